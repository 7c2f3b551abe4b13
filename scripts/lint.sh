#!/usr/bin/env bash
# The project's static checks: ./scripts/lint.sh
# Creates/reuses .venv, installs runtime + test requirements (hash-checked) only
# when they changed, then runs ruff (whole tree) and mypy (files set in pyproject.toml).
# Runs both and exits non-zero if either reports a finding.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"

ensure_venv
ensure_requirements requirements-secure.txt requirements-test.txt

rc=0
echo "lint: ruff check ." >&2
"$VENV_PY" -m ruff check . || rc=1
echo "lint: mypy" >&2
"$VENV_PY" -m mypy || rc=1
if ((rc)); then
    echo "lint: FAILED" >&2
fi
exit "$rc"
