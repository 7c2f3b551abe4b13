#!/usr/bin/env bash
# The whole pipeline offline, against the project's local Alpha Vantage EMULATOR
# (tests/alphavantage_emulator.py on 127.0.0.1), for machines without internet.
# Synthetic prices, real wire format and rate limits. Runs in a fresh temporary
# directory and leaves your own configuration and data untouched.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
ensure_requirements requirements-secure.txt

work="$(mktemp -d)"
port_file="$work/emulator.url"
cd "$REPO_ROOT"
"$VENV_PY" -m tests.alphavantage_emulator --port 0 --premium-key DEMOPREMIUM:600 >"$port_file" &
emulator=$!
trap 'kill "$emulator" 2>/dev/null; wait "$emulator" 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q http "$port_file" 2>/dev/null && break; sleep 0.1; done
url="$(grep -o 'http://[^ ]*' "$port_file" | head -n1)"
url="${url%/query}/query"

cd "$work"
# Only the emulator's throwaway key and a private key file: nothing of yours is used.
env -u OHLCV_ENCRYPTION_KEY -u OHLCV_DATA_DIR -u OHLCV_STATE_DIR -u OHLCV_BACKUP_DIR \
    PYTHON_KEYRING_BACKEND=keyring.backends.fail.Keyring \
    ALPHA_VANTAGE_BASE_URL="$url" ALPHA_VANTAGE_API_KEY=DEMOPREMIUM \
    OHLCV_RATE_LIMIT_PER_MINUTE=600 bash -c '
set -e
cli=("'"$VENV_PY"'" "'"$REPO_ROOT"'/secure_ohlcv_downloader.py")
echo "== offline demo against the local Alpha Vantage emulator ($ALPHA_VANTAGE_BASE_URL), in $PWD"
"${cli[@]}" --init >/dev/null
echo "== download daily bars"; "${cli[@]}" download IBM MSFT AAPL
echo "== again: already current, no request"; "${cli[@]}" download IBM MSFT AAPL
echo "== weekly adjusted and 5-minute bars"; "${cli[@]}" download IBM --interval weekly --adjusted
"${cli[@]}" download IBM --interval 5min
echo "== status"; "${cli[@]}" status
echo "== export the last rows of IBM daily as CSV"; "${cli[@]}" export IBM | tail -n 3
'
echo "== done; the demo directory was $work (remove it when you like)"
