#!/usr/bin/env bash
# The benchmark suite in one command, from a fresh clone: ./bench/run.sh [bench.run args]
# Creates/reuses .venv (scripts/_venv.sh), installs the runtime lock and the benchmark's own
# hash-pinned requirements, then runs every scenario and writes bench/RESULTS.md.
# Takes about 20 minutes on 2 cores (--no-before: 10); run it on an otherwise idle machine.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/_venv.sh"
cd "$REPO_ROOT"

ensure_venv
ensure_requirements requirements-secure.txt bench/requirements.txt

export BENCH_COMMAND="./bench/run.sh${*:+ $*}"
exec "$VENV_PY" -m bench.run "$@"
