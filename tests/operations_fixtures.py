"""Shared helpers of the operations tests (log, metrics, status, capacity, resource limits)
and of the documentation tests: everything runs as an operator runs it.

Import what a test module uses explicitly:

    from tests.operations_fixtures import OpsWorkspace, Metrics, secret_hits, ...

An `OpsWorkspace` is tests.download_fixtures.Workspace (one working directory, an
environment built from scratch: PATH, HOME, the fail keyring backend, a generated
OHLCV_ENCRYPTION_KEY, the premium API key, the emulator's URL, fast retries) plus what an
operations test needs: a chosen umask, a command line left running in the background, the
log, the metrics file and byte-exact snapshots of the store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from secure_ohlcv_downloader import DatasetId, api_key_fingerprint
from tests.download_fixtures import Workspace
from tests.foundation_fixtures import CLI, REPO, SUBPROCESS_TIMEOUT

LOG_NAME = "secure_downloader.log"
METRICS_LIST = REPO / "deploy" / "metrics.txt"


# -- a working directory --------------------------------------------------------------------

class OpsWorkspace(Workspace):
    """A Workspace whose command-line runs may choose their umask or run in the background."""

    def run(self, *args: str, umask: int = -1,
            **overrides: str | None) -> subprocess.CompletedProcess:
        """The real command line, stdin closed, waited for."""
        return subprocess.run([sys.executable, str(CLI), *args], check=False, cwd=self.cwd,
                              env=self.env(**overrides), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                              umask=umask)

    def start(self, *args: str, umask: int = -1, **overrides: str | None) -> subprocess.Popen:
        """The real command line, left running; `.communicate()` collects its output."""
        return subprocess.Popen([sys.executable, str(CLI), *args], cwd=self.cwd,
                                env=self.env(**overrides), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                umask=umask)

    @property
    def api_key(self) -> str:
        return str(self.variables["ALPHA_VANTAGE_API_KEY"])

    @property
    def key_fingerprint(self) -> str:
        """The API key's fingerprint as the tool logs and labels it (av-xxxxxxxx)."""
        return api_key_fingerprint(self.api_key)

    @property
    def log_path(self) -> Path:
        return self.cwd / LOG_NAME

    def data_files(self) -> dict[str, bytes]:
        """Every file under data/ (lock and temp files included) with its bytes."""
        data = self.cwd / "data"
        return {p.relative_to(data).as_posix(): p.read_bytes()
                for p in sorted(data.rglob("*")) if p.is_file()} if data.exists() else {}

    def stored_rows(self) -> dict[str, int]:
        """Rows of every stored dataset, each decrypted through the product's own store."""
        store = self.app().store()
        return {str(d): len(store.read(d)[0]) for d in store.datasets()}

    def daily_file(self, symbol: str) -> Path:
        return self.app().store().path(DatasetId(symbol))


# -- log lines ----------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def log_lines(text: str, level: str | None = None) -> list[str]:
    """The lines of a log text (optionally of one level only)."""
    lines = text.splitlines()
    if level is None:
        return lines
    return [line for line in lines if (m := LOG_LINE.match(line)) and m.group(1) == level]


def dataset_lines(text: str) -> list[str]:
    """The message of each per-dataset line ('IBM daily: updated full rows=...'), in order."""
    found = re.findall(r" secure_ohlcv (\S+ (?:daily|weekly|monthly)\S*: "
                       r"(?:updated|current|failed|pending) .*)$", text, re.MULTILINE)
    return found


# -- metrics ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


class Metrics:
    """A Prometheus text file, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [Sample(s.name, tuple(sorted(s.labels.items())), s.value)
                        for family in text_string_to_metric_families(text)
                        for s in family.samples]

    @classmethod
    def read(cls, path: Path) -> Metrics:
        return cls(path.read_text())

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def get(self, name: str, **labels: str) -> float | None:
        wanted = tuple(sorted(labels.items()))
        values = [s.value for s in self.samples if s.name == name and s.labels == wanted]
        assert len(values) <= 1, f"{name}{labels} appears {len(values)} times"
        return values[0] if values else None

    def value(self, name: str, **labels: str) -> float:
        found = self.get(name, **labels)
        assert found is not None, f"{name}{labels} is not in the metrics file:\n{self.text}"
        return found


def listed_metrics(path: Path = METRICS_LIST) -> dict[str, tuple[str, ...]]:
    """deploy/metrics.txt: metric name -> its label names ('-' means none)."""
    listed = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _type, labels, _meaning = line.split(None, 3)
        listed[name] = () if labels == "-" else tuple(sorted(labels.split(",")))
    return listed


# -- secrets ------------------------------------------------------------------------------------

def secret_fragments(secret: str, width: int = 16) -> set[str]:
    """The secret itself and every `width`-character piece of it."""
    return {secret} | {secret[i:i + width] for i in range(len(secret) - width + 1)}


def secret_hits(texts: dict[str, str | bytes], secrets: dict[str, str],
                width: int = 16) -> list[str]:
    """'where: which secret' for every text holding a secret or a `width`-character piece."""
    hits = []
    for where, text in texts.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        for label, secret in secrets.items():
            if any(piece.encode() in data for piece in secret_fragments(secret, width)):
                hits.append(f"{where}: {label}")
    return hits


# -- python on PATH -------------------------------------------------------------------------------

def python_shim(directory: Path) -> Path:
    """A directory whose `python` runs this interpreter (the test's venv included).

    A symlink would not do: a virtual environment's interpreter finds its pyvenv.cfg next
    to the path it was started by, so a symlinked `python` elsewhere loses the venv's
    packages. A two-line script keeps sys.executable's environment."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return directory


def with_path(env: dict[str, str], first: Path) -> dict[str, str]:
    return dict(env, PATH=f"{first}{os.pathsep}{env.get('PATH', os.defpath)}")


def link_project(cwd: Path) -> None:
    """Symlinks to the project's top-level scripts and pinned requirements in `cwd`, so a
    documented `python secure_ohlcv_cli.py ...` runs there as in a checkout."""
    for path in sorted(REPO.glob("*.py")) + [REPO / "requirements-secure.txt"]:
        (cwd / path.name).symlink_to(path)


def describe(run: Any) -> str:
    """A failed run, for an assertion message."""
    return (f"exit {run.returncode}\n--- stdout ---\n{run.stdout[-3000:]}\n"
            f"--- stderr ---\n{run.stderr[-3000:]}")
