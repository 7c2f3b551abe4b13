#!/usr/bin/env bash
# Create/refresh .venv with the runtime dependencies only (hash-checked).
# Usage: ./scripts/setup.sh     then: .venv/bin/python ...
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"

ensure_venv
ensure_requirements requirements-secure.txt
echo "Ready: $VENV_DIR (activate with: source .venv/bin/activate)"
