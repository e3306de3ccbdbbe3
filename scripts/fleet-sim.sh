#!/usr/bin/env bash
# Fleet simulator benchmark (issue 17 item 3): thousands of simulated agents
# (`polaris-bench fleet`, each a real queue connection answering signed results like
# polaris-agent) behind S polarisd shards and D dispatchers on SQLite or PostgreSQL; for a
# job targeted at all N hosts it measures the time until every host answered (p50/p99 over
# rounds), jobs/s with several fan-outs in flight, and each process's CPU and peak RSS.
#
#   scripts/fleet-sim.sh                         # the whole matrix
#   HOSTS=1000 SHARDS=1 DBS=sqlite scripts/fleet-sim.sh
#   SKIP_BUILD=1 HOSTS="1000 5000" ROUNDS=5 scripts/fleet-sim.sh
#
# Matrix: N in HOSTS x shards in SHARDS x DBS x dispatchers in DISPATCHERS; two or more
# dispatchers only with postgres (SQLite: one dispatcher per database file). A combination
# that cannot run here is skipped and listed as such (a shard needs RLIMIT_NOFILE above its
# connections; several shards need a dispatcher whose --queue takes a comma-separated list).
# Every process runs on loopback with a fresh data directory (and a fresh PostgreSQL server)
# and is stopped by its pid.
#
# Results: target/fleet/results.jsonl (one JSON line per run), target/fleet-results.md (the
# table, also printed), logs in target/fleet/run-*/.
#
# Settings (environment variables; defaults in brackets):
#   HOSTS ["1000 5000 20000"]  SHARDS ["1 3"]  DBS ["sqlite postgres"]  DISPATCHERS ["1 2"]
#   ROUNDS [10/5/3]  WARMUP_ROUNDS [1]  timed fan-outs one at a time (p50/p99), untimed ones
#                    first; by default 10 up to 1,000 hosts, 5 up to 5,000, 3 above
#   FANOUTS [6/4/3]  IN_FLIGHT [3/2/2]  throughput phase: fan-outs, and how many in flight
#   COMMAND_MS [0] JITTER_MS [0] FAILURE_RATE [0] OUTPUT_BYTES [0]   simulated commands
#   RESERVE_TIMEOUT [1]   the agents' reserve-with-timeout (polaris-agent: 1; 0: plain reserve)
#   POLL_MS [50]          least ms between the driver's polls of the job listing (2% of a fan-out's age)
#   SIM_PER_PROC [10000]  most hosts one simulator process holds (one connection each)
#   SIM_THREADS [1]       event-loop threads per simulator process
#   POLARISD_FLAGS [""]   extra polarisd flags (default: -b DIR, its default group fsync)
#   PG_BIN [/usr/lib/postgresql/15/bin]   PG_OPTS [""] extra `postgres -c` settings, e.g.
#                         "-c synchronous_commit=off" (default: PostgreSQL's durable defaults,
#                         as the dispatcher's SQLite runs synchronous=FULL)
#   PG_ROOT [/tmp]        where the throwaway PostgreSQL directory goes (nobody must reach it)
#   SHARDED [auto]        1/0: whether the dispatcher takes several --queue addresses
#   PAUSE_FILE [""]       before each configuration, wait while this file exists (a shared
#                         machine's "someone else is benchmarking" flag)
#   DATA_ROOT [target/fleet]  where the queues' and dispatchers' data directories go (e.g.
#                         /dev/shm/fleet: on tmpfs an fsync costs nothing, which shows what the
#                         disk's sync latency costs; PostgreSQL's: PG_ROOT)
#   SKIP_BUILD [0]  KEEP_DATA [0]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [[ $# -gt 0 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
: "${HOSTS:=1000 5000 20000}" "${SHARDS:=1 3}" "${DBS:=sqlite postgres}" "${DISPATCHERS:=1 2}"
: "${ROUNDS:=}" "${WARMUP_ROUNDS:=1}" "${FANOUTS:=}" "${IN_FLIGHT:=}"
: "${COMMAND_MS:=0}" "${JITTER_MS:=0}" "${FAILURE_RATE:=0}" "${OUTPUT_BYTES:=0}" "${RESERVE_TIMEOUT:=1}"
: "${POLL_MS:=50}" "${SIM_PER_PROC:=10000}" "${SIM_THREADS:=1}" "${POLARISD_FLAGS:=}"
: "${PG_BIN:=/usr/lib/postgresql/15/bin}" "${PG_OPTS:=}" "${PG_ROOT:=/tmp}" "${SHARDED:=auto}"
: "${SKIP_BUILD:=0}" "${KEEP_DATA:=0}" "${PAUSE_FILE:=}"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUTDIR="$TARGET/fleet"
RESULTS="$OUTDIR/results.jsonl"
: "${DATA_ROOT:=$OUTDIR}"
TABLE="$TARGET/fleet-results.md"
POLARISD="$TARGET/release/polarisd"
DISPATCH="$TARGET/release/polaris-dispatch"
BENCH="$TARGET/release/polaris-bench"

log() { printf '[fleet %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building polarisd, polaris-dispatch and polaris-bench (release)"
    cargo build --release --quiet -p polarisd -p polaris-dispatch -p polaris-bench
fi
for bin in "$POLARISD" "$DISPATCH" "$BENCH"; do
    [[ -x "$bin" ]] || die "$bin missing; run cargo build --release (or drop SKIP_BUILD=1)"
done
if [[ "$SHARDED" == auto ]]; then
    # The shard work makes --queue a comma-separated list; its help says so.
    help=$("$DISPATCH" --help)
    if grep -A3 -- '--queue <' <<<"$help" | grep -qiE 'comma|shard'; then SHARDED=1; else SHARDED=0; fi
fi
NOFILE=$(ulimit -Hn)
[[ "$NOFILE" == unlimited ]] && NOFILE=1048576
ulimit -n "$NOFILE"

mkdir -p "$OUTDIR"
: >"$RESULTS"
SECRET_FILE="$OUTDIR/secret"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE"

# ----- processes: every one started here is remembered by pid and stopped by pid -------

PIDS=()       # pids of the running configuration, in start order
PG_DIR=""     # the throwaway PostgreSQL directory, when one runs

# Whether pid runs (an exited child not yet reaped is a zombie: not running).
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ "$state" != Z* ]]
}

stop_pid() { # pid signal: signal, wait up to 15 s, then SIGKILL
    local pid=$1 sig=$2 i
    alive "$pid" || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "warning: pid $pid did not stop on SIG$sig within 15 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_all() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        # PostgreSQL's fast shutdown is SIGINT (it ends its own backends).
        if [[ "${PIDS[i]}" == pg:* ]]; then stop_pid "${PIDS[i]#pg:}" INT; else stop_pid "${PIDS[i]}" TERM; fi
    done
    PIDS=()
    wait 2>/dev/null || true
    if [[ -n "$PG_DIR" ]]; then rm -rf "$PG_DIR"; PG_DIR=""; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# Waits until `cmd...` succeeds, for up to $1 seconds; fails if pid $2 died meanwhile.
wait_for() {
    local secs=$1 pid=$2 i
    shift 2
    for ((i = 0; i < secs * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        alive "$pid" || return 1
        sleep 0.1
    done
    return 1
}

http_up() { [[ $(curl -s -o /dev/null -w '%{http_code}' "$1/v1/jobs?limit=1") == 200 ]]; }

# Starts a throwaway PostgreSQL server (as nobody: it refuses root) with database `fleet`;
# sets PG_URL and adds its pid.
start_postgres() {
    local dir=$1 port
    [[ -x "$PG_BIN/postgres" && -x "$PG_BIN/initdb" ]] || { log "no PostgreSQL in $PG_BIN"; return 1; }
    PG_DIR=$(mktemp -d "$PG_ROOT/fleet-pg.XXXXXX")
    chown 65534:65534 "$PG_DIR"
    local as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
    "${as_nobody[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U polaris --auth=trust -E UTF8 --no-sync \
        >"$dir/initdb.log" 2>&1 || { log "initdb failed: $(tail -3 "$dir/initdb.log")"; return 1; }
    port=$("$BENCH" free-port)
    # shellcheck disable=SC2086 # PG_OPTS is a list of -c settings
    "${as_nobody[@]}" "$PG_BIN/postgres" -D "$PG_DIR/data" -k "$PG_DIR" -h 127.0.0.1 -p "$port" \
        -c max_connections=200 $PG_OPTS >"$dir/postgres.log" 2>&1 &
    local pid=$!
    PIDS+=("pg:$pid")
    PG_PID=$pid
    wait_for 60 "$pid" "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" || { log "PostgreSQL did not start"; return 1; }
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U polaris fleet || return 1
    PG_URL="postgres://polaris@127.0.0.1:$port/fleet"
}

SKIPPED=()
FAILED=()

# One configuration: hosts shards dispatchers db.
run_config() {
    local n=$1 s=$2 d=$3 db=$4 i
    local name="run-$n-${s}shard-${d}disp-$db"
    local dir="$OUTDIR/$name" data="$DATA_ROOT/$name"
    rm -rf "$dir" "$data"
    mkdir -p "$dir" "$data"
    log "== $n hosts, $s shard(s), $d dispatcher(s), $db"

    local procs=() queues=()
    for ((i = 1; i <= s; i++)); do
        local port
        port=$("$BENCH" free-port)
        # shellcheck disable=SC2086 # POLARISD_FLAGS is a list of flags
        "$POLARISD" -l 127.0.0.1 -p "$port" -b "$data/q$i" $POLARISD_FLAGS >"$dir/polarisd-$i.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        procs+=(--proc "polarisd-$i=$pid")
        queues+=("127.0.0.1:$port")
        "$BENCH" ping --addr "127.0.0.1:$port" --timeout 30 >/dev/null || { log "polarisd $i did not start"; return 1; }
    done
    local queue_list
    queue_list=$(IFS=,; echo "${queues[*]}")

    local store=()
    if [[ "$db" == postgres ]]; then
        start_postgres "$dir" || return 1
        procs+=(--proc "postgres=$PG_PID")
    fi
    local dispatchers=()
    for ((i = 1; i <= d; i++)); do
        local port url
        port=$("$BENCH" free-port)
        url="http://127.0.0.1:$port"
        if [[ "$db" == postgres ]]; then store=(--database "$PG_URL"); else store=(--data "$data/dispatch-$i"); fi
        "$DISPATCH" --listen "127.0.0.1:$port" --queue "$queue_list" "${store[@]}" --secret-file "$SECRET_FILE" \
            >"$dir/dispatch-$i.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        procs+=(--proc "dispatch-$i=$pid")
        dispatchers+=(--dispatch "$url")
        wait_for 60 "$pid" http_up "$url" || { log "dispatcher $i did not start: $(tail -3 "$dir/dispatch-$i.log")"; return 1; }
    done

    local common=(--hosts "$n" "${dispatchers[@]}" --queue "${queues[0]}" --secret-file "$SECRET_FILE"
        --command-ms "$COMMAND_MS" --jitter-ms "$JITTER_MS" --failure-rate "$FAILURE_RATE"
        --output-bytes "$OUTPUT_BYTES" --reserve-timeout "$RESERVE_TIMEOUT" --threads "$SIM_THREADS")
    # Simulator processes: the driver holds the first SIM_PER_PROC hosts, helpers the rest.
    local first=$((SIM_PER_PROC + 1)) helper=2
    while ((first <= n)); do
        local count=$((n - first + 1))
        ((count > SIM_PER_PROC)) && count=$SIM_PER_PROC
        rm -f "$dir/sim-$helper.ready"
        "$BENCH" fleet "${common[@]}" --serve-only --first "$first" --count "$count" \
            --ready-file "$dir/sim-$helper.ready" >"$dir/sim-$helper.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        procs+=(--proc "sim-$helper=$pid")
        wait_for 900 "$pid" test -s "$dir/sim-$helper.ready" \
            || { log "simulator $helper did not get ready: $(tail -3 "$dir/sim-$helper.log")"; return 1; }
        first=$((first + count))
        helper=$((helper + 1))
    done
    local here=$n
    ((here > SIM_PER_PROC)) && here=$SIM_PER_PROC
    # Fewer rounds for bigger fleets: each takes longer.
    local rounds=10 fanouts=6 in_flight=3
    if ((n > 5000)); then rounds=3 fanouts=3 in_flight=2; elif ((n > 1000)); then rounds=5 fanouts=4 in_flight=2; fi
    local line
    line=$("$BENCH" fleet "${common[@]}" --first 1 --count "$here" "${procs[@]}" \
        --rounds "${ROUNDS:-$rounds}" --warmup-rounds "$WARMUP_ROUNDS" \
        --throughput-fanouts "${FANOUTS:-$fanouts}" --in-flight "${IN_FLIGHT:-$in_flight}" \
        --poll-ms "$POLL_MS" --shards "$s" --db "$db" --config "$name" 2>"$dir/sim-1.log") \
        || { log "the simulator failed: $(tail -5 "$dir/sim-1.log")"; return 1; }
    # A helper that died midway fails the run even if the driver did not notice.
    for ((i = 2; i < helper; i++)); do
        [[ -s "$dir/sim-$i.log" ]] && grep -q 'polaris-bench:' "$dir/sim-$i.log" \
            && { log "simulator $i failed: $(tail -3 "$dir/sim-$i.log")"; return 1; }
    done
    local seen
    seen=$(jq -r .queues_seen <<<"$line")
    if ((seen != s)); then
        log "the registrations named $seen queue(s), not the $s shards started (does the dispatcher assign shards?)"
        return 1
    fi
    echo "$line" >>"$RESULTS"
    log "$(jq -r '"p50 \(.p50_s)s p99 \(.p99_s)s, \(.jobs_per_s) jobs/s, \(.host_results_per_s|floor) host results/s"' <<<"$line")"
}

for db in $DBS; do
    for s in $SHARDS; do
        for d in $DISPATCHERS; do
            for n in $HOSTS; do
                label="N=$n, $s shard(s), $d dispatcher(s), $db"
                if [[ "$db" == sqlite && "$d" -gt 1 ]]; then
                    continue # one dispatcher per SQLite file: not a configuration
                fi
                if [[ "$s" -gt 1 && "$SHARDED" != 1 ]]; then
                    SKIPPED+=("$label: this polaris-dispatch takes one --queue address (no shards yet)")
                    continue
                fi
                per_shard=$(((n + s - 1) / s + 64))
                if ((per_shard > NOFILE)); then
                    SKIPPED+=("$label: a shard would hold ~$per_shard connections, above RLIMIT_NOFILE $NOFILE (hard limit)")
                    continue
                fi
                while [[ -n "$PAUSE_FILE" && -e "$PAUSE_FILE" ]]; do
                    log "waiting: $PAUSE_FILE exists"
                    sleep 30
                done
                if ! run_config "$n" "$s" "$d" "$db"; then
                    FAILED+=("$label (logs: $OUTDIR/run-$n-${s}shard-${d}disp-$db)")
                fi
                stop_all
                if [[ "$KEEP_DATA" != 1 ]]; then
                    rm -rf "$DATA_ROOT/run-$n-${s}shard-${d}disp-$db"/{q*,dispatch-*/}
                fi
            done
        done
    done
done

echo
echo "data: $DATA_ROOT; polarisd flags: -b DIR ${POLARISD_FLAGS:-(default fsync)}; dispatcher: SQLite synchronous=FULL or PostgreSQL ${PG_OPTS:-(defaults)}; $(nproc) CPUs; RLIMIT_NOFILE $NOFILE"
if [[ -s "$RESULTS" ]]; then
    "$BENCH" fleet-report --input "$RESULTS" --md "$TABLE"
fi
for s in "${SKIPPED[@]}"; do echo "- skipped: $s"; done
for f in "${FAILED[@]}"; do echo "- FAILED: $f"; done
if ((${#FAILED[@]} > 0)); then
    die "${#FAILED[@]} configuration(s) failed"
fi
[[ -s "$RESULTS" ]] || die "no configuration ran"
