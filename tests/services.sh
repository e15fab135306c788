#!/usr/bin/env bash
# Start and stop the real services the test-suite and the benchmarks need:
# a throwaway PostgreSQL cluster and a Redis server, both on loopback.
#
#   bash tests/services.sh run -- CMD ARGS...   start what is missing, export the env,
#                                               run CMD, stop only what this call started,
#                                               exit with CMD's exit code
#   bash tests/services.sh start                start what is missing and leave it running;
#                                               prints `export ...` lines on stdout, so
#                                               `eval "$(bash tests/services.sh start)"` works
#   bash tests/services.sh stop                 stop what `start` started
#   bash tests/services.sh env                  print the `export ...` lines
#
# Fault injection (tests/test_faults.py), only on services this script started:
#   bash tests/services.sh redis-stop [--nosave]  stop Redis; by default a snapshot is
#                                                 saved first, so redis-start brings the
#                                                 queues back (--nosave: data is lost)
#   bash tests/services.sh redis-start            start Redis again, same port, same
#                                                 command line, loading that snapshot
#   bash tests/services.sh pg-restart             pg_ctl restart -m fast of the cluster
#                                                 named by MAILER_TEST_PG_DATA
#
# A service whose port already answers is reused and never stopped by this script.
# Missing binaries (redis-server, PostgreSQL's initdb) are installed with apt-get.
#
# Environment:
#   MAILER_TEST_PG_PORT     (default 5439)
#   MAILER_TEST_REDIS_PORT  (default 6390)
#   MAILER_TEST_BROWSER=1   `run` also installs Chromium (/usr/bin/chromium) for
#                           tests/test_browser.py when it is missing (`make test` sets it)
#   (`stop` must see the same ports as `start`.)
#
# Exported to CMD (and printed by `env` / `start`):
#   DATABASE_URL=postgres://mailer:mailer@127.0.0.1:$PG_PORT/mailer
#   MAILER_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
#   CELERY_BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0
#   MAILER_TEST_PG_PORT, MAILER_TEST_REDIS_PORT   the ports in use
#   MAILER_TEST_PG_DATA, MAILER_TEST_PG_LOG       the cluster's data directory and server
#                                                 log, only when this script started it
#
# State lives in var/test-services/ (git-ignored). The PostgreSQL cluster is re-created
# from scratch every time this script has to start PostgreSQL itself.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR="$ROOT/var/test-services"

PG_PORT=${MAILER_TEST_PG_PORT:-5439}
REDIS_PORT=${MAILER_TEST_REDIS_PORT:-6390}
HOST=127.0.0.1

# Non-default ports get their own directories, so runs on different ports never
# share (or wipe) each other's state.
PG_SUFFIX=""; [ "$PG_PORT" = 5439 ] || PG_SUFFIX="-$PG_PORT"
REDIS_SUFFIX=""; [ "$REDIS_PORT" = 6390 ] || REDIS_SUFFIX="-$REDIS_PORT"

PG_DATA="$STATE_DIR/pg$PG_SUFFIX"
PG_LOG="$STATE_DIR/postgresql$PG_SUFFIX.log"
PG_OWNED="$STATE_DIR/pg$PG_SUFFIX.owned"          # marker: `start` started PostgreSQL
REDIS_DIR="$STATE_DIR/redis$REDIS_SUFFIX"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
REDIS_OWNED="$STATE_DIR/redis$REDIS_SUFFIX.owned"  # marker: `start` started Redis

DB_NAME=mailer
DB_USER=mailer
DB_PASSWORD=mailer

START_TIMEOUT=${MAILER_TEST_SERVICES_TIMEOUT:-60}

PG_BIN=""
PG_SOCK=""

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

usage() {
    sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------------------- helpers

# Run a command with root privileges (directly when root, else through sudo).
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || die "'$*' is missing and apt-get is not available: install it by hand"
    log "installing Debian package(s): $*"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
            || die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
            || die "apt-get install $* failed"
    fi
}

# Run a PostgreSQL server tool as the cluster owner: `postgres` when we are root
# (the server refuses to run as root), the current user otherwise.
as_pg() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u postgres -- "$@")
        else
            local cmd
            cmd=$(printf '%q ' "$@")
            (cd / && su postgres -s /bin/sh -c "$cmd")
        fi
    else
        "$@"
    fi
}

find_pg_bin() {
    local dir best=""
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && best=$(printf '%s\n%s\n' "$best" "$dir" | sed '/^$/d' | sort -V | tail -n1)
    done
    if [ -z "$best" ] && command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        [ -n "$dir" ] && [ -x "$dir/initdb" ] && best=$dir
    fi
    if [ -z "$best" ] && command -v initdb >/dev/null 2>&1; then
        best=$(dirname "$(command -v initdb)")
    fi
    printf '%s' "$best"
}

ensure_pg_bin() {
    PG_BIN=$(find_pg_bin)
    if [ -z "$PG_BIN" ]; then
        apt_install postgresql
        PG_BIN=$(find_pg_bin)
        [ -n "$PG_BIN" ] || die "PostgreSQL installed but initdb not found under /usr/lib/postgresql/*/bin"
    fi
    if is_root; then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to own the cluster"
    fi
}

ensure_redis_bin() {
    if ! command -v redis-server >/dev/null 2>&1; then
        apt_install redis-server
        hash -r
        command -v redis-server >/dev/null 2>&1 || die "redis-server installed but not on PATH"
    fi
}

ensure_chromium() {
    if [ ! -x /usr/bin/chromium ]; then
        apt_install chromium
        [ -x /usr/bin/chromium ] || die "chromium installed but /usr/bin/chromium is missing"
    fi
}

pg_isready_cmd() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready "$@"
    elif [ -n "$PG_BIN" ] && [ -x "$PG_BIN/pg_isready" ]; then
        "$PG_BIN/pg_isready" "$@"
    else
        local bin
        bin=$(find_pg_bin)
        [ -n "$bin" ] || return 2
        "$bin/pg_isready" "$@"
    fi
}

pg_answers() {
    pg_isready_cmd -q -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

redis_answers() {
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
    else
        # Plain RESP over bash's /dev/tcp.
        (
            exec 3<>"/dev/tcp/$HOST/$REDIS_PORT" || exit 1
            printf 'PING\r\n' >&3
            IFS= read -r -t 3 reply <&3 || exit 1
            [ "${reply%$'\r'}" = "+PONG" ]
        ) 2>/dev/null
    fi
}

wait_for() {  # wait_for DESCRIPTION CHECK-FUNCTION
    local what=$1 check=$2 i
    for ((i = 0; i < START_TIMEOUT * 4; i++)); do
        "$check" && return 0
        sleep 0.25
    done
    return 1
}

# Is PID alive and running a program whose name contains NAME?
pid_is() {
    local pid=$1 name=$2
    [ -n "$pid" ] && [ "$pid" -gt 0 ] 2>/dev/null || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [ -r "/proc/$pid/comm" ] || return 0
    # A zombie (dead, not yet reaped) is not running anything.
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ] || return 1
    grep -q "$name" "/proc/$pid/comm" "/proc/$pid/cmdline" 2>/dev/null
}

prepare_state_dir() {
    mkdir -p "$STATE_DIR"
    if is_root; then
        # The postgres user must be able to traverse down to its data directory.
        chmod o+x "$ROOT/var" "$STATE_DIR"
        local dir=$STATE_DIR
        while [ "$dir" != "/" ]; do
            if ! as_pg test -x "$dir" 2>/dev/null; then
                die "the 'postgres' user cannot enter $dir, so it cannot reach $PG_DATA; \
run 'chmod o+x $dir' or clone the repository somewhere world-traversable"
            fi
            dir=$(dirname "$dir")
        done
    fi
}

choose_socket_dir() {
    # Unix socket paths are limited to ~107 bytes: "<dir>/.s.PGSQL.<port>".
    local dir="$STATE_DIR/sock"
    if [ $((${#dir} + 16)) -gt 100 ]; then
        dir="/tmp/mailer-test-pg.$PG_PORT"
    fi
    PG_SOCK=$dir
}

# ---------------------------------------------------------------------------- PostgreSQL

stop_stale_postgres() {
    [ -f "$PG_DATA/postmaster.pid" ] || return 0
    local pid
    pid=$(head -n1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)
    if pid_is "$pid" postgres; then
        log "PostgreSQL from a previous run (pid $pid) is not answering on $PG_PORT; stopping it"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" stop -m immediate -w -t 20 >/dev/null 2>&1 \
            || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PG_DATA/postmaster.pid"
}

init_postgres_cluster() {
    stop_stale_postgres
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA" "$PG_SOCK"
    : >"$PG_LOG"
    if is_root; then
        chown postgres:postgres "$PG_DATA" "$PG_SOCK" "$PG_LOG"
    fi
    chmod 700 "$PG_DATA"

    local locale_opt=(--no-locale)
    if locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$'; then
        locale_opt=(--locale=C.UTF-8)
    fi
    log "initdb $PG_DATA"
    if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" --auth=trust -U postgres --encoding=UTF8 \
            "${locale_opt[@]}" >>"$PG_LOG" 2>&1; then
        tail -n 30 "$PG_LOG" >&2 || true
        die "initdb failed (log: $PG_LOG)"
    fi

    # A disposable test cluster: durability off, speed on.
    as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null <<EOF

# --- tests/services.sh: throwaway test cluster ---
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

start_postgres() {
    ensure_pg_bin
    prepare_state_dir
    choose_socket_dir
    init_postgres_cluster
    log "starting PostgreSQL $("$PG_BIN/postgres" --version | sed -n 's/^[^0-9]*\([0-9][0-9.]*\).*/\1/p') on $HOST:$PG_PORT"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$START_TIMEOUT" start >/dev/null 2>&1 \
            || ! wait_for PostgreSQL pg_answers; then
        log "PostgreSQL failed to start; last lines of $PG_LOG:"
        tail -n 30 "$PG_LOG" >&2 || true
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" stop -m immediate >/dev/null 2>&1 || true
        die "PostgreSQL did not start on $HOST:$PG_PORT"
    fi
}

psql_admin() {
    local psql=psql
    [ -n "$PG_BIN" ] && [ -x "$PG_BIN/psql" ] && psql="$PG_BIN/psql"
    command -v "$psql" >/dev/null 2>&1 || psql="$(find_pg_bin)/psql"
    PGCONNECT_TIMEOUT=5 as_pg "$psql" -X -q -w -v ON_ERROR_STOP=1 \
        -h "$HOST" -p "$PG_PORT" -U postgres -d postgres "$@"
}

ensure_database() {
    psql_admin >/dev/null <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
        CREATE ROLE $DB_USER LOGIN SUPERUSER CREATEDB PASSWORD '$DB_PASSWORD';
    ELSE
        ALTER ROLE $DB_USER LOGIN SUPERUSER CREATEDB PASSWORD '$DB_PASSWORD';
    END IF;
END
\$\$;
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')
\gexec
SQL
}

stop_postgres() {
    [ -d "$PG_DATA" ] || return 0
    [ -n "$PG_BIN" ] || PG_BIN=$(find_pg_bin)
    [ -n "$PG_BIN" ] || return 0
    if [ -f "$PG_DATA/postmaster.pid" ]; then
        log "stopping PostgreSQL on $HOST:$PG_PORT"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" stop -m fast -w -t 30 >/dev/null 2>&1 \
            || as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" stop -m immediate -w -t 10 >/dev/null 2>&1 \
            || log "could not stop PostgreSQL cleanly (data dir $PG_DATA)"
    fi
}

# ---------------------------------------------------------------------------- Redis

stop_stale_redis() {
    [ -f "$REDIS_PID" ] || return 0
    local pid
    pid=$(cat "$REDIS_PID" 2>/dev/null || true)
    if pid_is "$pid" redis; then
        log "Redis from a previous run (pid $pid) is not answering on $REDIS_PORT; stopping it"
        kill "$pid" 2>/dev/null || true
        sleep 1
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$REDIS_PID"
}

start_redis() {  # start_redis [keep]: keep loads the snapshot redis-stop saved
    ensure_redis_bin
    mkdir -p "$REDIS_DIR"
    stop_stale_redis
    if [ "${1:-}" = keep ]; then
        : >>"$REDIS_LOG"
    else
        rm -f "$REDIS_DIR/dump.rdb"   # a fresh start never sees a previous run's queues
        : >"$REDIS_LOG"
    fi
    log "starting Redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on $HOST:$REDIS_PORT"
    if ! redis-server --bind "$HOST" --port "$REDIS_PORT" --save '' --appendonly no \
            --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
            >/dev/null 2>&1 \
            || ! wait_for Redis redis_answers; then
        log "Redis failed to start; last lines of $REDIS_LOG:"
        tail -n 30 "$REDIS_LOG" >&2 || true
        stop_redis
        die "Redis did not start on $HOST:$REDIS_PORT"
    fi
}

stop_redis() {
    local pid="" i
    [ -f "$REDIS_PID" ] && pid=$(cat "$REDIS_PID" 2>/dev/null || true)
    if pid_is "$pid" redis; then
        log "stopping Redis on $HOST:$REDIS_PORT (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    elif [ -n "$pid" ] && command -v redis-cli >/dev/null 2>&1 && redis_answers; then
        # Pid file unusable but our Redis still answers: ask it to go.
        redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    fi
    rm -f "$REDIS_PID"
}

# ---------------------------------------------------------------------------- orchestration

STARTED_PG=0
STARTED_REDIS=0

ensure_services() {
    mkdir -p "$STATE_DIR"

    if pg_answers; then
        log "PostgreSQL already answers on $HOST:$PG_PORT; reusing it"
    else
        STARTED_PG=1   # set first: an interrupted start is cleaned up too
        start_postgres
    fi
    if ! ensure_database; then
        if [ "$STARTED_PG" = 1 ]; then
            die "could not create role/database '$DB_NAME' (log: $PG_LOG)"
        fi
        log "WARNING: could not create role/database '$DB_NAME' on the existing server; continuing"
    fi

    if redis_answers; then
        log "Redis already answers on $HOST:$REDIS_PORT; reusing it"
    else
        STARTED_REDIS=1   # set first: an interrupted start is cleaned up too
        start_redis
    fi
}

print_env() {
    local redis_url="redis://$HOST:$REDIS_PORT/0"
    printf 'export DATABASE_URL=%s\n' "postgres://$DB_USER:$DB_PASSWORD@$HOST:$PG_PORT/$DB_NAME"
    printf 'export MAILER_TEST_REDIS_URL=%s\n' "$redis_url"
    printf 'export CELERY_BROKER_URL=%s\n' "$redis_url"
    printf 'export MAILER_TEST_PG_PORT=%s\n' "$PG_PORT"
    printf 'export MAILER_TEST_REDIS_PORT=%s\n' "$REDIS_PORT"
    # Only a cluster this script started may be restarted by the fault tests.
    if [ "$STARTED_PG" = 1 ] || [ -f "$PG_OWNED" ]; then
        printf 'export MAILER_TEST_PG_DATA=%q\n' "$PG_DATA"
        printf 'export MAILER_TEST_PG_LOG=%q\n' "$PG_LOG"
    fi
}

export_env() {
    eval "$(print_env)"
}

cleanup_run() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    [ "$STARTED_REDIS" = 1 ] && stop_redis
    [ "$STARTED_PG" = 1 ] && stop_postgres
    exit "$rc"
}

cmd_run() {
    [ $# -gt 0 ] || die "usage: $0 run -- CMD [ARGS...]"
    trap cleanup_run EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    ensure_services
    [ "${MAILER_TEST_BROWSER:-0}" = 1 ] && ensure_chromium
    # A service we (re)started here supersedes a stale marker left by `start`.
    [ "$STARTED_PG" = 1 ] && rm -f "$PG_OWNED"
    [ "$STARTED_REDIS" = 1 ] && rm -f "$REDIS_OWNED"
    export_env
    log "running: $*"
    local rc=0
    "$@" || rc=$?
    exit "$rc"
}

cmd_start() {
    # If startup fails half-way, stop what we already started.
    trap cleanup_run EXIT
    ensure_services
    trap - EXIT
    [ "$STARTED_PG" = 1 ] && echo "$PG_PORT" >"$PG_OWNED"
    [ "$STARTED_REDIS" = 1 ] && echo "$REDIS_PORT" >"$REDIS_OWNED"
    log "services running; stop them with: bash tests/services.sh stop"
    print_env
}

cmd_stop() {
    local any=0
    if [ -f "$REDIS_OWNED" ]; then
        stop_redis
        rm -f "$REDIS_OWNED"
        any=1
    fi
    if [ -f "$PG_OWNED" ]; then
        stop_postgres
        rm -f "$PG_OWNED"
        any=1
    fi
    [ "$any" = 1 ] || log "nothing to stop (no services were started by 'start')"
}

# ---------------------------------------------------------------------------- faults

redis_is_ours() {
    local pid=""
    [ -f "$REDIS_PID" ] && pid=$(cat "$REDIS_PID" 2>/dev/null || true)
    pid_is "$pid" redis
}

cmd_redis_stop() {
    redis_is_ours || die "Redis on $HOST:$REDIS_PORT was not started by this script \
(no live pid in $REDIS_PID); refusing to stop it"
    local pid
    pid=$(cat "$REDIS_PID")
    if [ "${1:-}" = --nosave ]; then
        rm -f "$REDIS_DIR/dump.rdb"
        stop_redis
    else
        # A clean shutdown that keeps the data, as a Redis with persistence does:
        # SHUTDOWN SAVE writes a snapshot even though the server runs with --save ''.
        if command -v redis-cli >/dev/null 2>&1; then
            timeout 30 redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown save >/dev/null 2>&1 || true
        else
            (
                exec 3<>"/dev/tcp/$HOST/$REDIS_PORT" || exit 1
                printf 'SHUTDOWN SAVE\r\n' >&3
                IFS= read -r -t 30 _ <&3 || true
            ) 2>/dev/null || true
        fi
        local i
        for ((i = 0; i < 120; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && die "Redis (pid $pid) did not shut down"
        [ -f "$REDIS_DIR/dump.rdb" ] || die "Redis shut down without a snapshot in $REDIS_DIR"
        rm -f "$REDIS_PID"
    fi
    log "Redis on $HOST:$REDIS_PORT stopped"
}

cmd_redis_start() {
    redis_answers && die "something already answers on $HOST:$REDIS_PORT"
    start_redis keep
}

cmd_pg_restart() {
    local data=${MAILER_TEST_PG_DATA:-} pg_log=${MAILER_TEST_PG_LOG:-/dev/null}
    [ -n "$data" ] || die "MAILER_TEST_PG_DATA is not set: only a cluster started by \
'tests/services.sh run' or 'start' can be restarted"
    as_pg test -f "$data/postmaster.pid" || die "no running cluster in $data"
    ensure_pg_bin
    log "pg_ctl restart -m fast ($data)"
    as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$pg_log" -w -t "$START_TIMEOUT" restart -m fast \
        >/dev/null || die "pg_ctl restart failed (log: $pg_log)"
    wait_for PostgreSQL pg_answers || die "PostgreSQL does not answer after the restart"
}

main() {
    local action=${1:-}
    [ $# -gt 0 ] && shift
    case "$action" in
        run)
            [ "${1:-}" = "--" ] && shift
            cmd_run "$@"
            ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        env) print_env ;;
        redis-stop) cmd_redis_stop "$@" ;;
        redis-start) cmd_redis_start ;;
        pg-restart) cmd_pg_restart ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
