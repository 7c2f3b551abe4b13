"""Campaign, crash consistency: SIGKILL at random moments during download, merge (an
incremental download into existing data), key rotation, backup, cleanup and the migration
of a store of the earlier layout (migrate-store); and writes under a file-size limit (a
full disk).

Every trial copies a prepared installation (keys in `.env`, as `--init` leaves a headless
server), runs the command line (secure_ohlcv_cli.main) in a process forked from a server
that has imported it already (tests/campaign/campaign_child.py --fork-server: a fresh
process with its own environment and working directory, milliseconds to start), and kills
it with SIGKILL after a seeded random delay drawn from the operation's measured duration
(OHLCV_CAMPAIGN_SEED changes the seed). Then:
  * every dataset file decrypts with the key ring and validates, and holds either the
    data from before the operation or the data after it, nothing in between;
  * the canary decrypts; the state files are whole JSON;
  * a temp file is never taken for data: the store's dataset list, `status` and the backup
    list name real files only, and every archive listed verifies;
  * the next run of the same operation completes (exit 0, no traceback) and leaves the
    installation in the operation's finished state.
migrate-store starts from the downloaded store moved to the earlier layout's names
(`daily/S00.fernet`), its key ring without a naming key and no catalogue (only the names
changed between the layouts); after a kill, each dataset is under exactly one of its two
names, decrypts and holds its data, and no other dataset file exists; after the next run,
only opaque names, the catalogue, and the same data.
Kill statistics are printed (pytest -s). Trials: quick 5 per operation, long 40 (240 in all);
in long mode every 5th next run is a whole new interpreter. The full-disk tests always exec
the command line, with RLIMIT_FSIZE set (and SIGXFSZ ignored) in preexec_fn.
"""

from __future__ import annotations

import json
import os
import queue
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from keyring.backends import fail

from config import load_settings
from secure_ohlcv_downloader import (
    CANARY_TEXT,
    CATALOGUE_NAME,
    DatasetId,
    KeyRing,
    KeyringKeyStore,
    SecureOHLCVDownloader,
    backup_archives,
    dataset_file,
    dataset_files,
    decode_table,
    retention_cutoff,
    uses_earlier_layout,
    validate_bars,
    verify_backup,
)
from tests.alphavantage_emulator import AlphaVantageEmulator
from tests.campaign.figures import campaign_budget
from tests.download_fixtures import PREMIUM_KEY, PREMIUM_PER_MINUTE, start_emulator
from tests.foundation_fixtures import headless_env

CHILD = Path(__file__).resolve().parent / "campaign_child.py"
CLI = Path(__file__).resolve().parent.parent.parent / "secure_ohlcv_cli.py"
SYMBOLS = [f"S{i:02d}" for i in range(10)]
WEEKLY = ["W00", "W01"]
TRIM_DAILY = 3
RETENTION_DAYS = 400
BACKUP_KEEP = 2
SEED = int(os.environ.get("OHLCV_CAMPAIGN_SEED", "20240611"))
TRIALS = campaign_budget(5, 40)
PARALLEL = max(1, min(2, os.cpu_count() or 1))
CHILD_TIMEOUT = 120
# Long mode: every 5th next run is a whole new interpreter (secure_ohlcv_cli.py), not a fork.
# Quick mode leaves that to the full-disk tests, which always exec the command line.
REAL_CLI_EVERY = campaign_budget(0, 5)

OPERATIONS: dict[str, list[str]] = {
    "download": ["download", *SYMBOLS],
    "merge": ["download", *SYMBOLS],
    "rotate-key": ["rotate-key"],
    "backup": ["backup"],
    "cleanup": ["cleanup"],
    "migrate-store": ["migrate-store"],
}


# -- installations -------------------------------------------------------------------------

def site_env(site: Path, av: AlphaVantageEmulator, **extra: str) -> dict[str, str]:
    variables = dict(ALPHA_VANTAGE_API_KEY=PREMIUM_KEY, ALPHA_VANTAGE_BASE_URL=av.base_url,
                     OHLCV_RATE_LIMIT_PER_MINUTE=str(PREMIUM_PER_MINUTE),
                     OHLCV_BACKOFF_SECONDS="0.01", OHLCV_LOCK_TIMEOUT="10",
                     OHLCV_BACKUP_KEEP=str(BACKUP_KEEP))
    variables.update(extra)
    return headless_env(site, **variables)


def op_env(op: str, site: Path, av: AlphaVantageEmulator) -> dict[str, str]:
    extra = {"OHLCV_RETENTION_DAYS": str(RETENTION_DAYS)} if op == "cleanup" else {}
    return site_env(site, av, **extra)


def app_for(site: Path, env: dict[str, str]) -> SecureOHLCVDownloader:
    return SecureOHLCVDownloader(load_settings(environ=env, cwd=site),
                                 KeyringKeyStore(fail.Keyring()))


PLANTED = ".0123456789ab"


def plant_temp_files(site: Path) -> None:
    """What crashed writers leave: a torn copy of a real token under a temp name."""
    token = sorted((site / "data").glob("??/*.fernet"))  # the dataset files, not the catalogue
    torn = token[0].read_bytes()[: len(token[0].read_bytes()) // 2] if token else b"gAAAA"
    beside = token[0].parent if token else site / "data" / "00"  # a fan-out directory
    beside.mkdir(mode=0o700, exist_ok=True)
    (beside / f".tmp-{token[0].name if token else 'x.fernet'}.0123456789ab").write_bytes(torn)
    (site / "state" / ".tmp-pending.json.0123456789ab").write_bytes(b'["S0')
    (site / "backups" / ".tmp-ohlcv-backup-20000101T000000000000Z.tar.0123456789ab").write_bytes(
        b"\0" * 1024)


@dataclass
class Templates:
    av: AlphaVantageEmulator
    root: Path
    sites: dict[str, Path] = field(default_factory=dict)
    control: dict[str, pd.DataFrame] = field(default_factory=dict)     # rel path -> frame
    trimmed: dict[str, pd.DataFrame] = field(default_factory=dict)
    daily: set[str] = field(default_factory=set)  # rel paths of the daily datasets
    by_identity: dict[str, pd.DataFrame] = field(default_factory=dict)  # for migrate-store
    before_bytes: dict[str, dict[str, bytes]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    counter: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def copy(self, op: str) -> Path:
        with self.lock:
            self.counter += 1
            target = self.root / "trials" / f"{op}-{self.counter:04d}"
        shutil.copytree(self.sites[op], target, symlinks=True)
        return target


def rel(site: Path, path: Path) -> str:
    return path.relative_to(site / "data").as_posix()


def frames_of(site: Path, env: dict[str, str]) -> dict[str, pd.DataFrame]:
    store = app_for(site, env).store()
    return {rel(site, p): store.read_file(p)[0] for p in dataset_files(site / "data")}


def cutoff_frame(frame: pd.DataFrame) -> pd.DataFrame:
    cutoff = retention_cutoff(RETENTION_DAYS)
    return frame[frame["timestamp"].dt.date >= cutoff].reset_index(drop=True)


def to_earlier_layout(site: Path, env: dict[str, str],
                      control: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Move a store back to the earlier layout: each file renamed to its earlier path (the
    content did not change between the layouts), no naming key, no catalogue. Returns the
    control frames by dataset identity."""
    data = site / "data"
    by_identity = {}
    for item in app_for(site, env).store().listing():
        assert item.dataset is not None, item.error
        earlier = data / item.dataset.relative_path()
        earlier.parent.mkdir(mode=0o700, exist_ok=True)
        os.rename(data / item.file, earlier)
        by_identity[item.dataset.identity] = control[item.file]
    for fan_out in data.glob("??"):
        fan_out.rmdir()
    (data / CATALOGUE_NAME).unlink()
    env_file = site / ".env"
    env_file.write_text("".join(
        line.split(",naming:")[0] + "\n" if line.startswith("OHLCV_ENCRYPTION_KEY=") else line
        for line in env_file.read_text().splitlines(keepends=True)))
    assert app_for(site, env).key_ring().naming is None
    return by_identity


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    av = start_emulator()
    root = tmp_path_factory.mktemp("crash")
    t = Templates(av, root)
    try:
        empty = root / "templates" / "empty"
        empty.mkdir(parents=True)
        env = site_env(empty, av)
        report = app_for(empty, env).init()
        assert report.new_key and (empty / ".env").exists()
        full = root / "templates" / "full"
        shutil.copytree(empty, full)
        env = site_env(full, av)
        assert app_for(full, env).download(SYMBOLS).exit_code == 0
        assert app_for(full, env).download(WEEKLY, interval="weekly").exit_code == 0
        t.control = frames_of(full, env)
        control_store = app_for(full, env).store()
        t.daily = {control_store.relative(control_store.path(d))
                   for d in control_store.datasets() if d.name == "daily"}
        # merge: daily datasets a few sessions behind, last checked long ago
        stale = root / "templates" / "stale"
        shutil.copytree(full, stale)
        env = site_env(stale, av)
        store = app_for(stale, env).store()
        with store.lock():
            for symbol in SYMBOLS:
                dataset = DatasetId(symbol)
                frame, meta = store.read(dataset)
                cut = frame.iloc[:-TRIM_DAILY].reset_index(drop=True)
                t.trimmed[store.relative(store.path(dataset))] = cut
                store.write(dataset, cut, dict(meta, checked_at="2000-01-03T00:00:00+00:00"))
        # backups to prune, for backup and cleanup
        backed = root / "templates" / "backed"
        shutil.copytree(full, backed)
        env = site_env(backed, av, OHLCV_BACKUP_KEEP="7")
        for _ in range(3):
            app_for(backed, env).backup()
        earlier = root / "templates" / "earlier"
        shutil.copytree(full, earlier)
        t.by_identity = to_earlier_layout(earlier, site_env(earlier, av), t.control)
        for site in (empty, stale, backed, earlier):
            shutil.rmtree(site / "state" / "quota", ignore_errors=True)  # a new day
            for name in ("pending.fernet", "runs.json"):
                (site / "state" / name).unlink(missing_ok=True)
            plant_temp_files(site)
        t.sites = {"download": empty, "merge": stale, "rotate-key": backed,
                   "backup": backed, "cleanup": backed, "migrate-store": earlier}
        for op, site in t.sites.items():
            t.before_bytes[op] = {rel(site, p): p.read_bytes()
                                  for p in dataset_files(site / "data")}
        av.reset_counters()
        yield t
    finally:
        av.stop()


# -- children -----------------------------------------------------------------------------------

def start(args: list[str], cwd: Path, env: dict[str, str],
          preexec: Callable[[], None] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), *args], cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def spawn(args: list[str], cwd: Path, env: dict[str, str],
          preexec: Callable[[], None] | None = None) -> subprocess.Popen:
    return ready(start(args, cwd, env, preexec))


def ready(child: subprocess.Popen) -> subprocess.Popen:
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        out, err = child.communicate()
        raise AssertionError(f"child did not start: {line!r} {out!r} {err!r}")
    return child


class ForkServer:
    """campaign_child.py --fork-server: forks runs of the command line from a process that
    has imported it already (milliseconds instead of a fresh interpreter's import time)."""

    def __init__(self, logs: Path) -> None:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(logs),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "--fork-server"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.logs = logs
        self.count = 0

    def _call(self, **request: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("the fork server died")
        return json.loads(line)

    def spawn(self, args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
        self.count += 1
        stem = self.logs / f"{self.proc.pid}-{self.count}"
        run = {"stdout": f"{stem}.out", "stderr": f"{stem}.err"}
        run["pid"] = self._call(op="spawn", cwd=str(cwd), env=env, args=args, fsize=None,
                                **run)["pid"]
        return run

    def wait(self, run: dict[str, Any], timeout: float | None = None) -> int | None:
        return self._call(op="wait", pid=run["pid"], timeout=timeout)["code"]

    def output(self, run: dict[str, Any]) -> tuple[str, str]:
        return (Path(run["stdout"]).read_text(errors="replace"),
                Path(run["stderr"]).read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("crash-logs")
    servers: queue.Queue[ForkServer] = queue.Queue()
    started = [ForkServer(logs) for _ in range(PARALLEL)]
    for server in started:
        servers.put(server)
    try:
        yield servers
    finally:
        for server in started:
            server.close()


def go(child: subprocess.Popen) -> None:
    child.stdin.write("go\n")
    child.stdin.flush()


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=CHILD_TIMEOUT)
    return child.returncode, out, err


# -- checks -------------------------------------------------------------------------------------

def same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return list(a.columns) == list(b.columns) and a.reset_index(drop=True).equals(
        b.reset_index(drop=True))


def allowed_states(t: Templates, op: str, key: str) -> list[pd.DataFrame]:
    """The contents one dataset may hold during or after `op`: before or after, whole."""
    control = t.control[key]
    if op == "merge" and key in t.trimmed:
        return [t.trimmed[key], control]
    if op == "cleanup":
        return [control, cutoff_frame(control)]
    return [control]


def migration_problems(t: Templates, site: Path, env: dict[str, str]) -> list[str]:
    """During a migration: each dataset under exactly one of its two names (earlier or
    opaque, under the naming key as stored), readable, holding its data; nothing else."""
    problems: list[str] = []
    try:
        ring = app_for(site, env).key_ring()
    except Exception as exc:
        return [f"the key ring does not open: {type(exc).__name__}: {exc}"]
    data = site / "data"
    at_a_name = set()
    for identity, control in t.by_identity.items():
        dataset = DatasetId.from_identity(identity)
        names = [data / dataset.relative_path()] + (
            [data / dataset_file(ring.naming.key, dataset)] if ring.naming else [])
        found = [p for p in names if os.path.lexists(p)]
        if len(found) != 1:
            problems.append(f"{identity}: under {len(found)} names")
            continue
        at_a_name.add(found[0])
        try:
            frame = decode_table(ring.decrypt(found[0].read_bytes()))[0]
        except Exception as exc:
            problems.append(f"{identity}: {type(exc).__name__}: {exc}")
            continue
        if not same(frame, control):
            problems.append(f"{identity}: {len(frame)} rows, not its data")
    others = {p for p in data.rglob("*.fernet") if p.name != CATALOGUE_NAME} - at_a_name
    if others:
        problems.append(f"dataset files that are no dataset's: {sorted(others)[:3]}")
    try:
        if ring.decrypt((site / "state" / "canary.fernet").read_bytes()) != CANARY_TEXT:
            problems.append("the canary holds something else")
    except Exception as exc:
        problems.append(f"the canary does not decrypt: {type(exc).__name__}")
    return problems


def migrated_problems(t: Templates, site: Path, env: dict[str, str]) -> list[str]:
    """A finished migration: opaque names only, the catalogue, every dataset's data."""
    app = app_for(site, env)
    store = app.store()
    problems = []
    frames = {item.dataset.identity: store.read_file(site / "data" / item.file)[0]
              for item in store.listing() if item.dataset is not None}
    if set(frames) != set(t.by_identity):
        problems.append(f"datasets {sorted(set(frames) ^ set(t.by_identity))} missing or extra")
    problems += [f"{i}: not its data" for i, f in frames.items()
                 if i in t.by_identity and not same(f, t.by_identity[i])]
    if uses_earlier_layout(site / "data"):
        problems.append("directories of the earlier layout remain")
    if store.catalogue().problem:
        problems.append(f"the catalogue is {store.catalogue().problem}")
    if any("error" in d for d in app.status()["datasets"]):
        problems.append("status names an unreadable dataset")
    return problems


def consistency_problems(t: Templates, op: str, site: Path, env: dict[str, str],
                         stats: dict[str, Any]) -> list[str]:
    """What must hold at any moment: after a kill, and after the next run."""
    if op == "migrate-store":
        return migration_problems(t, site, env)
    problems: list[str] = []
    try:
        app = app_for(site, env)
        ring = app.key_ring()
        store = app.store()
    except Exception as exc:
        return [f"the installation does not open: {type(exc).__name__}: {exc}"]
    data = site / "data"
    files = dataset_files(data)
    listed = sorted(store.path(d) for d in store.datasets())
    if listed != sorted(files):
        problems.append(f"the store lists {len(listed)} datasets, {len(files)} files exist")
    if any(p.name.startswith(".") for p in listed):
        problems.append("a temp file is listed as a dataset")
    stats["temp_files"] = stats.get("temp_files", 0) + len(
        [p for p in data.rglob(".tmp-*") if not p.name.endswith(PLANTED)])
    for path in files:
        key = rel(site, path)
        if key not in t.control:
            problems.append(f"{key}: a dataset that never existed")
            continue
        if op == "backup" and path.read_bytes() != t.before_bytes[op].get(key):
            problems.append(f"{key}: changed by a backup")
        try:
            frame = store.read_file(path)[0]
            validate_bars(frame)
        except Exception as exc:
            problems.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        if not any(same(frame, want) for want in allowed_states(t, op, key)):
            problems.append(f"{key}: {len(frame)} rows, neither the data before nor after")
    if op != "download":
        missing = set(t.before_bytes[op]) - {rel(site, p) for p in files}
        cleanup_may_remove = op == "cleanup" and all(
            cutoff_frame(t.control[k]).empty for k in missing)
        if missing and not cleanup_may_remove:
            problems.append(f"datasets lost: {sorted(missing)}")
    try:
        if ring.decrypt(app.ctx.custody.canary_path.read_bytes()) != CANARY_TEXT:
            problems.append("the canary holds something else")
    except Exception as exc:
        problems.append(f"the canary does not decrypt: {type(exc).__name__}")
    for path in (site / "state").rglob("*.json"):
        try:
            json.loads(path.read_text())
        except ValueError:
            problems.append(f"state file {path.name} is torn")
    try:
        status = app.status()
        if len(status["datasets"]) != len(files) or any("error" in d for d in status["datasets"]):
            problems.append("status disagrees with the files or names an unreadable one")
    except Exception as exc:
        problems.append(f"status fails: {type(exc).__name__}: {exc}")
    archives = backup_archives(site / "backups")
    if any(a.name.startswith(".") for a in archives):
        problems.append("a temp archive is listed as a backup")
    for archive in archives:
        report = verify_backup(archive, ring, 1)  # every member against the manifest
        if not report.sound:
            problems.append(f"backup {archive.name} does not verify: {report.problems[:3]}")
    return problems


def finished_problems(t: Templates, op: str, site: Path, env: dict[str, str]) -> list[str]:
    """The operation's finished state, after the next run completed."""
    if op == "migrate-store":
        return migrated_problems(t, site, env)
    problems = []
    app = app_for(site, env)
    ring = app.key_ring()
    frames = frames_of(site, env)
    data = site / "data"
    if op in ("download", "merge", "rotate-key"):
        wanted = {k for k in t.control if op != "download" or k in t.daily}
        if set(frames) != wanted:
            problems.append(f"datasets {sorted(wanted ^ set(frames))} missing or extra")
        for key, frame in frames.items():
            if not same(frame, t.control[key]):
                problems.append(f"{key}: not the complete data")
    if op in ("download", "merge", "rotate-key", "cleanup") and list(data.rglob(".tmp-*")):
        problems.append("temp files remain in the data directory after a completed run")
    if op == "rotate-key":
        primary = KeyRing([ring.primary])
        for path in dataset_files(data) + [app.ctx.custody.canary_path]:
            try:
                primary.decrypt(path.read_bytes())
            except Exception:
                problems.append(f"{path.name}: not under the new primary key alone")
    if op == "backup":
        archives = backup_archives(site / "backups")
        if len(archives) != BACKUP_KEEP:
            problems.append(f"{len(archives)} archives kept, expected {BACKUP_KEEP}")
    if op == "cleanup":
        cutoff = retention_cutoff(RETENTION_DAYS)
        for key, frame in frames.items():
            if not same(frame, cutoff_frame(t.control[key])):
                problems.append(f"{key}: not trimmed to the retention window ({cutoff})")
        if len(backup_archives(site / "backups")) != BACKUP_KEEP:
            problems.append("old archives not pruned")
        leftovers = [p for root in ("data", "state", "backups")
                     for p in (site / root).rglob(".tmp-*")]
        if leftovers:
            problems.append(f"temp files not removed: {leftovers}")
    return problems


# -- trials -------------------------------------------------------------------------------------

@dataclass
class TrialResult:
    op: str
    index: int
    delay: float
    killed: bool
    problems: list[str]
    temp_files: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)


def calibrate(t: Templates, servers: queue.Queue, op: str) -> float:
    """Seconds of an uninterrupted run, fork to exit, plus 15% (the kill window, so that the
    operation's last steps are hit too): the second of two runs, so that warming up (the
    emulator's first answers, cold caches) does not widen it."""
    server = servers.get()
    durations = []
    try:
        for _ in range(2):
            site = t.copy(op)
            env = op_env(op, site, t.av)
            started = time.monotonic()
            run = server.spawn(OPERATIONS[op], site, env)
            code = server.wait(run)
            durations.append(time.monotonic() - started)
            assert code == 0, f"{op} calibration run failed: {code} {server.output(run)}"
        seconds = durations[-1] * 1.15
    finally:
        servers.put(server)
    assert not finished_problems(t, op, site, env), finished_problems(t, op, site, env)
    return seconds


def real_cli(args: list[str], site: Path, env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, str(CLI), *args], cwd=site, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)
    return done.returncode, done.stdout, done.stderr


def trial(t: Templates, servers: queue.Queue, op: str, index: int, window: float) -> TrialResult:
    rng = random.Random(f"{SEED}/{op}/{index}")
    delay = rng.uniform(0.0, window)
    started = time.monotonic()
    phases: dict[str, float] = {}
    since = [started]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = now - since[0]
        since[0] = now

    site = t.copy(op)
    env = op_env(op, site, t.av)
    server = servers.get()
    try:
        phase("copy")
        victim = server.spawn(OPERATIONS[op], site, env)
        code = server.wait(victim, timeout=delay)
        killed = code is None
        if killed:
            os.kill(victim["pid"], signal.SIGKILL)
            code = server.wait(victim)
            killed = code == -signal.SIGKILL  # else it finished just before the signal
        phase("run+kill")
        stats: dict[str, Any] = {}
        problems = [f"after the kill: {p}" for p in consistency_problems(t, op, site, env, stats)]
        if code not in (0, -signal.SIGKILL):
            problems.append(f"the run ended with {code}, neither done nor killed: "
                            f"{server.output(victim)[1].strip()[-300:]}")
        phase("check")
        # the next run: a forked one, and now and then a whole new interpreter
        if REAL_CLI_EVERY and index % REAL_CLI_EVERY == REAL_CLI_EVERY - 1:
            code, out, err = real_cli(OPERATIONS[op], site, env)
        else:
            follower = server.spawn(OPERATIONS[op], site, env)
            code = server.wait(follower, timeout=CHILD_TIMEOUT)
            out, err = server.output(follower)
    finally:
        servers.put(server)
    phase("next run")
    if code != 0:
        problems.append(f"the next run exited {code}: {err.strip()[-300:]}")
    if "Traceback" in err:
        problems.append("the next run printed a traceback")
    problems += [f"after the next run: {p}" for p in
                 consistency_problems(t, op, site, env, {}) + finished_problems(t, op, site, env)]
    phase("final check")
    if not problems:
        shutil.rmtree(site, ignore_errors=True)
    return TrialResult(op, index, delay, killed, [f"{op} #{index} (kill at {delay:.3f} s, "
                                                  f"site {site.name}): {p}" for p in problems],
                       stats.get("temp_files", 0), time.monotonic() - started, phases)


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_sigkill_at_random_moments_leaves_a_consistent_resumable_store(templates, fork_servers,
                                                                      op, figures):
    window = calibrate(templates, fork_servers, op)
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda i: trial(templates, fork_servers, op, i, window),
                                range(TRIALS)))
    delays = [r.delay for r in results]
    killed = sum(r.killed for r in results)
    held = sum(not r.problems for r in results)
    print(f"\n{op}: {len(results)} trials, window {window:.3f} s (measured run + 15%), kill delays "
          f"min {min(delays):.3f} / median {statistics.median(delays):.3f} / max "
          f"{max(delays):.3f} s; {killed} killed mid-run, {len(results) - killed} finished "
          f"first; temp files seen after kills: {sum(r.temp_files for r in results)}; "
          f"{held}/{len(results)} held; {sum(r.seconds for r in results):.1f} s of trials ("
          + ", ".join(f"{name} {statistics.mean(r.phases.get(name, 0) for r in results):.2f}"
                      for name in results[0].phases) + " s mean)")
    figures.record(f"crash consistency: SIGKILL during {op}", tried=len(results), held=held,
                   notes=f"window {window:.3f} s, {killed} killed mid-run, seed {SEED}",
                   killed=killed, window_seconds=round(window, 3))
    failures = [p for r in results for p in r.problems]
    assert not failures, "\n".join(failures[:30])


# -- a full disk -------------------------------------------------------------------------------

FSIZE_LIMIT = 16 * 1024  # bytes per file: below a dataset token, above the log of one run


def limited(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


FULL_DISK_OPS = campaign_budget(["merge"], ["merge", "rotate-key", "backup", "download"])


@pytest.mark.parametrize("op", FULL_DISK_OPS)
def test_full_disk_keeps_the_previous_files_and_reports_the_error(templates, op, figures):
    t = templates
    site = t.copy(op)
    env = op_env(op, site, t.av)
    before = {p: p.read_bytes() for root in ("data", "backups") for p in (site / root).rglob("*")
              if p.is_file() and not p.name.startswith(".")}
    sizes = [len(b) for p, b in before.items() if p.suffix == ".fernet"]
    assert op == "download" or max(sizes) > FSIZE_LIMIT, "tokens must exceed the limit"
    child = spawn(OPERATIONS[op], site, env, preexec=limited(FSIZE_LIMIT))
    go(child)
    code, out, err = finish(child)
    problems = []
    if code != 1:
        problems.append(f"exit {code}, expected 1")
    if "Traceback" in err or "internal error" in err:
        problems.append("a traceback or internal error on stderr")
    if "too large" not in err.lower() and "no space" not in err.lower():
        problems.append("the message does not say the file could not be written")
    # The catalogue is a cache: a run rewrites it when it no longer matches the files (as
    # in these copied stores, whose inodes are new); the datasets must stay as they were.
    changed = [p.name for p, b in before.items() if p.name != CATALOGUE_NAME
               and (not p.exists() or p.read_bytes() != b)]
    if op in ("merge", "backup", "download") and changed:
        problems.append(f"previous files changed: {changed}")
    problems += consistency_problems(t, op, site, env, {})
    # the next run, with room again, completes
    nxt = spawn(OPERATIONS[op], site, env)
    go(nxt)
    code2, _, err2 = finish(nxt)
    if code2 != 0:
        problems.append(f"the run after the disk had room again exited {code2}: {err2[-300:]}")
    else:
        problems += finished_problems(t, op, site, env)
    figures.record(f"full disk (RLIMIT_FSIZE {FSIZE_LIMIT} B): {op}", tried=1,
                   held=int(not problems), notes=f"exit {code}; stderr {err.strip()[-160:]!r}")
    assert not problems, f"{op} under a file-size limit: {problems}\nstdout={out!r}\nstderr={err!r}"


def test_full_disk_mid_run_names_the_dataset_and_does_not_deny_what_was_written(templates):
    t = templates
    site = t.copy("merge")                  # S00..S09 stale: merging each needs > the limit
    env = op_env("merge", site, t.av)
    env.update(ALPHA_VANTAGE_API_KEY="FREEKEY", OHLCV_RATE_LIMIT_PER_SECOND="20",
               OHLCV_MAX_WORKERS="1")
    del env["OHLCV_RATE_LIMIT_PER_MINUTE"]
    saved = t.av.free_per_second
    t.av.free_per_second = None
    try:
        # NEW: a new symbol on a free key gets the compact window, a small file that fits
        child = spawn(["download", "NEW", "S00"], site, env, preexec=limited(FSIZE_LIMIT))
        go(child)
        code, out, err = finish(child)
    finally:
        t.av.free_per_second = saved
    assert code == 1
    assert "Traceback" not in err
    assert "NEW daily: updated" in out and app_for(site, env).store().path(DatasetId("NEW")).exists()
    assert "S00 daily: FAILED" in out, (out, err)       # the failure is per dataset, named
    assert "nothing stored was changed" not in err, err  # NEW was stored by this very run
