#!/bin/sh
# Install the unixODBC driver manager and the Debian ODBC drivers that the SQL
# Server code path (aioodbc) is tested through: no SQL Server can run here, so
# tests/sql drive the aioodbc connector against MariaDB and PostgreSQL via their
# own ODBC drivers. Idempotent; called by CI before tests/sql.
set -eu
PACKAGES="unixodbc odbc-mariadb odbc-postgresql"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
odbcinst -q -d
