#!/usr/bin/env bash
# Times the agent's integrity.check against `aide --check` (Debian's aide 0.18) on one tree
# and one aide.conf, single-threaded and on every core; BENCHMARKS.md has the figures.
#
#   scripts/bench-integrity.sh [DIR [SMALL_FILES [LARGE_MIB]]]
#
# DIR (default /tmp/polaris-bench-integrity) gets the tree (100000 small files and 1024 MiB
# of 64 MiB files by default; made once, reused), the rules, both tools' databases. Delete
# it afterwards: it takes about 1.5 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x /usr/bin/aide ]]; then
    echo "aide is not installed (apt-get install aide); timing the agent alone" >&2
fi
cargo build --release -p polaris-agent --example bench_integrity --quiet
exec target/release/examples/bench_integrity "${1:-/tmp/polaris-bench-integrity}" "${2:-100000}" "${3:-1024}"
