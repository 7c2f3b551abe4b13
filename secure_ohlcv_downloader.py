"""Secure OHLCV Downloader: Alpha Vantage bars, encrypted at rest, safe to run for years.

Read top to bottom; the sections follow the data:

    1. Errors          -- OHLCVError and its family, one exit code each (mapped by the CLI)
    2. Redaction, log  -- SecretRedactor, RedactingFormatter, configure_logging
    3. Files           -- private directories, atomic writes, the data-directory lock
    4. Keys            -- fingerprint, KeyRing (MultiFernet), KeyringKeyStore / EnvKeyStore,
                          read_key_sources (which store wins, and every way that can go wrong)
    5. Rate limiting   -- DailyQuota (persisted, shared by processes), RateLimiter (per key)
    6. Client          -- classify_response, ApiRequest, AlphaVantageClient (retries, timeouts)
    7. Parsing         -- parse_payload (JSON or CSV to one typed table), validate_bars
    8. Encrypted store -- DatasetId (symbol and path rules), table codec, EncryptedStore
    9. Downloader      -- latest_session / is_current, merge_bars, DatasetDownloader,
                          PendingQueue (what the quota left undone)
   10. Lifecycle       -- KeyRotation, BackupWriter, BackupArchive (hostile-archive safe),
                          verify_backup, retention and pruning helpers
   11. Monitoring      -- ResourceMonitor (psutil), RunRecord, write_metrics (Prometheus
                          text file), estimate (capacity)
   12. Front door      -- SecureOHLCVDownloader: init, check_keys, download, load, status,
                          rotate_key, remove_key, backup, verify_backup, recover, cleanup

`python secure_ohlcv_downloader.py ARGS` runs the same command line as secure_ohlcv_cli.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import logging.handlers
import os
import re
import resource
import secrets
import stat
import tarfile
import math
import random
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol
from zoneinfo import ZoneInfo

import keyring
import keyring.backend
import keyring.errors
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests
import requests.adapters
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from config import (
    KEYRING_SERVICE,
    ConfigError,
    Settings,
    fernet_key_problem,
    load_settings,
    parse_encryption_keys,
    read_env_file,
)

__all__ = ["SecureOHLCVDownloader", "OHLCVError", "load_settings"]

# Arrow's default pool (mimalloc) keeps freed memory per thread: with 8 download workers
# that alone held ~70 MB (bench: peak RSS 222 MB with it, 157 MB with the system pool).
pa.set_memory_pool(pa.system_memory_pool())

log = logging.getLogger("secure_ohlcv")


# =========================================================================================
# 1. Errors
# =========================================================================================

class OHLCVError(Exception):
    """Base of every error the tool reports to an operator. `exit_code` is its CLI exit code."""

    exit_code = 1


class UsageError(OHLCVError):
    """Bad input from the user: an unknown option, a hostile symbol, a bad date."""

    exit_code = 2


class KeyStoreError(OHLCVError):
    """The encryption keys cannot be found, read, trusted or stored."""

    exit_code = 3


class UnsafePathError(OHLCVError):
    """A directory the tool would use has looser permissions than configured."""

    exit_code = 3


class LockTimeout(OHLCVError):
    """Another run holds the data-directory lock and did not let go in time."""

    exit_code = 1


class IntegrityError(OHLCVError):
    """Stored data does not decrypt or does not validate."""

    exit_code = 5


class QuotaExhausted(OHLCVError):
    """The day's API quota is spent: the run stops cleanly and can be resumed."""

    exit_code = 4


class InvalidApiKey(OHLCVError):
    """Alpha Vantage refused the API key itself."""

    exit_code = 3


class ApiError(OHLCVError):
    """One series could not be fetched: the symbol fails, the run goes on."""


class PremiumRequired(ApiError):
    """The endpoint needs a premium plan for this key."""


class PremiumParameter(ApiError):
    """A parameter (outputsize=full) needs a premium plan; compact still works."""


class InvalidPayload(ApiError):
    """The answer looked like data but is not a valid series; nothing of it is stored."""


class DiskSpaceLow(OHLCVError):
    """Free disk is below OHLCV_MIN_FREE_DISK_MB: no write is started."""


# ConfigError lives in config.py (which must not import this module); it maps to exit 3.
EXIT_CODES = {ConfigError: 3}


# =========================================================================================
# 2. Redaction and logging
# =========================================================================================

_APIKEY_PARAM = re.compile(r"(apikey=)[^&\s\"']+", re.IGNORECASE)


class SecretRedactor:
    """Replaces every known secret in a text. Keys register here the moment they are read."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *values: str) -> None:
        with self._lock:
            self._secrets.update(v for v in values if len(v) >= 4)

    def __call__(self, text: str) -> str:
        # Longest first, so a secret that contains another is removed whole.
        for value in sorted(self._secrets, key=len, reverse=True):
            if value in text:
                text = text.replace(value, "[REDACTED]")
        # urllib3 and requests print request URLs at DEBUG; a key we were never told about
        # (typed on a command line, say) still never reaches the log.
        return _APIKEY_PARAM.sub(r"\1[REDACTED]", text)


redact = SecretRedactor()


class RedactingFormatter(logging.Formatter):
    """Formats the whole record, traceback included, then removes secrets from the result."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """WatchedFileHandler (reopens the file when logrotate moves it away) whose file,
    first or reopened, has the configured mode: plain open() would take the umask's."""

    def __init__(self, path: Path, file_mode: int) -> None:
        self.file_mode = file_mode
        super().__init__(path, encoding="utf-8")

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                     self.file_mode)
        os.fchmod(fd, self.file_mode)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def configure_logging(settings: Settings) -> None:
    """Log to OHLCV_LOG_FILE (mode OHLCV_FILE_MODE), redacted, safe under logrotate."""
    redact.add(*settings.secrets())
    if not settings.log_file.parent.exists():
        ensure_private_dir(settings.log_file.parent, settings.dir_mode)
    handler = PrivateWatchedFileHandler(settings.log_file, settings.file_mode)
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_secure_ohlcv", False):
            root.removeHandler(old)
            old.close()
    handler._secure_ohlcv = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)


# =========================================================================================
# 3. Files: private directories, atomic writes, the data-directory lock
# =========================================================================================

TEMP_PREFIX = ".tmp-"


def ensure_private_dir(path: Path, mode: int) -> Path:
    """Create `path` (and missing parents) with exactly `mode`, whatever the umask.

    An existing directory with looser permissions than `mode` is refused, never used.
    """
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, mode)
        os.chmod(directory, mode)
    check_private_dir(path, mode)
    return path


def check_private_dir(path: Path, mode: int) -> None:
    """Raise UnsafePathError when `path` is not a directory of ours with at most `mode`."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path} is not a plain directory; refusing to use it.")
    loose = stat.S_IMODE(info.st_mode) & ~mode
    if loose:
        raise UnsafePathError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, looser than the configured "
            f"{mode:04o}; other users could read or change it. Fix: chmod {mode:o} {path}")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to this user "
                              f"(uid {os.geteuid()}). Fix: chown it or choose another directory.")


def write_env_key(path: Path, key: str, file_mode: int) -> None:
    """Set OHLCV_ENCRYPTION_KEY in a .env file, keeping its other lines; mode `file_mode`."""
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [ln for ln in lines if not re.match(r"\s*(export\s+)?OHLCV_ENCRYPTION_KEY\s*=", ln)]
    lines.append(f"OHLCV_ENCRYPTION_KEY={key}")
    atomic_write(path, ("\n".join(lines) + "\n").encode(), file_mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, file_mode: int) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half.

    Temp file in the same directory (same file system, so the rename is atomic), fsync,
    os.replace, then fsync of the directory so the rename itself survives a power cut.
    A crash leaves at most a `.tmp-*` file, which is never taken for data and is removed
    the next time a run takes the data-directory lock.
    """
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode)
    try:
        os.fchmod(fd, file_mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # name the file for the operator
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def locked_json(path: Path, load: Callable[[], dict[str, Any]], file_mode: int,
                dir_mode: int) -> Iterator[dict[str, Any]]:
    """Read-modify-write of a small JSON state file, serialised between processes by a
    flock on a sibling `.lock` file; written back atomically only when it changed."""
    ensure_private_dir(path.parent, dir_mode)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode)
    try:
        os.fchmod(fd, file_mode)
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = load()
        before = json.dumps(state, sort_keys=True)
        yield state
        if json.dumps(state, sort_keys=True) != before:
            atomic_write(path, json.dumps(state).encode(), file_mode)
    finally:
        os.close(fd)  # closing drops the flock


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return psutil.disk_usage(str(path)).free


def require_free_disk(path: Path, floor: int, needed: int) -> None:
    """Refuse to start a write that would leave less than `floor` bytes free."""
    free = free_disk(path)
    if free - needed < floor:
        raise DiskSpaceLow(f"only {free / 2**20:.0f} MB free for {path}, below "
                           f"OHLCV_MIN_FREE_DISK_MB={floor // 2**20}; no write was started "
                           "and stored data is intact. Free some space, then run again.")


def remove_temp_files(root: Path) -> list[Path]:
    """Delete the `.tmp-*` files crashed writers left under `root`. Call only under the lock."""
    removed = []
    for tmp in root.rglob(f"{TEMP_PREFIX}*"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()
            removed.append(tmp)
    return removed


class DataDirLock:
    """One inter-process lock per data directory (flock on `<data>/.lock`).

    The kernel drops a flock when its holder dies, so a crashed run never leaves a stale
    lock: the lock file may stay, the lock does not.
    """

    def __init__(self, data_dir: Path, timeout: float, file_mode: int, record: bool = True,
                 notify: Callable[[str], None] | None = None) -> None:
        self.path = data_dir / ".lock"
        self.timeout = timeout
        self.file_mode = file_mode
        self.record = record  # write the holder's pid (not in --dry-run: it changes nothing)
        self.notify = notify or log.warning
        self._fd: int | None = None

    def __enter__(self) -> "DataDirLock":
        # A run that records nothing (a dry run) creates nothing, not even the lock file.
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if self.record else 0)
        try:
            fd = os.open(self.path, flags, self.file_mode)
        except FileNotFoundError:
            if self.record:
                raise
            return self  # no lock file: no run has ever written here, nothing to guard
        if self.record:
            os.fchmod(fd, self.file_mode)
        deadline = time.monotonic() + self.timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                if not waited and self.timeout > 0:
                    self.notify(f"waiting for the lock on {self.path.parent}, held by another "
                                f"run ({holder}), up to {self.timeout:g} s (OHLCV_LOCK_TIMEOUT)")
                waited = True
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(
                        f"another run holds the lock on {self.path.parent} ({holder}); waited "
                        f"{self.timeout:g} s. It is released when that run ends; raise "
                        "OHLCV_LOCK_TIMEOUT to wait longer, or schedule the jobs apart.") from None
                time.sleep(0.1)
        if self.record:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {utc_now_iso()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            if self.record:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# =========================================================================================
# 4. Keys
# =========================================================================================

def fingerprint(key: str) -> str:
    """A short, one-way name for a Fernet key: safe to print, log and store."""
    return hashlib.sha256(b"secure-ohlcv key fingerprint\0" + key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StoredKey:
    key: str = field(repr=False)
    status: str = "primary"  # primary | retired
    added: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


class KeyRing:
    """The Fernet keys of this installation, primary first. Encrypts with the primary,
    decrypts with any (MultiFernet), so files written before a rotation stay readable."""

    def __init__(self, keys: list[StoredKey]) -> None:
        if not keys:
            raise KeyStoreError("the key ring is empty.")
        for stored in keys:
            problem = fernet_key_problem(stored.key)
            if problem:
                raise KeyStoreError(f"a stored key {problem} (the value is not shown).")
            redact.add(stored.key)
        self.keys = list(keys)
        self._singles = [Fernet(k.key) for k in keys]
        self._fernet = MultiFernet(self._singles)

    @property
    def primary(self) -> StoredKey:
        return self.keys[0]

    def fingerprints(self) -> list[str]:
        return [k.fingerprint for k in self.keys]

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, token: bytes) -> bytes:
        """Raise InvalidToken when no key of the ring opens `token` or it was altered."""
        return self._fernet.decrypt(token)

    def signed_by_primary(self, token: bytes) -> bool:
        """Whether the primary key alone opens `token`: its HMAC checks out (the check
        Fernet makes before decrypting; extract_timestamp makes it without decrypting)."""
        try:
            self._singles[0].extract_timestamp(token)
            return True
        except InvalidToken:
            return False

    def decrypt_with_fingerprint(self, token: bytes, path: Path,
                                 first: str | None = None) -> tuple[bytes, str]:
        """Decrypt trying each key alone, primary first (or the key `first` names: each
        miss costs a full base64 decode); also say which key opened it."""
        pairs = list(zip(self.keys, self._singles))
        pairs.sort(key=lambda pair: pair[0].fingerprint != first)  # stable: else ring order
        for stored, single in pairs:
            try:
                return single.decrypt(token), stored.fingerprint
            except InvalidToken:
                continue
        raise IntegrityError(f"{path} does not decrypt with the key ring "
                             f"({', '.join(self.fingerprints())}).")

    @classmethod
    def generate(cls) -> "KeyRing":
        return cls([StoredKey(Fernet.generate_key().decode(), "primary", utc_now_iso())])


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool
    secure: bool
    problem: str = ""


class KeyStore(Protocol):
    """Where a key ring is kept: load it (None when nothing is stored), save it."""

    label: str

    def load(self) -> list[StoredKey] | None: ...

    def save(self, keys: list[StoredKey]) -> None: ...


_SECURE_BACKENDS = ("keyring.backends.SecretService", "keyring.backends.libsecret",
                    "keyring.backends.kwallet", "keyring.backends.macOS",
                    "keyring.backends.Windows")
KEYRING_USERNAME = "fernet-key-ring"
KEYRING_TIMEOUT = 15.0


def describe_backend(backend: keyring.backend.KeyringBackend) -> BackendInfo:
    """Name the keyring backend and say whether it can hold keys, and safely."""
    name = f"{type(backend).__module__}.{type(backend).__qualname__}"
    if name.startswith(("keyring.backends.fail", "keyring.backends.null")):
        return BackendInfo(name, False, False,
                           "no OS keyring backend is available (a headless server without a "
                           "Secret Service?). Fix: set OHLCV_ENCRYPTION_KEY, or run a Secret "
                           "Service (gnome-keyring) in this session.")
    parts = getattr(backend, "backends", None)
    if parts is not None:  # the chainer: secure only when every backend in it is
        infos = [describe_backend(b) for b in parts]
        insecure = [i.name for i in infos if not i.secure]
        return BackendInfo(name + "[" + ", ".join(i.name for i in infos) + "]", bool(infos),
                           bool(infos) and not insecure,
                           f"insecure backend in the chain: {', '.join(insecure)}" if insecure else "")
    if name.startswith(_SECURE_BACKENDS):
        return BackendInfo(name, True, True)
    return BackendInfo(name, True, False,
                       f"{name} is not a known encrypted keyring (keyrings.alt's plaintext "
                       "file keeps keys readable on disk). Fix: use a Secret Service "
                       "(gnome-keyring, KWallet) or OHLCV_ENCRYPTION_KEY from a 0600 file.")


def _with_timeout(call: Callable[[], Any], what: str) -> Any:
    """Run a keyring call that could block on an unlock prompt no one will ever answer."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="keyring-call")
    worker.start()
    worker.join(KEYRING_TIMEOUT)
    if worker.is_alive():
        raise KeyStoreError(f"the OS keyring did not answer within {KEYRING_TIMEOUT:g} s while "
                            f"trying to {what}: it is probably locked and waiting for an "
                            "unlock prompt. Fix: unlock it, or set OHLCV_ENCRYPTION_KEY.")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class KeyringKeyStore:
    """Keeps the key ring in the OS keyring: service `secure-ohlcv-downloader`, one entry."""

    label = "OS keyring"

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None) -> None:
        self.backend = backend if backend is not None else keyring.get_keyring()
        self.info = describe_backend(self.backend)

    def load(self) -> list[StoredKey] | None:
        raw = self._call(lambda: self.backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME),
                         "read the key ring")
        if raw is None:
            return None
        redact.add(raw)
        try:
            entries = json.loads(raw)["keys"]
            keys = [StoredKey(e["key"], e.get("status", "retired"), e.get("added", ""))
                    for e in entries]
        except (ValueError, KeyError, TypeError):
            raise KeyStoreError(
                f"the keyring entry {KEYRING_SERVICE}/{KEYRING_USERNAME} is not a key ring "
                "written by this tool (content not shown). Fix: remove it with your keyring "
                "tool and run --recover with the key from your offline copy.") from None
        for k in keys:
            redact.add(k.key)
        return keys

    def save(self, keys: list[StoredKey]) -> None:
        payload = json.dumps({"format": 1, "keys": [
            {"key": k.key, "status": k.status, "added": k.added} for k in keys]})
        redact.add(payload)
        self._call(lambda: self.backend.set_password(KEYRING_SERVICE, KEYRING_USERNAME, payload),
                   "store the key ring")
        if self.load() != keys:
            raise KeyStoreError("the OS keyring accepted the key ring but gave back something "
                                "else; it cannot be trusted with keys. Use OHLCV_ENCRYPTION_KEY.")

    def _call(self, call: Callable[[], Any], what: str) -> Any:
        if not self.info.usable:
            raise KeyStoreError(self.info.problem)
        try:
            return _with_timeout(call, what)
        except keyring.errors.KeyringLocked:
            raise KeyStoreError(
                "the OS keyring is locked. Fix: unlock it (log in to the desktop session, or "
                "`gnome-keyring-daemon --unlock` on a server), or set OHLCV_ENCRYPTION_KEY."
            ) from None
        except keyring.errors.KeyringError as exc:
            raise KeyStoreError(f"the OS keyring refused to {what}: "
                                f"{type(exc).__name__}: {redact(str(exc))}. Fix: check the "
                                "keyring service, or set OHLCV_ENCRYPTION_KEY.") from None


class EnvKeyStore:
    """The key ring given in OHLCV_ENCRYPTION_KEY (primary first). It cannot be written."""

    label = "OHLCV_ENCRYPTION_KEY"

    def __init__(self, settings: Settings) -> None:
        self._keys = [StoredKey(s.reveal(), "primary" if i == 0 else "retired")
                      for i, s in enumerate(settings.encryption_keys)]

    def load(self) -> list[StoredKey] | None:
        return list(self._keys) or None

    def save(self, keys: list[StoredKey]) -> None:
        raise KeyStoreError("OHLCV_ENCRYPTION_KEY is read-only to this program; set it yourself.")


@dataclass
class KeySources:
    """What each key store holds, and which one the run uses."""

    backend: BackendInfo
    keyring_keys: list[StoredKey] | None
    keyring_problem: str
    env_keys: list[StoredKey] | None
    warnings: list[str] = field(default_factory=list)

    def choose(self) -> tuple[KeyRing, str]:
        """The key ring to use and its source; raise KeyStoreError with the fix otherwise."""
        kr, env = self.keyring_keys, self.env_keys
        if kr and env and kr[0].key != env[0].key:
            raise KeyStoreError(
                f"the OS keyring (primary key {kr[0].fingerprint}) and OHLCV_ENCRYPTION_KEY "
                f"(primary key {env[0].fingerprint}) disagree. Fix: if the keyring is right, "
                "unset OHLCV_ENCRYPTION_KEY or set it to the value printed by the last "
                "--rotate-key; if the variable is right, run --recover to re-link the keyring.")
        if kr:
            return KeyRing(kr), KeyringKeyStore.label
        if env:
            return KeyRing(env), EnvKeyStore.label
        if self.keyring_problem:
            raise KeyStoreError(f"no encryption key: {self.keyring_problem}")
        raise KeyStoreError("no encryption key is stored yet. Fix: run "
                            "`python secure_ohlcv_downloader.py --init`.")


def read_key_sources(settings: Settings, keyring_store: KeyringKeyStore) -> KeySources:
    """Look in both key stores; a failing keyring is recorded, not raised, so the variable
    can still serve (the headless and cron case)."""
    env = EnvKeyStore(settings).load()
    info = keyring_store.info
    keys, problem, warnings = None, "", []
    if not info.usable:
        problem = info.problem
    else:
        if not info.secure:
            warnings.append(f"insecure keyring backend: {info.problem}")
        try:
            keys = keyring_store.load()
        except KeyStoreError as exc:
            problem = str(exc)
    if problem and env and info.usable:  # no backend at all is the headless norm: no warning
        warnings.append(f"OS keyring not used ({problem.split('. Fix')[0]}); "
                        "keys come from OHLCV_ENCRYPTION_KEY.")
    return KeySources(info, keys, problem, env, warnings)


# =========================================================================================
# 5. Rate limiting
# =========================================================================================

MARKET_TZ = ZoneInfo("America/New_York")
# Spacing is stretched by this much so that jitter between our clock and the server's never
# puts one request too many into the server's window; it costs 3% of a plan's throughput.
RATE_SLACK = 1.03


def market_today() -> date:
    """The quota day. Alpha Vantage does not document its reset; we use the market's day."""
    return datetime.now(MARKET_TZ).date()


class DailyQuota:
    """One API key's count of today's requests, in the state directory, shared by every
    process (flock on the file), so consecutive cron runs spend one budget."""

    def __init__(self, settings: Settings, key_fp: str) -> None:
        self.path = settings.state_dir / "quota" / f"{key_fp}.json"
        self.per_day = settings.rate_limit_per_day
        self.file_mode = settings.file_mode
        self.dir_mode = settings.dir_mode

    def _locked(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        return locked_json(self.path, self.read, self.file_mode, self.dir_mode)

    def read(self) -> dict[str, Any]:
        today = market_today().isoformat()
        try:
            state = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("day") != today:
            state = {"day": today, "used": 0, "exhausted": False,
                     "last_request": state.get("last_request", 0.0),
                     "recent": state.get("recent", [])}
        return state

    def take(self) -> bool:
        """Count one request; False (and nothing counted) when today's budget is spent."""
        with self._locked() as state:
            if state["exhausted"] or (self.per_day and state["used"] >= self.per_day):
                return False
            state["used"] += 1
            state["last_request"] = time.time()
            return True

    def mark_exhausted(self) -> None:
        """The server said the day's quota is spent, whatever our count says."""
        with self._locked() as state:
            state["exhausted"] = True

    def save_recent(self, stamps: list[float]) -> None:
        """Keep the last minute's send times, so the next run starts inside the limits."""
        with self._locked() as state:
            state["recent"] = [round(t, 3) for t in stamps]

    def left(self) -> int | None:
        state = self.read()
        if state["exhausted"]:
            return 0
        return max(self.per_day - state["used"], 0) if self.per_day else None


@dataclass
class ApiKey:
    secret: str = field(repr=False)
    fingerprint: str = ""


class RateLimiter:
    """Per-key caps for every request: per second and per minute in sliding windows here,
    per day through DailyQuota. `acquire` blocks until some key may send and returns it;
    several keys share the load, the one free soonest first."""

    def __init__(self, settings: Settings, api_keys: list[str], monotonic: Callable[[], float]
                 = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.spacing = RATE_SLACK / settings.rate_limit_per_second
        self.per_minute = settings.rate_limit_per_minute
        self.keys = [ApiKey(k, api_key_fingerprint(k)) for k in api_keys]
        self.quotas = {k.fingerprint: DailyQuota(settings, k.fingerprint) for k in self.keys}
        self._monotonic, self._sleep = monotonic, sleep
        self._lock = threading.Lock()
        self._sent: dict[str, deque[float]] = {}
        self._exhausted: set[str] = set()
        self._penalty_until: dict[str, float] = {}
        offset = time.time() - monotonic()  # wall clock -> our monotonic clock
        for key in self.keys:
            state = self.quotas[key.fingerprint].read()
            recent = sorted(state.get("recent", []) + [state.get("last_request", 0.0)])
            self._sent[key.fingerprint] = deque(t - offset for t in recent if t - offset >
                                                monotonic() - 60 * RATE_SLACK)
            if state["exhausted"]:
                self._exhausted.add(key.fingerprint)

    def _next_slot(self, fp: str, now: float) -> float:
        sent = self._sent[fp]
        window = 60 * RATE_SLACK
        while sent and sent[0] <= now - window:
            sent.popleft()
        slot = max(now, self._penalty_until.get(fp, now))
        if sent:
            slot = max(slot, sent[-1] + self.spacing)
        if self.per_minute and len(sent) >= self.per_minute:
            slot = max(slot, sent[-self.per_minute] + window)
        return slot

    def _last_sent(self, fp: str) -> float:
        sent = self._sent[fp]
        return sent[-1] if sent else float("-inf")

    def acquire(self) -> ApiKey:
        """Reserve the next free slot of some key, wait for it, and return that key.
        QuotaExhausted when every key is spent today.

        The day's count is persisted (file lock, fsync) *before* the slot is reserved, so
        that write overlaps the wait instead of lengthening every interval; the slot is
        never earlier than the moment the count is on disk, so a slow write only delays.
        A key the server throttled or declared spent during the wait is not used: the
        request goes behind the penalty, or to another key."""
        with self._lock:
            key, slot, now = self._reserve()
        if slot <= now:
            return key
        while True:
            self._sleep(max(slot - self._monotonic(), 0.0))
            with self._lock:
                fp = key.fingerprint
                if fp not in self._exhausted and self._penalty_until.get(fp, slot) <= slot:
                    return key
                with contextlib.suppress(ValueError):  # gone only if we slept for minutes
                    self._sent[fp].remove(slot)
                if fp in self._exhausted:  # its count no longer matters: the day is over
                    key, slot, _ = self._reserve()
                else:  # counted already: only the slot moves, behind the penalty
                    slot = self._next_slot(fp, self._monotonic())
                    self._sent[fp].append(slot)

    def _reserve(self) -> tuple[ApiKey, float, float]:
        """Under the lock: count a request for the key free soonest and reserve its slot.
        Returns the key, the slot and the time the slot was reserved at."""
        while True:
            usable = [k for k in self.keys if k.fingerprint not in self._exhausted]
            if not usable:
                raise QuotaExhausted("the daily API quota of every configured key is spent.")
            now = self._monotonic()
            # The key free soonest; among keys free now, the least recently used, so that
            # several keys share the load even when requests never overlap.
            slot, _, index = min((self._next_slot(k.fingerprint, now),
                                  self._last_sent(k.fingerprint), i)
                                 for i, k in enumerate(usable))
            key = usable[index]
            if self.quotas[key.fingerprint].take():
                break
            self._exhausted.add(key.fingerprint)
            log.warning("rate limit: key %s reached its daily budget of %s",
                        key.fingerprint, self.quotas[key.fingerprint].per_day)
        now = self._monotonic()
        slot = max(slot, now)
        self._sent[key.fingerprint].append(slot)
        log.debug("rate limit: key %s sends in %.3f s (%d in the last minute)",
                  key.fingerprint, slot - now, len(self._sent[key.fingerprint]))
        return key, slot, now

    def state(self, key: ApiKey) -> str:
        """The limiter's view of one key, for the log: never the key itself."""
        used = self.quotas[key.fingerprint].read()["used"]
        cap = self.quotas[key.fingerprint].per_day or "unlimited"
        with self._lock:
            last_minute = len(self._sent[key.fingerprint])
        return (f"{used}/{cap} today, {last_minute} in the last minute, "
                f"spacing {self.spacing:.3f} s, per-minute cap {self.per_minute or 'none'}")

    def throttled(self, key: ApiKey, pause: float, message: str) -> None:
        """The server throttled this key: it sends nothing more for `pause` seconds."""
        with self._lock:
            self._penalty_until[key.fingerprint] = self._monotonic() + pause
        log.warning("rate limit: key %s throttled by the server (%s); pausing it %.1f s; "
                    "limiter: %s", key.fingerprint, message[:100], pause, self.state(key))

    def exhausted(self, key: ApiKey) -> None:
        with self._lock:
            self._exhausted.add(key.fingerprint)
        self.quotas[key.fingerprint].mark_exhausted()
        log.warning("rate limit: the server says key %s has spent its daily quota; limiter: %s",
                    key.fingerprint, self.state(key))

    def close(self) -> None:
        """Persist each key's last minute of sends for the next run."""
        offset = time.time() - self._monotonic()
        for key in self.keys:
            with self._lock:
                stamps = [t + offset for t in self._sent[key.fingerprint]]
            self.quotas[key.fingerprint].save_recent(stamps)


def api_key_fingerprint(api_key: str) -> str:
    return "av-" + hashlib.sha256(b"secure-ohlcv api key\0" + api_key.encode()).hexdigest()[:8]


# =========================================================================================
# 6. Alpha Vantage client
# =========================================================================================

class Outcome(str, Enum):
    """What an Alpha Vantage body means. The API says nearly everything with HTTP 200."""

    DATA = "data"
    THROTTLED = "throttled"
    QUOTA_SPENT = "quota_spent"
    PREMIUM_ENDPOINT = "premium_endpoint"
    PREMIUM_PARAMETER = "premium_parameter"
    DEMO_KEY = "demo_key"
    INVALID_KEY = "invalid_key"
    INVALID_REQUEST = "invalid_request"
    EMPTY = "empty"
    NOT_JSON = "not_json"


@dataclass(frozen=True)
class Classified:
    outcome: Outcome
    message: str = ""
    payload: Any = None


def classify_response(body: bytes) -> Classified:
    """Read a body before trusting it. `Information` is ambiguous (rate limit, premium,
    demo), so its text decides; `Note` is the legacy rate limit; `Error Message` a bad call."""
    text = body.lstrip()[:1]
    if text not in (b"{", b"["):
        if body.startswith(b"timestamp,") or body.startswith(b"\xef\xbb\xbftimestamp,"):
            return Classified(Outcome.DATA, payload=body)
        return Classified(Outcome.NOT_JSON, "the body is neither JSON nor our CSV "
                          f"(starts with {body[:40]!r})")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        return Classified(Outcome.NOT_JSON, "the body is not UTF-8 text")
    except ValueError as exc:
        return Classified(Outcome.NOT_JSON, f"malformed JSON ({exc})")
    if not isinstance(payload, dict) or not payload:
        return Classified(Outcome.EMPTY, "the API returned no data ({})")
    if "Error Message" in payload:
        message = str(payload["Error Message"])
        kind = Outcome.INVALID_KEY if "apikey" in message.lower() else Outcome.INVALID_REQUEST
        return Classified(kind, message)
    if "Note" in payload:
        return Classified(Outcome.THROTTLED, str(payload["Note"]))
    if "Information" in payload:
        message = str(payload["Information"])
        lower = message.lower()
        # Order matters: the burst text also names the daily figure and "premium plans".
        if "spreading out" in lower or "burst pattern" in lower:
            kind = Outcome.THROTTLED
        elif "rate limit is" in lower and "per day" in lower:
            kind = Outcome.QUOTA_SPENT
        elif "premium endpoint" in lower:
            kind = Outcome.PREMIUM_ENDPOINT
        elif "premium feature" in lower:
            kind = Outcome.PREMIUM_PARAMETER
        elif "demo" in lower:
            kind = Outcome.DEMO_KEY
        else:  # "higher API call volume" and texts not seen yet: treat as a rate limit
            kind = Outcome.THROTTLED
        return Classified(kind, message)
    series = [k for k in payload if k.startswith(("Time Series", "Weekly", "Monthly"))]
    if not series:
        return Classified(Outcome.EMPTY, f"no time series in the answer (keys: {sorted(payload)[:5]})")
    if not payload[series[0]]:
        return Classified(Outcome.EMPTY, "the time series is empty")
    return Classified(Outcome.DATA, payload=payload[series[0]])


FUNCTIONS = {
    ("daily", False): "TIME_SERIES_DAILY", ("daily", True): "TIME_SERIES_DAILY_ADJUSTED",
    ("weekly", False): "TIME_SERIES_WEEKLY", ("weekly", True): "TIME_SERIES_WEEKLY_ADJUSTED",
    ("monthly", False): "TIME_SERIES_MONTHLY", ("monthly", True): "TIME_SERIES_MONTHLY_ADJUSTED",
}
MAX_BODY_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ApiRequest:
    symbol: str
    interval: str
    adjusted: bool = False
    outputsize: str | None = None  # compact | full; None for weekly and monthly
    month: str | None = None

    @property
    def function(self) -> str:
        return "TIME_SERIES_INTRADAY" if self.interval in INTRADAY \
            else FUNCTIONS[(self.interval, self.adjusted)]

    def params(self, datatype: str) -> dict[str, str]:
        params = {"function": self.function, "symbol": self.symbol, "datatype": datatype}
        if self.interval in INTRADAY:
            params["interval"] = self.interval
        if self.outputsize:
            params["outputsize"] = self.outputsize
        if self.month:
            params["month"] = self.month
        return params


@dataclass
class RunStats:
    """Counters of one run, for the log, the summary and the metrics file."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    bytes_downloaded: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: str, size: int = 0) -> None:
        with self._lock:
            self.requests[outcome] += 1
            self.bytes_downloaded += size

    def retried(self) -> None:
        with self._lock:
            self.retries += 1


class AlphaVantageClient:
    """Fetches one series: rate-limited, timed out, retried with backoff, classified.

    Retries are written here rather than left to urllib3's Retry because every attempt,
    retries included, must pass the rate limiter and count against the day's quota.
    `Error Message` answers are never retried: the same call would fail the same way.
    """

    def __init__(self, settings: Settings, limiter: RateLimiter, stats: RunStats) -> None:
        self.url = settings.base_url
        self.timeout = (settings.connect_timeout, settings.request_timeout)
        self.max_retries = settings.max_retries
        self.backoff = settings.backoff_seconds
        self.datatype = settings.datatype
        self.limiter = limiter
        self.stats = stats
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "secure-ohlcv-downloader/1"
        adapter = requests.adapters.HTTPAdapter(pool_connections=1,
                                                pool_maxsize=max(settings.max_workers, 1))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def fetch(self, request: ApiRequest) -> Classified:
        """The data of `request` (Outcome.DATA), or an ApiError saying why not."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retried()
                delay = min(60.0, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.info("%s %s: retry %d/%d in %.1f s after %s", request.symbol,
                         request.function, attempt, self.max_retries, delay, problem)
                time.sleep(delay)
            key = self.limiter.acquire()
            started = time.monotonic()
            try:
                status, body = self._get(request, key)
            except requests.RequestException as exc:
                problem = f"network error ({type(exc).__name__})"
                self.stats.count("network_error")
                log.debug("%s: %s: %s", request.symbol, problem, exc)
                continue
            log.debug("%s %s: HTTP %d, %d bytes in %.3f s via key %s", request.symbol,
                      request.function, status, len(body), time.monotonic() - started,
                      key.fingerprint)
            if status >= 500 or status == 429:
                problem = f"HTTP {status}"
                self.stats.count("http_error", len(body))
                continue
            if status != 200:
                self.stats.count("http_error", len(body))
                raise ApiError(f"HTTP {status} from {self.url}; not retried.")
            answer = classify_response(body)
            self.stats.count(answer.outcome.value, len(body))
            if answer.outcome is Outcome.DATA:
                return answer
            if answer.outcome in (Outcome.NOT_JSON, Outcome.THROTTLED):
                problem = answer.message[:120]
                if answer.outcome is Outcome.THROTTLED:
                    self.limiter.throttled(key, self.backoff * 2 ** attempt, answer.message)
                continue
            if answer.outcome is Outcome.QUOTA_SPENT:
                self.limiter.exhausted(key)
                return self.fetch(request)  # another key may still have quota
            raise _refusal(answer, request)
        raise ApiError(f"gave up after {self.max_retries + 1} attempts: {problem}.")

    def _get(self, request: ApiRequest, key: ApiKey) -> tuple[int, bytes]:
        params = request.params(self.datatype) | {"apikey": key.secret}
        with self.session.get(self.url, params=params, timeout=self.timeout, stream=True) as resp:
            chunks, size = [], 0
            for chunk in resp.iter_content(256 * 1024):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ApiError(f"the answer exceeds {MAX_BODY_BYTES // 2**20} MiB; refused.")
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks)


def _refusal(answer: Classified, request: ApiRequest) -> OHLCVError:
    quoted = f"Alpha Vantage: {answer.message!r}"
    if answer.outcome is Outcome.INVALID_KEY:
        return InvalidApiKey(f"the API key was refused ({quoted}). Fix: check ALPHA_VANTAGE_API_KEY.")
    if answer.outcome is Outcome.PREMIUM_ENDPOINT:
        return PremiumRequired(f"{request.function} needs a premium plan for this key ({quoted}).")
    if answer.outcome is Outcome.PREMIUM_PARAMETER:
        return PremiumParameter(f"outputsize=full needs a premium plan ({quoted}).")
    if answer.outcome is Outcome.DEMO_KEY:
        return ApiError(f"the demo key serves IBM only; set ALPHA_VANTAGE_API_KEY ({quoted}).")
    if answer.outcome is Outcome.INVALID_REQUEST:
        return ApiError(f"invalid symbol or request ({quoted}).")
    return ApiError(answer.message)


# =========================================================================================
# 7. Parsing and validation
# =========================================================================================

PRICE_COLUMNS = ["open", "high", "low", "close"]
BASE_COLUMNS = ["timestamp", *PRICE_COLUMNS, "volume"]
ADJUSTED_COLUMNS = {"daily": ["adjusted_close", "dividend_amount", "split_coefficient"],
                    "weekly": ["adjusted_close", "dividend_amount"],
                    "monthly": ["adjusted_close", "dividend_amount"]}


def columns_for(dataset: DatasetId) -> list[str]:
    return BASE_COLUMNS + (ADJUSTED_COLUMNS[dataset.interval] if dataset.adjusted else [])


def _wire_name(name: str) -> str:
    """'5. adjusted close' and 'adjusted close' become 'adjusted_close'."""
    return re.sub(r"^\d+[a-z]?\.\s*", "", name.strip()).replace(" ", "_").lower()


def parse_payload(answer: Classified, dataset: DatasetId) -> pd.DataFrame:
    """A DATA answer (JSON series or CSV body) as our typed table, oldest first.

    Refuses, with the reason, anything that is not a valid series: missing or repeated
    fields, non-numeric values, missing timestamps, high or low inconsistent with open and
    close, negative prices or volume, duplicate timestamps. A refused payload stores nothing.
    """
    wanted = columns_for(dataset)
    numbers = _fast_numbers(answer.payload, wanted)
    if numbers is None:  # something is off: the careful path finds it and says what
        numbers = _checked_numbers(_text_table(answer.payload), wanted)
    # Built from whole columns at once: per-column assignment and list indexing of a
    # DataFrame cost more than the parsing itself (the per-symbol benchmark's profile).
    columns: dict[str, Any] = {"timestamp": _parse_timestamps(numbers["timestamp"], dataset)}
    for column in wanted[1:]:
        values = numbers[column].to_numpy(dtype="float64")
        if column == "volume":
            if not (values == np.round(values)).all():
                raise InvalidPayload("volume must be a whole number.")
            if (np.abs(values) >= 2.0**63).any():
                raise InvalidPayload("volume out of range.")
            values = values.astype("int64")
        columns[column] = values
    frame = pd.DataFrame(columns).sort_values("timestamp", kind="stable").reset_index(drop=True)
    validate_bars(frame)
    return frame


_PLAIN_NUMBERS = re.compile(r"[0-9eE+\-. ]*", re.ASCII)


def _fast_numbers(payload: Any, wanted: list[str]) -> pd.DataFrame | None:
    """The series straight into float64 columns (pandas' C parser for CSV, astype for
    JSON), ten times faster than column-by-column checks; None when anything is off."""
    try:
        if isinstance(payload, (bytes, bytearray)):
            header = bytes(payload[:payload.find(b"\n")]).decode("utf-8-sig").strip()
            names = [_wire_name(c) for c in header.split(",")]
            if len(set(names)) != len(names) or not set(wanted) <= set(names):
                return None
            if b'"' in payload:
                return None  # quoted fields: let the careful path read them
            frame = pd.read_csv(io.BytesIO(payload), header=0, names=names, usecols=wanted,
                                dtype={c: "float64" for c in wanted[1:]} | {"timestamp": str},
                                keep_default_na=False, na_values=[], encoding="utf-8-sig")
            # A row with more or fewer fields than the header (an unquoted "1,000") must
            # not be read shifted: every line, header included, has the header's commas.
            if payload.count(b",") != (len(frame) + 1) * (len(names) - 1):
                return None
        elif isinstance(payload, dict) and all(isinstance(b, dict) for b in payload.values()):
            frame = pd.DataFrame.from_dict(payload, orient="index")
            names = [_wire_name(str(c)) for c in frame.columns]
            if len(set(names)) != len(names) or not set(wanted[1:]) <= set(names):
                return None
            frame.columns = names
            cells = frame[wanted[1:]].to_numpy().ravel().tolist()
            # Python's float() also takes "1_000" and non-ASCII digits, which the CSV
            # parser (rightly) refuses: only plain decimal text takes the fast path.
            if not all(isinstance(c, str) for c in cells) or \
                    not _PLAIN_NUMBERS.fullmatch("".join(cells)):
                return None
            frame = frame[wanted[1:]].astype("float64")
            frame.insert(0, "timestamp", frame.index.astype(str))
        else:
            return None
    except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError):
        return None
    if frame.empty or not all(np.isfinite(frame[c].to_numpy()).all() for c in wanted[1:]):
        return None
    return frame.reset_index(drop=True)


def _checked_numbers(raw: pd.DataFrame, wanted: list[str]) -> pd.DataFrame:
    """The slow path: every field checked, the first bad one named."""
    if raw.empty:
        raise InvalidPayload("the series has no bars.")
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise InvalidPayload(f"missing fields: {', '.join(missing)}.")
    numbers = pd.DataFrame({"timestamp": raw["timestamp"]})
    for column in wanted[1:]:
        values = pd.to_numeric(raw[column].str.strip(), errors="coerce").astype("float64")
        bad = ~np.isfinite(values)  # NaN (not a number), inf
        if bad.any():
            row = raw.loc[bad.idxmax()]
            raise InvalidPayload(f"non-numeric {column} {row[column]!r} at {row['timestamp']!r}.")
        numbers[column] = values
    return numbers


def _text_table(payload: Any) -> pd.DataFrame:
    """The series as a table of strings with our column names; InvalidPayload otherwise."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            raw = pd.read_csv(io.BytesIO(payload), dtype=str, keep_default_na=False,
                              encoding="utf-8-sig")
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise InvalidPayload(f"unreadable CSV: {exc}") from None
        names = [_wire_name(str(c)) for c in raw.columns]
    elif isinstance(payload, dict):
        if not all(isinstance(bar, dict) for bar in payload.values()):
            raise InvalidPayload("a bar of the series is not an object of fields.")
        raw = pd.DataFrame.from_dict(payload, orient="index", dtype=str)
        names = [_wire_name(str(c)) for c in raw.columns]
        if "timestamp" in names:
            raise InvalidPayload("a bar carries a field named timestamp.")
        raw.index.name = "timestamp"
        raw = raw.reset_index()
        names = ["timestamp"] + names
    else:
        raise InvalidPayload("the series is not a table.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidPayload(f"fields named more than once: {', '.join(repeated)}.")
    raw.columns = names
    return raw.fillna("").astype(str)


def _parse_timestamps(values: pd.Series, dataset: DatasetId) -> pd.Series:
    text = values.str.strip()
    if (text == "").any():
        raise InvalidPayload("a bar has no timestamp.")
    try:
        if dataset.interval in INTRADAY:
            stamps = pd.to_datetime(text, format="%Y-%m-%d %H:%M:%S")
            stamps = stamps.dt.tz_localize(MARKET_TZ, ambiguous="raise", nonexistent="raise")
        else:
            # A daily series may be stamped with a time for the session in progress.
            stamps = pd.to_datetime(text.str.slice(0, 10), format="%Y-%m-%d")  # midnight
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidPayload(f"bad timestamp: {exc}") from None
    if stamps.isna().any():
        raise InvalidPayload("a bar has no valid timestamp.")
    return stamps


def validate_bars(frame: pd.DataFrame) -> None:
    """Raise InvalidPayload naming the first bar that is not a plausible OHLCV bar."""
    stamps = frame["timestamp"]
    opens, highs, lows, closes = (frame[c].to_numpy() for c in PRICE_COLUMNS)
    checks = [
        (stamps.duplicated().to_numpy(), "duplicate timestamp"),
        ((opens < 0) | (highs < 0) | (lows < 0) | (closes < 0) | (frame["volume"].to_numpy() < 0),
         "negative price or volume"),
        (highs < np.fmax(opens, closes), "high below max(open, close)"),
        (lows > np.fmin(opens, closes), "low above min(open, close)"),
    ]
    for bad, reason in checks:
        if bad.any():
            raise InvalidPayload(f"{reason} at {stamps.iloc[int(bad.argmax())]}.")


# =========================================================================================
# 8. Encrypted store
# =========================================================================================

# Letters, digits, '.' and '-' as Alpha Vantage uses them (BRK.B, TSCO.LON, 600104.SHH),
# ASCII only, starting with a letter or digit: no path separator, no '..', no look-alikes.
SYMBOL_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9.\-]{0,19}", re.ASCII)
INTERVALS = ("daily", "weekly", "monthly", "1min", "5min", "15min", "30min", "60min")
INTRADAY = INTERVALS[3:]
MONTH_PATTERN = re.compile(r"(\d{4})-(0[1-9]|1[0-2])", re.ASCII)
FILE_SUFFIX = ".fernet"
SCHEMA_VERSION = 1


def validate_symbol(symbol: str) -> str:
    """The symbol in upper case, or UsageError when it could not be a ticker."""
    upper = symbol.upper() if symbol.isascii() else symbol
    if not SYMBOL_PATTERN.fullmatch(upper) or ".." in upper:
        shown = symbol if symbol.isprintable() and len(symbol) <= 40 else repr(symbol[:40])
        raise UsageError(f"invalid symbol {shown!r}: use 1-20 ASCII letters, digits, '.' "
                         "or '-', starting with a letter or digit (e.g. IBM, BRK.B, TSCO.LON).")
    return upper


@dataclass(frozen=True)
class DatasetId:
    """One stored series: a symbol at an interval, adjusted or not; intraday by month."""

    symbol: str
    interval: str = "daily"
    adjusted: bool = False
    month: str | None = None  # YYYY-MM, intraday only

    def __post_init__(self) -> None:
        object.__setattr__(self, "symbol", validate_symbol(self.symbol))
        if self.interval not in INTERVALS:
            raise UsageError(f"unknown interval {self.interval!r}: use one of {', '.join(INTERVALS)}.")
        intraday = self.interval in INTRADAY
        if intraday and self.adjusted:
            raise UsageError("--adjusted applies to daily, weekly and monthly bars only.")
        if intraday != (self.month is not None):
            raise UsageError("intraday datasets are stored by month (YYYY-MM); "
                             "daily, weekly and monthly ones are not.")
        if self.month is not None and not MONTH_PATTERN.fullmatch(self.month):
            raise UsageError(f"invalid month {self.month!r}: use YYYY-MM.")

    @property
    def name(self) -> str:
        """The dataset directory: daily, daily_adjusted, ..., intraday_5min."""
        if self.interval in INTRADAY:
            return f"intraday_{self.interval}"
        return self.interval + ("_adjusted" if self.adjusted else "")

    def relative_path(self) -> Path:
        if self.month is not None:
            return Path(self.name, self.symbol, self.month + FILE_SUFFIX)
        return Path(self.name, self.symbol + FILE_SUFFIX)

    @classmethod
    def from_relative_path(cls, rel: Path) -> "DatasetId":
        """The inverse of relative_path; UsageError for a path the store did not write."""
        parts = rel.parts
        if not parts or not parts[-1].endswith(FILE_SUFFIX):
            raise UsageError(f"{rel} is not a dataset file.")
        stem = parts[-1][: -len(FILE_SUFFIX)]
        if len(parts) == 3 and parts[0].startswith("intraday_"):
            return cls(parts[1], parts[0][len("intraday_"):], False, stem)
        if len(parts) == 2:
            interval, _, adjusted = parts[0].partition("_")
            if adjusted not in ("", "adjusted"):
                raise UsageError(f"{rel} is not a dataset file.")
            return cls(stem, interval, adjusted == "adjusted")
        raise UsageError(f"{rel} is not a dataset file.")

    def __str__(self) -> str:
        return f"{self.symbol} {self.name}" + (f" {self.month}" if self.month else "")


_META_KEY = b"secure_ohlcv"
# Prices arrive as decimal strings with a few decimals. Stored as integers at the smallest
# exact scale, delta-encoded, they take a third of the bytes of float64 (bench/RESULTS.md),
# and come back bit-identical: round(x * 10**d) / 10**d is the float nearest the decimal.
MAX_SCALE = 8
_INT_ENCODING = "DELTA_BINARY_PACKED"


def _exact_scale(values: np.ndarray) -> int | None:
    """The fewest decimals that represent every value exactly, or None (kept as float64)."""
    if not np.isfinite(values).all():
        return None
    for decimals in range(MAX_SCALE + 1):
        scaled = np.round(values * 10.0**decimals)
        if np.abs(scaled).max(initial=0) >= 2**53:
            return None
        if np.array_equal(scaled / 10.0**decimals, values):
            return decimals
    return None


def encode_table(frame: pd.DataFrame, meta: dict[str, Any]) -> bytes:
    """A frame as Parquet bytes, with our schema version and `meta` in the file metadata.

    Daily and longer timestamps are stored as dates; float columns as scaled integers
    where that is exact (the scale is in the metadata), else as float64."""
    columns, scales, encodings = {}, {}, {}
    for name in frame.columns:
        values = frame[name]
        if name == "timestamp" and values.dt.tz is None:
            columns[name] = pa.array(values.to_numpy().astype("datetime64[D]"), pa.date32())
            encodings[name] = _INT_ENCODING
        elif name == "timestamp":
            columns[name] = pa.array(values)
            encodings[name] = _INT_ENCODING
        elif values.dtype.kind == "f" and (decimals := _exact_scale(values.to_numpy())) is not None:
            scales[name] = decimals
            columns[name] = pa.array(np.round(values.to_numpy() * 10.0**decimals).astype("int64"))
            encodings[name] = _INT_ENCODING
        elif values.dtype.kind == "f":
            columns[name] = pa.array(values.to_numpy())
            encodings[name] = "BYTE_STREAM_SPLIT"
        else:
            columns[name] = pa.array(values.to_numpy())
            if values.dtype.kind in "iu":
                encodings[name] = _INT_ENCODING
    payload = dict(meta, schema_version=SCHEMA_VERSION, scales=scales)
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(payload).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False,
                   column_encoding=encodings)
    return sink.getvalue()


def decode_table(data: bytes) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The inverse of encode_table; ValueError for anything that is not our table."""
    table, meta = decode_arrow(data)
    return table.to_pandas(use_threads=False), meta


def decode_arrow(data: bytes) -> tuple[pa.Table, dict[str, Any]]:
    """decode_table, stopping at the Arrow table (for building one frame of many)."""
    try:
        # ParquetFile.read on one thread: for tables this small, read_table's dataset
        # machinery and thread hand-offs cost more than the decoding itself.
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"not a Parquet table ({exc})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError("no secure_ohlcv metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError("unreadable secure_ohlcv metadata") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema version {meta.get('schema_version')!r}, "
                         f"this program reads {SCHEMA_VERSION}")
    # Undo the storage encodings in Arrow, column by column, then convert once: cheaper
    # than fixing up pandas columns one assignment at a time.
    columns = {}
    scales = meta.get("scales", {})
    for name in table.column_names:
        column = table[name]
        if name in scales:
            column = pc.divide(column.cast(pa.float64()), 10.0 ** scales[name])
        elif name == "timestamp" and pa.types.is_date32(column.type):
            column = column.cast(pa.timestamp("us"))
        columns[name] = column
    return pa.table(columns), meta


class EncryptedStore:
    """Datasets on disk: one Fernet token per file, written atomically, 0600 in 0700 dirs."""

    def __init__(self, settings: Settings, key_ring: KeyRing) -> None:
        self.root = settings.data_dir
        self.key_ring = key_ring
        self.file_mode = settings.file_mode
        self.dir_mode = settings.dir_mode
        self.lock_timeout = settings.lock_timeout
        self.disk_floor = settings.min_free_disk_mb * 2**20

    def path(self, dataset: DatasetId) -> Path:
        return self.root / dataset.relative_path()

    def lock(self) -> DataDirLock:
        """The exclusive write lock of this data directory."""
        check_private_dir(self.root, self.dir_mode)
        return DataDirLock(self.root, self.lock_timeout, self.file_mode)

    def write(self, dataset: DatasetId, frame: pd.DataFrame, meta: dict[str, Any]) -> int:
        """Encrypt and store `frame`; returns the bytes written. Hold `lock()` around it."""
        path = self.path(dataset)
        ensure_private_dir(path.parent, self.dir_mode)
        meta = dict(meta, symbol=dataset.symbol, dataset=dataset.name, written_at=utc_now_iso())
        token = self.key_ring.encrypt(encode_table(frame, meta))
        require_free_disk(path.parent, self.disk_floor, len(token))
        atomic_write(path, token, self.file_mode)
        return len(token)

    def read(self, dataset: DatasetId) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Decrypt a dataset. FileNotFoundError when absent, IntegrityError when unreadable."""
        return self.read_file(self.path(dataset))

    def read_file(self, path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
        token = path.read_bytes()
        try:
            return decode_table(self.key_ring.decrypt(token))
        except InvalidToken:
            raise IntegrityError(f"{path} does not decrypt with the key ring "
                                 f"({', '.join(self.key_ring.fingerprints())}): altered, "
                                 "truncated, or written under a key that is not in the ring.") from None
        except ValueError as exc:
            raise IntegrityError(f"{path} decrypts but is not a dataset: {exc}.") from None

    def read_with_key(self, dataset: DatasetId) -> tuple[pd.DataFrame, dict[str, Any], str]:
        """Like read, and also the fingerprint of the key that opened the file."""
        path = self.path(dataset)
        plaintext, key_fp = self.key_ring.decrypt_with_fingerprint(path.read_bytes(), path)
        try:
            frame, meta = decode_table(plaintext)
        except ValueError as exc:
            raise IntegrityError(f"{path} decrypts but is not a dataset: {exc}.") from None
        return frame, meta, key_fp

    def datasets(self) -> Iterator[DatasetId]:
        """Every dataset file in the store, in path order; temp files are never listed."""
        if not self.root.exists():
            return
        for path in sorted(self.root.rglob(f"*{FILE_SUFFIX}")):
            if path.name.startswith(".") or not path.is_file():
                continue
            with contextlib.suppress(UsageError):
                yield DatasetId.from_relative_path(path.relative_to(self.root))


# =========================================================================================
# 9. Downloader: what to fetch, how to merge, what is left
# =========================================================================================

# Alpha Vantage publishes a session's daily bar after the close; a check made this long
# after the close that found no new bar means there was no session (a holiday).
SESSION_CLOSE = dt_time(16, 30)
HOLIDAY_GRACE = timedelta(hours=2)
COMPACT_BARS = 100
COMPACT_MAX_GAP = 90  # weekdays; leaves room for holidays inside the 100-bar window


def latest_session(now: datetime | None = None) -> date:
    """The newest trading day whose bar should be published by `now` (weekends skipped;
    exchange holidays are learned from the API, see is_current)."""
    now = (now or datetime.now(timezone.utc)).astimezone(MARKET_TZ)
    day = now.date() if now.time() >= SESSION_CLOSE else now.date() - timedelta(days=1)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def weekdays_between(start: date, end: date) -> int:
    """Weekdays after `start` up to and including `end`."""
    return int(np.busday_count(start + timedelta(days=1), end + timedelta(days=1)))


def is_current(last_bar: date | None, checked_at: str | None, now: datetime) -> bool:
    expected = latest_session(now)
    if last_bar is not None and last_bar >= expected:
        return True
    if checked_at:
        close = datetime.combine(expected, SESSION_CLOSE, MARKET_TZ) + HOLIDAY_GRACE
        return datetime.fromisoformat(checked_at) >= close
    return False


def _month_complete(month: str | None, checked_at: str | None) -> bool:
    """An intraday month checked after it ended (plus the publishing grace) is final."""
    if month is None or not checked_at:
        return False
    year, number = map(int, month.split("-"))
    following = date(year + number // 12, number % 12 + 1, 1)
    ended = datetime.combine(following, dt_time(0), MARKET_TZ) + HOLIDAY_GRACE
    return datetime.fromisoformat(checked_at) >= ended


@dataclass
class DatasetResult:
    """What one dataset's download did: one line of the command's output."""

    dataset: DatasetId
    outcome: str  # updated | current | failed | pending
    rows: int = 0
    added: int = 0
    last_bar: str = ""
    mode: str = ""  # compact | full | none
    seconds: float = 0.0
    error: str = ""
    partial_history: bool = False

    def line(self) -> str:
        head = f"{self.dataset}: "
        if self.outcome == "failed":
            return head + f"FAILED: {self.error}"
        if self.outcome == "pending":
            return head + f"not reached: {self.error}; the next run does it first"
        if self.outcome == "current":
            return head + f"current, no request ({self.rows} rows, last bar {self.last_bar})"
        note = " (partial history: full history needs a premium key)" if self.partial_history else ""
        return (head + f"updated, {self.rows} rows (+{self.added}), last bar {self.last_bar} "
                f"[{self.mode}, {self.seconds:.2f} s]{note}")


@dataclass
class DownloadReport:
    results: list[DatasetResult]
    stats: RunStats
    quota_exhausted: bool = False
    memory_exceeded: bool = False

    @property
    def failed(self) -> list[DatasetResult]:
        return [r for r in self.results if r.outcome == "failed"]

    @property
    def pending(self) -> list[DatasetResult]:
        return [r for r in self.results if r.outcome == "pending"]

    @property
    def exit_code(self) -> int:
        if self.quota_exhausted:
            return 4
        return 1 if self.failed or self.memory_exceeded else 0


def merge_bars(stored: pd.DataFrame | None, fresh: pd.DataFrame, dataset: DatasetId) -> pd.DataFrame:
    """Stored bars plus fresh ones; where both have a bar, the fresh one wins (corrections).

    Weekly and monthly bars are matched by period, not date: the bar of the week in
    progress is re-dated every day (keyed by its latest trading day) and must replace,
    not join, yesterday's version of itself.
    """
    if stored is None or stored.empty:
        return fresh
    combined = pd.concat([stored, fresh], ignore_index=True)
    if dataset.interval in ("weekly", "monthly"):
        stamps = combined["timestamp"].dt.tz_localize(None) if combined["timestamp"].dt.tz else combined["timestamp"]
        key = stamps.dt.to_period("W" if dataset.interval == "weekly" else "M")
    else:
        key = combined["timestamp"]
    combined = combined[~key.duplicated(keep="last")]
    return combined.sort_values("timestamp", kind="stable").reset_index(drop=True)


class DatasetDownloader:
    """Brings one dataset up to date: decide the request, fetch, parse, merge, store.

    Shared by the worker threads of a run; each call touches one dataset file only, so
    writes to one file are never concurrent."""

    def __init__(self, store: EncryptedStore, client: AlphaVantageClient) -> None:
        self.store = store
        self.client = client
        self.full_refused = False  # learned once per run: this key's plan has no full history
        self.full_works = False    # learned once per run: it has
        self._full_probe = threading.Lock()
        self.refused_functions: dict[str, str] = {}
        self._warned = threading.Lock()

    def run(self, dataset: DatasetId, force_full: bool, now: datetime,
            trailing: bool = False) -> DatasetResult:
        """Bring `dataset` up to date. `trailing` (intraday without --month): fetch the
        trailing 30 days and store every month they touch, so no month end is lost."""
        started = time.monotonic()
        stored, meta = self._read(dataset)
        last_bar = None if stored is None or stored.empty else stored["timestamp"].iloc[-1].date()
        final_month = not meta.get("partial_history") and _month_complete(dataset.month,
                                                                           meta.get("checked_at"))
        if not force_full and stored is not None and (
                is_current(last_bar, meta.get("checked_at"), now) or final_month):
            return DatasetResult(dataset, "current", len(stored), 0, str(last_bar), "none")
        request, needs_full = self._plan(dataset, last_bar, force_full, now)
        if trailing:
            request = replace(request, month=None)
        if request.function in self.refused_functions:
            raise PremiumRequired(self.refused_functions[request.function])
        # History is partial when it should have been full but the plan allows compact only.
        partial = (bool(meta.get("partial_history")) if stored is not None else False) \
            or (needs_full and request.outputsize == "compact")
        try:
            request, fresh = self._fetch_or_compact(request, dataset)
        except PremiumRequired as exc:
            self.refused_functions[request.function] = str(exc)
            raise
        if request.outputsize == "full":
            partial = False
        elif request.outputsize == "compact" and needs_full:
            partial = True
        if (dataset.adjusted and request.outputsize == "compact" and stored is not None
                and self._corporate_action_since(fresh, last_bar)):
            # Adjusted history changes backwards after a split or dividend: refetch it all.
            log.info("%s: split or dividend in the new bars; fetching the full history", dataset)
            request, fresh = self._fetch_or_compact(replace(request, outputsize="full"), dataset)
            if request.outputsize == "full":
                stored, partial = None, False
        meta = {"checked_at": utc_now_iso(), "partial_history": partial,
                "function": request.function}
        added = 0
        if trailing:  # other months the trailing window touched: merge into their files
            for month, part in fresh.groupby(fresh["timestamp"].dt.strftime("%Y-%m")):
                if month != dataset.month:
                    other = replace(dataset, month=month)
                    before = self._read(other)[0]
                    merged = merge_bars(before, part.reset_index(drop=True), other)
                    added += len(merged) - (0 if before is None else len(before))
                    self.store.write(other, merged, meta)
            fresh = fresh[fresh["timestamp"].dt.strftime("%Y-%m") == dataset.month]
            fresh = fresh.reset_index(drop=True)
        merged = merge_bars(stored, fresh, dataset)
        added += len(merged) - (0 if stored is None else len(stored))
        if merged.empty:
            raise ApiError(f"no bars for {dataset.month} in the answer.")
        self.store.write(dataset, merged, meta)
        return DatasetResult(dataset, "updated", len(merged), added,
                             str(merged["timestamp"].iloc[-1].date()), request.outputsize or "full",
                             time.monotonic() - started, partial_history=partial)

    def _read(self, dataset: DatasetId) -> tuple[pd.DataFrame | None, dict[str, Any]]:
        try:
            return self.store.read(dataset)
        except FileNotFoundError:
            return None, {}

    def _plan(self, dataset: DatasetId, last_bar: date | None, force_full: bool,
              now: datetime) -> tuple[ApiRequest, bool]:
        """The request to make, and whether the full history is what the dataset needs."""
        symbol, interval = dataset.symbol, dataset.interval
        if interval in ("weekly", "monthly"):
            return ApiRequest(symbol, interval, dataset.adjusted), False  # always everything
        if interval in INTRADAY:  # the whole month (or trailing 30 days) is what it needs
            return ApiRequest(symbol, interval, outputsize="full", month=dataset.month), True
        small_gap = last_bar is not None and weekdays_between(last_bar, latest_session(now)) <= COMPACT_MAX_GAP
        needs_full = force_full or not small_gap
        compact = not needs_full or self.full_refused
        return (ApiRequest(symbol, interval, dataset.adjusted, "compact" if compact else "full"),
                needs_full)

    def _fetch_or_compact(self, request: ApiRequest,
                          dataset: DatasetId) -> tuple[ApiRequest, pd.DataFrame]:
        """Fetch; a refused outputsize=full falls back to compact, once per run.

        Until one full answer has come back, full requests go one at a time: otherwise
        every worker would spend a request of a free key's 25 on the same refusal."""
        if request.outputsize != "full" or self.full_works:
            return self._fetch_falling_back(request, dataset)
        with self._full_probe:
            if self.full_refused:
                request = replace(request, outputsize="compact")
            request, frame = self._fetch_falling_back(request, dataset)
            self.full_works = request.outputsize == "full" or self.full_works
            return request, frame

    def _fetch_falling_back(self, request: ApiRequest,
                            dataset: DatasetId) -> tuple[ApiRequest, pd.DataFrame]:
        try:
            return request, self._fetch(request, dataset)
        except PremiumParameter:
            self._note_full_refused()
            compact = replace(request, outputsize="compact")
            return compact, self._fetch(compact, dataset)

    def _fetch(self, request: ApiRequest, dataset: DatasetId) -> pd.DataFrame:
        frame = parse_payload(self.client.fetch(request), dataset)
        if request.month:
            frame = frame[frame["timestamp"].dt.strftime("%Y-%m") == request.month]
            if frame.empty:
                raise ApiError(f"no bars for {request.month} in the answer.")
        return frame.reset_index(drop=True)

    def _note_full_refused(self) -> None:
        with self._warned:
            if not self.full_refused:
                self.full_refused = True
                log.warning("outputsize=full is a premium feature for this key: falling back to "
                            "compact (latest %d bars); datasets are marked partial", COMPACT_BARS)

    @staticmethod
    def _corporate_action_since(fresh: pd.DataFrame, last_bar: date | None) -> bool:
        new = fresh[fresh["timestamp"].dt.date > last_bar] if last_bar else fresh
        events = new["dividend_amount"] != 0
        if "split_coefficient" in new:
            events |= new["split_coefficient"] != 1
        return bool(events.any())


PENDING_NAME = "pending.json"


class PendingQueue:
    """Datasets a run could not reach before the quota ran out; the next run does them first."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.state_dir / PENDING_NAME
        self.file_mode = settings.file_mode

    def load(self) -> set[str]:
        try:
            return set(json.loads(self.path.read_text()))
        except (FileNotFoundError, ValueError):
            return set()

    def order(self, datasets: list[DatasetId]) -> list[DatasetId]:
        pending = self.load()
        return sorted(datasets, key=lambda d: str(d) not in pending)  # stable: pending first

    def save(self, report: DownloadReport) -> None:
        pending = self.load()
        pending -= {str(r.dataset) for r in report.results if r.outcome != "pending"}
        pending |= {str(r.dataset) for r in report.pending}
        atomic_write(self.path, json.dumps(sorted(pending)).encode(), self.file_mode)


# =========================================================================================
# 10. Lifecycle: rotate keys, back up, verify, recover, clean up
# =========================================================================================

def dataset_files(root: Path) -> list[Path]:
    """Every dataset file below `root`, sorted; temp files and foreign files excluded."""
    found = []
    for path in sorted(root.rglob(f"*{FILE_SUFFIX}")) if root.exists() else []:
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            with contextlib.suppress(UsageError):
                DatasetId.from_relative_path(path.relative_to(root))
                found.append(path)
    return found


@dataclass
class RotationReport:
    old_fingerprint: str
    new_fingerprint: str
    rotated: int = 0
    already_done: int = 0
    seconds: float = 0.0
    new_env_value: str | None = field(default=None, repr=False)  # shown once, then forgotten
    awaiting_env_update: bool = False
    env_file_updated: Path | None = None


# Each file's fsyncs release the GIL while another thread decrypts and encrypts the next
# (bench/RESULTS.md, scenario 7 and the before/after table). More threads gained nothing
# on 2 cores (2 and 8 measured): the crypto itself holds the GIL.
ROTATION_THREADS = 4


class KeyRotation:
    """Re-encrypt every dataset under a new primary key, crash-safely and resumably.

    Order is what makes it safe: (1) the new key ring, old keys kept as retired, is stored
    where keys are kept *before* any file changes; (2) each dataset is re-encrypted under
    the new key and replaced atomically (several files at a time, each one whole), skipping
    files the new key already opens; (3) the canary is rotated last, so a canary still
    under an old key means "unfinished" and a re-run completes the job; (4) every file must
    then open under the new key alone.
    """

    def __init__(self, app: "SecureOHLCVDownloader") -> None:
        self.app = app
        self.settings = app.settings

    def run(self) -> RotationReport:
        started = time.monotonic()
        with self.app.exclusive() as ring:
            canary_fp = ring.decrypt_with_fingerprint(self.app.canary_path.read_bytes(),
                                                      self.app.canary_path)[1]
            if canary_fp == ring.primary.fingerprint:  # no rotation under way: start one
                report = self._new_primary(ring)
                if report.awaiting_env_update:
                    return report
                ring = self.app.key_ring()
            else:
                old = next(k for k in ring.keys if k.fingerprint == canary_fp)
                report = RotationReport(old.fingerprint, ring.primary.fingerprint)
                log.info("resuming the rotation to key %s", ring.primary.fingerprint)
            rotate_one = functools.partial(self._rotate_file, ring, report.old_fingerprint)
            datasets = dataset_files(self.settings.data_dir)
            written: dict[Path, bytes] = {}  # SHA-256 of each token this run wrote
            with ThreadPoolExecutor(ROTATION_THREADS, thread_name_prefix="rotate") as pool:
                try:
                    for path, digest in zip(datasets, pool.map(rotate_one, datasets)):
                        if digest is None:
                            report.already_done += 1
                        else:
                            written[path], report.rotated = digest, report.rotated + 1
                    # Only once every dataset is on disk under the new key: the canary,
                    # whose old key is how a re-run after a crash knows it is unfinished.
                    digest = rotate_one(self.app.canary_path)
                    if digest is not None:
                        written[self.app.canary_path] = digest
                    # Proof that every file opens under the new key alone.
                    files = datasets + [self.app.canary_path]  # the lock keeps the set fixed
                    check = functools.partial(self._under_primary_alone, ring, written)
                    for path, sound in zip(files, pool.map(check, files)):
                        if not sound:
                            raise IntegrityError(f"{path} does not open under the new key "
                                                 "alone after rotation; run --rotate-key again.")
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # files already replaced stay valid
                    raise
        report.seconds = time.monotonic() - started
        log.info("rotation done: %d files re-encrypted, %d already done, %s -> %s in %.1f s",
                 report.rotated, report.already_done, report.old_fingerprint,
                 report.new_fingerprint, report.seconds)
        return report

    def _rotate_file(self, ring: KeyRing, old_fingerprint: str, path: Path) -> bytes | None:
        """Re-encrypt one file under the primary key; the SHA-256 of the token written, or
        None when the primary key already opens it (done by an earlier, interrupted run)."""
        token = path.read_bytes()
        try:
            # One pass over the keys, the old key first (most files are under it): tells
            # "already done" from "to do", with the plaintext.
            plaintext, key_fp = ring.decrypt_with_fingerprint(token, path, first=old_fingerprint)
        except IntegrityError:
            raise IntegrityError(f"{path} does not decrypt with the key ring; the rotation "
                                 "stopped before touching it. Run --recover to restore it "
                                 "from a backup.") from None
        if key_fp == ring.primary.fingerprint:
            return None
        rotated = ring.encrypt(plaintext)
        atomic_write(path, rotated, self.settings.file_mode)
        return hashlib.sha256(rotated).digest()

    @staticmethod
    def _under_primary_alone(ring: KeyRing, written: dict[Path, bytes], path: Path) -> bool:
        """A file this run wrote must read back as the very token Fernet made under the
        new key; any other file must carry that key's valid HMAC."""
        token = path.read_bytes()
        if path in written:
            return hashlib.sha256(token).digest() == written[path]
        return ring.signed_by_primary(token)

    def _new_primary(self, ring: KeyRing) -> RotationReport:
        """Store a ring with a new primary (old keys retired) where the keys are kept."""
        new = StoredKey(Fernet.generate_key().decode(), "primary", utc_now_iso())
        redact.add(new.key)
        keys = [new] + [replace(k, status="retired") for k in ring.keys]
        report = RotationReport(ring.primary.fingerprint, new.fingerprint)
        env_value = ",".join(k.key for k in keys)
        if self.app.key_source == KeyringKeyStore.label:
            self.app.keyring_store.save(keys)
            # The variable must follow, or every later run stops because the two disagree.
            if self.settings.encryption_key_in_env_file:
                write_env_key(self.settings.env_file, env_value, self.settings.file_mode)
                report.env_file_updated = self.settings.env_file
            elif self.settings.encryption_keys:
                report.new_env_value = env_value
        elif self.settings.encryption_key_in_env_file:
            write_env_key(self.settings.env_file, env_value, self.settings.file_mode)
            report.env_file_updated = self.settings.env_file
        else:
            # The keys live in a variable set outside our reach: nothing may be encrypted
            # under a key that exists only in this process. The operator sets it, then
            # runs --rotate-key again, which finds the canary under an old key and resumes.
            report.new_env_value, report.awaiting_env_update = env_value, True
            return report
        self.app.use_keys(keys)
        return report


BACKUP_PREFIX = "ohlcv-backup-"
BACKUP_SUFFIX = ".tar"
MANIFEST_MEMBER = "manifest.fernet"
CANARY_MEMBER = "state/" + "canary.fernet"
MAX_MEMBER_BYTES = 1 << 30


def backup_archives(directory: Path) -> list[Path]:
    """The backup archives in `directory`, oldest first (their names sort by UTC time)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.glob(f"{BACKUP_PREFIX}*{BACKUP_SUFFIX}")
                  if p.is_file() and not p.name.startswith("."))


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    info.uid = info.gid = 0
    info.uname = info.gname = ""  # reveal nothing about the machine it came from
    return info


@dataclass
class BackupReport:
    path: Path
    datasets: int
    bytes: int
    pruned: list[Path]


class BackupWriter:
    """One archive: the encrypted dataset files as they are, the canary, and an encrypted
    manifest (per file: path, size, SHA-256, key, rows, first and last bar)."""

    def __init__(self, app: "SecureOHLCVDownloader") -> None:
        self.app = app
        self.settings = app.settings

    def write(self, dest: Path | None) -> BackupReport:
        s = self.settings
        directory = ensure_private_dir(dest or s.backup_dir, s.dir_mode)
        name = f"{BACKUP_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}{BACKUP_SUFFIX}"
        target = directory / name
        tmp = directory / f"{TEMP_PREFIX}{name}.{secrets.token_hex(6)}"
        entries = []
        with self.app.exclusive() as ring:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, s.file_mode)
            try:
                os.fchmod(fd, s.file_mode)
                with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                                              format=tarfile.PAX_FORMAT) as tar:
                    for path in dataset_files(s.data_dir):
                        token = path.read_bytes()
                        plaintext, key_fp = ring.decrypt_with_fingerprint(token, path)
                        frame, _ = decode_table(plaintext)
                        rel = path.relative_to(s.data_dir).as_posix()
                        entries.append({"path": rel, "size": len(token),
                                        "sha256": hashlib.sha256(token).hexdigest(), "key": key_fp,
                                        "rows": len(frame),
                                        "first_bar": str(frame["timestamp"].iloc[0]) if len(frame) else None,
                                        "last_bar": str(frame["timestamp"].iloc[-1]) if len(frame) else None})
                        tar.addfile(_tar_member("data/" + rel, len(token)), io.BytesIO(token))
                        del plaintext, frame
                    canary = self.app.canary_path.read_bytes()
                    tar.addfile(_tar_member(CANARY_MEMBER, len(canary)), io.BytesIO(canary))
                    manifest = {"format": 1, "created_at": utc_now_iso(), "datasets": entries,
                                "primary_key": ring.primary.fingerprint,
                                "canary": {"size": len(canary),
                                           "sha256": hashlib.sha256(canary).hexdigest()}}
                    sealed = ring.encrypt(json.dumps(manifest).encode())
                    tar.addfile(_tar_member(MANIFEST_MEMBER, len(sealed)), io.BytesIO(sealed))
                    tar.fileobj.flush()
                    os.fsync(raw.fileno())
                os.replace(tmp, target)
                fsync_dir(directory)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if isinstance(exc, OSError) and exc.filename is None:  # name the archive
                    raise OSError(exc.errno, exc.strerror, str(target)) from exc
                raise
        pruned = prune_backups(directory, s.backup_keep)
        size = target.stat().st_size
        log.info("backup %s: %d datasets, %d bytes; pruned %d old archive(s)", target,
                 len(entries), size, len(pruned))
        return BackupReport(target, len(entries), size, pruned)


def prune_backups(directory: Path, keep: int, dry_run: bool = False) -> list[Path]:
    """Remove all but the newest `keep` archives; returns what went (or would go)."""
    old = backup_archives(directory)[:-keep] if keep else []
    if not dry_run:
        for path in old:
            path.unlink()
    return old


@dataclass
class VerifyReport:
    archive: Path
    members_checked: int = 0
    datasets_decrypted: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems


class BackupArchive:
    """Reads an archive we did not necessarily write: every member is checked before use.

    Only regular files with our names are read (no links, devices, absolute paths or
    '..'), each at most MAX_MEMBER_BYTES; nothing is ever extracted to a path it names."""

    def __init__(self, path: Path, ring: KeyRing) -> None:
        self.path = path
        self.ring = ring
        self.members: dict[str, bytes] = {}
        self.problems: list[str] = []
        self.altered: set[str] = set()  # members whose bytes differ from the manifest
        self.manifest: dict[str, Any] = {}
        self._read()

    def _read(self) -> None:
        try:
            with tarfile.open(self.path, mode="r:") as tar:
                for info in tar:
                    name = info.name
                    if not info.isfile():
                        self.problems.append(f"{name}: not a regular file (link or device); refused")
                    elif not _safe_member_name(name):
                        self.problems.append(f"{name!r}: unsafe member name; refused")
                    elif info.size > MAX_MEMBER_BYTES:
                        self.problems.append(f"{name}: {info.size} bytes, over the limit; refused")
                    elif name in self.members:
                        self.problems.append(f"{name}: appears twice; refused")
                    else:
                        handle = tar.extractfile(info)
                        self.members[name] = handle.read() if handle else b""
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.problems.append(f"{self.path.name}: unreadable or truncated archive ({exc})")
            return
        sealed = self.members.get(MANIFEST_MEMBER)
        if sealed is None:
            self.problems.append(f"{MANIFEST_MEMBER}: missing")
            return
        try:
            manifest = json.loads(self.ring.decrypt(sealed))
        except (InvalidToken, ValueError):
            self.problems.append(f"{MANIFEST_MEMBER}: does not decrypt with the key ring "
                                 f"({', '.join(self.ring.fingerprints())}) or is altered")
            return
        if not _manifest_shape_ok(manifest):
            self.problems.append(f"{MANIFEST_MEMBER}: decrypts but is not a manifest of this tool")
            return
        self.manifest = manifest

    def entries(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("datasets", []))

    def check_members(self) -> int:
        """Compare every member with the manifest; returns how many were checked."""
        if not self.manifest:
            return 0
        expected = {"data/" + e["path"]: e for e in self.entries()}
        canary = self.manifest.get("canary")
        if canary:
            expected[CANARY_MEMBER] = canary
        for name, entry in expected.items():
            data = self.members.get(name)
            if data is None:
                self.problems.append(f"{name}: missing from the archive")
            elif len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                self.altered.add(name)
                self.problems.append(f"{name}: size or SHA-256 differs from the manifest (altered)")
        for name in self.members.keys() - expected.keys() - {MANIFEST_MEMBER}:
            self.problems.append(f"{name}: not in the manifest")
        return len(expected)

    def dataset(self, entry: dict[str, Any]) -> tuple[bytes, pd.DataFrame]:
        """A member's token and its validated table; IntegrityError saying what is wrong."""
        name = "data/" + entry["path"]
        token = self.members.get(name)
        if token is None:
            raise IntegrityError(f"{name}: missing from the archive")
        if name in self.altered:
            raise IntegrityError(f"{name}: size or SHA-256 differs from the manifest (altered)")
        try:
            frame, _ = decode_table(self.ring.decrypt(token))
            validate_bars(frame)
        except InvalidToken:
            raise IntegrityError(f"{name}: does not decrypt with the key ring") from None
        except (ValueError, InvalidPayload) as exc:
            raise IntegrityError(f"{name}: decrypts but is not a valid dataset ({exc})") from None
        if len(frame) != entry["rows"]:
            raise IntegrityError(f"{name}: {len(frame)} rows, the manifest says {entry['rows']}")
        return token, frame


def _manifest_shape_ok(manifest: Any) -> bool:
    """Every field the readers use is there with its type (a sealed manifest can still
    come from a buggy or older writer)."""
    def entry_ok(entry: Any, fields: dict[str, type]) -> bool:
        return isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in fields.items())

    return (isinstance(manifest, dict) and manifest.get("format") == 1
            and isinstance(manifest.get("datasets"), list)
            and all(entry_ok(e, {"path": str, "size": int, "sha256": str, "rows": int})
                    for e in manifest["datasets"])
            and entry_ok(manifest.get("canary"), {"size": int, "sha256": str}))


def _safe_member_name(name: str) -> bool:
    if name in (MANIFEST_MEMBER, CANARY_MEMBER):
        return True
    parts = Path(name).parts
    if name.startswith("/") or "\\" in name or ".." in parts or not name.startswith("data/"):
        return False
    try:
        DatasetId.from_relative_path(Path(*parts[1:]))
    except (UsageError, TypeError):
        return False
    return True


def verify_backup(archive: Path, ring: KeyRing, sample: int | None) -> VerifyReport:
    """Check members against the manifest, then decrypt and validate `sample` datasets
    (all of them when None)."""
    backup = BackupArchive(archive, ring)
    report = VerifyReport(archive)
    report.members_checked = backup.check_members()
    entries = backup.entries()
    chosen = entries if sample is None or sample >= len(entries) else random.sample(entries, sample)
    for entry in chosen:
        try:
            backup.dataset(entry)
            report.datasets_decrypted += 1
        except IntegrityError as exc:
            report.problems.append(str(exc))
    report.problems[:0] = backup.problems
    return report


@dataclass
class RecoverReport:
    key_source: str
    relinked: bool
    checked: int = 0
    restored: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class CleanupReport:
    dry_run: bool
    trimmed: list[tuple[str, int]] = field(default_factory=list)  # dataset, rows removed
    removed_files: list[Path] = field(default_factory=list)
    pruned_backups: list[Path] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)
    bytes_freed: int = 0


def retention_cutoff(days: int, today: date | None = None) -> date:
    """Bars dated on or after this day are kept; older ones go."""
    return (today or market_today()) - timedelta(days=days)


# =========================================================================================
# 11. Monitoring: resources, run records, metrics, capacity
# =========================================================================================

class ResourceMonitor:
    """psutil's view of this run: RSS against OHLCV_MAX_MEMORY_MB (warning at 80%, stop at
    100%), CPU time, and free disk against OHLCV_MIN_FREE_DISK_MB before every write."""

    WARN_AT = 0.8

    def __init__(self, settings: Settings) -> None:
        self.process = psutil.Process()
        self.limit = settings.max_memory_mb * 2**20
        self.disk_floor = settings.min_free_disk_mb * 2**20
        self.data_dir = settings.data_dir
        self.peak_rss = self.rss()
        self._warned = False
        self.started = time.monotonic()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def snapshot(self, label: str) -> None:
        cpu = self.process.cpu_times()
        log.info("resources at %s: rss %.1f MB (peak %.1f MB), cpu %.2f s, free disk %.0f MB",
                 label, self.rss() / 2**20, self.peak() / 2**20, cpu.user + cpu.system,
                 self.free_disk() / 2**20)

    def peak(self) -> int:
        # ru_maxrss is the kernel's own high-water mark (KiB on Linux): nothing is missed
        # between our samples.
        self.peak_rss = max(self.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return self.peak_rss

    def free_disk(self) -> int:
        return free_disk(self.data_dir)

    def memory_ok(self) -> bool:
        """False once RSS reaches the limit: finish the dataset in hand, start no other."""
        rss = self.rss()
        self.peak_rss = max(self.peak_rss, rss)
        if rss >= self.limit:
            log.error("memory: rss %.1f MB reached OHLCV_MAX_MEMORY_MB=%d; stopping cleanly",
                      rss / 2**20, self.limit // 2**20)
            return False
        if rss >= self.WARN_AT * self.limit and not self._warned:
            self._warned = True
            log.warning("memory: rss %.1f MB is over 80%% of OHLCV_MAX_MEMORY_MB=%d",
                        rss / 2**20, self.limit // 2**20)
        return True



RUNS_NAME = "runs.json"


class RunRecord:
    """Last run, exit code and last success per command (state/runs.json), for `status`
    and for the metrics file, which would otherwise forget the other commands."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.state_dir / RUNS_NAME
        self.settings = settings

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def record(self, command: str, exit_code: int, finished: float,
               samples: list[list[Any]]) -> dict[str, Any]:
        """Store this run; returns every command's record. `samples` are the run's own
        figures, kept so that the next command's metrics file still carries them."""
        entry_now = {"last_run": finished, "exit_code": exit_code, "samples": samples}
        if not self.settings.state_dir.is_dir():
            return {command: entry_now}
        with locked_json(self.path, self.read, self.settings.file_mode,
                         self.settings.dir_mode) as runs:
            entry = runs.setdefault(command, {})
            entry.update(entry_now)
            if exit_code == 0:
                entry["last_success"] = finished
            return json.loads(json.dumps(runs))


# name -> (help, label names). The list the alert rules and dashboard are checked against
# is deploy/metrics.txt; a test keeps the two equal.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ohlcv_requests_total": ("API requests of the last download by outcome", ("outcome",)),
    "ohlcv_throttled_total": ("Throttled answers in the last download", ()),
    "ohlcv_retries_total": ("Request retries in the last download", ()),
    "ohlcv_bytes_downloaded_total": ("Response bytes of the last download", ()),
    "ohlcv_datasets_total": ("Datasets of the last download by result", ("result",)),
    "ohlcv_rows_written_total": ("Bars added by the last download", ()),
    "ohlcv_quota_used": ("API requests used today per key fingerprint", ("key",)),
    "ohlcv_quota_left": ("API requests left today per key fingerprint", ("key",)),
    "ohlcv_verify_members_checked": ("Archive members checked by the last verify", ()),
    "ohlcv_verify_datasets_decrypted": ("Datasets decrypted by the last verify", ()),
    "ohlcv_verify_problems": ("Problems found by the last verify", ()),
    "ohlcv_backup_datasets": ("Datasets in the last backup", ()),
    "ohlcv_backup_bytes": ("Size of the last backup archive", ()),
    "ohlcv_run_duration_seconds": ("Duration of the last run of each command", ("command",)),
    "ohlcv_peak_rss_bytes": ("Peak resident memory of the last run of each command", ("command",)),
    "ohlcv_last_run_timestamp_seconds": ("When each command last ran", ("command",)),
    "ohlcv_last_exit_code": ("Exit code of each command's last run", ("command",)),
    "ohlcv_last_success_timestamp_seconds": ("When each command last exited 0", ("command",)),
}


def run_samples(command: str, duration: float, peak_rss: int,
                facts: dict[str, Any]) -> list[list[Any]]:
    """This run's figures as [metric, labels, value] triples."""
    samples: list[list[Any]] = [["ohlcv_run_duration_seconds", {"command": command}, duration],
                                ["ohlcv_peak_rss_bytes", {"command": command}, peak_rss]]
    stats: RunStats | None = facts.get("stats")
    if stats is not None:
        samples += [["ohlcv_requests_total", {"outcome": o}, n] for o, n in stats.requests.items()]
        samples += [["ohlcv_throttled_total", {}, stats.requests["throttled"]],
                    ["ohlcv_retries_total", {}, stats.retries],
                    ["ohlcv_bytes_downloaded_total", {}, stats.bytes_downloaded]]
    if "results" in facts:
        counts = Counter(r.outcome for r in facts["results"])
        samples += [["ohlcv_datasets_total", {"result": r}, counts[r]]
                    for r in ("updated", "current", "failed", "pending")]
        samples.append(["ohlcv_rows_written_total", {}, sum(r.added for r in facts["results"])])
    for key_fp, used, left in facts.get("quota", []):
        samples.append(["ohlcv_quota_used", {"key": key_fp}, used])
        if left is not None:  # unlimited plans have no figure to show
            samples.append(["ohlcv_quota_left", {"key": key_fp}, left])
    for name in ("verify_members_checked", "verify_datasets_decrypted", "verify_problems",
                 "backup_datasets", "backup_bytes"):
        if name in facts:
            samples.append(["ohlcv_" + name, {}, facts[name]])
    return samples


def write_metrics(path: Path, file_mode: int, runs: dict[str, Any]) -> None:
    """The Prometheus text file for node_exporter's textfile collector: the last figures
    of every command (newest run wins where two commands report the same series) and the
    last run, exit code and success of each. Labels carry fingerprints, never keys."""
    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}

    def set_sample(name: str, labels: dict[str, str], value: float) -> None:
        # Created on first use: a figure no command has produced is absent, not a false 0.
        if name not in gauges:
            doc, label_names = METRICS[name]
            gauges[name] = Gauge(name, doc, label_names, registry=registry)
        (gauges[name].labels(**labels) if labels else gauges[name]).set(value)

    for command, entry in sorted(runs.items(), key=lambda item: item[1]["last_run"]):
        for name, labels, value in entry.get("samples", []):
            set_sample(name, labels, value)
        set_sample("ohlcv_last_run_timestamp_seconds", {"command": command}, entry["last_run"])
        set_sample("ohlcv_last_exit_code", {"command": command}, entry["exit_code"])
        if "last_success" in entry:
            set_sample("ohlcv_last_success_timestamp_seconds", {"command": command},
                       entry["last_success"])
    # The same temp-file-and-rename as prometheus_client's write_to_textfile, but through
    # atomic_write, so the file has its configured mode from its first byte (the library's
    # temp file takes whatever the umask gives) and is fsynced.
    atomic_write(path, generate_latest(registry), file_mode)


# Bars a year per interval: 252 sessions; intraday counts extended hours (04:00-20:00 ET).
BARS_PER_YEAR = {"daily": 252, "weekly": 52, "monthly": 12, "1min": 252 * 960,
                 "5min": 252 * 192, "15min": 252 * 64, "30min": 252 * 32, "60min": 252 * 16}
# Measured on the emulator's synthetic histories (about 17 bytes a daily bar after
# encryption, 21 adjusted); used until this store has data of its own to measure.
DEFAULT_BYTES_PER_BAR = {"daily": 18, "weekly": 25, "monthly": 30}
DEFAULT_INTRADAY_BYTES_PER_BAR = 15
GUIDE_BYTES_PER_TICKER_DAY = (1_000, 5_000)  # the operations guide's "1-5 KB per ticker per day"


@dataclass
class Estimate:
    symbols: int
    interval: str
    years: float
    bytes_per_bar: float
    measured: bool
    storage_bytes: float
    backup_bytes: float
    backfill_requests: int
    refresh_requests: int
    backfill_seconds: float
    refresh_seconds: float
    bytes_per_ticker_day: float


def estimate(settings: Settings, store: EncryptedStore | None, symbols: int, interval: str,
             years: float) -> Estimate:
    """Storage, requests and time for `symbols` symbols, from this store's own bytes per
    bar where it has data of that interval."""
    bytes_per_bar, measured = _measured_bytes_per_bar(store, interval)
    if bytes_per_bar is None:
        bytes_per_bar = DEFAULT_BYTES_PER_BAR.get(interval, DEFAULT_INTRADAY_BYTES_PER_BAR)
    bars = symbols * years * BARS_PER_YEAR[interval]
    storage = bars * bytes_per_bar
    if interval in INTRADAY:
        backfill = symbols * max(1, math.ceil(years * 12))  # one request per symbol and month
    else:
        backfill = symbols  # daily full history, weekly and monthly: one request each
    refresh = symbols
    rate = settings.rate_limit_per_second / RATE_SLACK
    if settings.rate_limit_per_minute:
        rate = min(rate, settings.rate_limit_per_minute / 60)

    def duration(requests_needed: int) -> float:
        if settings.rate_limit_per_day and requests_needed > settings.rate_limit_per_day:
            days = math.ceil(requests_needed / settings.rate_limit_per_day)
            return (days - 1) * 86400 + (requests_needed % settings.rate_limit_per_day or
                                         settings.rate_limit_per_day) / rate
        return requests_needed / rate

    per_day_bars = BARS_PER_YEAR[interval] / 252
    return Estimate(symbols, interval, years, bytes_per_bar, measured, storage,
                    storage * settings.backup_keep, backfill, refresh, duration(backfill),
                    duration(refresh), bytes_per_bar * per_day_bars)


def _measured_bytes_per_bar(store: EncryptedStore | None, interval: str) -> tuple[float | None, bool]:
    if store is None:
        return None, False
    size = rows = 0
    for dataset in store.datasets():
        if dataset.interval == interval and not dataset.adjusted:
            frame, _ = store.read(dataset)
            size += store.path(dataset).stat().st_size
            rows += len(frame)
            if rows > 200_000:
                break
    return (size / rows, True) if rows else (None, False)


# =========================================================================================
# 12. The library's front door
# =========================================================================================

CANARY_NAME = "canary.fernet"
CANARY_TEXT = b"secure-ohlcv-downloader canary v1"


@dataclass
class InitReport:
    created_dirs: list[Path]
    already_initialised: bool
    key_source: str
    fingerprints: list[str]
    generated_key: str | None = field(default=None, repr=False)
    stored_in_keyring: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class KeyCheckReport:
    checks: list[Check]
    warnings: list[str]

    @property
    def sound(self) -> bool:
        return all(c.ok for c in self.checks)


class SecureOHLCVDownloader:
    """The library's front door: one object per run, built from Settings."""

    def __init__(self, settings: Settings, keyring_store: KeyringKeyStore | None = None) -> None:
        self.settings = settings
        redact.add(*settings.secrets())
        self.keyring_store = keyring_store if keyring_store is not None else KeyringKeyStore()
        self._key_ring: KeyRing | None = None
        self.key_source = ""
        self.warnings: list[str] = list(settings.warnings)
        self.monitor = ResourceMonitor(settings)
        self.notify: Callable[[str], None] = log.warning  # the CLI also shows these on stderr
        self.facts: dict[str, Any] = {}  # what the last command did, for the metrics file

    @classmethod
    def from_env(cls) -> "SecureOHLCVDownloader":
        """Settings from the environment and `.env`; the keyring picked by `keyring`."""
        return cls(load_settings())

    # -- keys ----------------------------------------------------------------------------

    @property
    def canary_path(self) -> Path:
        return self.settings.state_dir / CANARY_NAME

    def key_ring(self) -> KeyRing:
        """The key ring in use (read once per run)."""
        if self._key_ring is None:
            sources = read_key_sources(self.settings, self.keyring_store)
            self.warnings += sources.warnings
            self._key_ring, self.key_source = sources.choose()
            log.info("key ring from %s, primary %s, %d key(s)", self.key_source,
                     self._key_ring.primary.fingerprint, len(self._key_ring.keys))
        return self._key_ring

    def store(self) -> EncryptedStore:
        """The store for reading; writers use `exclusive()`."""
        self.check_dirs()
        return EncryptedStore(self.settings, self.key_ring())

    def check_dirs(self) -> None:
        """Every directory a command uses must be ours and no looser than configured:
        a loose one is reported (UnsafePathError, exit 3), never silently used."""
        s = self.settings
        for directory in (s.data_dir, s.state_dir, s.backup_dir):
            if directory.exists() or directory != s.backup_dir:
                try:
                    check_private_dir(directory, s.dir_mode)
                except FileNotFoundError:
                    raise UsageError(f"{directory} does not exist. Fix: run "
                                     "`python secure_ohlcv_downloader.py --init`.") from None

    @contextlib.contextmanager
    def exclusive(self, record: bool = True, reload_keys: bool = True,
                  remove_temps: bool = True) -> Iterator[KeyRing]:
        """The data-directory lock, then the key ring as stored *now*: a run that waited
        while another rotated the keys must not write under the ring it read before.
        Temp files found under the lock are crashed writers' and go (cleanup reports them)."""
        s = self.settings
        self.check_dirs()
        with DataDirLock(s.data_dir, s.lock_timeout, s.file_mode, record, self.notify):
            if remove_temps:
                remove_temp_files(s.data_dir)
            if reload_keys:
                self._reload_keys()
            yield self.key_ring()

    def _reload_keys(self) -> None:
        if self.settings.encryption_key_in_env_file:
            value = read_env_file(self.settings.env_file)[0].get("OHLCV_ENCRYPTION_KEY", "")
            self.settings = replace(self.settings, encryption_keys=parse_encryption_keys(value))
            redact.add(*self.settings.secrets())
        self._key_ring = None

    def init(self) -> InitReport:
        """Create the private directories and the first key; a second run changes nothing."""
        s = self.settings
        created = [d for d in (s.data_dir, s.backup_dir, s.state_dir) if not d.exists()]
        for directory in (s.data_dir, s.backup_dir, s.state_dir):
            ensure_private_dir(directory, s.dir_mode)
        sources = read_key_sources(s, self.keyring_store)
        self.warnings += sources.warnings

        if self.canary_path.exists():
            ring, source = sources.choose()
            self._check_canary(ring)
            return InitReport(created, True, source, ring.fingerprints(), warnings=self.warnings)

        generated = None
        if sources.keyring_keys:
            ring, source = sources.choose()  # never replace a key the keyring already holds
        elif sources.env_keys:
            ring, source = KeyRing(sources.env_keys), EnvKeyStore.label
        elif sources.keyring_problem and sources.backend.usable:
            # A keyring exists but fails (locked, refusing): a key generated now could be
            # kept nowhere, so stop and let the operator fix the keyring first.
            raise KeyStoreError(sources.keyring_problem)
        else:
            ring, source = KeyRing.generate(), "generated"
            generated = ring.primary.key
        stored = False
        if not sources.keyring_keys and sources.backend.usable and not sources.keyring_problem:
            self.keyring_store.save(ring.keys)
            stored = True
        elif generated:
            # Headless: the guide's own fallback is OHLCV_ENCRYPTION_KEY in a 0600 .env.
            write_env_key(s.env_file, generated, s.file_mode)
            self.warnings.append(f"no usable OS keyring: the new key was written to "
                                 f"{s.env_file} (mode {s.file_mode:04o}) as "
                                 "OHLCV_ENCRYPTION_KEY. Cron jobs must run in this directory "
                                 "or get the variable another way.")
        atomic_write(self.canary_path, ring.encrypt(CANARY_TEXT), s.file_mode)
        log.info("initialised: key ring from %s, primary %s, stored in keyring: %s",
                 source, ring.primary.fingerprint, stored)
        self._key_ring, self.key_source = ring, source
        return InitReport(created, False, source, ring.fingerprints(), generated, stored,
                          self.warnings)

    def _check_canary(self, ring: KeyRing) -> str:
        try:
            if ring.decrypt(self.canary_path.read_bytes()) != CANARY_TEXT:
                raise InvalidToken
        except InvalidToken:
            raise KeyStoreError(
                f"the key ring ({', '.join(ring.fingerprints())}) does not open the canary "
                f"{self.canary_path}: these are not the keys this store was initialised "
                "with. Fix: use the key from your offline copy (OHLCV_ENCRYPTION_KEY) and "
                "run --recover.") from None
        return "decrypts with the key ring"

    def check_keys(self) -> KeyCheckReport:
        """Prove the key store end to end; every check says what it found."""
        s = self.settings
        sources = read_key_sources(s, self.keyring_store)
        checks = []
        backend = sources.backend
        # No backend is sound when the variable holds the keys (the headless case); an
        # insecure one is sound but warned about (read_key_sources adds the warning).
        headless = not backend.usable and bool(sources.env_keys)
        checks.append(Check("keyring backend", backend.usable or headless,
                            f"{backend.name}: " + ("secure" if backend.secure else
                                                   "none; keys come from OHLCV_ENCRYPTION_KEY "
                                                   "(the headless fallback)" if headless
                                                   else backend.problem)))
        kr = sources.keyring_keys
        checks.append(Check("keyring entry", not sources.keyring_problem or bool(sources.env_keys),
                            f"{len(kr)} key(s), primary {kr[0].fingerprint}" if kr
                            else "no backend" if headless else sources.keyring_problem or "empty"))
        env = sources.env_keys
        checks.append(Check("OHLCV_ENCRYPTION_KEY", True,
                            f"{len(env)} key(s), primary {env[0].fingerprint}" if env else "not set"))
        try:
            ring, source = sources.choose()
        except KeyStoreError as exc:
            checks.append(Check("key ring in use", False, str(exc)))
            return KeyCheckReport(checks, self.warnings + sources.warnings)
        agree = "agree" if kr and env else "only one source"
        checks.append(Check("key ring in use", True,
                            f"from {source}: {', '.join(ring.fingerprints())} "
                            f"(primary first; keyring and variable: {agree})"))
        if self.canary_path.exists():
            try:
                checks.append(Check("canary", True, self._check_canary(ring)))
            except KeyStoreError as exc:
                checks.append(Check("canary", False, str(exc)))
        else:
            checks.append(Check("canary", False, f"{self.canary_path} is missing. Fix: run --init."))
        probe = secrets.token_bytes(32)
        checks.append(Check("round trip", ring.decrypt(ring.encrypt(probe)) == probe,
                            "fresh encrypt/decrypt with the primary key"))
        for label, directory in (("data directory", s.data_dir), ("backup directory", s.backup_dir),
                                 ("state directory", s.state_dir)):
            try:
                check_private_dir(directory, s.dir_mode)
                checks.append(Check(label, True, f"{directory} (mode within {s.dir_mode:04o})"))
            except FileNotFoundError:
                checks.append(Check(label, False, f"{directory} is missing. Fix: run --init."))
            except UnsafePathError as exc:
                checks.append(Check(label, False, str(exc)))
        return KeyCheckReport(checks, self.warnings + sources.warnings)

    # -- data ----------------------------------------------------------------------------

    def download(self, symbols: list[str], interval: str = "daily", adjusted: bool = False,
                 full: bool = False, month: str | None = None,
                 on_result: Callable[[DatasetResult], None] | None = None) -> DownloadReport:
        """Bring each symbol's dataset up to date, within the rate limits. Per-symbol
        failures are in the report; the quota running out stops the run cleanly."""
        trailing = interval in INTRADAY and month is None
        if trailing:
            month = datetime.now(MARKET_TZ).strftime("%Y-%m")
        elif interval not in INTRADAY and month is not None:
            raise UsageError("--month applies to intraday intervals only.")
        datasets = list(dict.fromkeys(DatasetId(s, interval, adjusted, month) for s in symbols))
        if not datasets:
            raise UsageError("no symbols given.")
        pending = PendingQueue(self.settings)
        api_keys = [k.reveal() for k in self.settings.api_keys]
        if not api_keys:
            self.warnings.append("ALPHA_VANTAGE_API_KEY is not set: using the public demo key, "
                                 "which serves IBM only. Claim a free key at "
                                 "https://www.alphavantage.co/support/#api-key.")
            api_keys = ["demo"]
        stats = RunStats()
        now = datetime.now(timezone.utc)
        results: list[DatasetResult] = []
        with self.exclusive() as ring:
            store = EncryptedStore(self.settings, ring)
            limiter = RateLimiter(self.settings, api_keys)
            client = AlphaVantageClient(self.settings, limiter, stats)
            worker = DatasetDownloader(store, client)
            stop = threading.Event()
            fatal: list[OHLCVError] = []
            memory_stop = threading.Event()

            quota_note = "the daily API quota is spent"
            memory_note = f"the run reached OHLCV_MAX_MEMORY_MB={self.settings.max_memory_mb}"

            def job(dataset: DatasetId) -> DatasetResult:
                # A spent quota does not skip the job: a current dataset still says so, and
                # one that needs a request gets QuotaExhausted from the limiter, unsent.
                if fatal:
                    return DatasetResult(dataset, "pending", error="the run stopped on an error")
                if memory_stop.is_set() or not self.monitor.memory_ok():
                    memory_stop.set()  # the datasets in hand finish; no new one starts
                    return DatasetResult(dataset, "pending", error=memory_note)
                try:
                    return worker.run(dataset, full, now, trailing)
                except QuotaExhausted:
                    stop.set()
                    return DatasetResult(dataset, "pending", error=quota_note)
                except OSError as exc:  # a full disk, a file-size limit: the next would fail too
                    stop.set()
                    failure = OHLCVError(f"cannot write {dataset}: {exc.strerror or exc}"
                                         + (f" ({exc.filename})" if exc.filename else "")
                                         + "; the previous version of that file is intact.")
                    fatal.append(failure)
                    return DatasetResult(dataset, "failed", error=str(failure))
                except (InvalidApiKey, DiskSpaceLow) as exc:
                    stop.set()
                    fatal.append(exc)
                    return DatasetResult(dataset, "failed", error=str(exc))
                except ApiError as exc:
                    log.warning("%s: failed: %s", dataset, exc)
                    return DatasetResult(dataset, "failed", error=str(exc))

            try:
                with ThreadPoolExecutor(self.settings.max_workers, "download") as pool:
                    futures = [pool.submit(job, d) for d in pending.order(datasets)]
                    for future in as_completed(futures):
                        result = future.result()
                        log.info("%s: %s %s rows=%d added=%d %.3fs%s", result.dataset,
                                 result.outcome, result.mode, result.rows, result.added,
                                 result.seconds, f" error={result.error}" if result.error else "")
                        results.append(result)
                        if on_result:
                            on_result(result)
            finally:
                limiter.close()
                client.close()
            report = DownloadReport(results, stats, quota_exhausted=stop.is_set() and not fatal,
                                    memory_exceeded=memory_stop.is_set())
            pending.save(report)
        self.facts.update(stats=stats, results=results, quota=self.quota_facts())
        if fatal:
            raise fatal[0]
        return report

    def quota_facts(self) -> list[tuple[str, int, int | None]]:
        """(key fingerprint, used today, left today or None when unlimited) per API key."""
        facts = []
        for api_key in [k.reveal() for k in self.settings.api_keys] or ["demo"]:
            daily = DailyQuota(self.settings, api_key_fingerprint(api_key))
            facts.append((daily.path.stem, daily.read()["used"], daily.left()))
        return facts

    def load(self, symbol: str, interval: str = "daily", adjusted: bool = False,
             start: str | date | None = None, end: str | date | None = None) -> pd.DataFrame:
        """The stored bars of one symbol as a DataFrame indexed by timestamp, oldest first."""
        frame = self._stored_frame(symbol, interval, adjusted)
        stamps = frame["timestamp"]
        if start is not None:
            frame = frame[stamps >= _bound(start, stamps)]
        if end is not None:
            frame = frame[frame["timestamp"] < _bound(end, stamps) + pd.Timedelta(days=1)]
        return frame.set_index("timestamp")

    def load_many(self, symbols: list[str], interval: str = "daily",
                  adjusted: bool = False) -> pd.DataFrame:
        """Many symbols' bars in one DataFrame: columns `symbol` (categorical), `timestamp`
        and the bars, symbol by symbol, oldest first.

        Memory stays near the result's own size: a first pass reads only each file's row
        count, the columns are allocated once, and each dataset is decoded straight into
        its slice, so no per-symbol frame or concatenation copy is ever held."""
        if interval in INTRADAY:
            raise UsageError("load_many takes daily, weekly or monthly bars; use load() "
                             "for intraday months.")
        store = self.store()
        datasets = [DatasetId(s, interval, adjusted) for s in symbols]
        counts = [pq.ParquetFile(pa.BufferReader(self._plaintext(store, d))).metadata.num_rows
                  for d in datasets]
        columns: dict[str, np.ndarray] = {}
        offset = 0
        for dataset, count in zip(datasets, counts):
            table, _ = decode_arrow(self._plaintext(store, dataset))
            for name in table.column_names:
                values = table[name].to_numpy()
                if name not in columns:
                    columns[name] = np.empty(sum(counts), dtype=values.dtype)
                columns[name][offset:offset + count] = values
            offset += count
        codes = np.repeat(np.arange(len(datasets), dtype="int32"), counts)
        symbol = pd.Categorical.from_codes(codes, [d.symbol for d in datasets])
        return pd.DataFrame({"symbol": symbol, **columns}, copy=False)

    @staticmethod
    def _plaintext(store: EncryptedStore, dataset: DatasetId) -> bytes:
        path = store.path(dataset)
        try:
            return store.key_ring.decrypt(path.read_bytes())
        except FileNotFoundError:
            raise UsageError(f"nothing stored for {dataset}: download it first.") from None
        except InvalidToken:
            raise IntegrityError(f"{path} does not decrypt with the key ring.") from None

    def _stored_frame(self, symbol: str, interval: str, adjusted: bool) -> pd.DataFrame:
        """One dataset's table; for intraday, its month files joined in order."""
        store = self.store()
        if interval not in INTRADAY:
            dataset = DatasetId(symbol, interval, adjusted)
            try:
                return store.read(dataset)[0]
            except FileNotFoundError:
                raise UsageError(f"nothing stored for {dataset}: download it first.") from None
        symbol = validate_symbol(symbol)
        months = sorted((d for d in store.datasets() if d.symbol == symbol and d.interval == interval),
                        key=lambda d: d.month or "")
        if not months:
            raise UsageError(f"nothing stored for {symbol} intraday_{interval}: download it first.")
        return pd.concat([store.read(d)[0] for d in months], ignore_index=True)

    def status(self) -> dict[str, Any]:
        """Every stored dataset (rows, first and last bar, last update, key) and today's quota."""
        store = self.store()
        now = datetime.now(timezone.utc)
        datasets = []
        for dataset in store.datasets():
            entry: dict[str, Any] = {"dataset": str(dataset), "path": str(dataset.relative_path())}
            try:
                frame, meta, key_fp = store.read_with_key(dataset)
                newest = frame["timestamp"].iloc[-1].date()
                shown = (lambda t: str(t)) if dataset.month else (lambda t: str(t.date()))
                entry |= {"rows": len(frame), "first_bar": shown(frame["timestamp"].iloc[0]),
                          "last_bar": shown(frame["timestamp"].iloc[-1]),
                          "age_days": (market_today() - newest).days,
                          "stale": not (_month_complete(dataset.month, meta.get("checked_at"))
                                        or is_current(newest, meta.get("checked_at"), now)),
                          "updated_at": meta.get("written_at"), "key": key_fp,
                          "partial_history": bool(meta.get("partial_history"))}
            except IntegrityError as exc:
                entry["error"] = str(exc)
            datasets.append(entry)
        quota = [{"key": fp, "day": market_today().isoformat(), "used": used,
                  "limit": self.settings.rate_limit_per_day or None, "left": left}
                 for fp, used, left in self.quota_facts()]
        self.facts["quota"] = self.quota_facts()
        return {"datasets": datasets, "quota": quota, "runs": RunRecord(self.settings).read(),
                "pending": sorted(PendingQueue(self.settings).load())}

    # -- lifecycle -----------------------------------------------------------------------

    def use_keys(self, keys: list[StoredKey]) -> None:
        """Switch this run to a key ring just stored (rotation, recovery)."""
        self._key_ring = KeyRing(keys)

    def rotate_key(self) -> RotationReport:
        """A new primary key, every dataset re-encrypted under it; resumable."""
        return KeyRotation(self).run()

    def backup(self, dest: Path | None = None) -> BackupReport:
        report = BackupWriter(self).write(dest)
        self.facts.update(backup_datasets=report.datasets, backup_bytes=report.bytes)
        return report

    def verify_backup(self, archive: Path | None = None, sample: int | None = 5) -> VerifyReport:
        if archive is None:
            archives = backup_archives(self.settings.backup_dir)
            if not archives:
                raise UsageError(f"no backup archive in {self.settings.backup_dir}; run backup first.")
            archive = archives[-1]
        if not archive.is_file():
            raise UsageError(f"{archive} is not a file.")
        report = verify_backup(archive, self.key_ring(), sample)
        self.facts.update(verify_members_checked=report.members_checked,
                          verify_datasets_decrypted=report.datasets_decrypted,
                          verify_problems=len(report.problems))
        return report

    def remove_key(self, key_fp: str, confirm: bool) -> tuple[list[str], bool]:
        """Drop a retired key from the keyring's ring. Returns the backups that need it
        (they become unreadable) and whether it was removed (only with `confirm`)."""
        with self.exclusive() as ring:
            return self._remove_key(ring, key_fp, confirm)

    def _remove_key(self, ring: KeyRing, key_fp: str, confirm: bool) -> tuple[list[str], bool]:
        target = [k for k in ring.keys if k.fingerprint == key_fp]
        if not target:
            raise UsageError(f"no key with fingerprint {key_fp} in the ring "
                             f"({', '.join(ring.fingerprints())}).")
        if target[0] is ring.primary:
            raise UsageError("the primary key cannot be removed; rotate first (--rotate-key).")
        if self.key_source != KeyringKeyStore.label:
            raise UsageError("keys come from OHLCV_ENCRYPTION_KEY: remove the key from the "
                             "variable yourself, after checking the backups listed here.")
        needed = []
        for archive in backup_archives(self.settings.backup_dir):
            backup = BackupArchive(archive, ring)
            keys = {e.get("key") for e in backup.entries()}
            if key_fp in keys or backup.problems:
                needed.append(archive.name)
        for path in dataset_files(self.settings.data_dir) + [self.canary_path]:
            if ring.decrypt_with_fingerprint(path.read_bytes(), path)[1] == key_fp:
                raise IntegrityError(f"{path} is still encrypted under {key_fp}; finish "
                                     "the rotation (--rotate-key) first.")
        if confirm:
            keys = [k for k in ring.keys if k.fingerprint != key_fp]
            self.keyring_store.save(keys)
            self.use_keys(keys)
        return needed, confirm

    def recover(self, from_backup: Path | None = None, key_file: Path | None = None,
                prompt: Callable[[], str] | None = None) -> RecoverReport:
        """On a rebuilt machine: re-link the keys, check every dataset, and restore from
        `from_backup` what is missing or broken, never overwriting a sound file."""
        s = self.settings
        if from_backup is not None and not from_backup.is_file():
            raise UsageError(f"--from-backup {from_backup}: no such archive file.")
        for directory in (s.data_dir, s.backup_dir, s.state_dir):
            ensure_private_dir(directory, s.dir_mode)
        keys, source = self._recovery_keys(key_file, prompt)
        report = RecoverReport(source, False)
        sources = read_key_sources(s, self.keyring_store)
        if sources.backend.usable and not sources.keyring_problem:
            kept = [replace(k, status="retired") for k in sources.keyring_keys or []
                    if k.key not in {n.key for n in keys}]
            if (sources.keyring_keys or []) != keys + kept:
                self.keyring_store.save(keys + kept)
                report.relinked = True
            keys = keys + kept
        elif source.startswith(("key file", "prompt")):
            write_env_key(s.env_file, ",".join(k.key for k in keys), s.file_mode)
            report.warnings.append(f"no usable OS keyring: the keys were written to {s.env_file} "
                                   f"(mode {s.file_mode:04o}) as OHLCV_ENCRYPTION_KEY.")
        self.use_keys(keys)
        self.key_source = source
        with self.exclusive(reload_keys=False) as ring:
            archive = BackupArchive(from_backup, ring) if from_backup else None
            if archive is not None and not archive.manifest:
                # Nothing in it can be trusted; above all, its canary must not become ours.
                raise IntegrityError(f"cannot recover from {from_backup.name}: "
                                     + "; ".join(archive.problems))
            if archive is not None:
                archive.check_members()
                report.warnings += [f"backup: {p}" for p in archive.problems]
            store = EncryptedStore(s, ring)
            broken = set()
            for path in dataset_files(s.data_dir):
                report.checked += 1
                try:
                    validate_bars(store.read_file(path)[0])
                except (IntegrityError, InvalidPayload) as exc:
                    broken.add(path.relative_to(s.data_dir).as_posix())
                    log.warning("recover: %s", exc)
            for entry in archive.entries() if archive is not None else []:
                rel = entry["path"]
                target = s.data_dir / rel
                if target.exists() and rel not in broken:
                    continue  # a sound file in the store is never overwritten
                try:
                    token, _ = archive.dataset(entry)
                except IntegrityError as exc:
                    report.failed.append(str(exc))
                    continue
                ensure_private_dir(target.parent, s.dir_mode)
                atomic_write(target, token, s.file_mode)
                broken.discard(rel)
                report.restored.append(rel)
            report.failed += [f"{rel}: does not decrypt or validate, and no backup copy"
                              for rel in sorted(broken)]
            if not self.canary_path.exists():
                # The key ring opened the manifest (or every dataset was checked with it):
                # a fresh canary under its primary is the truth from here on.
                atomic_write(self.canary_path, ring.encrypt(CANARY_TEXT), s.file_mode)
            else:
                self._check_canary(ring)
        log.info("recover: %d checked, %d restored, %d failed", report.checked,
                 len(report.restored), len(report.failed))
        return report

    def _recovery_keys(self, key_file: Path | None,
                       prompt: Callable[[], str] | None) -> tuple[list[StoredKey], str]:
        if key_file is not None:
            return parse_key_text(read_key_file(key_file)), f"key file {key_file}"
        if self.settings.encryption_keys:
            return EnvKeyStore(self.settings).load() or [], EnvKeyStore.label
        sources = read_key_sources(self.settings, self.keyring_store)
        if sources.keyring_keys:
            return sources.keyring_keys, KeyringKeyStore.label
        if prompt is not None:
            return parse_key_text(prompt()), "prompt"
        raise KeyStoreError("no key to recover with: set OHLCV_ENCRYPTION_KEY, give "
                            "--key-file FILE, or run on a terminal to type the key.")

    def cleanup(self, dry_run: bool = False) -> CleanupReport:
        """Apply OHLCV_RETENTION_DAYS, prune old archives, remove crashed writers' temp files."""
        s = self.settings
        report = CleanupReport(dry_run)
        with self.exclusive(record=not dry_run, remove_temps=False) as ring:
            store = EncryptedStore(s, ring)
            for root in (s.data_dir, s.state_dir, s.backup_dir):
                temps = [p for p in root.rglob(f"{TEMP_PREFIX}*") if p.is_file()] if root.exists() else []
                report.temp_files += temps
                report.bytes_freed += sum(p.stat().st_size for p in temps)
                if not dry_run:
                    for path in temps:
                        path.unlink()
            if s.retention_days:
                self._apply_retention(store, retention_cutoff(s.retention_days), report)
            pruned = prune_backups(s.backup_dir, s.backup_keep, dry_run=True)
            report.bytes_freed += sum(p.stat().st_size for p in pruned)
            report.pruned_backups = pruned if dry_run else prune_backups(s.backup_dir, s.backup_keep)
        return report

    def _apply_retention(self, store: EncryptedStore, cutoff: date, report: CleanupReport) -> None:
        for path in dataset_files(store.root):
            dataset = DatasetId.from_relative_path(path.relative_to(store.root))
            if dataset.month is not None:
                year, number = map(int, dataset.month.split("-"))
                if date(year, number, 1) >= cutoff:
                    continue  # the whole month is inside the window: no need to decrypt
            frame, meta = store.read_file(path)
            keep = frame[frame["timestamp"].dt.date >= cutoff].reset_index(drop=True)
            if len(keep) == len(frame):
                continue
            report.trimmed.append((str(dataset), len(frame) - len(keep)))
            size = path.stat().st_size
            if keep.empty:
                report.removed_files.append(path)
                report.bytes_freed += size
                if not report.dry_run:
                    path.unlink()
            elif not report.dry_run:
                store.write(dataset, keep, meta)
                report.bytes_freed += max(size - path.stat().st_size, 0)


def read_key_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read --key-file {path}: {exc.strerror}.") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is readable by group or others (mode %04o)", path,
                    stat.S_IMODE(mode))
    return text


def parse_key_text(text: str) -> list[StoredKey]:
    """Keys typed or kept in a file: comma or newline separated, '#' comments, and an
    optional `OHLCV_ENCRYPTION_KEY=` in front. Primary first."""
    text = re.sub(r"#.*", "", text)
    text = re.sub(r"(?m)^\s*(export\s+)?OHLCV_ENCRYPTION_KEY\s*=", "", text)
    values = [v.strip().strip("'\"") for v in re.split(r"[,\s]+", text) if v.strip()]
    if not values:
        raise KeyStoreError("no key given.")
    for position, value in enumerate(values, 1):
        problem = fernet_key_problem(value)
        if problem:
            raise KeyStoreError(f"key {position} {problem} (the value is not shown).")
        redact.add(value)
    return [StoredKey(v, "primary" if i == 0 else "retired") for i, v in enumerate(values)]


def _bound(value: str | date, stamps: pd.Series) -> pd.Timestamp:
    try:
        bound = pd.Timestamp(value)
    except ValueError:
        raise UsageError(f"invalid date {value!r}: use YYYY-MM-DD.") from None
    if stamps.dt.tz is not None and bound.tz is None:
        bound = bound.tz_localize(stamps.dt.tz)
    return bound


if __name__ == "__main__":
    import sys

    from secure_ohlcv_cli import main

    sys.exit(main())
