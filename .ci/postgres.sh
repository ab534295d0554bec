# Sourced by .ci/run: a throwaway PostgreSQL on loopback for the tests that need a real database server.
# Installs Debian's package when it is missing, starts a cluster in a temporary folder on a free port, exports
# CIFAKE_TEST_POSTGRES_URL, and stops the server by its PID when the calling script exits. Where any step is not
# possible (no apt, no root), it says so and the tests that need the server are skipped with that reason.

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

start_test_postgres() {
    local bin
    bin="$(_pg_bin)"
    if [ -z "$bin" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "postgres: installing Debian's postgresql package" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1; } \
            || true
        bin="$(_pg_bin)"
    fi
    if [ -z "$bin" ]; then
        echo "postgres: not available (no PostgreSQL binaries, and no root apt to install them); its tests skip" >&2
        return 0
    fi
    PG_DIR="$(mktemp -d /tmp/cifake-pg.XXXXXX)"
    local port run_as=()
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres "$PG_DIR"
        run_as=(runuser -u postgres --)
    fi
    "${run_as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U postgres -A trust --no-sync >"$PG_DIR/initdb.log" 2>&1 \
        && "${run_as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c fsync=off" start >/dev/null \
        && "${run_as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres cifake_test \
        || { echo "postgres: could not start (logs in $PG_DIR); its tests skip" >&2; return 0; }
    PG_PID="$(head -n 1 "$PG_DIR/data/postmaster.pid")"
    export CIFAKE_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/cifake_test"
    echo "postgres: PID $PG_PID on 127.0.0.1:$port ($CIFAKE_TEST_POSTGRES_URL)" >&2
    trap stop_test_postgres EXIT
}

stop_test_postgres() {
    if [ -n "${PG_PID:-}" ]; then
        kill -INT "$PG_PID" 2>/dev/null || true  # PostgreSQL's fast shutdown
        for _ in $(seq 50); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    [ -n "${PG_DIR:-}" ] && rm -rf "$PG_DIR"
}
