#!/usr/bin/env bash
# Quick start: ./scripts/quickstart.sh [SYMBOL...]
# Sets up .venv (hash-checked runtime requirements), initialises the private directories
# and the encryption key (idempotent), downloads daily bars (default IBM, which the public
# demo key serves when ALPHA_VANTAGE_API_KEY is not set), then shows the store's status.
# Data, state and log land in the current directory, as the operations guide describes.
set -euo pipefail
here="$(pwd)"
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
ensure_requirements requirements-secure.txt
cd "$here"
cli=("$VENV_PY" "$REPO_ROOT/secure_ohlcv_downloader.py")
"${cli[@]}" --init
rc=0
"${cli[@]}" download "${@:-IBM}" || rc=$?
"${cli[@]}" status
exit "$rc"
