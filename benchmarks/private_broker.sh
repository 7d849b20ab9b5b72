#!/usr/bin/env bash
# A RabbitMQ node of the benchmarks' own (same rabbitmq-server package as the
# shared one, 127.0.0.1:5673), so that fault-injection tests that restart the
# shared broker or shorten its consumer_timeout cannot touch the figures.
#
#   bash benchmarks/private_broker.sh start   # then: source the printed exports
#   bash benchmarks/private_broker.sh stop
#
# Needs root (the node runs as the rabbitmq user, like the packaged one).
set -euo pipefail
NODE=${BENCH_RABBITMQ_NODE:-orxbench@localhost}
BASE=${BENCH_RABBITMQ_BASE:-/tmp/orxbench-rmq}
PORT=${BENCH_BROKER_PORT:-5673}

case "${1:-}" in
start)
    mkdir -p "$BASE/mnesia" "$BASE/log"
    echo "listeners.tcp.local = 127.0.0.1:$PORT" > "$BASE/rabbitmq.conf"
    echo "[]." > "$BASE/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$BASE"
    cd /var/lib/rabbitmq
    su rabbitmq -s /bin/sh -c "env HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=$NODE \
        RABBITMQ_DIST_PORT=$((PORT + 20000)) RABBITMQ_MNESIA_BASE=$BASE/mnesia \
        RABBITMQ_LOG_BASE=$BASE/log RABBITMQ_PID_FILE=$BASE/pid \
        RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/enabled_plugins \
        RABBITMQ_CONFIG_FILE=$BASE/rabbitmq.conf ERL_EPMD_ADDRESS=127.0.0.1 \
        rabbitmq-server -detached"
    rabbitmqctl -n "$NODE" wait "$BASE/pid" --timeout 60 >/dev/null
    echo "export BENCH_BROKER_PORT=$PORT BENCH_RABBITMQ_NODE=$NODE" \
        "BENCH_RABBITMQ_LOG=$BASE/log/$NODE.log"
    ;;
stop)
    rabbitmqctl -n "$NODE" stop "$BASE/pid"
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
