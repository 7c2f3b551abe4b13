"""Shared pieces of the benchmark suite: paths, the headless app, statistics, machine facts,
durable plain writes (the physical reference), and a sampling profiler hook.

Nothing here changes the product: it builds `SecureOHLCVDownloader` from an explicit
environment mapping and working directory, exactly as a cron job with a `.env` would.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# The product measured: this checkout's modules, or those of an earlier commit exported to
# BENCH_PRODUCT_DIR (the "before" of the before/after table), imported ahead of this
# checkout's. The benchmark code and the emulator are always this checkout's.
PRODUCT = Path(os.environ.get("BENCH_PRODUCT_DIR") or REPO).resolve()
PRODUCT_MODULES = ("secure_ohlcv_downloader.py", "config.py", "secure_ohlcv_cli.py")
for _path in (REPO, PRODUCT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# A premium key known to the emulator; the value means nothing outside the benchmark.
API_KEY = "BENCHPREMIUMKEY"


# -- results -------------------------------------------------------------------------------

@dataclass
class Row:
    """One measured figure: every run's value, summarised as median (min-max)."""

    label: str
    values: list[float]
    unit: str
    digits: int = 2
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cell(self, value: float) -> str:
        return f"{value:,.{self.digits}f}"

    @property
    def summary(self) -> str:
        if self.note == "p50, p99, max":  # a distribution, not repeated runs
            p50, p99, top = self.values
            return (f"p50 {self.cell(p50)} {self.unit}, p99 {self.cell(p99)} {self.unit}, "
                    f"max {self.cell(top)} {self.unit}")
        if len(self.values) == 1:
            return f"{self.cell(self.values[0])} {self.unit} (1 run)"
        return (f"{self.cell(self.median)} {self.unit} (min {self.cell(min(self.values))}, "
                f"max {self.cell(max(self.values))}, n={len(self.values)})")


@dataclass
class Check:
    """A target: the measured ratio or figure, the target and whether it is met."""

    name: str
    measured: str
    target: str
    met: bool


@dataclass
class ScenarioResult:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)   # markdown blocks from profile runs
    seconds: float = 0.0
    others_cpu: float = 0.0   # share of the machine's CPU used by other processes meanwhile

    def row(self, label: str, values: list[float], unit: str, digits: int = 2,
            note: str = "") -> Row:
        row = Row(label, list(values), unit, digits, note)
        self.rows.append(row)
        return row

    def check(self, name: str, measured: str, target: str, met: bool) -> Check:
        check = Check(name, measured, target, bool(met))
        self.checks.append(check)
        return check

    @property
    def missed(self) -> list[Check]:
        return [c for c in self.checks if not c.met]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the headless application --------------------------------------------------------------

def new_fernet_key() -> str:
    from cryptography.fernet import Fernet
    return Fernet.generate_key().decode()


# The naming key every store of this bench run gets with its Fernet key: a key ring
# without one is a store from before it, which --check-keys fails. A product from before
# naming keys (a before-run) refuses the item, and gets the Fernet key alone.
NAMING_ITEM = ("naming:" + new_fernet_key()
               if "naming:" in (PRODUCT / "config.py").read_text() else "")


def bench_env(root: Path, base_url: str, *, per_minute: int, workers: int = 8,
              key: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of a headless run in `root`. `key=None` leaves OHLCV_ENCRYPTION_KEY
    out of the mapping (it must then come from `root/.env`)."""
    env = {
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "ALPHA_VANTAGE_API_KEY": API_KEY,
        "ALPHA_VANTAGE_BASE_URL": base_url,
        "OHLCV_DATA_DIR": str(root / "data"),
        "OHLCV_BACKUP_DIR": str(root / "backups"),
        "OHLCV_STATE_DIR": str(root / "state"),
        "OHLCV_LOG_FILE": str(root / "bench.log"),
        "OHLCV_RATE_LIMIT_PER_MINUTE": str(per_minute),
        "OHLCV_MAX_WORKERS": str(workers),
        "OHLCV_MIN_FREE_DISK_MB": "100",
    }
    if key is not None:
        env["OHLCV_ENCRYPTION_KEY"] = ",".join(filter(None, (key, NAMING_ITEM)))
    env.update(extra or {})
    return env


def write_env_file(root: Path, key: str) -> None:
    """Keys in `.env` (0600), the headless place that --rotate-key can rewrite."""
    path = root / ".env"
    path.write_text(f"OHLCV_ENCRYPTION_KEY={','.join(filter(None, (key, NAMING_ITEM)))}\n")
    path.chmod(0o600)


def make_app(root: Path, env: dict[str, str], *, init: bool = False, logging: bool = True):
    """SecureOHLCVDownloader for `root`, settings from `env` and `root/.env` only (the real
    environment is not consulted), a keyring that fails (headless), logging to the file as
    the CLI does."""
    import keyring.backends.fail

    from config import load_settings
    from secure_ohlcv_downloader import KeyringKeyStore, SecureOHLCVDownloader, configure_logging

    root.mkdir(parents=True, exist_ok=True)
    settings = load_settings(environ=env, cwd=root)
    if logging:
        configure_logging(settings)
    app = SecureOHLCVDownloader(settings, KeyringKeyStore(keyring.backends.fail.Keyring()))
    if init:
        app.init()
    return app


def fresh_copy(source: Path, target: Path) -> Path:
    """A copy of a prepared run directory (data, state, .env) for one measured run."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, symlinks=True)
    settle()
    return target


def settle() -> None:
    """Flush dirty pages before a timed run. ext4 (data=ordered) writes out other files'
    dirty data when a later fsync commits the journal, so without this the first fsyncs of
    a timed run would pay for the copy that prepared it."""
    os.sync()


# -- market days ---------------------------------------------------------------------------

def session_days(count: int) -> list[date]:
    """The last `count` trading days the emulator serves, ending at the product's own
    newest published US session (the product decides currency from the New York Stock
    Exchange's calendar and the real clock; the emulator's default as_of is the last
    weekday before today). Every emulator of the suite runs with skip_holidays=False:
    every weekday trades, so that session always has a bar."""
    from secure_ohlcv_downloader import DatasetId, expected_session, utc_now
    from tests.alphavantage_emulator import TradingCalendar

    end = expected_session(DatasetId("IBM"), utc_now())[0]
    calendar = TradingCalendar(skip_holidays=False)
    days = calendar.days(end - timedelta(days=count * 2 + 20), end)
    return days[-count:]


# -- durable plain write: the physical reference ------------------------------------------

def plain_atomic_write(path: Path, data: bytes) -> None:
    """Temp file, write, fsync, rename, fsync of the directory: what any durable atomic
    write costs, without encryption."""
    tmp = path.with_name(f".plain-{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- memory --------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def vmhwm_bytes() -> int:
    """The kernel's peak RSS of this address space (VmHWM), a cross-check of ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- timing --------------------------------------------------------------------------------

class CpuWatch:
    """How much CPU other processes on the machine used while we measured: the suite runs
    where other work may run too, and a busy neighbour slows every figure."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import psutil

        total = psutil.cpu_times()
        busy = total.user + total.nice + total.system + getattr(total, "irq", 0.0) + \
            getattr(total, "softirq", 0.0) + getattr(total, "steal", 0.0)
        me = psutil.Process().cpu_times()
        return time.time(), busy, me.user + me.system + me.children_user + me.children_system

    def others_share(self) -> float:
        """Share of the machine's CPU capacity used by other processes since the start."""
        now = self._sample()
        wall = now[0] - self.start[0]
        others = (now[1] - self.start[1]) - (now[2] - self.start[2])
        return max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


# -- machine and versions ------------------------------------------------------------------

def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))} ({platform.platform()})"
    fs = ""
    with contextlib.suppress(Exception):
        fs = subprocess.run(["df", "--output=fstype", tempfile.gettempdir()], capture_output=True,
                            text=True, timeout=10).stdout.split()[-1]
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical (affinity: {len(os.sched_getaffinity(0))})",
        "RAM": ram,
        "Python": f"{platform.python_version()} ({sys.executable})",
        "OS": os_name,
        "temp file system": fs or "unknown",
    }


def git(*args: str) -> str:
    """Read-only git queries (rev-parse, status); never anything that changes state."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


PRODUCT_FILES = PRODUCT_MODULES + ("tests/alphavantage_emulator.py",)


def product_digest() -> str:
    """sha256 over the product's sources and the emulator, to notice a change mid-run (the
    measuring process keeps the code it imported; fresh child processes would not)."""
    import hashlib

    digest = hashlib.sha256()
    for name in PRODUCT_FILES:
        path = (PRODUCT if name in PRODUCT_MODULES else REPO) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    if PRODUCT != REPO:
        commit = os.environ.get("BENCH_PRODUCT_COMMIT", "unknown") + f" (exported to {PRODUCT})"
    else:
        commit = git("rev-parse", "HEAD") or "unknown"
        if git("status", "--porcelain", "--untracked-files=no", "--", *PRODUCT_FILES):
            commit += " + uncommitted changes to the product's files"
    out = {"secure-ohlcv-downloader (git commit)": commit,
           "sha256 of " + ", ".join(PRODUCT_FILES) + " (first 16 hex)": product_digest()}
    for dist in ("pandas", "pyarrow", "cryptography", "numpy", "requests", "alpha-vantage",
                 "py-spy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# -- profiling -----------------------------------------------------------------------------

def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def sampled(path: Path, *, idle: bool = False, rate: int = 250) -> Iterator[None]:
    """Sample every thread of this process with py-spy (raw collapsed stacks to `path`).
    `idle=True` keeps waiting threads too: wall-time view instead of CPU view."""
    exe = _py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -r bench/requirements.txt)")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(os.getpid()), "--rate", str(rate), "--format", "raw",
           "--output", str(path), "--nonblocking"] + (["--idle"] if idle else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarise_stacks(path: Path, top: int = 18) -> str:
    """Inclusive and self share of samples per function, from py-spy's raw output."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples",
             "",
             "inclusive  self   function (file:line of the first sample)"]
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])
    shown = 0
    for frame, count in ranked:
        if frame.startswith(("<module>", "Thread._bootstrap", "Thread.run", "_worker",
                             "_run_module", "main (bench", "run_scenario")):
            continue
        lines.append(f"{100 * count / total:7.1f}%  {100 * own.get(frame, 0) / total:5.1f}%  {frame}")
        shown += 1
        if shown >= top:
            break
    lines += ["", "top self time:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"{100 * count / total:7.1f}%  {frame}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; keep the function and the file.
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(file).name})" if file else name
