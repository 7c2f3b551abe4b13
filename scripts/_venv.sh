# shellcheck shell=bash
# Shared by scripts/setup.sh and scripts/test.sh (sourced, not executed).
# Creates or reuses .venv in the repo root with the current python3 (>= 3.11)
# and installs pinned, hash-checked requirement files only when they changed.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="$REPO_ROOT/.venv"
VENV_PY="$VENV_DIR/bin/python"
# One line per requirement file: "<sha256>  <file>" (sha256sum format).
STAMP_FILE="$VENV_DIR/.requirements.sha256"
PYTHON="${PYTHON:-python3}"

_venv_die() { echo "error: $*" >&2; exit 1; }

# Exit status 0 when "$1" is a Python >= 3.11.
_venv_py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

ensure_venv() {
    command -v "$PYTHON" >/dev/null 2>&1 \
        || _venv_die "'$PYTHON' not found; install Python >= 3.11 (or set PYTHON=/path/to/python3.11)"
    if ! _venv_py_ok "$PYTHON"; then
        _venv_die "Python >= 3.11 required, but '$PYTHON' is $("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
    fi
    if [[ -x "$VENV_PY" ]] && _venv_py_ok "$VENV_PY"; then
        return 0
    fi
    echo "Creating $VENV_DIR with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
    "$PYTHON" -m venv --clear "$VENV_DIR" \
        || _venv_die "'$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
}

# ensure_requirements FILE...: pip install --require-hashes all FILEs (paths
# relative to the repo root) in one go if any of them changed since the last
# successful install into this venv; otherwise do nothing.
ensure_requirements() {
    local f stale=0 wanted current
    for f in "$@"; do
        [[ -f "$REPO_ROOT/$f" ]] || _venv_die "missing $f"
        wanted="$(cd "$REPO_ROOT" && sha256sum "$f")"
        if ! grep -qxF -- "$wanted" "$STAMP_FILE" 2>/dev/null; then
            stale=1
        fi
    done
    [[ $stale -eq 0 ]] && return 0

    local args=()
    for f in "$@"; do args+=(-r "$REPO_ROOT/$f"); done
    echo "Installing $* into $VENV_DIR ..." >&2
    "$VENV_PY" -m pip install --quiet --no-input --disable-pip-version-check \
        --require-hashes "${args[@]}"

    # Record the installed files, keeping other files' lines.
    current="$(cd "$REPO_ROOT" && sha256sum "$@")"
    {
        if [[ -f "$STAMP_FILE" ]]; then
            grep -vF -f <(printf '  %s\n' "$@") "$STAMP_FILE" || true
        fi
        printf '%s\n' "$current"
    } >"$STAMP_FILE.tmp"
    mv "$STAMP_FILE.tmp" "$STAMP_FILE"
}
