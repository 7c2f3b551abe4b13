"""Shared helpers of the lifecycle tests (rotate-key, remove-key, backup, verify-backup,
recover, cleanup): installations on disk, their datasets, archives and ways to spoil them.

Import what a test module uses explicitly:

    from tests.lifecycle_fixtures import Site, headless_site, keyring_site, sample_datasets

A `Site` is one installation in its own directory (`data/`, `state/`, `backups/`, maybe a
`.env`) plus the environment a command-line run there gets. Its keys are kept the three
ways an operator keeps them:

* `.env` written by --init on a server with no keyring backend (headless_site),
* a real environment variable, OHLCV_ENCRYPTION_KEY, on a headless server
  (headless_site(key_in_variable=True)),
* the OS keyring, a real Secret Service (keyring_site).

The site directory is `<root>/site`, so everything a test creates outside the installation
(`<root>` and up) can be checked to stay untouched.

`Site.cli` runs the command line in a process of its own, forked by tests/rotation_child.py
from an interpreter that has already imported it: the same `main`, a fresh process, exactly
the given environment and directory, no terminal; about 0.7 s cheaper than a new
interpreter, which keeps the suite within its time budget. `Site.cli_fresh` runs
`python secure_ohlcv_cli.py` in a new interpreter, as an operator types it; each command
is run that way at least once.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from keyring.backends import fail

from config import Settings
from secure_ohlcv_downloader import (
    DatasetId,
    EncryptedStore,
    KeyCustody,
    KeyRing,
    KeyringKeyStore,
    SecureOHLCVDownloader,
    dataset_file,
    dataset_files,
    decode_table,
)
from tests.foundation_fixtures import (
    REPO,
    SUBPROCESS_TIMEOUT,
    base_env,
    headless_env,
    init_in_process,
    new_key_ring,
    run_cli,
    secret_service_env,
    settings_for,
)

MARKET_TZ = "America/New_York"
KEY_VALUE = r"OHLCV_ENCRYPTION_KEY=(\S+)"  # how --rotate-key prints a key ring to set


# -- bars ----------------------------------------------------------------------------------

def bars(stamps: Any, first_price: float) -> pd.DataFrame:
    """Valid OHLCV bars at `stamps` with recognisable prices (two decimals, 0.37 apart)."""
    stamps = pd.DatetimeIndex(stamps)
    rows = len(stamps)
    opens = np.round(first_price + 0.37 * np.arange(rows, dtype="float64"), 2)
    return pd.DataFrame({
        "timestamp": stamps,
        "open": opens,
        "high": opens + 1.25,
        "low": opens - 0.75,
        "close": opens + 0.5,
        "volume": 1_000 + 7 * np.arange(rows, dtype="int64"),
    })


def daily_bars(days: list[date] | pd.DatetimeIndex, first_price: float) -> pd.DataFrame:
    """Daily bars: timestamps are dates (datetime64 at midnight, no time zone)."""
    return bars(pd.DatetimeIndex(pd.to_datetime(list(days))).normalize(), first_price)


def weekday_bars(first_day: str, count: int, first_price: float) -> pd.DataFrame:
    return daily_bars(pd.bdate_range(first_day, periods=count), first_price)


def intraday_bars(times: list[str], first_price: float) -> pd.DataFrame:
    """Intraday bars: `times` are wall-clock times in New York ('2024-01-02 09:30')."""
    return bars(pd.DatetimeIndex(pd.to_datetime(times)).tz_localize(MARKET_TZ), first_price)


def month_of_5min_bars(month: str, first_price: float, sessions: int = 3) -> pd.DataFrame:
    days = pd.bdate_range(f"{month}-01", periods=sessions)
    times = [f"{d:%Y-%m-%d} {t}" for d in days for t in ("09:30", "09:35", "15:55")]
    return intraday_bars(times, first_price)


def sample_datasets() -> dict[DatasetId, pd.DataFrame]:
    """A small store: two daily series, a weekly one, and an intraday series in two months."""
    return {
        DatasetId("IBM"): weekday_bars("2024-01-02", 30, 131.17),
        DatasetId("MSFT"): weekday_bars("2024-01-02", 25, 371.43),
        DatasetId("BRK.B", "weekly"):
            daily_bars(pd.date_range("2023-09-01", periods=12, freq="W-FRI"), 352.19),
        DatasetId("TSCO.LON", "5min", month="2024-01"): month_of_5min_bars("2024-01", 283.11),
        DatasetId("TSCO.LON", "5min", month="2024-02"): month_of_5min_bars("2024-02", 291.07),
    }


def many_datasets(count: int) -> dict[DatasetId, pd.DataFrame]:
    """`count` small daily datasets (S000, S001, ...), each with its own prices."""
    return {DatasetId(f"S{i:03d}"): weekday_bars("2024-03-01", 15 + i % 7, 20.0 + 3.11 * i)
            for i in range(count)}


# -- running the command line -------------------------------------------------------------

SERVER = Path(__file__).with_name("rotation_child.py")


class CliServer:
    """tests/rotation_child.py: forks command-line runs on request (see its docstring)."""

    def __init__(self) -> None:
        self.outputs = Path(tempfile.mkdtemp(prefix="ohlcv-cli-runs-"))
        self._numbers = itertools.count()
        self._errors = open(self.outputs / "server.err", "wb")
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], cwd=self.outputs,
                                     env=base_env(self.outputs), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._errors, text=True)
        line = self.proc.stdout.readline()
        if line != "ready\n":
            raise RuntimeError("the command-line server did not start: "
                               + (self.outputs / "server.err").read_text())
        self._pending: dict[int, Path] = {}

    def start(self, args: list[str], cwd: Path, env: dict[str, str]) -> int:
        """Start `python secure_ohlcv_cli.py ARGS` in `cwd`; its PID."""
        output = self.outputs / f"run-{next(self._numbers)}"
        request = {"run": list(args), "cwd": str(cwd), "env": env, "output": str(output)}
        pid = self._ask(request)["pid"]
        self._pending[pid] = output
        return pid

    def wait(self, pid: int, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
        code = self._ask({"wait": pid, "timeout": timeout})["code"]
        output = self._pending.pop(pid)
        out, err = (_read_text(output.with_suffix(suffix)) for suffix in (".out", ".err"))
        if code == "timeout":
            raise subprocess.TimeoutExpired(["secure_ohlcv_cli.py"], timeout, out, err)
        return subprocess.CompletedProcess(["secure_ohlcv_cli.py"], code, out, err)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the command-line server died: "
                               + (self.outputs / "server.err").read_text())
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # end of input: the server exits
        try:
            self.proc.wait(timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._errors.close()
        shutil.rmtree(self.outputs, ignore_errors=True)


def _read_text(path: Path) -> str:
    """A run's output; a run killed before it opened its output files has none."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


_server: CliServer | None = None


def cli_server() -> CliServer:
    """The one server of this test session, started on first use."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = CliServer()
        atexit.register(_server.close)
    return _server


# -- installations -------------------------------------------------------------------------

@dataclass
class Site:
    """One installation: `cwd` holds data/, state/, backups/ (and .env when keys live there)."""

    cwd: Path
    home: Path
    variables: dict[str, str] = field(default_factory=dict)  # OHLCV_* of every run here
    backend: Any = field(default_factory=fail.Keyring)  # in-process keyring backend
    service: Any = None  # the PrivateSecretService of a keyring site

    # -- running it ------------------------------------------------------------------

    def env(self, **variables: str) -> dict[str, str]:
        """The environment of a command-line run here, plus `variables`."""
        merged = {**self.variables, **variables}
        if self.service is None:
            return headless_env(self.home, **merged)
        return secret_service_env(self.service, self.home, **merged)

    def cli(self, *args: str, **variables: str) -> subprocess.CompletedProcess:
        """The command line run here in a process of its own (no terminal on stdin)."""
        server = cli_server()
        return server.wait(server.start(list(args), self.cwd, self.env(**variables)))

    def cli_fresh(self, *args: str, **variables: str) -> subprocess.CompletedProcess:
        """`python secure_ohlcv_cli.py ARGS` in a new interpreter, as an operator types it."""
        return run_cli(list(args), self.cwd, self.env(**variables))

    def settings(self, **variables: str) -> Settings:
        return settings_for(self.cwd, **{**self.variables, **variables})

    def app(self, **variables: str) -> SecureOHLCVDownloader:
        return SecureOHLCVDownloader(self.settings(**variables), KeyringKeyStore(self.backend))

    def ring(self) -> KeyRing:
        """The key ring as stored right now: .env, the variable and the keyring read again."""
        return KeyCustody(self.settings(), KeyringKeyStore(self.backend)).sources().choose()[0]

    # -- its files -------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.cwd / "data"

    @property
    def state_dir(self) -> Path:
        return self.cwd / "state"

    @property
    def backup_dir(self) -> Path:
        return self.cwd / "backups"

    @property
    def canary(self) -> Path:
        return self.state_dir / "canary.fernet"

    @property
    def env_file(self) -> Path:
        return self.cwd / ".env"

    @property
    def log_file(self) -> Path:
        return self.cwd / "secure_downloader.log"

    def put(self, datasets: dict[DatasetId, pd.DataFrame], ring: KeyRing | None = None) -> None:
        """Store `datasets` encrypted under `ring` (default: the stored ring's primary)."""
        store = EncryptedStore(self.settings(), ring or self.ring())
        for dataset, frame in datasets.items():
            store.write(dataset, frame, {"checked_at": "2024-06-01T00:00:00+00:00"})

    def file_of(self, dataset: DatasetId) -> Path:
        """Where `dataset` is stored here: the name the site's naming key gives it."""
        naming = self.ring().naming
        assert naming is not None
        return self.data_dir / dataset_file(naming.key, dataset)

    def files(self) -> dict[str, bytes]:
        """Every dataset file, by path relative to the data directory, with its bytes."""
        return {p.relative_to(self.data_dir).as_posix(): p.read_bytes()
                for p in dataset_files(self.data_dir)}

    def frames(self, ring: KeyRing | None = None) -> dict[str, pd.DataFrame]:
        ring = ring or self.ring()
        return {rel: decode_table(ring.decrypt(token))[0] for rel, token in self.files().items()}

    def backup(self) -> Path:
        """One archive written in this process (a set-up step faster than a CLI run)."""
        return self.app().backup().path


def cli_all(site: Site, commands: list[list[str]],
            **variables: str) -> list[subprocess.CompletedProcess]:
    """Several independent command-line runs in `site` at once (readers, such as export)."""
    server = cli_server()
    pids = [server.start(args, site.cwd, site.env(**variables)) for args in commands]
    return [server.wait(pid) for pid in pids]


def run_all(runs: dict[str, tuple[Site, list[str]]]) -> dict[str, subprocess.CompletedProcess]:
    """Independent command-line runs, all at once: readers of one installation, or each in
    an installation of its own. Returns each run's result under its name."""
    server = cli_server()
    pids = {name: server.start(args, site.cwd, site.env()) for name, (site, args) in runs.items()}
    return {name: server.wait(pid) for name, pid in pids.items()}


def _site_dirs(root: Path) -> tuple[Path, Path]:
    cwd, home = root / "site", root / "home"
    cwd.mkdir(parents=True)
    home.mkdir(exist_ok=True)
    return cwd, home


def headless_site(root: Path, *, key_in_variable: bool = False, **variables: str) -> Site:
    """An initialised installation on a server with no keyring backend.

    Keys in `.env` (as --init writes them there), or with `key_in_variable` in a real
    OHLCV_ENCRYPTION_KEY that every run of this site gets.
    """
    cwd, home = _site_dirs(root)
    if key_in_variable:
        variables.setdefault("OHLCV_ENCRYPTION_KEY", new_key_ring())
    site = Site(cwd, home, dict(variables))
    init_in_process(cwd, site.backend, **site.variables)
    assert site.env_file.exists() != key_in_variable
    return site


def keyring_site(root: Path, service, backend, **variables: str) -> Site:
    """An initialised installation whose key ring lives in the Secret Service `service`.

    With OHLCV_ENCRYPTION_KEY among `variables`, --init imports it into the keyring and
    every run also gets the variable (keyring and variable agree).
    """
    cwd, home = _site_dirs(root)
    site = Site(cwd, home, dict(variables), backend, service)
    report = init_in_process(cwd, backend, **site.variables)
    assert "OS keyring" in report.stored_in and not site.env_file.exists()
    return site


def clone_site(site: Site, root: Path) -> Site:
    """A copy of `site` (files, modes, variables, key store) under `root`."""
    cwd, home = root / "site", root / "home"
    shutil.copytree(site.cwd, cwd, symlinks=True)
    home.mkdir(exist_ok=True)
    return Site(cwd, home, dict(site.variables), site.backend, site.service)


# -- archives ------------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def read_members(archive: Path) -> list[Member]:
    """Every member of a tar archive with its content (None for links)."""
    with tarfile.open(archive, mode="r:") as tar:
        members = []
        for info in tar:
            handle = tar.extractfile(info) if info.isfile() else None
            members.append((info, handle.read() if handle else None))
        return members


def write_members(archive: Path, members: list[Member]) -> Path:
    """A tar archive holding exactly `members`, in order, in the product's tar format."""
    with tarfile.open(archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info = _copy_info(info)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return archive


def _copy_info(info: tarfile.TarInfo) -> tarfile.TarInfo:
    copy = tarfile.TarInfo(info.name)
    for attr in ("size", "mode", "mtime", "type", "linkname", "uid", "gid", "uname", "gname"):
        setattr(copy, attr, getattr(info, attr))
    return copy


def file_member(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    return info, data


def link_member(name: str, target: str, *, hard: bool = False) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def rewrite_archive(source: Path, target: Path, *, drop: tuple[str, ...] = (),
                    replace: dict[str, bytes] | None = None,
                    add: tuple[Member, ...] = ()) -> Path:
    """A copy of `source` without the members named in `drop`, with the content of those
    in `replace` changed, and the members `add` appended."""
    replace = replace or {}
    members = [(info, replace.get(info.name, data)) for info, data in read_members(source)
               if info.name not in drop]
    return write_members(target, members + list(add))


def member_data_offset(archive: Path, name: str) -> tuple[int, int]:
    """Where a member's content starts in the raw archive, and its size."""
    with tarfile.open(archive, mode="r:") as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


def member_header_offset(archive: Path, name: str) -> int:
    with tarfile.open(archive, mode="r:") as tar:
        return tar.getmember(name).offset


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte of a file in place (the lowest bit of the byte at `offset`)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


# -- snapshots -----------------------------------------------------------------------------

def snapshot(root: Path, *, exclude: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every path under `root`: its kind, mode and (for files) SHA-256; to compare."""
    found = {}
    for path in sorted(root.rglob("*")):
        if any(path == e or e in path.parents for e in exclude):
            continue
        info = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_dir():
            found[str(path.relative_to(root))] = ("dir", oct(info.st_mode))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(root))] = ("file", oct(info.st_mode), digest)
    return found


# -- another run holding the data-directory lock -------------------------------------------

_HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from secure_ohlcv_downloader import DataDirLock
with DataDirLock(Path(sys.argv[2]), 0, 0o600):
    print("locked", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_holder(data_dir: Path) -> Iterator[subprocess.Popen]:
    """A live process that holds the data-directory lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(REPO), str(data_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "locked\n", proc.stderr.read() if proc.poll() is not None else line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
