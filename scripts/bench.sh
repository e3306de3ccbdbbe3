#!/usr/bin/env bash
# Side-by-side benchmark of Debian's beanstalkd and polarisd, in one run.
#
#   scripts/bench.sh                 # everything, ~10 minutes on 2 cores
#   scripts/bench.sh --quick         # 1 round, 1 s phases, 200,000-job fill: a smoke test
#   ROUNDS=5 DURATION=5 scripts/bench.sh
#   SCENARIOS="pipeline latency" CONFIGS=mem scripts/bench.sh
#
# Every scenario runs against beanstalkd and then polarisd with the same
# parameters, each on a freshly started server (fresh data directory) on
# loopback; rounds repeat the whole sequence and the report takes medians.
# Results: target/bench/results.jsonl (one JSON line per measurement) and
# target/bench-results.md (the Markdown table with ratios, also printed).
#
# Settings (environment variables; defaults in brackets):
#   ROUNDS [3]        rounds of every scenario (fill/restart: FILL_ROUNDS [1]; latency: LAT_ROUNDS [5])
#   DURATION [3]      measured seconds per phase;  WARMUP [0.5] seconds before it
#   CONNS [16] DEPTH [16] SIZE [100] TUBES [1]     load shape (see polaris-bench --help)
#   LAT_RATE [10000]  jobs/s offered in the latency scenario (LAT_RATE_FSYNC [1000] with -f 0)
#   FILL_JOBS [1000000]  jobs for the RSS and restart scenarios
#   IDLE [10000]      idle connections held open in the pipeline+idle scenario
#   SYNC_CONNS [32]   connections of the `sync` scenario (pipeline without pipelining: depth 1)
#   FLEET_CONNS [1000]  connections of the `fleet` scenario (`sync` with that many, as a fleet of
#                     agents and workers looks: each sends one command and waits)
#   SCENARIOS ["put-drain pipeline sync fleet latency idle fill"]   (fill includes restart for durable)
#   CONFIGS ["mem durable fsync-always"]   mem: no -b; durable: -b DIR (default fsync, -f 50);
#                                          fsync-always: -b DIR -f 0
#   FILL_CONFIGS ["mem durable"]  IDLE_CONFIGS ["mem"]
#   BEANSTALKD [/usr/bin/beanstalkd]  DATA_DIR [target/bench/data] (must be on a real disk)
#   SKIP_BUILD [0]    KEEP_DATA [0]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [[ "${1:-}" == "--quick" ]]; then
    : "${ROUNDS:=1}" "${LAT_ROUNDS:=1}" "${DURATION:=1}" "${WARMUP:=0.3}" "${FILL_JOBS:=200000}" "${IDLE:=2000}"
    shift
elif [[ $# -gt 0 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
: "${ROUNDS:=3}" "${FILL_ROUNDS:=1}" "${LAT_ROUNDS:=5}" "${DURATION:=3}" "${WARMUP:=0.5}"
: "${CONNS:=16}" "${DEPTH:=16}" "${SIZE:=100}" "${TUBES:=1}"
: "${LAT_RATE:=10000}" "${LAT_RATE_FSYNC:=1000}" "${FILL_JOBS:=1000000}" "${IDLE:=10000}"
: "${SCENARIOS:=put-drain pipeline sync fleet latency idle fill}" "${SYNC_CONNS:=32}" "${FLEET_CONNS:=1000}"
: "${CONFIGS:=mem durable fsync-always}"
: "${FILL_CONFIGS:=mem durable}" "${IDLE_CONFIGS:=mem}"
: "${BEANSTALKD:=/usr/bin/beanstalkd}" "${SKIP_BUILD:=0}" "${KEEP_DATA:=0}"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUTDIR="$TARGET/bench"
: "${DATA_DIR:=$OUTDIR/data}"
RESULTS="$OUTDIR/results.jsonl"
TABLE="$TARGET/bench-results.md"
POLARISD="$TARGET/release/polarisd"
BENCH="$TARGET/release/polaris-bench"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ----- prerequisites -------------------------------------------------------------

if [[ ! -x "$BEANSTALKD" ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing beanstalkd"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq beanstalkd >/dev/null
        systemctl stop beanstalkd 2>/dev/null || service beanstalkd stop 2>/dev/null || true
    fi
    [[ -x "$BEANSTALKD" ]] || die "$BEANSTALKD not found (apt-get install beanstalkd)"
fi
BVERSION=$("$BEANSTALKD" -v 2>&1 | head -1)
[[ "$BVERSION" == *1.12* ]] || log "warning: expected beanstalkd 1.12, found '$BVERSION'"

if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building polarisd and polaris-bench (release)"
    cargo build --release --quiet --bin polarisd --bin polaris-bench
fi
[[ -x "$POLARISD" && -x "$BENCH" ]] || die "release binaries missing; run cargo build --release"

# 10,000 idle connections need 10,000 descriptors in the server and in the client.
hard=$(ulimit -Hn)
if [[ "$hard" == unlimited ]]; then ulimit -n 1048576 2>/dev/null || ulimit -n 65536; else ulimit -n "$hard"; fi
nofile=$(ulimit -n)
if (( nofile < IDLE + 200 )); then
    log "WARNING: open-file limit is $nofile; holding $((nofile - 200)) idle connections instead of $IDLE"
    IDLE=$((nofile - 200))
fi

mkdir -p "$OUTDIR" "$DATA_DIR"
: > "$RESULTS"
WORK=$(mktemp -d "$DATA_DIR/run.XXXXXX")

# ----- servers ---------------------------------------------------------------------

SPID=""      # pid of the running server
SADDR=""     # its address
SNAME=""     # beanstalkd | polarisd
SLOG=""      # its log file

cleanup() {
    local rc=$?
    if [[ -n "$SPID" ]] && kill -0 "$SPID" 2>/dev/null; then
        kill -TERM "$SPID" 2>/dev/null || true
        wait "$SPID" 2>/dev/null || true
    fi
    [[ "$KEEP_DATA" == 1 ]] || rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# server_cmd NAME CONFIG DIR PORT: prints the command line, one word per line.
server_cmd() {
    local name=$1 cfg=$2 dir=$3 port=$4
    case $name in
        beanstalkd) printf '%s\n' "$BEANSTALKD" -l 127.0.0.1 -p "$port" ;;
        polarisd) printf '%s\n' "$POLARISD" -l 127.0.0.1 -p "$port" ;;
    esac
    case $cfg in
        mem) ;;
        durable) printf '%s\n' -b "$dir" ;;
        fsync-always) printf '%s\n' -b "$dir" -f 0 ;;
        *) die "unknown config $cfg" ;;
    esac
}

# start_server NAME CONFIG [DIR]: fresh data directory unless DIR is given.
start_server() {
    local name=$1 cfg=$2 dir=${3:-}
    [[ -n "$dir" ]] || dir=$(mktemp -d "$WORK/$name-$cfg.XXXX")
    local port; port=$("$BENCH" free-port)
    local -a cmd; mapfile -t cmd < <(server_cmd "$name" "$cfg" "$dir" "$port")
    SLOG="$WORK/$name-$cfg-$port.log"
    "${cmd[@]}" >"$SLOG" 2>&1 &
    SPID=$!
    SNAME=$name
    SADDR="127.0.0.1:$port"
    SDIR=$dir
    "$BENCH" ping --addr "$SADDR" --timeout 30 >/dev/null || { tail -20 "$SLOG" >&2; die "$name ($cfg) did not start: ${cmd[*]}"; }
}

check_alive() {
    if ! kill -0 "$SPID" 2>/dev/null; then
        tail -20 "$SLOG" >&2
        die "$SNAME died (pid $SPID); log above"
    fi
}

stop_server() {
    check_alive
    kill -TERM "$SPID"
    local i
    for i in $(seq 1 300); do
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SPID" 2>/dev/null; then
        log "warning: $SNAME did not stop on SIGTERM within 30 s; killing it"
        kill -KILL "$SPID" 2>/dev/null || true
    fi
    wait "$SPID" 2>/dev/null || true
    SPID=""
}

# bench MODE CONFIG [args...]: runs polaris-bench against the running server.
bench() {
    local mode=$1 cfg=$2; shift 2
    local line
    line=$("$BENCH" "$mode" --addr "$SADDR" --pid "$SPID" --server "$SNAME" --config "$cfg" \
        --conns "$CONNS" --depth "$DEPTH" --size "$SIZE" --tubes "$TUBES" \
        --duration "$DURATION" --warmup "$WARMUP" --out "$RESULTS" "$@") || { check_alive; die "polaris-bench $mode failed against $SNAME ($cfg)"; }
    check_alive
    summarize "$line"
}

summarize() {
    local line=$1
    if command -v jq >/dev/null; then
        log "$(jq -r '"\(.scenario)/\(.config) \(.server): \(.jobs) jobs, \(.jobs_per_s|floor) jobs/s, server \(((.server_cpu_us_per_job // 0)*100|floor)/100) µs/job" + (if .p99_us then ", p50/p99/p99.9 \(.p50_us|floor)/\(.p99_us|floor)/\(.p999_us|floor) µs" else "" end) + (if .rss_kb then ", RSS \(.rss_kb/1024|floor) MiB" else "" end) + (if .restart_s then ", restart \(.restart_s*1000|floor) ms" else "" end)' <<<"$line")"
    else
        log "$line"
    fi
}

lat_rate() { [[ $1 == fsync-always ]] && echo "$LAT_RATE_FSYNC" || echo "$LAT_RATE"; }

# ----- scenarios ---------------------------------------------------------------------

scenario_put_drain() {
    local srv=$1 cfg=$2
    start_server "$srv" "$cfg"
    bench put "$cfg"
    bench drain "$cfg"
    stop_server
}

scenario_pipeline() {
    local srv=$1 cfg=$2
    start_server "$srv" "$cfg"
    bench pipeline "$cfg"
    stop_server
}

scenario_sync() {
    local srv=$1 cfg=$2
    start_server "$srv" "$cfg"
    bench pipeline "$cfg" --conns "$SYNC_CONNS" --depth 1 --scenario sync
    stop_server
}

scenario_fleet() {
    local srv=$1 cfg=$2
    start_server "$srv" "$cfg"
    bench pipeline "$cfg" --conns "$FLEET_CONNS" --depth 1 --scenario fleet
    stop_server
}

scenario_latency() {
    local srv=$1 cfg=$2
    start_server "$srv" "$cfg"
    bench latency "$cfg" --rate "$(lat_rate "$cfg")" --reserve-depth 1
    stop_server
}

scenario_idle() {
    local srv=$1 cfg=$2
    [[ " $IDLE_CONFIGS " == *" $cfg "* ]] || return 0
    start_server "$srv" "$cfg"
    bench pipeline "$cfg" --idle "$IDLE" --scenario pipeline+idle
    stop_server
}

scenario_fill() {
    local srv=$1 cfg=$2
    [[ " $FILL_CONFIGS " == *" $cfg "* ]] || return 0
    (( round <= FILL_ROUNDS )) || return 0
    start_server "$srv" "$cfg"
    local dir=$SDIR
    bench fill "$cfg" --jobs "$FILL_JOBS"
    stop_server
    if [[ $cfg != mem ]]; then
        local port; port=$("$BENCH" free-port)
        local -a cmd; mapfile -t cmd < <(server_cmd "$srv" "$cfg" "$dir" "$port")
        local line
        line=$("$BENCH" restart --addr "127.0.0.1:$port" --expect-jobs "$FILL_JOBS" --server "$srv" --config "$cfg" \
            --out "$RESULTS" -- "${cmd[@]}") || die "restart of $srv ($cfg) failed"
        summarize "$line"
    fi
    rm -rf "$dir"
}

# ----- run ---------------------------------------------------------------------------

START=$(date +%s)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "beanstalkd: $BVERSION; polarisd: $(git rev-parse --short HEAD 2>/dev/null || echo '?'); open files: $(ulimit -n)"
log "rounds=$ROUNDS duration=${DURATION}s conns=$CONNS depth=$DEPTH size=$SIZE tubes=$TUBES idle=$IDLE fill=$FILL_JOBS"
# rounds_of SCENARIO: how many rounds it runs.
rounds_of() {
    case $1 in
        latency) echo "$LAT_ROUNDS" ;;
        *) echo "$ROUNDS" ;;
    esac
}
ALL_ROUNDS=$(( ROUNDS > LAT_ROUNDS ? ROUNDS : LAT_ROUNDS ))
for round in $(seq 1 "$ALL_ROUNDS"); do
    log "round $round of $ALL_ROUNDS"
    for scenario in $SCENARIOS; do
        (( round <= $(rounds_of "$scenario") )) || continue
        for cfg in $CONFIGS; do
            for srv in beanstalkd polarisd; do
                "scenario_${scenario//-/_}" "$srv" "$cfg"
            done
        done
    done
done
ELAPSED=$(( $(date +%s) - START ))

{
    echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') (${ELAPSED} s), polarisd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $BVERSION."
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r), load average before the run: $LOAD0."
    echo "Parameters: ROUNDS=$ROUNDS LAT_ROUNDS=$LAT_ROUNDS FLEET_CONNS=$FLEET_CONNS DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS DEPTH=$DEPTH SIZE=$SIZE TUBES=$TUBES LAT_RATE=$LAT_RATE LAT_RATE_FSYNC=$LAT_RATE_FSYNC FILL_JOBS=$FILL_JOBS IDLE=$IDLE; medians over rounds."
    echo
    "$BENCH" report --input "$RESULTS"
} > "$TABLE"
cat "$TABLE"
log "done in ${ELAPSED} s; table: $TABLE; raw results: $RESULTS"
