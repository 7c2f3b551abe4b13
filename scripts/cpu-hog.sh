#!/usr/bin/env bash
# Load for proving the suite under load: ./scripts/cpu-hog.sh [N]
# Runs N busy loops (default: one per core) until interrupted or killed; its loops end
# with it. Typical use (docs/RELIABILITY.md, "Under load"):
#     ./scripts/cpu-hog.sh & hog=$!
#     for i in 1 2 3 4 5; do ./scripts/test.sh -q || break; done
#     kill "$hog"
set -euo pipefail
count="${1:-$(nproc)}"
loops=()
stop() {
    kill "${loops[@]}" 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT TERM
for ((i = 0; i < count; i++)); do
    # A bash busy loop: no interpreter to find, and nothing else to load.
    while :; do :; done &
    loops+=("$!")
done
echo "cpu-hog: $count busy loop(s), pids ${loops[*]}; stop with Ctrl-C or kill $$" >&2
wait
