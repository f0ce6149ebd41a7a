# Start a throw-away PostgreSQL server on a free loopback port for the tests, and stop it on
# exit. Sets CERTWRIGHT_TEST_POSTGRES_URL. Source this file, then call start_test_postgres.
start_test_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$bin" ]]; then
    echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
    return 1
  fi
  PG_TEST_DIR=$(mktemp -d /tmp/certwright-pg.XXXXXX)
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
  local run=()
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres "$PG_TEST_DIR"
    run=(runuser -u postgres --)
  fi
  "${run[@]}" "$bin/initdb" -D "$PG_TEST_DIR/data" -A trust -U postgres >"$PG_TEST_DIR/initdb.log" 2>&1
  "${run[@]}" "$bin/pg_ctl" -D "$PG_TEST_DIR/data" -l "$PG_TEST_DIR/server.log" -w \
    -o "-p $port -k $PG_TEST_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
  PG_TEST_RUN=("${run[@]}")
  PG_TEST_BIN=$bin
  export CERTWRIGHT_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  trap stop_test_postgres EXIT
}

stop_test_postgres() {
  if [[ -n "${PG_TEST_DIR:-}" && -d "$PG_TEST_DIR/data" ]]; then
    "${PG_TEST_RUN[@]}" "$PG_TEST_BIN/pg_ctl" -D "$PG_TEST_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_TEST_DIR"
  fi
}
