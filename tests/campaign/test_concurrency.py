"""Campaign B, area 5: several runs on one data directory at once.

Real processes of the command line, started together on one installation whose keys live
in `.env` (as --init leaves them on a headless server, so --rotate-key re-encrypts for
real), against the emulator with some latency so that runs overlap:

* two downloads of the same symbols; a download and a cleanup; then four runs (two
  downloads, cleanup, backup) -- with OHLCV_LOCK_TIMEOUT large (all succeed, one after the
  other) and small (1 s: some give up with exit 1 and a message naming the lock);
* a download or a backup and a key rotation, in both orders of taking the lock. The
  order is forced, not left to chance: a helper holds the lock, the run meant to go second
  is paused (SIGSTOP) once it has read its keys and is waiting, the other runs, then the
  first is resumed -- exactly what a slow or descheduled cron job does.

After each: every exit code is a documented one (0..5) and the expected one; every dataset
decrypts under the key ring as stored and validates; after a rotation every file opens
under the new primary key alone; the data equals what a serial run gives; no temp file is
left, before or after the next run. A run that has to wait for the lock says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cryptography.fernet import Fernet
from keyring.backends import fail

from config import load_settings
from secure_ohlcv_downloader import (
    KeyCustody,
    KeyRing,
    KeyringKeyStore,
    SecureOHLCVDownloader,
    backup_archives,
    dataset_files,
    decode_table,
    market_today,
    retention_cutoff,
    validate_bars,
    verify_backup,
)
from tests.campaign.figures import is_long
from tests.download_fixtures import PREMIUM_KEY, PREMIUM_PER_MINUTE
from tests.foundation_fixtures import CLI, headless_env
from tests.lifecycle_fixtures import lock_holder

DOCUMENTED_EXITS = {0, 1, 2, 3, 4, 5}
LOCK_MESSAGE = re.compile(r"another run holds the lock on (\S+) \(pid \d+")


@contextlib.contextmanager
def latency(av, seconds: float) -> Iterator[None]:
    av.latency = seconds
    try:
        yield
    finally:
        av.latency = 0.0


# -- an installation and its runs --------------------------------------------------------

@dataclass
class Run:
    name: str
    args: list[str]
    proc: subprocess.Popen
    code: int | None = None
    stdout: str = ""
    stderr: str = ""

    def wait(self, timeout: float = 120) -> Run:
        if self.code is not None:
            return self
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        self.code = self.proc.returncode
        return self

    def gave_up(self) -> bool:
        return self.code == 1 and bool(LOCK_MESSAGE.search(self.stderr))


class Site:
    """One installation in `cwd`, keys in its .env; runs of the real command line."""

    def __init__(self, root: Path, av, **variables: str) -> None:
        self.cwd, self.home = root / "site", root / "home"
        self.cwd.mkdir(parents=True)
        self.home.mkdir(exist_ok=True)
        env_file = self.cwd / ".env"
        env_file.write_text(f"OHLCV_ENCRYPTION_KEY={Fernet.generate_key().decode()},naming:{Fernet.generate_key().decode()}\n")
        env_file.chmod(0o600)
        self.variables = {"ALPHA_VANTAGE_API_KEY": PREMIUM_KEY,
                          "ALPHA_VANTAGE_BASE_URL": av.base_url,
                          "OHLCV_RATE_LIMIT_PER_MINUTE": str(PREMIUM_PER_MINUTE),
                          "OHLCV_BACKOFF_SECONDS": "0.01", "OHLCV_MAX_WORKERS": "1",
                          "OHLCV_LOCK_TIMEOUT": "60", **variables}
        self.app().init()

    @property
    def data(self) -> Path:
        return self.cwd / "data"

    @property
    def log(self) -> Path:
        return self.cwd / "secure_downloader.log"

    def env(self, **overrides: str) -> dict[str, str]:
        return headless_env(self.home, **{**self.variables, **overrides})

    def app(self, **overrides: str) -> SecureOHLCVDownloader:
        settings = load_settings(environ=self.env(**overrides), cwd=self.cwd)
        return SecureOHLCVDownloader(settings, KeyringKeyStore(fail.Keyring()))

    def start(self, name: str, *args: str, **overrides: str) -> Run:
        proc = subprocess.Popen([sys.executable, str(CLI), *args], cwd=self.cwd,
                                env=self.env(**overrides), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Run(name, list(args), proc)

    def ring(self) -> KeyRing:
        """The key ring as stored now (.env read again)."""
        settings = load_settings(environ=self.env(), cwd=self.cwd)
        return KeyCustody(settings, KeyringKeyStore(fail.Keyring())).sources().choose()[0]

    def key_reads(self) -> int:
        """How many runs have read their key ring so far (each logs it once)."""
        return self.log.read_text().count(" key ring from ") if self.log.exists() else 0

    def lock_waits(self) -> int:
        """How many runs have said they are waiting for the data-directory lock."""
        return self.log.read_text().count("waiting for the lock on ") if self.log.exists() else 0

    def wait_lock_waits(self, count: int, runs: list[Run], timeout: float = 60) -> None:
        self.wait_key_reads(count, runs, timeout, counter=self.lock_waits)

    def wait_key_reads(self, count: int, runs: list[Run], timeout: float = 60,
                       counter=None) -> None:
        counter = counter or self.key_reads
        deadline = time.monotonic() + timeout
        while counter() < count:
            finished = [r for r in runs if r.proc.poll() is not None]
            assert not finished, f"{finished[0].name} ended early: {finished[0].wait().stderr[-500:]}"
            assert time.monotonic() < deadline, "a run never read its keys"
            time.sleep(0.02)

    def temp_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.cwd)) for d in ("data", "state", "backups")
                      for p in (self.cwd / d).rglob(".tmp-*"))

    def frames(self, ring: KeyRing | None = None) -> dict[str, pd.DataFrame]:
        """Every dataset by identity (daily/IBM, as its own metadata names it), decrypted
        with `ring` (default: as stored) and validated."""
        ring = ring or self.ring()
        frames = {}
        for path in dataset_files(self.data):
            frame, meta = decode_table(ring.decrypt(path.read_bytes()))
            validate_bars(frame)
            frames["/".join(filter(None, (meta["dataset"], meta["symbol"], meta.get("month"))))] = frame
        return frames

    def under_primary_alone(self) -> list[str]:
        """Files that do NOT open under the primary key alone."""
        alone = KeyRing([self.ring().primary])
        stray = []
        for path in dataset_files(self.data) + [self.cwd / "state" / "canary.fernet"]:
            try:
                alone.decrypt(path.read_bytes())
            except Exception:  # noqa: BLE001
                stray.append(str(path.relative_to(self.cwd)))
        return stray


_SERIAL: dict[str, pd.DataFrame] = {}


def serial_frames(tmp_path_factory, av, symbols: list[str]) -> dict[str, pd.DataFrame]:
    """What one serial download of each symbol stores (cached per symbol)."""
    missing = [s for s in symbols if s not in _SERIAL]
    if missing:
        site = Site(tmp_path_factory.mktemp("serial"), av)
        report = site.app().download(missing)
        assert report.exit_code == 0, [r.line() for r in report.results]
        for rel, frame in site.frames().items():
            _SERIAL[rel.split("/")[1]] = frame
    return {f"daily/{s}": _SERIAL[s] for s in symbols}


def differences(actual: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> list[str]:
    found = []
    for rel in sorted(set(actual) | set(expected)):
        if rel not in actual or rel not in expected:
            found.append(f"{rel}: {'missing' if rel not in actual else 'unexpected'}")
            continue
        try:
            pd.testing.assert_frame_equal(actual[rel], expected[rel], check_exact=True)
        except AssertionError as exc:
            found.append(f"{rel}: {str(exc).splitlines()[0]}")
    return found


def outcome_problems(runs: list[Run], expected: dict[str, set[int]]) -> list[str]:
    """Exit codes documented and expected; a run that gave up names the lock and the fix."""
    problems = []
    for run in runs:
        if run.code not in DOCUMENTED_EXITS:
            problems.append(f"{run.name}: undocumented exit {run.code}")
        elif run.code not in expected[run.name]:
            problems.append(f"{run.name}: exit {run.code} (expected {sorted(expected[run.name])}): "
                            f"{run.stderr.strip()[-300:]}")
        if run.code == 1 and "lock" in run.stderr and not (
                run.gave_up() and "OHLCV_LOCK_TIMEOUT" in run.stderr):
            problems.append(f"{run.name}: gave up without naming the lock and the fix: {run.stderr[-200:]}")
        if "Traceback" in run.stderr or "internal error" in run.stderr:
            problems.append(f"{run.name}: crashed: {run.stderr[-300:]}")
    return problems


def start_together(site: Site, commands: dict[str, list[str]], *, overlap: Any = None) -> list[Run]:
    """Start every command at once. With `overlap` (the emulator), the first is given the
    lock before the others start and is kept slow (3 s an answer) until every other run
    has ended: they surely find the lock taken, as behind a long cron job that overruns."""
    names = list(commands)
    first = site.start(names[0], *commands[names[0]])
    if overlap is not None:
        overlap.latency = 3.0
        deadline = time.monotonic() + 60
        while f"pid {first.proc.pid} " not in _read(site.data / ".lock"):
            assert first.proc.poll() is None, first.wait().stderr[-500:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.01)
    others = [site.start(name, *commands[name]) for name in names[1:]]
    if overlap is not None:
        for run in others:
            run.wait()
        overlap.latency = 0.0
    return [run.wait() for run in [first, *others]]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def after_next_run(site: Site, symbols: list[str]) -> list[str]:
    """Run the next (serial) download; return the temp files left anywhere after it."""
    result = site.start("next run", "download", *symbols).wait()
    assert result.code == 0, result.stderr[-500:]
    return site.temp_files()


def record(figures, area: str, runs: list[Run], problems: list[str], notes: str = "") -> None:
    figures.record(area, tried=len(runs), held=len(runs) if not problems else 0,
                   notes=notes + f" exits={[r.code for r in runs]}")
    if problems:
        pytest.fail(f"{area}:\n  " + "\n  ".join(problems), pytrace=False)


# -- two downloads ---------------------------------------------------------------------------

SAME = ["IBM", "MSFT", "AAPL", "GOOG", "AMZN", "NVDA"]


@pytest.mark.parametrize("lock_timeout", ["60", "1"])
def test_two_downloads_of_the_same_symbols(tmp_path, tmp_path_factory, emulator, figures, lock_timeout):
    """Both wait their turn (60 s: both exit 0, the second finds everything current) or
    one gives up (1 s: exit 1 naming the lock). Either way the store equals one serial
    download, every file decrypts, no temp file is left."""
    site = Site(tmp_path, emulator, OHLCV_LOCK_TIMEOUT=lock_timeout)
    expected_frames = serial_frames(tmp_path_factory, emulator, SAME)
    with latency(emulator, 0.15):
        runs = start_together(site, {"download A": ["download", *SAME], "download B": ["download", *SAME]},
                              overlap=emulator if lock_timeout == "1" else None)
    ok = {0} if lock_timeout == "60" else {0, 1}
    problems = outcome_problems(runs, {"download A": ok, "download B": ok})
    if lock_timeout == "1" and sum(r.gave_up() for r in runs) != 1:
        problems.append(f"with a 1 s lock timeout exactly one run should give up: "
                        f"{[(r.code, r.stderr[-120:]) for r in runs]}")
    problems += [f"left behind: {t}" for t in site.temp_files()]
    problems += differences(site.frames(), expected_frames)
    problems += [f"after the next run: {t}" for t in after_next_run(site, SAME)]
    record(figures, f"concurrency/download+download timeout={lock_timeout}", runs, problems)


def test_download_and_cleanup(tmp_path, tmp_path_factory, emulator, figures):
    """A download of new symbols and a cleanup applying a retention window, together:
    the store equals one of the two serial orders, nothing lost, nothing interleaved."""
    seeded, fresh = ["IBM", "MSFT"], ["AAPL", "GOOG", "AMZN"]
    site = Site(tmp_path, emulator, OHLCV_RETENTION_DAYS="400")
    assert site.app().download(seeded).exit_code == 0
    full = serial_frames(tmp_path_factory, emulator, seeded + fresh)
    cutoff = pd.Timestamp(retention_cutoff(400, market_today()))

    def trimmed(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["timestamp"] >= cutoff].reset_index(drop=True)

    cleanup_first = {rel: (trimmed(f) if any(s in rel for s in seeded) else f) for rel, f in full.items()}
    download_first = {rel: trimmed(f) for rel, f in full.items()}
    with latency(emulator, 0.3):
        runs = start_together(site, {"download": ["download", *fresh], "cleanup": ["--cleanup"]})
    problems = outcome_problems(runs, {"download": {0}, "cleanup": {0}})
    frames = site.frames()
    if differences(frames, cleanup_first) and differences(frames, download_first):
        problems.append("the store matches neither serial order: "
                        + "; ".join(differences(frames, download_first)[:3]))
    problems += [f"left behind: {t}" for t in site.temp_files()]
    problems += [f"after the next run: {t}" for t in after_next_run(site, fresh)]
    record(figures, "concurrency/download+cleanup", runs, problems)


# -- a rotation and another run, in a forced order --------------------------------------

def forced_order(site: Site, first: tuple[str, list[str]], second: tuple[str, list[str]]) -> list[Run]:
    """`second` starts and waits for the lock, then pauses (SIGSTOP); `first` takes the
    lock and finishes; `second` resumes and takes the lock after it. (Keys are read only
    once the lock is held, so `second` must see what `first` left.)"""
    waits = site.lock_waits()
    with lock_holder(site.data):
        later = site.start(second[0], *second[1])
        site.wait_lock_waits(waits + 1, [later])
        os.kill(later.proc.pid, signal.SIGSTOP)
        sooner = site.start(first[0], *first[1])
        site.wait_lock_waits(waits + 2, [sooner])
    sooner.wait()
    os.kill(later.proc.pid, signal.SIGCONT)
    return [sooner, later.wait()]


ROTATE = ("rotate-key", ["--rotate-key"])
DOWNLOAD = ("download", ["download", "IBM", "MSFT", "AAPL", "GOOG"])
BACKUP = ("backup", ["backup"])
ORDERS = {
    "download, then rotate": (DOWNLOAD, ROTATE),
    "rotate, then a download that waited for the lock": (ROTATE, DOWNLOAD),
    "backup, then rotate": (BACKUP, ROTATE),
    "rotate, then a backup that waited for the lock": (ROTATE, BACKUP),
}
QUICK_ORDERS = ("download, then rotate", "rotate, then a download that waited for the lock",
                "rotate, then a backup that waited for the lock")


@pytest.mark.parametrize("order", [o for o in ORDERS if is_long() or o in QUICK_ORDERS])
def test_rotation_and_another_run(tmp_path, tmp_path_factory, emulator, figures, order):
    """Whichever takes the lock first, both runs succeed (exit 0); afterwards every file
    opens under the new primary key alone (the rotation's promise), the data equals a
    serial run's, and a backup taken in the middle verifies under the ring as stored."""
    site = Site(tmp_path, emulator)
    assert site.app().download(["IBM", "MSFT"]).exit_code == 0
    expected_frames = serial_frames(tmp_path_factory, emulator, ["IBM", "MSFT", "AAPL", "GOOG"])
    if "download" not in order:
        expected_frames = {k: v for k, v in expected_frames.items() if "IBM" in k or "MSFT" in k}
    first, second = ORDERS[order]
    before = site.ring().primary.fingerprint
    runs = forced_order(site, first, second)
    problems = outcome_problems(runs, {"rotate-key": {0}, "download": {0}, "backup": {0}})
    ring = site.ring()
    if ring.primary.fingerprint == before:
        problems.append("the rotation did not change the primary key")
    try:
        problems += differences(site.frames(ring), expected_frames)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"a dataset does not decrypt under the ring as stored: {exc!r}")
    problems += [f"not under the new primary key alone: {p}" for p in site.under_primary_alone()]
    for archive in backup_archives(site.cwd / "backups"):
        report = verify_backup(archive, ring, None)
        problems += [f"{archive.name}: {p}" for p in report.problems]
    problems += [f"left behind: {t}" for t in site.temp_files()]
    record(figures, f"concurrency/forced order: {order}", runs, problems)


# -- four runs -------------------------------------------------------------------------------

FOUR_A, FOUR_B = ["AAPL", "GOOG", "AMZN"], ["NVDA", "META", "TSLA"]


@pytest.mark.parametrize("lock_timeout", ["60", "1"])
def test_four_runs_together(tmp_path, tmp_path_factory, emulator, figures, lock_timeout):
    """Two downloads of different symbols, a cleanup and a backup, started together.
    60 s: all exit 0, the store holds everything a serial run would, the new archive
    verifies, BACKUP_KEEP holds. 1 s: the ones that give up exit 1 naming the lock and
    leave nothing half done; what the others did is complete and correct."""
    site = Site(tmp_path, emulator, OHLCV_LOCK_TIMEOUT=lock_timeout, OHLCV_BACKUP_KEEP="2")
    app = site.app()
    assert app.download(["IBM"]).exit_code == 0
    for _ in range(3):
        app.backup()
    before = {a.name for a in backup_archives(site.cwd / "backups")}
    expected_frames = serial_frames(tmp_path_factory, emulator, ["IBM", *FOUR_A, *FOUR_B])
    commands = {"download A": ["download", *FOUR_A], "download B": ["download", *FOUR_B],
                "cleanup": ["--cleanup"], "backup": ["backup"]}
    with latency(emulator, 0.15):
        runs = start_together(site, commands, overlap=emulator if lock_timeout == "1" else None)
    ok = {0} if lock_timeout == "60" else {0, 1}
    problems = outcome_problems(runs, {name: ok for name in commands})
    done = {r.name for r in runs if r.code == 0}
    if lock_timeout == "1" and not (1 <= len(done) < len(runs)):
        problems.append(f"with a 1 s lock timeout some runs should give up and one succeed: "
                        f"{[(r.name, r.code) for r in runs]}")
    wanted = {"daily/IBM"}
    wanted |= {f"daily/{s}" for s in FOUR_A} if "download A" in done else set()
    wanted |= {f"daily/{s}" for s in FOUR_B} if "download B" in done else set()
    problems += differences(site.frames(), {k: v for k, v in expected_frames.items() if k in wanted})
    archives = backup_archives(site.cwd / "backups")
    if ("backup" in done or "cleanup" in done) and len(archives) != 2:
        problems.append(f"OHLCV_BACKUP_KEEP=2 but {len(archives)} archives remain")
    if "backup" in done:
        newest = [a for a in archives if a.name not in before]
        if len(newest) != 1:
            problems.append(f"expected one new archive, found {[a.name for a in newest]}")
        for archive in newest:
            problems += [f"{archive.name}: {p}" for p in verify_backup(archive, site.ring(), None).problems]
    problems += [f"left behind: {t}" for t in site.temp_files()]
    problems += [f"after the next run: {t}" for t in after_next_run(site, ["IBM"])]
    record(figures, f"concurrency/four runs timeout={lock_timeout}", runs, problems,
           notes=f"succeeded: {sorted(done)};")


@pytest.mark.skipif(not is_long(), reason="long campaign only: left to the scheduler's chance")
def test_four_runs_with_a_rotation_started_together(tmp_path, tmp_path_factory, emulator, figures):
    """Two downloads, a backup and a rotation started together, repeatedly, in whatever
    order the scheduler gives: all succeed, every file under the new key alone."""
    expected = serial_frames(tmp_path_factory, emulator, ["IBM", *FOUR_A, *FOUR_B])
    failures, tried = [], 0
    for attempt in range(3):
        site = Site(tmp_path / f"attempt-{attempt}", emulator)
        assert site.app().download(["IBM"]).exit_code == 0
        commands = {"download A": ["download", *FOUR_A], "download B": ["download", *FOUR_B],
                    "backup": ["backup"], "rotate-key": ["--rotate-key"]}
        with latency(emulator, 0.1):
            runs = start_together(site, commands)
        tried += len(runs)
        problems = outcome_problems(runs, {name: {0} for name in commands})
        try:
            problems += differences(site.frames(), expected)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"a dataset does not decrypt: {exc!r}")
        problems += [f"not under the primary alone: {p}" for p in site.under_primary_alone()]
        if problems:
            failures.append((attempt, problems))
    figures.record("concurrency/four with rotation (natural order)", tried=tried,
                   held=tried - sum(len(p) for _, p in failures))
    if failures:
        pytest.fail("started together with a rotation:\n" + "\n".join(
            f"  attempt {attempt}: {problem}" for attempt, problems in failures for problem in problems),
            pytrace=False)


# -- waiting is said -------------------------------------------------------------------------

WAIT_WORDS = re.compile(r"(?i)(wait\w*\W+(\w+\W+){0,6}lock|lock\W+(\w+\W+){0,8}(held|holds|busy|wait\w*))")


def test_a_run_that_waits_for_the_lock_says_so(tmp_path, emulator, figures):
    """A run that finds the lock taken and waits (within OHLCV_LOCK_TIMEOUT) must say so
    -- in the log or on stderr, naming the holder -- so that an operator reading a slow
    cron job's output knows why it took long. It then succeeds."""
    site = Site(tmp_path, emulator, OHLCV_LOCK_TIMEOUT="30")
    assert site.app().download(["IBM"]).exit_code == 0
    log_before = site.log.read_text() if site.log.exists() else ""
    with lock_holder(site.data) as holder:
        run = site.start("download", "download", "MSFT")
        site.wait_lock_waits(site.lock_waits() + 1, [run])
        time.sleep(1.0)
        holder_pid = holder.pid
    run.wait()
    new_log = (site.log.read_text() if site.log.exists() else "")[len(log_before):]
    said = [line for line in (new_log + "\n" + run.stderr).splitlines()
            if WAIT_WORDS.search(line) and "finished" not in line]
    names_holder = any(str(holder_pid) in line for line in said)
    figures.record("concurrency/waiting is said", tried=1, held=int(bool(said) and run.code == 0),
                   notes=f"names holder: {names_holder}")
    assert run.code == 0, run.stderr[-500:]
    assert said, ("the run waited about 1 s for the data-directory lock and neither its log "
                  "nor its stderr says so")

