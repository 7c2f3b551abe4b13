"""Shared helpers and fixtures of the foundation tests (config, key store, store, CLI).

Import what a test module uses explicitly (pytest finds fixtures imported into a module):

    from tests.foundation_fixtures import keyring_backend, run_cli, headless_env, ...

Subprocesses get an environment built from scratch (PATH, HOME and the variables a test
names), never the developer's own: no inherited OHLCV_* / ALPHA_VANTAGE_* variable, no
D-Bus session, no display.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring.errors
import numpy as np
import pandas as pd
import pytest
from cryptography.fernet import Fernet
from keyring.backends import SecretService

from config import KEYRING_SERVICE, Settings, load_settings
from secure_ohlcv_downloader import KEYRING_PREVIOUS_USERNAME, KEYRING_USERNAME

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "secure_ohlcv_cli.py"
MODULE = REPO / "secure_ohlcv_downloader.py"
NO_BACKEND = "keyring.backends.fail.Keyring"
SUBPROCESS_TIMEOUT = 30


# -- environments and subprocesses -------------------------------------------------------

def base_env(home: Path, **variables: str) -> dict[str, str]:
    """PATH, HOME and exactly the variables given; nothing else is inherited."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home)}
    env.update(variables)
    return env


def headless_env(home: Path, **variables: str) -> dict[str, str]:
    """A server with no keyring backend at all: keyring falls back to its `fail` backend."""
    return base_env(home, PYTHON_KEYRING_BACKEND=NO_BACKEND, **variables)


def secret_service_env(service, home: Path, **variables: str) -> dict[str, str]:
    """A desktop-like session whose keyring is the private Secret Service `service`."""
    return base_env(home, **service.env, **variables)


def run_cli(args: list[str], cwd: Path, env: dict[str, str], *, script: Path = CLI,
            umask: int = -1) -> subprocess.CompletedProcess:
    """Run the command line as an operator would, with no terminal on stdin."""
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, umask=umask)


def run_python(code: str, cwd: Path, env: dict[str, str], *,
               umask: int = -1) -> subprocess.CompletedProcess:
    """Run a short program that imports the product modules (REPO on sys.path)."""
    env = dict(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, umask=umask)


# -- settings and data -------------------------------------------------------------------

def settings_for(cwd: Path, **variables: str) -> Settings:
    """Settings as a run in `cwd` with exactly `variables` in its environment would see."""
    return load_settings(environ=variables, cwd=cwd)


def init_in_process(cwd: Path, backend, **variables: str):
    """`--init` done in this process (a faster set-up step than a CLI run)."""
    from secure_ohlcv_downloader import KeyringKeyStore, SecureOHLCVDownloader

    app = SecureOHLCVDownloader(settings_for(cwd, **variables), KeyringKeyStore(backend))
    return app.init()


def new_key() -> str:
    return Fernet.generate_key().decode()


def new_key_ring() -> str:
    """A whole key ring as OHLCV_ENCRYPTION_KEY holds it: a primary key and the naming key."""
    return f"{new_key()},naming:{new_key()}"


def handed_over_keys(cwd: Path) -> list[str]:
    """The key ring a run without a terminal handed over in `state/new-key-*.txt`
    (exactly one such file), primary first."""
    (path,) = (cwd / "state").glob("new-key-*.txt")
    (line,) = [ln for ln in path.read_text().splitlines() if ln.startswith("OHLCV_ENCRYPTION_KEY=")]
    return line.split("=", 1)[1].split(",")


def ohlcv_frame(rows: int, first: float = 100.0) -> pd.DataFrame:
    """`rows` minute bars with predictable prices: open = first + row number."""
    opens = first + np.arange(rows, dtype="float64")
    return pd.DataFrame({
        "timestamp": pd.date_range("2024-01-02 09:30", periods=rows, freq="min", tz="UTC"),
        "open": opens,
        "high": opens + 1.0,
        "low": opens - 1.0,
        "close": opens + 0.5,
        "volume": np.arange(rows, dtype="int64") * 10,
    })


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory): a snapshot to compare."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


# -- the real Secret Service -------------------------------------------------------------

def delete_key_ring_entry(backend) -> None:
    """Both entries: the product loads `fernet-key-ring.previous` when the main entry is
    gone (a save cut short), so a copy left by one test is a key ring for the next."""
    for username in (KEYRING_USERNAME, KEYRING_PREVIOUS_USERNAME):
        with contextlib.suppress(keyring.errors.PasswordDeleteError):
            backend.delete_password(KEYRING_SERVICE, username)


@contextlib.contextmanager
def secret_service_keyring(service) -> Iterator[SecretService.Keyring]:
    """The Secret Service `service` as this process's keyring backend, holding no key ring
    entry before or after (the entry names are fixed: service secure-ohlcv-downloader, users
    fernet-key-ring and its save's copy fernet-key-ring.previous)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
        patch.delenv("DISPLAY", raising=False)
        for name, value in service.env.items():
            patch.setenv(name, value)
        backend = SecretService.Keyring()
        delete_key_ring_entry(backend)
        try:
            yield backend
        finally:
            delete_key_ring_entry(backend)


@pytest.fixture
def keyring_backend(secret_service):
    """The private Secret Service as a keyring backend, with no key ring entry in it: every
    test starts and ends without it."""
    with secret_service_keyring(secret_service) as backend:
        yield backend
