#!/usr/bin/env bash
# Profiles a server under one polaris-bench workload: syscalls per job (perf
# tracepoints), where CPU time goes (perf record, cpu-clock sampling) and,
# with TOOL=callgrind, instructions per function (valgrind).
#
#   scripts/profile.sh [polarisd|beanstalkd] [mem|durable|fsync-always] [MODE] [polaris-bench args...]
#   scripts/profile.sh polarisd mem pipeline
#   scripts/profile.sh polarisd fsync-always pipeline --conns 16 --depth 16
#   scripts/profile.sh polarisd mem latency --rate 10000 --reserve-depth 1
#   TOOL=callgrind scripts/profile.sh polarisd mem pipeline
#
# Output goes to target/profile/<server>-<config>-<mode>.* and a summary is printed.
# Settings: DURATION [4] seconds of load; TOOL [perf] or callgrind; SKIP_BUILD [0];
#           CALLGRAPH [dwarf] (perf --call-graph; `fp` is cheaper but loses Rust frames).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SERVER=${1:-polarisd}
CONFIG=${2:-mem}
MODE=${3:-pipeline}
shift $(( $# < 3 ? $# : 3 ))
: "${DURATION:=4}" "${TOOL:=perf}" "${SKIP_BUILD:=0}" "${CALLGRAPH:=dwarf}"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BENCH="$TARGET/release/polaris-bench"
OUT="$TARGET/profile"
ARGTAG=$(printf '%s' "$*" | tr -c 'A-Za-z0-9' '_' | tr -s '_' | sed 's/^_//; s/_$//')
NAME="$SERVER-$CONFIG-$MODE${ARGTAG:+-$ARGTAG}"
mkdir -p "$OUT"
[[ "$SKIP_BUILD" == 1 ]] || cargo build --release --quiet --bin polarisd --bin polaris-bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

DATA=$(mktemp -d "$OUT/data.XXXXXX")
PID=""
cleanup() {
    if [[ -n "$PID" ]]; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$DATA"
}
trap cleanup EXIT

PORT=$("$BENCH" free-port)
case $SERVER in
    polarisd) CMD=("$TARGET/release/polarisd" -l 127.0.0.1 -p "$PORT") ;;
    beanstalkd) CMD=(/usr/bin/beanstalkd -l 127.0.0.1 -p "$PORT") ;;
    *) echo "unknown server $SERVER" >&2; exit 2 ;;
esac
case $CONFIG in
    mem) ;;
    durable) CMD+=(-b "$DATA") ;;
    fsync-always) CMD+=(-b "$DATA" -f 0) ;;
    *) echo "unknown config $CONFIG" >&2; exit 2 ;;
esac
if [[ $TOOL == callgrind ]]; then
    CMD=(valgrind --tool=callgrind --callgrind-out-file="$OUT/$NAME.callgrind" "${CMD[@]}")
fi
"${CMD[@]}" >"$OUT/$NAME.server.log" 2>&1 &
PID=$!
"$BENCH" ping --addr "127.0.0.1:$PORT" --timeout 60 >/dev/null
if [[ $MODE == drain ]]; then
    "$BENCH" put --addr "127.0.0.1:$PORT" --duration "$DURATION" --warmup 0 >/dev/null
fi

run_load() {
    "$BENCH" "$MODE" --addr "127.0.0.1:$PORT" --pid "$PID" --duration "$DURATION" --warmup 0 \
        --server "$SERVER" --config "$CONFIG" "$@" > "$OUT/$NAME.result.json"
}

if [[ $TOOL == callgrind ]]; then
    run_load "$@"
    kill -TERM "$PID"; wait "$PID" || true; PID=""
    set +o pipefail
    callgrind_annotate --inclusive=no "$OUT/$NAME.callgrind" 2>/dev/null | head -45 > "$OUT/$NAME.callgrind.txt"
    callgrind_annotate --inclusive=yes "$OUT/$NAME.callgrind" 2>/dev/null | head -60 > "$OUT/$NAME.callgrind-inclusive.txt"
    cat "$OUT/$NAME.result.json"
    cat "$OUT/$NAME.callgrind.txt"
    exit 0
fi

SYSCALLS=read,write,writev,readv,recvfrom,sendto,sendmsg,epoll_wait,epoll_pwait,epoll_ctl,fsync,fdatasync,pwrite64,pread64,lseek,fcntl,futex,accept4,openat,close,ftruncate,fallocate,mmap,munmap,brk,madvise
EVENTS=raw_syscalls:sys_enter
for s in ${SYSCALLS//,/ }; do
    grep -qx "syscalls:sys_enter_$s" <(perf list tracepoint 2>/dev/null | awk '{print $1}') && EVENTS+=",syscalls:sys_enter_$s"
done
perf stat -e "$EVENTS" -p "$PID" -o "$OUT/$NAME.syscalls.txt" -- sleep "$DURATION" &
STAT=$!
perf record -e cpu-clock -F 999 --call-graph "$CALLGRAPH" -p "$PID" -o "$OUT/$NAME.perf.data" -- sleep "$DURATION" 2>/dev/null &
REC=$!
run_load "$@"
wait $STAT $REC || true

set +o pipefail  # `head` closes the pipes below early
JOBS=$(jq .jobs "$OUT/$NAME.result.json")
SECS=$(jq .secs "$OUT/$NAME.result.json")
echo "== $NAME: $(jq -c '{jobs, jobs_per_s: (.jobs_per_s|floor), server_cpu_us_per_job, p50_us, p99_us}' "$OUT/$NAME.result.json")"
echo "== syscalls per job (perf stat window ${DURATION}s vs load window ${SECS}s; approximate):"
awk -v jobs="$JOBS" -v d="$DURATION" -v s="$SECS" '/sys_enter/ { gsub(",", "", $1); if ($1+0 > 0) printf "  %-40s %12d  %8.3f per job\n", $2, $1, $1 / (jobs * d / s) }' "$OUT/$NAME.syscalls.txt"
echo "== CPU by binary (perf cpu-clock; loopback TCP work of the peer is charged to the sender):"
perf report -i "$OUT/$NAME.perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -5
echo "== top functions (self time, perf cpu-clock):"
perf report -i "$OUT/$NAME.perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9]' | sed 's/ *$//' | cut -c1-120 | head -30 | tee "$OUT/$NAME.perf-self.txt"
perf report -i "$OUT/$NAME.perf.data" --children --sort symbol --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9]' | sed 's/ *$//' | cut -c1-130 | head -150 > "$OUT/$NAME.perf-children.txt"
echo "== main-loop functions (inclusive time):"
grep -E '(polarisd::(server|store|config)|polaris_engine|polaris_proto)::[A-Za-z_:<>]+$|Store::|Server::' "$OUT/$NAME.perf-children.txt" | head -20 || true
echo "(inclusive view: $OUT/$NAME.perf-children.txt)"
