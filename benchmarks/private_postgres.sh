#!/usr/bin/env bash
# A PostgreSQL server of the benchmarks' own (same binaries as the shared one,
# 127.0.0.1:5449 by default), so that fault-injection tests that restart the
# shared database cannot touch the figures.
#
#   bash benchmarks/private_postgres.sh start   # then: source the printed export
#   bash benchmarks/private_postgres.sh stop
#
# Needs root (the server runs as the postgres user, like the packaged one).
set -euo pipefail
BASE=${BENCH_PG_BASE:-/tmp/orxbench-pg}
PORT=${BENCH_PG_PORT:-5449}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

case "${1:-}" in
start)
    if [ ! -f "$BASE/data/PG_VERSION" ]; then
        mkdir -p "$BASE"
        chown postgres:postgres "$BASE"
        su postgres -s /bin/sh -c "$BIN/initdb -D $BASE/data -A trust -U postgres >/dev/null"
    fi
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D $BASE/data -l $BASE/log -w start \
        -o '-c listen_addresses=127.0.0.1 -p $PORT -k $BASE -c max_connections=200 \
        -c shared_buffers=256MB -c fsync=on'" >/dev/null
    su postgres -s /bin/sh -c "$BIN/createdb -h 127.0.0.1 -p $PORT -U postgres test" 2>/dev/null || true
    echo "export BENCH_PG_ADMIN=postgresql://postgres@127.0.0.1:$PORT/test"
    ;;
stop)
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D $BASE/data -m fast -w stop" >/dev/null
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
