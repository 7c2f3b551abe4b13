#!/usr/bin/env bash
# The project's test command: ./scripts/test.sh [pytest args]
# Creates/reuses .venv, installs runtime + test requirements (hash-checked)
# only when they changed, then runs pytest and exits with its code.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"

ensure_venv
ensure_requirements requirements-secure.txt requirements-test.txt

# Per-test timeout (pytest-timeout) unless configured otherwise; stops hung tests.
export PYTEST_TIMEOUT="${PYTEST_TIMEOUT:-300}"
exec "$VENV_PY" -m pytest "$@"
