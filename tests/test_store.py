"""The encrypted store: what is on disk, who may read it, which names it accepts, and
what survives a crash (docs/FORMAT.md's invariants, checked on real files)."""

from __future__ import annotations

import os
import posixpath
import queue
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st
from keyring.backends import fail

from secure_ohlcv_downloader import (
    INTERVALS,
    INTRADAY,
    DataDirLock,
    DatasetId,
    EncryptedStore,
    IntegrityError,
    KeyRing,
    LockTimeout,
    StoredKey,
    UnsafePathError,
    UsageError,
    dataset_file,
    ensure_private_dir,
    remove_temp_files,
)
from tests.foundation_fixtures import (
    REPO,
    base_env,
    headless_env,
    init_in_process,
    new_key,
    ohlcv_frame,
    run_cli,
    run_python,
    settings_for,
    tree,
)
from tests.writer_child import DATASETS
from tests.writer_child import frame as writer_frame

WRITER = Path(__file__).with_name("writer_child.py")
IBM = DatasetId("IBM")
NAMING = new_key()  # every store of these tests names its files with this naming key


def ring(*keys: str) -> KeyRing:
    """The Fernet keys given (primary first) and NAMING."""
    return KeyRing([StoredKey(k, "primary" if i == 0 else "retired") for i, k in enumerate(keys)]
                   + [StoredKey(NAMING, "naming")])


def with_naming(key: str) -> str:
    """OHLCV_ENCRYPTION_KEY holding `key` and NAMING."""
    return f"{key},naming:{NAMING}"


def make_store(cwd: Path, key: str) -> EncryptedStore:
    settings = settings_for(cwd, OHLCV_ENCRYPTION_KEY=with_naming(key))
    ensure_private_dir(settings.data_dir, settings.dir_mode)
    return EncryptedStore(settings, ring(key))


@pytest.fixture
def key() -> str:
    return new_key()


@pytest.fixture
def store(tmp_path, key) -> EncryptedStore:
    return make_store(tmp_path, key)


# =========================================================================================
# What is on disk
# =========================================================================================

def test_write_then_read_round_trips_the_frame_and_metadata(store):
    frame = ohlcv_frame(5)

    store.write(IBM, frame, {"source": "unit test"})
    read, meta = store.read(IBM)

    pd.testing.assert_frame_equal(read, frame)
    assert meta["source"] == "unit test"
    assert (meta["symbol"], meta["dataset"], meta["schema_version"]) == ("IBM", "daily", 1)


def test_file_is_one_standard_fernet_token_holding_parquet(store, key):
    store.write(IBM, ohlcv_frame(5), {})

    plaintext = Fernet(key).decrypt(store.path(IBM).read_bytes())
    table = pq.read_table(pa.BufferReader(plaintext))

    assert table.num_rows == 5
    assert table.column_names == ["timestamp", "open", "high", "low", "close", "volume"]


def test_file_altered_by_one_byte_is_an_integrity_error(store):
    store.write(IBM, ohlcv_frame(5), {})
    path = store.path(IBM)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] = ord("A") if data[middle] != ord("A") else ord("B")
    path.write_bytes(bytes(data))

    with pytest.raises(IntegrityError) as caught:
        store.read(IBM)

    assert caught.value.exit_code == 5


def test_truncated_file_is_an_integrity_error(store):
    store.write(IBM, ohlcv_frame(5), {})
    path = store.path(IBM)
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(IntegrityError):
        store.read(IBM)


def test_file_written_under_a_key_not_in_the_ring_is_an_integrity_error(store, tmp_path):
    stranger = make_store(tmp_path / "elsewhere", new_key())
    stranger.write(IBM, ohlcv_frame(5), {})
    store.path(IBM).parent.mkdir(mode=0o700)
    store.path(IBM).write_bytes(stranger.path(IBM).read_bytes())

    with pytest.raises(IntegrityError, match="not in the ring"):
        store.read(IBM)


def test_retired_key_still_reads_files_written_before_a_rotation(tmp_path, key):
    make_store(tmp_path, key).write(IBM, ohlcv_frame(3), {})
    settings = settings_for(tmp_path)
    rotated = EncryptedStore(settings, ring(new_key(), key))

    read, _ = rotated.read(IBM)

    assert len(read) == 3


# =========================================================================================
# Permissions
# =========================================================================================

WRITE_DATASETS = """
from config import load_settings
from secure_ohlcv_downloader import DatasetId, EncryptedStore, KeyRing, ring_of
from tests.writer_child import frame
settings = load_settings()
store = EncryptedStore(settings, KeyRing(ring_of(settings.encryption_keys)))
with store.lock():
    store.write(DatasetId("IBM"), frame(1, 3), {})
    store.write(DatasetId("TSCO.LON", "5min", month="2024-01"), frame(2, 3), {})
"""


def test_every_created_file_and_directory_is_private_under_umask_000(tmp_path, key):
    home = tmp_path / "home"
    home.mkdir()
    env = headless_env(home, OHLCV_ENCRYPTION_KEY=with_naming(key), OHLCV_DATA_DIR="vault/data",
                       OHLCV_LOG_FILE="logs/cron/ohlcv.log")
    init = run_cli(["--init"], tmp_path, env, umask=0)
    assert init.returncode == 0, init.stderr
    write = run_python(WRITE_DATASETS, tmp_path, env, umask=0)
    assert write.returncode == 0, write.stderr

    created = [p for p in tmp_path.rglob("*") if home not in (p, *p.parents)]
    wrong = {str(p.relative_to(tmp_path)): f"{stat.S_IMODE(p.lstat().st_mode):04o}"
             for p in created
             if stat.S_IMODE(p.lstat().st_mode) != (0o700 if p.is_dir() else 0o600)}
    assert wrong == {}
    files = [dataset_file(NAMING, d) for d in (IBM, DatasetId("TSCO.LON", "5min", month="2024-01"))]
    expected = {"vault", "vault/data", "vault/data/.lock",
                *(f"vault/data/{f.parent}" for f in files), *(f"vault/data/{f}" for f in files),
                "backups", "state", "state/canary.fernet",
                "logs", "logs/cron", "logs/cron/ohlcv.log"}
    assert expected <= {str(p.relative_to(tmp_path)) for p in created}


def test_existing_loose_data_dir_is_refused_with_chmod_advice(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)

    with pytest.raises(UnsafePathError) as caught:
        ensure_private_dir(data, 0o700)

    assert f"chmod 700 {data}" in str(caught.value)
    assert stat.S_IMODE(data.stat().st_mode) == 0o755  # reported, not silently changed


def test_store_lock_refuses_a_loose_data_dir(store):
    store.root.chmod(0o755)

    with pytest.raises(UnsafePathError, match="chmod"):
        store.lock()


def test_write_refuses_a_loose_dataset_dir(store):
    store.path(IBM).parent.mkdir(mode=0o700)
    store.path(IBM).parent.chmod(0o750)

    with pytest.raises(UnsafePathError):
        store.write(IBM, ohlcv_frame(1), {})

    assert not store.path(IBM).exists()


def test_check_keys_reports_a_loose_data_dir_and_exits_3(tmp_path, key):
    init_in_process(tmp_path, fail.Keyring(), OHLCV_ENCRYPTION_KEY=key)
    (tmp_path / "data").chmod(0o755)

    result = run_cli(["--check-keys"], tmp_path, headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=key))

    assert result.returncode == 3
    line = next(row for row in result.stdout.splitlines() if "data directory" in row)
    assert line.startswith("FAIL") and "chmod 700" in line


# =========================================================================================
# Symbols and paths
# =========================================================================================

HOSTILE_SYMBOLS = ["../x", "/etc/passwd", "IBM/..", "", "A" * 100, "IB\x00M",
                   "\u0406\u0412\u041c",  # Cyrillic I, V, M: looks like IBM
                   "IBM ", "..", ".", "-IBM", "IBM\n", "C:\\x", "IBM/2024"]


@pytest.mark.parametrize("symbol", HOSTILE_SYMBOLS, ids=repr)
def test_hostile_symbol_is_a_usage_error(symbol):
    with pytest.raises(UsageError) as caught:
        DatasetId(symbol)

    assert caught.value.exit_code == 2


@pytest.mark.parametrize("symbol", HOSTILE_SYMBOLS, ids=repr)
def test_hostile_symbol_writes_nothing(tmp_path, store, symbol):
    before = tree(tmp_path)

    with pytest.raises(UsageError):
        store.write(DatasetId(symbol), ohlcv_frame(1), {})

    assert tree(tmp_path) == before


@pytest.mark.parametrize("month", ["../2024-01", "2024-13", "2024-1", "2024-01/x", ""])
def test_hostile_month_is_a_usage_error(month):
    with pytest.raises(UsageError):
        DatasetId("IBM", "5min", month=month)


@pytest.mark.parametrize("symbol, stored", [("IBM", "IBM"), ("ibm", "IBM"), ("BRK.B", "BRK.B"),
                                            ("TSCO.LON", "TSCO.LON"), ("600104.SHH", "600104.SHH")])
def test_valid_symbol_is_accepted_in_upper_case(symbol, stored):
    assert DatasetId(symbol).symbol == stored


def _inside(root: str, rel: Path) -> bool:
    return posixpath.normpath(posixpath.join(root, str(rel))).startswith(root + "/")


@given(symbol=st.one_of(st.text(), st.text(alphabet="ABZabz019.-_/\\ \x00:~\u0406", max_size=24)),
       interval=st.sampled_from(INTERVALS))
def test_any_symbol_is_rejected_or_stays_inside_the_data_dir(symbol, interval):
    month = "2024-01" if interval in INTRADAY else None
    try:
        dataset = DatasetId(symbol, interval, month=month)
    except UsageError:
        return
    rel = dataset.relative_path()

    assert not rel.is_absolute()
    assert ".." not in rel.parts
    assert _inside("/srv/ohlcv/data", rel)
    assert len(rel.parts) == (3 if month else 2)


ROUND_TRIP_DATASETS = [
    DatasetId("IBM"), DatasetId("IBM", "daily", adjusted=True), DatasetId("BRK.B", "weekly"),
    DatasetId("BRK.B", "weekly", adjusted=True), DatasetId("600104.SHH", "monthly"),
    DatasetId("600104.SHH", "monthly", adjusted=True),
    *(DatasetId("TSCO.LON", interval, month="2024-02") for interval in INTRADAY),
]


@pytest.mark.parametrize("dataset", ROUND_TRIP_DATASETS, ids=str)
def test_from_relative_path_inverts_relative_path(dataset):
    assert DatasetId.from_relative_path(dataset.relative_path()) == dataset


@given(symbol=st.from_regex(r"[A-Z0-9][A-Z0-9.\-]{0,19}", fullmatch=True).filter(lambda s: ".." not in s),
       interval=st.sampled_from(INTERVALS), adjusted=st.booleans(),
       year=st.integers(1990, 2099), month=st.integers(1, 12))
def test_from_relative_path_inverts_relative_path_for_any_valid_dataset(symbol, interval, adjusted,
                                                                        year, month):
    intraday = interval in INTRADAY
    dataset = DatasetId(symbol, interval, adjusted and not intraday,
                        f"{year}-{month:02d}" if intraday else None)

    assert DatasetId.from_relative_path(dataset.relative_path()) == dataset


# =========================================================================================
# Temp files
# =========================================================================================

def _leave_temp_files(store: EncryptedStore) -> list[Path]:
    """What crashed writers leave: temp files beside real datasets, one named like data."""
    intraday = DatasetId("TSCO.LON", "5min", month="2024-01")
    store.write(IBM, ohlcv_frame(2), {})
    store.write(intraday, ohlcv_frame(2), {})
    temps = [store.path(IBM).with_name(".tmp-IBM.fernet.0123456789ab"),
             store.path(IBM).with_name(".tmp-MSFT.fernet"),
             store.path(intraday).with_name(".tmp-2024-02.fernet.ba9876543210")]
    for temp in temps:
        temp.write_bytes(b"half a token")
    return temps


def test_datasets_never_lists_temp_files(store):
    _leave_temp_files(store)

    assert sorted(map(str, store.datasets())) == sorted(
        ["IBM daily", "TSCO.LON intraday_5min 2024-01"])


def test_remove_temp_files_removes_every_temp_file_and_nothing_else(store):
    temps = _leave_temp_files(store)

    with store.lock():
        removed = remove_temp_files(store.root)

    assert sorted(removed) == sorted(temps)
    assert not any(t.exists() for t in temps)
    assert len(list(store.datasets())) == 2


# =========================================================================================
# The data-directory lock
# =========================================================================================

HOLD_LOCK = """
import sys, time
from pathlib import Path
from secure_ohlcv_downloader import DataDirLock
with DataDirLock(Path(sys.argv[1]), 0, 0o600):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the data-directory lock of tmp_path/data."""
    data = ensure_private_dir(tmp_path / "data", 0o700)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(data)], cwd=tmp_path,
                              env=base_env(tmp_path, PYTHONPATH=str(REPO)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()


def test_second_process_times_out_with_a_clear_message_while_the_lock_is_held(tmp_path,
                                                                              lock_holder):
    started = time.monotonic()

    with pytest.raises(LockTimeout) as caught:
        with DataDirLock(tmp_path / "data", 0.5, 0o600):
            pass

    assert time.monotonic() - started >= 0.5
    assert caught.value.exit_code == 1
    message = str(caught.value)
    assert f"pid {lock_holder.pid}" in message and "OHLCV_LOCK_TIMEOUT" in message


def test_lock_is_free_at_once_after_its_holder_is_sigkilled(tmp_path, lock_holder):
    with pytest.raises(LockTimeout):  # held: one try fails
        with DataDirLock(tmp_path / "data", 0, 0o600):
            pass

    lock_holder.send_signal(signal.SIGKILL)
    lock_holder.wait(timeout=10)

    with DataDirLock(tmp_path / "data", 0, 0o600):  # timeout 0: one try, no waiting
        pass


# =========================================================================================
# SIGKILL crash campaign
# =========================================================================================

NAME_OF = {dataset: name for name, dataset in DATASETS.items()}


class WriterChild:
    """tests/writer_child.py, started ahead of time and released with `go()`."""

    def __init__(self, seed: int, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WRITER), str(seed)], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def go(self) -> None:
        assert self.lines.get(timeout=30) == "ready"
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_for(self, prefix: str, timeout: float = 30) -> list[str]:
        seen = []
        deadline = time.monotonic() + timeout
        while not (seen and seen[-1].startswith(prefix)):
            seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
        return seen

    def sigkill(self) -> list[str]:
        """SIGKILL it; every line it printed since `go()` (or since the last wait_for)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        stderr = self.proc.stderr.read()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()
        assert self.proc.returncode == -signal.SIGKILL, f"the writer died by itself:\n{stderr}"
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _possible_versions(events: list[tuple[str, int, int]]) -> set[tuple[int, int]]:
    """The (version, rows) a dataset file may hold: the last write the child confirmed, or
    any it started after that (a kill may land after the rename, before the confirmation)."""
    last_done = max((i for i, e in enumerate(events) if e[0] == "wrote"), default=-1)
    possible = {(v, r) for kind, v, r in events[last_done + 1:] if kind == "writing"}
    if last_done >= 0:
        possible.add(events[last_done][1:])
    return possible


def _check_after_crash(root: Path, reader: EncryptedStore,
                       events: dict[str, list]) -> list[Path]:
    name_at = {reader.path(dataset): name for dataset, name in NAME_OF.items()}
    """Assert the crash invariants of the data directory; return the temp files found."""
    temps, strays = [], []
    for path in sorted(p for p in root.rglob("*") if not p.is_dir()):
        if path.name == ".lock":
            continue
        if path.name.startswith(".tmp-"):
            temps.append(path)
            continue
        if path not in name_at:
            strays.append(path)
            continue
        name = name_at[path]
        frame, meta = reader.read_file(path)  # IntegrityError for a torn file
        assert len(frame) == meta["rows"]
        pd.testing.assert_frame_equal(frame, writer_frame(meta["version"], meta["rows"]))
        assert (meta["version"], meta["rows"]) in _possible_versions(events[name])
    assert strays == []
    return temps


def _record(lines: list[str], events: dict[str, list]) -> None:
    for line in lines:
        kind, name, version, rows = line.split()
        events[name].append((kind, int(version), int(rows)))


def _sigkill_when_a_temp_file_appears(child: WriterChild, reader: EncryptedStore,
                                      limit: float = 5.0):
    """Aim a kill at the write itself: poll the dataset directories, kill on the first temp file."""
    directories = [reader.path(dataset).parent for dataset in DATASETS.values()]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for directory in directories:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            if any(name.startswith(".tmp-") for name in names):
                return child.sigkill()
    return child.sigkill()


RANDOM_KILLS = 20
AIMED_KILLS = 6


def test_sigkill_mid_write_never_leaves_a_torn_or_unexpected_file(tmp_path, key):
    rng = random.Random(20240601)
    # Random moments (a few very early, the rest 20-200 ms after the writer is released),
    # then kills aimed at the moment a temp file exists.
    delays = [0.0, 0.001, 0.004, 0.01] + [rng.uniform(0.02, 0.2) for _ in range(RANDOM_KILLS - 4)]
    delays += [None] * AIMED_KILLS
    root = tmp_path / "data"
    env = base_env(tmp_path, OHLCV_DATA_DIR=str(root), OHLCV_ENCRYPTION_KEY=with_naming(key),
                   OHLCV_LOCK_TIMEOUT="10")
    reader = EncryptedStore(settings_for(tmp_path, OHLCV_DATA_DIR=str(root)), ring(key))
    events: dict[str, list] = defaultdict(list)
    mid_write = {"random": 0, "aimed": 0}
    children = [WriterChild(rng.randrange(2**31), tmp_path, env)]
    try:
        for delay in delays:
            # The next child imports while this one runs; it waits for go() to touch the disk.
            children.append(WriterChild(rng.randrange(2**31), tmp_path, env))
            child = children[-2]
            child.go()
            if delay is None:
                _record(_sigkill_when_a_temp_file_appears(child, reader), events)
            else:
                time.sleep(delay)
                _record(child.sigkill(), events)

            if not root.exists():  # killed before its first mkdir
                continue
            temps = _check_after_crash(root, reader, events)
            mid_write["random" if delay is not None else "aimed"] += bool(temps)
            with reader.lock():
                remove_temp_files(root)
            assert list(root.rglob(".tmp-*")) == []

        # After all that, a writer still runs and completes writes in this directory.
        last = children[-1]
        last.go()
        _record(last.wait_for("wrote"), events)
        _record(last.sigkill(), events)
        _check_after_crash(root, reader, events)
    finally:
        for child in children:
            child.stop()

    completed = sum(kind == "wrote" for e in events.values() for kind, _, _ in e)
    print(f"\nSIGKILL campaign: {len(delays)} kills; landed mid-write (temp file left behind): "
          f"{mid_write['random']} of {RANDOM_KILLS} random, {mid_write['aimed']} of "
          f"{AIMED_KILLS} aimed; {completed} writes completed.")
    assert completed >= 1
