"""Secure OHLCV Downloader: Alpha Vantage bars, encrypted at rest, safe to run for years.

Read top to bottom; the sections follow the data, and calls only go down the file. Above
section 1, DeferredModule: pandas, numpy, pyarrow and the other heavy imports happen on
first use, so a command that touches no bar data starts without them.

    1. Errors          -- the OHLCVError family (root in config.py), one exit code each;
                          EXIT_CODES, the one table of their meanings
    2. Redaction, log  -- SecretRedactor (every config.Secret ever made), RedactingFormatter,
                          configure_logging
    3. Files           -- private directories (never through a link), atomic writes with an
                          optional read-back proof, the data-directory lock
    4. Keys            -- fingerprint, KeyRing (MultiFernet); three KeyStores behind one
                          protocol: KeyringKeyStore, EnvKeyStore (read-only), EnvFileKeyStore
                          (.env); KeyCustody: which store holds the ring, proof before a key
                          is stored, the canary, a new key handed to a person exactly once
    5. Rate limiting   -- DailyQuota (persisted, shared by processes), RateLimiter (per key)
    6. Client          -- classify_response, ApiRequest, AlphaVantageClient (retries, timeouts)
    7. Parsing         -- parse_payload (JSON or CSV to one typed table), validate_bars
    8. Encrypted store -- DatasetId (symbol rules, identity), dataset_file (opaque names
                          by keyed hash), table codec, table_days, Catalogue (encrypted
                          index proven by stat), EncryptedStore, load_frame / load_many,
                          RunContext (what every command body gets)
    9. Downloader      -- ExchangeCalendar / calendar_for / CalendarCache (each exchange's
                          sessions kept in the state directory), find_gaps (a dataset's dates
                          against its sessions), is_current / stale_after, merge_bars,
                          DatasetDownloader, PendingQueue, run_download (the download command)
   10. Lifecycle       -- KeyRotation, StoreMigration (the earlier layout to opaque names),
                          BackupWriter + BackupDestinations, archive_ages (newest
                          by manifest), BackupArchive (hostile-archive safe, bounded memory),
                          verify_backup; the commands init_store, check_keys, remove_key,
                          recover, cleanup
   11. Monitoring      -- ResourceMonitor (psutil), RunRecord, write_metrics (Prometheus
                          text file), estimate, status_of, gap_report (the gaps command;
                          in_forked_workers: one process per core), finish_run
   12. Front door      -- SecureOHLCVDownloader: a thin delegator that records every command

`python secure_ohlcv_downloader.py ARGS` runs the same command line as secure_ohlcv_cli.py.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import importlib
import io
import json
import logging
import logging.handlers
import math
import multiprocessing
import os
import random
import re
import reprlib
import resource
import secrets
import stat
import struct
import sys
import tarfile
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dt_time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from config import (
    KEYRING_SERVICE,
    NAMING_PREFIX,
    ConfigError,
    OHLCVError,
    Secret,
    Settings,
    fernet_key_problem,
    load_settings,
    open_private_file,
    parse_key_list,
    read_env_file,
)

__all__ = ["EXIT_CODES", "ConfigError", "OHLCVError", "SecureOHLCVDownloader", "load_settings"]


class DeferredModule:
    """A module imported when one of its attributes is first used. pandas, numpy and
    pyarrow take ~0.6 s and ~100 MB to import, requests, keyring, prometheus_client and
    psutil another ~0.1 s: a command that never needs them (--help, estimate, status,
    --check-keys, cleanup --dry-run) never pays for them. `with_modules` are imported
    along (`import keyring` leaves out keyring.errors); `then` runs once, after the import."""

    def __init__(self, name: str, *with_modules: str,
                 then: Callable[[], None] | None = None) -> None:
        self._names = (name, *with_modules)
        self._then = then

    def __getattr__(self, attribute: str) -> Any:
        module = [importlib.import_module(name) for name in self._names][0]
        if self._then is not None:
            self._then()
            self._then = None
        value = getattr(module, attribute)
        setattr(self, attribute, value)  # later uses are a plain attribute look-up
        return value


def _arrow_memory_pool() -> None:
    """Arrow's default pool (mimalloc) keeps freed memory per thread: with 8 download
    workers that alone held ~70 MB (bench: peak RSS 222 MB with it, 157 MB with the
    system pool). Set before any table is built, whichever of pandas or pyarrow comes first."""
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())


if TYPE_CHECKING:
    import exchange_calendars as xcals
    import keyring
    import keyring.backend
    import keyring.errors
    import numpy as np
    import pandas as pd
    import prometheus_client
    import psutil
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import requests
    import requests.adapters
    import urllib3.exceptions
else:
    keyring = DeferredModule("keyring", "keyring.backend", "keyring.errors")
    np = DeferredModule("numpy")
    pd = DeferredModule("pandas", then=_arrow_memory_pool)
    prometheus_client = DeferredModule("prometheus_client")
    psutil = DeferredModule("psutil")
    pa = DeferredModule("pyarrow", then=_arrow_memory_pool)
    pc = DeferredModule("pyarrow.compute", then=_arrow_memory_pool)
    pq = DeferredModule("pyarrow.parquet", then=_arrow_memory_pool)
    requests = DeferredModule("requests", "requests.adapters")
    urllib3 = DeferredModule("urllib3", "urllib3.exceptions")
    xcals = DeferredModule("exchange_calendars")

log = logging.getLogger("secure_ohlcv")


# =========================================================================================
# 1. Errors
# =========================================================================================

# OHLCVError, the root, lives in config.py with ConfigError (exit 3): config.py is
# imported by every module and imports none of ours.

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


# The one table of exit codes: each class above carries its code, and these are their
# meanings as the README and --help give them (tests/test_exit_codes.py keeps all three
# equal). 130 is the shell's convention for a run stopped by Ctrl-C / SIGINT.
EXIT_CODES: dict[int, str] = {
    0: "ok",
    1: "some work failed (named in the output); or another run held the data-directory "
       "lock too long",
    2: "usage or input error (unknown option, hostile symbol, bad date) — nothing was written",
    3: "configuration or key problem (bad variable, unsafe file or path, no key, keyring "
       "locked, keys disagree, key not proven, API key refused)",
    4: "API quota spent — resumable: the next run starts with what is left",
    5: "integrity failure found (a stored file does not decrypt or validate)",
    130: "interrupted (Ctrl-C): every file keeps its previous or its new version",
}


def exit_code_of(error: BaseException) -> int:
    """The exit code of a run that ended with `error`."""
    if isinstance(error, OHLCVError):
        return error.exit_code
    return 130 if isinstance(error, KeyboardInterrupt) else 1


# =========================================================================================
# 2. Redaction and logging
# =========================================================================================

_APIKEY_PARAM = re.compile(r"(apikey=)[^&\s\"']+", re.IGNORECASE)


class SecretRedactor:
    """Replaces every secret in a text: the values config.Secret registered (every API key
    and Fernet key is wrapped in one where it enters the program), and any apikey= value."""

    def __init__(self) -> None:
        self._known: frozenset[str] = frozenset()
        self._ordered: list[str] = []

    def _refresh(self) -> None:
        known = Secret.known()
        if known is not self._known:  # longest first: a secret inside another goes whole
            self._ordered, self._known = sorted(known, key=len, reverse=True), known

    def __call__(self, text: str) -> str:
        self._refresh()
        for value in self._ordered:
            if value in text:
                text = text.replace(value, "[REDACTED]")
        # urllib3 and requests print request URLs at DEBUG; a key we were never told about
        # (typed on a command line, say) still never reaches the log.
        return _APIKEY_PARAM.sub(r"\1[REDACTED]", text)

    def longest(self) -> int:
        """The length of the longest secret known."""
        self._refresh()
        return len(self._ordered[0]) if self._ordered else 0


redact = SecretRedactor()


# Text from outside is capped at this many characters wherever it is shown; a server's
# own messages (Information, Note, Error Message) at SERVER_MESSAGE_LIMIT, which keeps
# every message Alpha Vantage is known to send whole (the longest is 344 characters).
OUTSIDE_TEXT_LIMIT = 300
SERVER_MESSAGE_LIMIT = 500


def _escape(character: str, from_bytes: bool) -> str:
    """One character as a safe line shows it: printable ones as they are, the rest as
    repr() writes them (\\n, \\x1b, \\u202e); an undecodable byte as \\xNN."""
    if character.isprintable():
        return character
    if from_bytes and "\udc80" <= character <= "\udcff":  # surrogateescape's stand-in
        return f"\\x{ord(character) - 0xDC00:02x}"
    return repr(character)[1:-1]


def _escaped_prefix(line: str, limit: int, from_bytes: bool = False) -> tuple[str, int]:
    """The escaped start of `line` of at most `limit` characters, cut between two escapes
    (never inside one), and how many characters of `line` it shows."""
    pieces: list[str] = []
    size = 0
    for used, character in enumerate(line):  # at most limit + 1 rounds: a piece is >= 1
        piece = _escape(character, from_bytes)
        if size + len(piece) > limit:
            return "".join(pieces), used
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces), len(line)


def outside_text(text: object, limit: int = OUTSIDE_TEXT_LIMIT) -> str:
    """Text from outside (a server message, a field name, a timestamp, an archive member
    name, an exception quoting them) as one safe line: secrets redacted first, on the whole
    text, so no cut can leave part of a key; every character repr() would escape (control
    characters, ESC, line breaks, direction marks and overrides, other format characters)
    escaped as repr() writes it; at most `limit` characters, cut between two escapes, then
    a note of how many more there were. Use it wherever such text is printed or logged.

    A backslash is left as it is, so the result passes through again unchanged (a message
    that quotes outside text can be made safe as a whole). Bytes are decoded as UTF-8, an
    undecodable byte shown as \\xNN; only their start is decoded and redacted, always far
    enough past the cut that a secret starting before it lies wholly inside."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return _outside_bytes(bytes(text), limit)
    try:
        line = str(text)
    except RecursionError:  # a container nested deeper than repr() goes
        line = f"({type(text).__name__} nested too deeply to show)"
    line = redact(line)
    if len(line) <= limit and line.isprintable():
        return line
    shown, used = _escaped_prefix(line, limit)
    return shown if used == len(line) else f"{shown}... ({len(line) - used} more characters)"


def _outside_bytes(data: bytes, limit: int) -> str:
    reach = 4 * (limit + redact.longest() + 16)  # a character is at most 4 bytes
    while True:
        line = redact(data[:reach].decode("utf-8", "surrogateescape"))
        shown, used = _escaped_prefix(line, limit, from_bytes=True)
        if reach >= len(data):
            return shown if used == len(line) else f"{shown}... ({len(data)} bytes in all)"
        # Earlier secrets redacted to a shorter [REDACTED] let the cut move on: decode
        # more until no secret that starts before the cut can run past what was read.
        if used + redact.longest() < len(line):
            return f"{shown}... ({len(data)} bytes in all)"
        reach *= 2


# A log record's message (our words, with outside text already quoted through
# outside_text) is one line too; this cap only stops a message that forgot to.
LOG_MESSAGE_LIMIT = 4000


class RedactingFormatter(logging.Formatter):
    """Formats the whole record, traceback included, then removes secrets from the result.

    Every record is one line plus, for a logged exception, its traceback: the message and
    each exception's own text are escaped as outside_text does, so no text from outside
    can start a line that looks like a record of its own or reach a terminal raw."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = outside_text(record.message, LOG_MESSAGE_LIMIT)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        chunks = []
        for chunk in traceback.TracebackException(*ei[:3]).format():
            if chunk.startswith(("  ", "Traceback (", "\nDuring handling", "\nThe above")):
                chunks.append(chunk)  # frames (our source lines) and the chain's headings
            else:  # "Type: text", the text possibly from outside
                chunks.append(outside_text(chunk.rstrip("\n"), LOG_MESSAGE_LIMIT) + "\n")
        return "".join(chunks).rstrip("\n")

    def format(self, record: logging.LogRecord) -> str:
        cached, record.exc_text = record.exc_text, None  # another handler's raw traceback
        try:
            return redact(super().format(record))
        finally:
            record.exc_text = cached


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """WatchedFileHandler (reopens the file when logrotate moves it away) whose file,
    first or reopened, has the configured mode: plain open() would take the umask's."""

    def __init__(self, path: Path, file_mode: int) -> None:
        self.file_mode = file_mode
        super().__init__(path, encoding="utf-8")

    def _open(self) -> Any:
        # O_NONBLOCK: a FIFO planted at the path must not hang the run on open.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_NONBLOCK, self.file_mode)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafePathError(
                f"{self.baseFilename} (OHLCV_LOG_FILE) is not a regular file of this user "
                f"(uid {info.st_uid}); another user may have planted it to read the log. Fix: "
                "remove it, or point OHLCV_LOG_FILE at a path of your own.")
        os.fchmod(fd, self.file_mode)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def configure_logging(settings: Settings) -> None:
    """Log to OHLCV_LOG_FILE (mode OHLCV_FILE_MODE), redacted, safe under logrotate; a
    link at the log file's path is refused, never appended to."""
    if not settings.log_file.parent.exists():
        ensure_private_dir(settings.log_file.parent, settings.dir_mode)
    try:
        handler = PrivateWatchedFileHandler(settings.log_file, settings.file_mode)
    except OSError as exc:
        raise refused_path(settings.log_file, "OHLCV_LOG_FILE", exc) from None
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


def refused_path(path: Path, name: str, error: OSError) -> OHLCVError:
    """The operator's message for a configured file that cannot be opened safely."""
    if error.errno == errno.ELOOP or os.path.islink(path):
        return UnsafePathError(
            f"{path} ({name}) is a symbolic link; refusing to follow it: another user may "
            f"have planted it to make this tool write elsewhere. Fix: remove the link (`rm "
            f"{path}`) or point {name} at a path of your own.")
    return UnsafePathError(f"cannot open {path} ({name}): {error.strerror}. Fix: check the "
                           "path, its owner and its mode.")


def ensure_private_dir(path: Path, mode: int) -> Path:
    """Create `path` (and missing parents) with exactly `mode`, whatever the umask.

    An existing directory with looser permissions than `mode`, another user's, or a link
    is refused, never used (lexists: a dangling link is not "missing")."""
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            check_private_dir(directory, mode)  # someone else's, made in between: refuse
            continue
        os.chmod(directory, mode)  # just made by us: a plain directory, mode beyond the umask
    check_private_dir(path, mode)
    return path


def ensure_private_dirs(paths: tuple[Path, ...], mode: int) -> None:
    """ensure_private_dir for each of `paths`, checking the existing ones first: a
    refusal leaves nothing created behind it."""
    for path in sorted(paths, key=lambda p: not os.path.lexists(p)):
        ensure_private_dir(path, mode)


def check_private_dir(path: Path, mode: int, info: os.stat_result | None = None) -> None:
    """Raise UnsafePathError when `path` (of stat `info`, when the caller holds it open) is
    not a directory of ours with at most `mode`."""
    info = info or os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(
            f"{path} is a symbolic link; refusing to follow it (another user may have "
            "planted it). Fix: replace it with a real directory, or configure the real "
            "path itself.")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path} is not a plain directory; refusing to use it. Fix: "
                              "move it aside, so that this tool makes the directory itself.")
    loose = stat.S_IMODE(info.st_mode) & ~mode
    if loose:
        raise UnsafePathError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, looser than the configured "
            f"{mode:04o}; other users could read or change it. Fix: chmod {mode:o} {path}")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to this user "
                              f"(uid {os.geteuid()}). Fix: chown it or choose another directory.")


def kind_of(info: os.stat_result) -> str:
    """What a file-system entry is, in words for a message."""
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if stat.S_ISFIFO(info.st_mode):
        return "a FIFO"
    return "a directory" if stat.S_ISDIR(info.st_mode) else "a regular file" if \
        stat.S_ISREG(info.st_mode) else "a device or socket"


def read_own_file(path: Path, limit: int, dir_mode: int,
                  fix: str) -> tuple[bytes, os.stat_result]:
    """A file this tool wrote inside one of its private directories, and the stat of the
    bytes read. No link is followed, neither the file nor its directory (a planted link
    would make us read elsewhere); nothing but a regular file is opened for reading (a FIFO
    would block for ever); the directory must be ours and no looser than `dir_mode`; at
    most `limit` bytes are read. FileNotFoundError when absent, UnsafePathError (naming
    `fix`) for anything else in its place, ValueError when it is larger than `limit`."""
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except NotADirectoryError:
        raise UnsafePathError(f"{path.parent} is {kind_of(os.lstat(path.parent))}, where this "
                              "tool keeps a directory of its own; refusing to follow or use "
                              f"it (another user may have planted it). Fix: {fix}") from None
    try:
        check_private_dir(path.parent, dir_mode, os.fstat(dir_fd))
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd = -1
    finally:
        os.close(dir_fd)
    info = os.lstat(path) if fd < 0 else os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        if fd >= 0:
            os.close(fd)
        raise UnsafePathError(f"{path} is not a regular file ({kind_of(info)}); refusing to "
                              "follow or open it: this tool wrote none such. Fix: " + fix)
    # read(n) allocates n bytes before it reads: ask for the size fstat gave (and one more,
    # to see growth), never for the limit itself.
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(info.st_size + 1) if info.st_size <= limit else b""
    if info.st_size > limit:
        raise ValueError(f"{path} holds more than {limit} bytes")
    if len(data) > info.st_size:
        raise ValueError(f"{path} grew while it was read")
    return data, info


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, file_mode: int,
                 proof: Callable[[Path], None] | None = None, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half.

    Temp file in the same directory (same file system, so the rename is atomic), fsync,
    os.replace, then fsync of the directory so the rename itself survives a power cut.
    A link at `path` is replaced, never written through. `proof(temp)` may read the temp
    file back and raise: the previous version then stays. `durable=False` skips both fsyncs
    (still atomic; a power cut may keep the previous version): for bookkeeping only. A crash leaves at most a
    `.tmp-*` file, which is never taken for data and is removed the next time a run takes
    the data-directory lock.
    """
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode)
    try:
        os.fchmod(fd, file_mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
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
        if proof is not None:
            proof(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def locked_json(path: Path, load: Callable[[], dict[str, Any]], file_mode: int,
                dir_mode: int, durable: bool = True) -> Iterator[dict[str, Any]]:
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
            atomic_write(path, json.dumps(state).encode(), file_mode, durable=durable)
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


def temp_files(root: Path) -> list[Path]:
    """The `.tmp-*` files crashed writers left under `root`; nothing behind a link."""
    if not root.is_dir() or root.is_symlink():
        return []
    return [p for p in root.rglob(f"{TEMP_PREFIX}*") if p.is_file() and not p.is_symlink()]


def remove_temp_files(root: Path) -> list[Path]:
    """Delete the `.tmp-*` files crashed writers left under `root`. Call only under the lock."""
    removed = temp_files(root)
    for tmp in removed:
        tmp.unlink()
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

    def __enter__(self) -> DataDirLock:
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
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def utc_now() -> datetime:
    """The clock a run judges "now" by (RunContext.clock; tests set another)."""
    return datetime.now(UTC)


# =========================================================================================
# 4. Keys
# =========================================================================================

def fingerprint(key: str) -> str:
    """A short, one-way name for a Fernet key: safe to print, log and store."""
    return hashlib.sha256(b"secure-ohlcv key fingerprint\0" + key.encode()).hexdigest()[:12]


def naming_fingerprint(key: str) -> str:
    """A short, one-way name for the naming key, in a domain of its own: it never equals
    a Fernet key's fingerprint, even were the same value used as both."""
    return hashlib.sha256(b"secure-ohlcv naming key fingerprint\0"
                          + key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StoredKey:
    key: str = field(repr=False)
    status: str = "primary"  # primary | retired | naming (keys the data files' names)
    added: str = ""

    def __post_init__(self) -> None:
        Secret(self.key)  # registered for redaction the moment it exists

    @property
    def fingerprint(self) -> str:
        return naming_fingerprint(self.key) if self.naming else fingerprint(self.key)

    @property
    def naming(self) -> bool:
        return self.status == "naming"

    @property
    def item(self) -> str:
        """The key as one item of a key list (the variable, `.env`, a key file)."""
        return NAMING_PREFIX + self.key if self.naming else self.key

    @property
    def label(self) -> str:
        """The fingerprint as a message lists it among a ring's: the naming key marked."""
        return NAMING_PREFIX + self.fingerprint if self.naming else self.fingerprint


def ring_of(secrets_: tuple[Secret, ...] | list[Secret]) -> list[StoredKey]:
    """Parsed keys as a ring: the first is primary, the others retired; an item written
    `naming:<key>` is the naming key."""
    items = [s.reveal() for s in secrets_]
    fernet = [StoredKey(v, "primary" if i == 0 else "retired")
              for i, v in enumerate(v for v in items if not v.startswith(NAMING_PREFIX))]
    return fernet + [StoredKey(v.removeprefix(NAMING_PREFIX), "naming", "")
                     for v in items if v.startswith(NAMING_PREFIX)]


def new_naming_key() -> StoredKey:
    """A new naming key: 32 random bytes, url-safe base64, like a Fernet key."""
    return StoredKey(Fernet.generate_key().decode(), "naming", utc_now_iso())


class KeyRing:
    """The Fernet keys of this installation, primary first. Encrypts with the primary,
    decrypts with any (MultiFernet), so files written before a rotation stay readable.

    The naming key (the secret of the data files' names) travels with the ring but is
    no Fernet key: `naming` holds it (None in a store not yet migrated), `keys` never
    does, and `stored()` gives every key back for saving or handing over."""

    def __init__(self, keys: list[StoredKey]) -> None:
        for stored in keys:
            problem = fernet_key_problem(stored.key)
            if problem:
                raise KeyStoreError(f"a stored key {problem} (the value is not shown).")
        naming = [k for k in keys if k.naming]
        if len(naming) > 1:
            raise KeyStoreError(f"the key ring holds {len(naming)} naming keys "
                                f"({', '.join(k.fingerprint for k in naming)}); it has one. "
                                "Fix: run --recover with the value of your offline copy.")
        self.naming: StoredKey | None = naming[0] if naming else None
        self.keys = [k for k in keys if not k.naming]
        if not self.keys:
            raise KeyStoreError("the key ring is empty.")
        self._singles = [Fernet(k.key) for k in self.keys]
        self._fernet = MultiFernet(self._singles)

    @property
    def primary(self) -> StoredKey:
        return self.keys[0]

    def fingerprints(self) -> list[str]:
        return [k.fingerprint for k in self.keys]

    def stored(self) -> list[StoredKey]:
        """Every key, as a key store keeps it: the Fernet keys, then the naming key."""
        return self.keys + ([self.naming] if self.naming is not None else [])

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, token: bytes) -> bytes:
        """Raise InvalidToken when no key of the ring opens `token` or it was altered."""
        return self._fernet.decrypt(token)

    def signed_by_primary(self, token: bytes) -> bool:
        """Whether the primary key alone opens `token`: its HMAC checks out (the check
        Fernet makes before decrypting; extract_timestamp makes it without decrypting)."""
        return signed_by(self._singles[0], token)

    def decrypt_with_fingerprint(self, token: bytes, path: Path,
                                 first: str | None = None) -> tuple[bytes, str]:
        """Decrypt trying each key alone, primary first (or the key `first` names: each
        miss costs a full base64 decode); also say which key opened it."""
        pairs = list(zip(self.keys, self._singles, strict=True))
        pairs.sort(key=lambda pair: pair[0].fingerprint != first)  # stable: else ring order
        for stored, single in pairs:
            try:
                return single.decrypt(token), stored.fingerprint
            except InvalidToken:
                continue
        raise IntegrityError(f"{path} does not decrypt with the key ring "
                             f"({', '.join(self.fingerprints())}).")

    @classmethod
    def generate(cls) -> KeyRing:
        """A new installation's ring: a primary key and the naming key."""
        return cls([StoredKey(Fernet.generate_key().decode(), "primary", utc_now_iso()),
                    new_naming_key()])


def signed_by(fernet: Fernet, token: bytes) -> bool:
    """Whether `token` carries a valid HMAC under this one key (nothing is decrypted)."""
    try:
        fernet.extract_timestamp(token)
        return True
    except InvalidToken:
        return False


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool
    secure: bool
    problem: str = ""


class KeyStore(Protocol):
    """Where a key ring is kept: load it (None when nothing is stored), save it. A save
    keeps the previous version until the new one has been read back equal; a store that
    cannot be written says in its error exactly what the operator must edit."""

    label: str

    def load(self) -> list[StoredKey] | None: ...

    def save(self, keys: list[StoredKey]) -> None: ...


_SECURE_BACKENDS = ("keyring.backends.SecretService", "keyring.backends.libsecret",
                    "keyring.backends.kwallet", "keyring.backends.macOS",
                    "keyring.backends.Windows")
KEYRING_USERNAME = "fernet-key-ring"
KEYRING_PREVIOUS_USERNAME = "fernet-key-ring.previous"
KEYRING_TIMEOUT = 15.0
KEY_VARIABLE = "OHLCV_ENCRYPTION_KEY"


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
    """Keeps the key ring in the OS keyring: service `secure-ohlcv-downloader`, one entry.

    A save first copies the current entry to `fernet-key-ring.previous`, and deletes that
    copy only once the new entry reads back equal: interrupted or refused, the previous
    ring is still in the keyring (`load` falls back to it when the main entry is gone)."""

    label = "OS keyring"

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None) -> None:
        self.backend = backend if backend is not None else keyring.get_keyring()
        self.info = describe_backend(self.backend)

    def load(self) -> list[StoredKey] | None:
        raw = self._get(KEYRING_USERNAME)
        if raw is None:
            raw = self._get(KEYRING_PREVIOUS_USERNAME)  # a save cut short after the copy
        return None if raw is None else self._parse(raw)

    def save(self, keys: list[StoredKey]) -> None:
        payload = json.dumps({"format": 1, "keys": [
            {"key": k.key, "status": k.status, "added": k.added} for k in keys]})
        previous = self._get(KEYRING_USERNAME)
        if previous is not None:
            self._call(lambda: self.backend.set_password(
                KEYRING_SERVICE, KEYRING_PREVIOUS_USERNAME, previous), "keep the previous key ring")
        self._call(lambda: self.backend.set_password(KEYRING_SERVICE, KEYRING_USERNAME, payload),
                   "store the key ring")
        try:
            stored = self._get(KEYRING_USERNAME)
            proven = stored is not None and self._parse(stored) == keys
        except KeyStoreError:
            proven = False
        if not proven:
            # Drop what it gave back, so `load` falls back to the previous ring, kept aside.
            self._delete(KEYRING_USERNAME)
            raise KeyStoreError(
                "the OS keyring accepted the key ring but gave back something else; the "
                f"previous ring stays in its entry {KEYRING_PREVIOUS_USERNAME} and is what "
                "loads now. It cannot be trusted with keys: use OHLCV_ENCRYPTION_KEY.")
        self._delete(KEYRING_PREVIOUS_USERNAME)

    def _delete(self, username: str) -> None:
        with contextlib.suppress(keyring.errors.PasswordDeleteError):
            self._call(lambda: self.backend.delete_password(KEYRING_SERVICE, username),
                       "drop a key ring entry")

    def _get(self, username: str) -> str | None:
        raw = self._call(lambda: self.backend.get_password(KEYRING_SERVICE, username),
                         "read the key ring")
        if raw is not None:
            Secret(raw)
        return raw

    @staticmethod
    def _parse(raw: str) -> list[StoredKey]:
        try:
            entries = json.loads(raw)["keys"]
            return [StoredKey(e["key"], e.get("status", "retired"), e.get("added", ""))
                    for e in entries]
        except (ValueError, KeyError, TypeError):
            raise KeyStoreError(
                f"the keyring entry {KEYRING_SERVICE}/{KEYRING_USERNAME} is not a key ring "
                "written by this tool (content not shown). Fix: remove it with your keyring "
                "tool and run --recover with the key from your offline copy.") from None

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
        except keyring.errors.PasswordDeleteError:
            raise
        except keyring.errors.KeyringError as exc:
            raise KeyStoreError(f"the OS keyring refused to {what}: "
                                f"{type(exc).__name__}: {redact(str(exc))}. Fix: check the "
                                "keyring service, or set OHLCV_ENCRYPTION_KEY.") from None


class EnvKeyStore:
    """The key ring given in OHLCV_ENCRYPTION_KEY by the environment (a service file, a
    credential store: outside this program's reach), primary first. It cannot be written:
    a save says exactly what the operator must set."""

    label = KEY_VARIABLE

    def __init__(self, settings: Settings) -> None:
        self._keys = ring_of(settings.encryption_keys) if not settings.encryption_key_in_env_file else []

    def load(self) -> list[StoredKey] | None:
        return list(self._keys) or None

    def save(self, keys: list[StoredKey]) -> None:
        old = [k.label for k in self._keys]
        new = [k.label for k in keys]
        raise KeyStoreError(
            f"{KEY_VARIABLE} is set outside this program (keys {', '.join(old)}) and is "
            f"read-only to it. Fix: set it where it is defined to the keys {', '.join(new)} in this "
            "order (the values are in your offline copy).")


class EnvFileKeyStore:
    """The key ring as OHLCV_ENCRYPTION_KEY in the `.env` file: read afresh at every load
    (another run may have rotated), replaced atomically, its other lines kept, and the
    new file read back and compared before it replaces the old one."""

    def __init__(self, path: Path, file_mode: int) -> None:
        self.path = path
        self.file_mode = file_mode & ~0o022  # writable by others, it would be refused
        self.label = f"{KEY_VARIABLE} in {path}"

    def load(self) -> list[StoredKey] | None:
        return self._read(self.path) or None

    def save(self, keys: list[StoredKey]) -> None:
        lines = open_private_file(self.path, ".env file")[0].splitlines() \
            if os.path.lexists(self.path) else []
        lines = [ln for ln in lines if not re.match(rf"\s*(export\s+)?{KEY_VARIABLE}\s*=", ln)]
        lines.append(f"{KEY_VARIABLE}={','.join(k.item for k in keys)}")
        wanted = [k.item for k in keys]

        def read_back(temp: Path) -> None:
            if [k.item for k in self._read(temp)] != wanted:
                raise KeyStoreError(f"{self.path} did not read back as written; it was left "
                                    "as it was.")

        atomic_write(self.path, ("\n".join(lines) + "\n").encode(), self.file_mode, read_back)

    def _read(self, path: Path) -> list[StoredKey]:
        values, _ = read_env_file(path)
        return ring_of(parse_key_list(values.get(KEY_VARIABLE, ""), f"{KEY_VARIABLE} in {path}"))


def naming_key_of(keys: list[StoredKey]) -> StoredKey | None:
    return next((k for k in keys if k.naming), None)


@dataclass
class KeySources:
    """What each key store holds, and which one the run uses."""

    backend: BackendInfo
    keyring_keys: list[StoredKey] | None
    keyring_problem: str
    env_keys: list[StoredKey] | None
    env_label: str = KEY_VARIABLE
    warnings: list[str] = field(default_factory=list)

    def choose(self) -> tuple[KeyRing, str]:
        """The key ring to use and its source; raise KeyStoreError with the fix otherwise."""
        kr, env = self.keyring_keys, self.env_keys
        if kr and env and kr[0].key != env[0].key:
            raise KeyStoreError(
                f"the OS keyring (primary key {kr[0].fingerprint}) and {self.env_label} "
                f"(primary key {env[0].fingerprint}) disagree. Fix: if the keyring is right, "
                "unset OHLCV_ENCRYPTION_KEY or set it to the value the last --rotate-key "
                "handed over; if the variable is right, run --recover to re-link the keyring.")
        kr_naming, env_naming = (naming_key_of(kr), naming_key_of(env)) if kr and env else (None, None)
        if kr_naming != env_naming:
            raise KeyStoreError(
                f"the OS keyring (naming key {kr_naming.fingerprint if kr_naming else 'none'}) "
                f"and {self.env_label} (naming key "
                f"{env_naming.fingerprint if env_naming else 'none'}) disagree. Fix: if the "
                "keyring is right, unset OHLCV_ENCRYPTION_KEY or set it to the value last "
                "handed over (it ends with naming:...); if the variable is right, run "
                "--recover to re-link the keyring.")
        if kr:
            return KeyRing(kr), KeyringKeyStore.label
        if env:
            return KeyRing(env), self.env_label
        if self.keyring_problem:
            raise KeyStoreError(f"no encryption key: {self.keyring_problem}")
        raise KeyStoreError("no encryption key is stored yet. Fix: run "
                            "`python secure_ohlcv_downloader.py --init`.")


CANARY_NAME = "canary.fernet"
CANARY_TEXT = b"secure-ohlcv-downloader canary v1"
NEW_KEY_PREFIX = "new-key-"


@dataclass
class NewKey:
    """A new key ring a person must see once: `value` (OHLCV_ENCRYPTION_KEY's whole value,
    new primary first) is shown on the terminal, or, off a terminal, written to a 0600
    `file` named by the fingerprint, to be moved offline."""

    fingerprint: str
    value: str = field(repr=False)
    file: Path | None = None
    made: str = ""  # what is new in it, by fingerprint: `key ab12...` or `naming key cd34...`


@dataclass
class NamingKeyReport:
    """A naming key given to a ring that had none (see KeyCustody.add_naming_key)."""

    fingerprint: str
    new_key: NewKey  # the whole ring, shown once or in a file to move offline
    awaiting_env_update: bool = False  # keys only in a variable set outside: set it, re-run
    stored_in: list[str] = field(default_factory=list)
    variable_disagrees: bool = False  # the keyring moved on; the outside variable must follow


class KeyCustody:
    """Owns the encryption keys: which store holds the ring (OS keyring, the variable set
    outside, the `.env` file), reading it again under the lock, storing a ring only once it
    is proven, the canary, the keys a recovery offers, and handing a new key to a person.

    Invariants: a Fernet key enters custody only after it opens the canary, a backup
    manifest or a stored dataset (a naming key opens nothing: it enters when made, after
    it has been handed over, or with the keys a recovery proves); custody never drops a
    key (remove-key aside, and never the naming key); a store keeps its previous version
    until the new one reads back equal."""

    def __init__(self, settings: Settings, keyring_store: KeyringKeyStore | None = None,
                 warnings: list[str] | None = None) -> None:
        self.settings = settings
        self.keyring = keyring_store if keyring_store is not None else KeyringKeyStore()
        self.variable: KeyStore = (
            EnvFileKeyStore(settings.env_file, settings.file_mode)
            if settings.encryption_key_in_env_file else EnvKeyStore(settings))
        self.canary_path = settings.state_dir / CANARY_NAME
        self.warnings = warnings if warnings is not None else []
        self.source = ""
        self._ring: KeyRing | None = None

    # -- reading ----------------------------------------------------------------------

    def sources(self) -> KeySources:
        """Look in every store; a failing keyring is recorded, not raised, so the variable
        can still serve (the headless and cron case)."""
        env = self.variable.load()
        info = self.keyring.info
        keys, problem, warnings = None, "", []
        if not info.usable:
            problem = info.problem
        else:
            if not info.secure:
                warnings.append(f"insecure keyring backend: {info.problem}")
            try:
                keys = self.keyring.load()
            except KeyStoreError as exc:
                problem = str(exc)
        if problem and env and info.usable:  # no backend at all is the headless norm
            warnings.append(f"OS keyring not used ({problem.split('. Fix')[0]}); "
                            f"keys come from {self.variable.label}.")
        return KeySources(info, keys, problem, env, self.variable.label, warnings)

    def ring(self) -> KeyRing:
        """The key ring in use (read once per run; `reload` reads it again)."""
        if self._ring is None:
            sources = self.sources()
            self.warnings += [w for w in sources.warnings if w not in self.warnings]
            self._ring, self.source = sources.choose()
            log.info("key ring from %s, primary %s, %d key(s)", self.source,
                     self._ring.primary.fingerprint, len(self._ring.keys))
        return self._ring

    def reload(self) -> KeyRing:
        """The ring as stored now: call under the data-directory lock, so a run that
        waited while another rotated never writes under the ring it read before."""
        self._ring = None
        return self.ring()

    # -- the canary -------------------------------------------------------------------

    def check_canary(self, ring: KeyRing) -> str:
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

    def write_canary(self, ring: KeyRing) -> None:
        atomic_write(self.canary_path, ring.encrypt(CANARY_TEXT), self.settings.file_mode)

    # -- proof and storing --------------------------------------------------------------

    def prove(self, keys: list[StoredKey], tokens: Iterator[tuple[str, bytes]],
              named: dict[str, str] | None = None) -> tuple[dict[str, str], list[StoredKey]]:
        """Which of `keys` open something: {fingerprint: what it opened}, and the keys
        that open nothing. `tokens` yields (what, token) pairs (canary, manifest,
        datasets), read lazily until every key is proven; `named` are fingerprints an
        opened manifest vouches for (the keys of its datasets)."""
        keys = [k for k in keys if not k.naming]  # a naming key opens nothing
        proven = {fp: what for fp, what in (named or {}).items()
                  if fp in {k.fingerprint for k in keys}}
        waiting = [(k, Fernet(k.key)) for k in keys if k.fingerprint not in proven]
        for what, token in tokens:
            if not waiting:
                break
            for stored, single in list(waiting):
                if signed_by(single, token):
                    proven[stored.fingerprint] = what
                    waiting.remove((stored, single))
        return proven, [k for k, _ in waiting]

    def store(self, keys: list[StoredKey]) -> tuple[list[str], bool]:
        """Keep `keys` (already proven) in every store that holds the ring: the OS keyring
        when it works, the `.env` file when it holds keys or no keyring does. Returns the
        stores written, and whether OHLCV_ENCRYPTION_KEY set outside must be updated by
        the operator (it then disagrees with the stores)."""
        sources = self.sources()
        keyring_ok = sources.backend.usable and not sources.keyring_problem
        targets: list[KeyStore] = [self.keyring] if keyring_ok else []
        outside = isinstance(self.variable, EnvKeyStore) and bool(sources.env_keys)
        if isinstance(self.variable, EnvFileKeyStore) and (sources.env_keys or not keyring_ok):
            targets.append(self.variable)
        elif not targets and not outside:  # headless: `.env` is the home of the keys
            targets.append(EnvFileKeyStore(self.settings.env_file, self.settings.file_mode))
        written = []
        for target in targets:
            if target.load() != keys:
                target.save(keys)
                written.append(target.label)
        self._ring = KeyRing(keys)
        self.source = targets[0].label if targets else self.variable.label
        log.info("key ring stored in %s: %s", ", ".join(written) or "no store (unchanged)",
                 ", ".join(k.label for k in keys))
        return written, outside and [k.item for k in (sources.env_keys or [])] != [k.item for k in keys]

    # -- keys from outside --------------------------------------------------------------

    def read_key_file(self, path: Path) -> list[StoredKey]:
        """Keys from an operator's file: never through a link, never another user's or a
        writable-by-others file; a file others can read gives a warning."""
        text, warnings = open_private_file(path, "--key-file")
        self.warnings += warnings
        for warning in warnings:
            log.warning("%s", warning)
        return ring_of(parse_key_list(text, f"--key-file {path}"))

    # -- a new key, seen once by a person -------------------------------------------------

    def hand_over(self, ring: KeyRing, show: Callable[[NewKey], None] | None,
                  new_naming: bool = False) -> NewKey:
        """Give the new ring to a person before it is used: `show` it (a terminal), or,
        with no one to show it to (cron, systemd), write it to a 0600 file in the state
        directory named by its fingerprint. The value is what OHLCV_ENCRYPTION_KEY and
        `--key-file` take: the whole ring, new primary first, the naming key last."""
        made = (f"naming key {ring.naming.fingerprint}" if new_naming and ring.naming is not None
                else f"key {ring.primary.fingerprint}")  # `new_naming`: the primary is unchanged
        new = NewKey(ring.primary.fingerprint, ",".join(k.item for k in ring.stored()), made=made)
        if show is not None:
            show(new)
            return new
        path = self.settings.state_dir / f"{NEW_KEY_PREFIX}{new.fingerprint}.txt"
        naming = f", naming key {ring.naming.fingerprint}" if ring.naming is not None else ""
        text = (f"# Secure OHLCV Downloader: key ring, primary key {new.fingerprint}{naming}, "
                f"made {utc_now_iso()}.\n"
                "# Move it offline now (password manager, paper in a safe), then delete this "
                f"file: shred -u {path}\n"
                "# It serves as --key-file for --recover on a new machine.\n"
                f"{KEY_VARIABLE}={new.value}\n")
        atomic_write(path, text.encode(), 0o600)  # 0600 whatever OHLCV_FILE_MODE allows
        new.file = path
        log.warning("new key %s written to %s: move it offline, then delete it",
                    new.fingerprint, path)
        return new

    def add_naming_key(self, ring: KeyRing,
                       show: Callable[[NewKey], None] | None) -> NamingKeyReport | None:
        """Give a ring that has none a naming key (a store from before the naming key):
        handed to a person first, then stored. None when `ring` has one already: a naming
        key is never replaced. Keys held only in a variable set outside: nothing is stored
        (`awaiting_env_update`); the operator sets it to the value handed over, re-runs."""
        if ring.naming is not None:
            return None
        naming = new_naming_key()
        added = KeyRing(ring.stored() + [naming])
        report = NamingKeyReport(naming.fingerprint, self.hand_over(added, show, new_naming=True))
        if self.source == EnvKeyStore.label:
            report.awaiting_env_update = True
            return report
        report.stored_in, report.variable_disagrees = self.store(added.stored())
        return report

    def key_files_waiting(self) -> list[Path]:
        """New-key files not yet moved offline (and deleted)."""
        state = self.settings.state_dir
        if not state.is_dir():
            return []
        return sorted(p for p in state.glob(f"{NEW_KEY_PREFIX}*.txt")
                      if stat.S_ISREG(os.lstat(p).st_mode))


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

    def take(self) -> str | None:
        """Count one request: the quota day it counts against; None (and nothing counted)
        when today's budget is spent."""
        with self._locked() as state:
            if state["exhausted"] or (self.per_day and state["used"] >= self.per_day):
                return None
            state["used"] += 1
            state["last_request"] = time.time()
            return str(state["day"])

    def give_back(self, day: str) -> None:
        """Uncount one request counted on `day` that never reached the server: a slot
        reserved but not used, a connection never made. A later day's count is not
        touched: that request was never part of it."""
        with self._locked() as state:
            if state["day"] == day and state["used"] > 0:
                state["used"] -= 1

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
        self._written = threading.Condition(self._lock)
        self._sent: dict[str, deque[float]] = {}
        # Requests acquired but not yet on the wire (stamps, per key): see written().
        self._pending: dict[str, set[float]] = {k.fingerprint: set() for k in self.keys}
        # Keys the server called spent: a request waiting for a slot of one is not sent.
        self._exhausted: set[str] = set()
        # Keys whose count reached the daily budget: no new reservation, but the ones
        # already counted are sent (dropping them would leave the budget partly unused).
        self._budget_spent: set[str] = set()
        self._reserved = threading.local()  # the quota day of this thread's reservation
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

    def _leave_at(self, fp: str, now: float) -> float:
        """The earliest moment from `now` a request whose slot has passed may leave: after
        the penalty, and far enough from the requests that left (or were due) before it
        for both windows. The requests due after it check for themselves when they wake."""
        earlier = [t for t in self._sent[fp] if t <= now]
        slot = max(now, self._penalty_until.get(fp, now))
        if earlier:
            slot = max(slot, earlier[-1] + self.spacing)
        if self.per_minute and len(earlier) >= self.per_minute:
            slot = max(slot, earlier[-self.per_minute] + 60 * RATE_SLACK)
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
        request goes behind the penalty, or to another key. A reservation that is not
        sent (that key spent, or the wait interrupted) is given back to the day's count;
        so is one whose request never reaches the server (`unsent`).

        The caller reports when the request is on the wire (`written`) or that it is done
        with it (`done`): until then a later request of the same key waits, since the
        server counts from when a request arrived, whatever delayed its sending."""
        self.done()  # this thread's previous request is over, written or not
        with self._lock:
            key, slot, _ = self._reserve()
        counted = True
        try:
            while True:
                delay = slot - self._monotonic()
                if delay > 0:
                    self._sleep(delay)
                with self._lock:
                    fp = key.fingerprint
                    sent = self._sent[fp]
                    with contextlib.suppress(ValueError):  # gone only if we slept for minutes
                        sent.remove(slot)
                    if fp in self._exhausted:  # the server says its day is over: not sent
                        self.quotas[fp].give_back(self._reserved.day)
                        counted = False
                        key, slot, _ = self._reserve()
                        counted = True
                        continue
                    # The request is stamped when it leaves, not at the slot: a thread
                    # woken late (a loaded machine) sends late, and the server counts from
                    # when it arrived. Stamped at its slot, it put the next request that
                    # much too close to it: a free key throttled at 1 request a second.
                    now = self._monotonic()
                    if self._pending[fp]:  # an earlier request is not on the wire yet
                        bisect.insort(sent, now)  # our place in the queue, meanwhile
                        self._written.wait(1.0)
                        slot = now
                        continue
                    slot = self._leave_at(fp, now)
                    bisect.insort(sent, slot)
                    if slot <= now:
                        self._pending[fp].add(slot)
                        self._reserved.pending = (fp, slot)
                        return key
                    # counted already: only the slot moves, behind the penalty or just
                    # behind a request that left late, keeping its place in the queue
        except BaseException:  # Ctrl-C during the wait: the request never leaves
            if counted:
                self.quotas[key.fingerprint].give_back(self._reserved.day)
            raise

    def written(self) -> None:
        """This thread's request is on the wire now (its bytes written): the next request
        of its key is spaced from this moment. Stamped when acquire returned instead, a
        request that a loaded machine then kept from the socket for longer than the slack
        (GIL, CPU, a new connection's handshake) reached the server too close to the next
        one: a free key throttled, one of its 25 requests of the day lost."""
        pending = getattr(self._reserved, "pending", None)
        if pending is not None:
            fp, stamp = pending
            with self._lock:
                sent = self._sent[fp]
                with contextlib.suppress(ValueError):
                    sent.remove(stamp)
                bisect.insort(sent, max(self._monotonic(), stamp))
        self.done()

    def done(self) -> None:
        """This thread is done with its request (written, failed, or abandoned): requests
        waiting behind it may go."""
        pending = getattr(self._reserved, "pending", None)
        if pending is not None:
            self._reserved.pending = None
            with self._lock:
                self._pending[pending[0]].discard(pending[1])
                self._written.notify_all()

    def unsent(self, key: ApiKey) -> None:
        """The request this thread's last acquire() was for never reached the server (no
        connection was made): it does not count against the day."""
        self.quotas[key.fingerprint].give_back(self._reserved.day)
        with self._lock:
            self._budget_spent.discard(key.fingerprint)  # one more may be counted now

    def _reserve(self) -> tuple[ApiKey, float, float]:
        """Under the lock: count a request for the key free soonest and reserve its slot.
        Returns the key, the slot and the time the slot was reserved at."""
        while True:
            usable = [k for k in self.keys
                      if k.fingerprint not in self._exhausted | self._budget_spent]
            if not usable:
                raise QuotaExhausted("the daily API quota of every configured key is spent.")
            now = self._monotonic()
            # The key free soonest; among keys free now, the least recently used, so that
            # several keys share the load even when requests never overlap.
            slot, _, index = min((self._next_slot(k.fingerprint, now),
                                  self._last_sent(k.fingerprint), i)
                                 for i, k in enumerate(usable))
            key = usable[index]
            day = self.quotas[key.fingerprint].take()
            if day is not None:
                self._reserved.day = day
                break
            self._budget_spent.add(key.fingerprint)
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
                    "limiter: %s", key.fingerprint, outside_text(message, 100), pause,
                    self.state(key))

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

class Outcome(str, Enum):  # noqa: UP042 -- str() of a member is its name, as logged
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
    INVALID_PAYLOAD = "invalid_payload"  # JSON no series can be (nested too deeply)


@dataclass(frozen=True)
class Classified:
    """`message` is safe to show as it is: built by outside_text from the server's words."""

    outcome: Outcome
    message: str = ""
    payload: Any = None
    meta: Any = None  # a JSON answer's "Meta Data", to check it against the request


def _server_message(value: Any) -> tuple[str, str]:
    """A message value as text to classify (raw) and as text to show (outside_text)."""
    raw = value if isinstance(value, str) else reprlib.repr(value)  # bounded, any depth
    return raw, outside_text(raw, SERVER_MESSAGE_LIMIT)


TOO_DEEP = "the JSON is nested too deeply to be a series"


def classify_response(body: bytes) -> Classified:
    """Read a body before trusting it. `Information` is ambiguous (rate limit, premium,
    demo), so its text decides; `Note` is the legacy rate limit; `Error Message` a bad call.
    JSON nested deeper than the parser goes is INVALID_PAYLOAD, never a RecursionError."""
    text = body.lstrip()[:1]
    if text not in (b"{", b"["):
        if body.startswith(b"timestamp,") or body.startswith(b"\xef\xbb\xbftimestamp,"):
            return Classified(Outcome.DATA, payload=body)
        return Classified(Outcome.NOT_JSON, "the body is neither JSON nor our CSV "
                          f"(starts with '{outside_text(body, 40)}')")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        return Classified(Outcome.NOT_JSON, "the body is not UTF-8 text")
    except RecursionError:
        return Classified(Outcome.INVALID_PAYLOAD, TOO_DEEP)
    except ValueError as exc:
        return Classified(Outcome.NOT_JSON, f"malformed JSON ({outside_text(exc)})")
    try:
        return _classify_payload(payload)
    except RecursionError:
        return Classified(Outcome.INVALID_PAYLOAD, TOO_DEEP)


def _classify_payload(payload: Any) -> Classified:
    if not isinstance(payload, dict) or not payload:
        return Classified(Outcome.EMPTY, "the API returned no data ({})")
    if "Error Message" in payload:
        raw, message = _server_message(payload["Error Message"])
        kind = Outcome.INVALID_KEY if "apikey" in raw.lower() else Outcome.INVALID_REQUEST
        return Classified(kind, message)
    if "Note" in payload:
        return Classified(Outcome.THROTTLED, _server_message(payload["Note"])[1])
    if "Information" in payload:
        raw, message = _server_message(payload["Information"])
        lower = raw.lower()
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
        keys = outside_text(", ".join(sorted(payload)[:5]))
        return Classified(Outcome.EMPTY, f"no time series in the answer (keys: {keys})")
    if not payload[series[0]]:
        return Classified(Outcome.EMPTY, "the time series is empty")
    return Classified(Outcome.DATA, payload=payload[series[0]], meta=payload.get("Meta Data"))


FUNCTIONS = {
    ("daily", False): "TIME_SERIES_DAILY", ("daily", True): "TIME_SERIES_DAILY_ADJUSTED",
    ("weekly", False): "TIME_SERIES_WEEKLY", ("weekly", True): "TIME_SERIES_WEEKLY_ADJUSTED",
    ("monthly", False): "TIME_SERIES_MONTHLY", ("monthly", True): "TIME_SERIES_MONTHLY_ADJUSTED",
}
MAX_BODY_BYTES = 64 * 2**20  # the most any one answer may be, whatever the memory limit

# One answer's memory. Reading and parsing an answer takes a multiple of its size: the
# body, the join of its chunks, json.loads' objects or pandas' columns, the table. Measured
# (peak RSS over body size, fetch and parse of one large valid answer of 1-minute bars as
# Alpha Vantage formats them, through this client): JSON 6.5 to 7.2 (46 MB body: 428 MB
# peak from 128 MB), CSV 4.8 to 7.0 (37 MB body: 306 MB peak from 128 MB). So, with B
# bytes of headroom for each answer in flight,
#     B = (OHLCV_MAX_MEMORY_MB - RSS when the download starts) / downloads in flight,
# one body is capped at B / ANSWER_EXPANSION (9: the larger factor with a margin, and at
# least answer_cost's estimate of such a series), refused as soon as it passes the cap,
# unread beyond it.
# A hostile body under the cap can still expand far more than a series: json.loads makes
# an 80-byte list of each 3-byte "[]," (27.5 times the body), a dict of each '{"1":{"a":
# "1"}}' (24 times). So before parsing, a body is also refused when answer_cost, an upper
# bound of what its values will take, is over B: twice the body, plus per JSON value (each
# follows a ',' ':' or '[') an object and its slot, per JSON object a dict, per CSV cell
# a string and its slot. Measured against it (actual, estimate): a series as Alpha Vantage
# sends it, JSON 7.2, 8.2; CSV 7.0, 7.9; compact JSON 11.2, 12.5; hostile shapes (lists,
# dicts, short strings, numbers, dense CSV) 8.6 to 27.5, each estimated at least as high.
ANSWER_EXPANSION = 9
JSON_VALUE_COST = 80
JSON_OBJECT_COST = 320
CSV_CELL_COST = 64


def answer_budget(settings: Settings, baseline_rss: int, in_flight: int) -> int:
    """B above: the bytes one answer may take while it is read and parsed."""
    return max(0, settings.max_memory_mb * 2**20 - baseline_rss) // max(1, in_flight)


def answer_cost(body: bytes) -> int:
    """An upper bound of the memory reading and parsing `body` takes (see above)."""
    if body.lstrip()[:1] in (b"{", b"["):
        values = body.count(b",") + body.count(b":") + body.count(b"[") + 1
        return 2 * len(body) + JSON_VALUE_COST * values + JSON_OBJECT_COST * body.count(b"{")
    return 2 * len(body) + CSV_CELL_COST * (body.count(b",") + body.count(b"\n") + 1)


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


OFFLINE_HINT = ("Fix: check this machine's network connection and DNS (and "
                "ALPHA_VANTAGE_BASE_URL); to try the tool without network, run "
                "./scripts/offline-demo.sh (the whole pipeline against a local emulator).")


@dataclass(frozen=True)
class NetworkFailure:
    """What a failed request met on the network, in words for the operator."""

    text: str
    unsent: bool      # no connection was made: the request never reached the server
    unresolved: bool  # the server's name did not resolve


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: requests wraps urllib3's MaxRetryError, whose `reason` is
    the failure itself, raised from the OSError (a gaierror for a name)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 12:
        error = todo.pop(0)
        if error is None or any(error is s for s in seen):
            continue
        seen.append(error)
        yield error
        wrapped = error.args[0] if error.args and isinstance(error.args[0], BaseException) \
            else None
        todo += [getattr(error, "reason", None), wrapped, error.__cause__, error.__context__]


def network_failure(exc: requests.RequestException, url: str) -> NetworkFailure:
    """Name the cause of a failed request and whether it can have reached the server.

    Only a connection never made is surely unsent: the name did not resolve, the
    connection was refused or unreachable, or not made in time (urllib3's
    NewConnectionError, NameResolutionError, ConnectTimeoutError). A read timeout or a
    reset after the request went out may have been counted by the server."""
    parts = urlsplit(url)
    host = outside_text(parts.hostname or "", 100)
    where = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    chain = list(_chain(exc))
    os_error = next((e for e in chain if isinstance(e, OSError)
                     and not isinstance(e, urllib3.exceptions.HTTPError)
                     and not isinstance(e, requests.RequestException)), None)
    detail = outside_text(os_error.strerror or os_error, 100) if os_error is not None else ""
    if any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in chain):
        return NetworkFailure(f"could not resolve {host}: no network, or no DNS server "
                              f"answers ({detail or 'name resolution failed'})", True, True)
    if any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain):
        return NetworkFailure(f"could not connect to {where} ({detail or 'no connection'})",
                              True, False)
    if any(isinstance(e, urllib3.exceptions.ConnectTimeoutError) for e in chain) \
            or isinstance(exc, requests.ConnectTimeout):
        return NetworkFailure(f"no connection to {where} in time (connect timeout)", True, False)
    return NetworkFailure(f"network error ({type(exc).__name__})", False, False)


# The moment a request's bytes are written, for RateLimiter.written: requests and urllib3
# have no hook there, so the client's connections report it to this thread's `report`.
_request_written = threading.local()


def _report_written() -> None:
    report = getattr(_request_written, "report", None)
    if report is not None:
        report()


@functools.cache
def _reporting_adapter_class() -> type[requests.adapters.HTTPAdapter]:
    """An HTTPAdapter whose connections report each request once it is written (built on
    first use: requests and urllib3 are imported then)."""
    import urllib3.connection
    import urllib3.connectionpool

    class ReportingHTTPConnection(urllib3.connection.HTTPConnection):
        def request(self, *args: Any, **kwargs: Any) -> None:
            super().request(*args, **kwargs)
            _report_written()

    class ReportingHTTPSConnection(urllib3.connection.HTTPSConnection):
        def request(self, *args: Any, **kwargs: Any) -> None:
            super().request(*args, **kwargs)
            _report_written()

    class HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = ReportingHTTPConnection

    class HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = ReportingHTTPSConnection

    class ReportingAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    return ReportingAdapter


class AlphaVantageClient:
    """Fetches one series: rate-limited, timed out, retried with backoff, classified.

    Retries are written here rather than left to urllib3's Retry because every attempt,
    retries included, must pass the rate limiter and count against the day's quota (an
    attempt that never reached the server is given back). `Error Message` answers are
    never retried: the same call would fail the same way. `notify`, when set, is told of
    each retry wait (the command line shows it on a terminal only).
    """

    def __init__(self, settings: Settings, limiter: RateLimiter, stats: RunStats,
                 in_flight: int | None = None, baseline_rss: int | None = None) -> None:
        self.url = settings.base_url
        self.max_memory_mb = settings.max_memory_mb
        self.in_flight = max(1, in_flight or settings.max_workers)
        if baseline_rss is None:
            baseline_rss = psutil.Process().memory_info().rss
        self.budget = answer_budget(settings, baseline_rss, self.in_flight)
        self.max_body = min(MAX_BODY_BYTES, self.budget // ANSWER_EXPANSION)
        self.timeout = (settings.connect_timeout, settings.request_timeout)
        self.max_retries = settings.max_retries
        self.backoff = settings.backoff_seconds
        self.datatype = settings.datatype
        self.limiter = limiter
        self.stats = stats
        self.notify: Callable[[str], None] | None = None
        self.unresolved = False  # the API's host name did not resolve, even on a retry
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "secure-ohlcv-downloader/1"
        adapter = _reporting_adapter_class()(pool_connections=1,
                                             pool_maxsize=max(settings.max_workers, 1))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def fetch(self, request: ApiRequest) -> Classified:
        """The data of `request` (Outcome.DATA), or an ApiError saying why not."""
        problem, unsent, unresolved = "", False, False
        # A name that does not resolve is retried once at most, and in a run where it
        # already failed that way, not at all. getaddrinfo has already asked every
        # configured resolver, with their own retries and timeouts: "no such name" or no
        # network at all does not change within our seconds of backoff; a resolver
        # hiccup (EAI_AGAIN while it restarts, a link coming up) may, hence the one retry.
        # Five would only keep a machine without network silent for most of a minute.
        # The next run (cron) tries again.
        name_retries = 0 if self.unresolved else 1
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retried()
                delay = min(60.0, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                retries = attempt if unresolved else self.max_retries  # a name: this one only
                log.info("%s %s: retry %d/%d in %.1f s after %s", request.symbol,
                         request.function, attempt, retries, delay, problem)
                if self.notify is not None:
                    self.notify(f"{request.symbol}: {problem}; retry {attempt} of {retries} "
                                f"in {delay:.1f} s")
                time.sleep(delay)
            key = self.limiter.acquire()
            started = time.monotonic()
            try:
                status, body = self._get(request, key)
            except requests.RequestException as exc:
                failure = network_failure(exc, self.url)
                problem, unsent, unresolved = failure.text, failure.unsent, failure.unresolved
                if failure.unsent:  # the server never saw it: not one of today's requests
                    self.limiter.unsent(key)
                self.stats.count("no_connection" if failure.unsent else "network_error")
                log.debug("%s: %s: %s", request.symbol, problem, outside_text(exc))
                if failure.unresolved:
                    if name_retries == 0:
                        self.unresolved = True
                        raise ApiError(f"gave up after {attempt + 1} attempt"
                                       f"{'s' if attempt else ''}: {problem}. {OFFLINE_HINT}") from None
                    name_retries -= 1
                continue
            unsent = unresolved = False
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
            if len(body) > 4096 and answer_cost(body) > self.budget:
                self.stats.count("too_large", len(body))
                raise self._too_large(f"the answer ({len(body) / 2**20:.1f} MB) would take "
                                      f"more than the {self.budget / 2**20:.0f} MB one answer "
                                      "may take to parse", "refused before parsing",
                                      by_memory=True)
            answer = classify_response(body)
            self.stats.count(answer.outcome.value, len(body))
            if answer.outcome is Outcome.DATA:
                return answer
            if answer.outcome in (Outcome.NOT_JSON, Outcome.THROTTLED):
                problem = answer.message  # safe and capped (outside_text)
                if answer.outcome is Outcome.THROTTLED:
                    self.limiter.throttled(key, self.backoff * 2 ** attempt, answer.message)
                continue
            if answer.outcome is Outcome.QUOTA_SPENT:
                self.limiter.exhausted(key)
                return self.fetch(request)  # another key may still have quota
            raise _refusal(answer, request)
        hint = f" {OFFLINE_HINT}" if unsent else ""
        attempts = self.max_retries + 1
        raise ApiError(f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}: "
                       f"{problem}.{hint}")

    def _get(self, request: ApiRequest, key: ApiKey) -> tuple[int, bytes]:
        """Status and body, streamed: a body over the cap is refused unread beyond it
        (before a byte of it when its declared length already says so)."""
        params = request.params(self.datatype) | {"apikey": key.secret}
        _request_written.report = self.limiter.written
        try:
            with self.session.get(self.url, params=params, timeout=self.timeout,
                                  stream=True) as resp:
                return self._read(resp)
        finally:
            _request_written.report = None
            self.limiter.done()

    def _read(self, resp: requests.Response) -> tuple[int, bytes]:
        self.limiter.written()  # the answer has begun: the request was written (a proxy's
        # connections do not report it themselves)
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            self.stats.count("too_large")
            raise self._too_large(f"the answer is {int(declared) / 2**20:.1f} MB (its "
                                  f"declared length), more than {self._cap_text()}",
                                  "refused unread", self.max_body < MAX_BODY_BYTES)
        chunks, size = [], 0
        for chunk in resp.iter_content(256 * 1024):
            size += len(chunk)
            if size > self.max_body:
                self.stats.count("too_large", size)
                raise self._too_large(f"the answer is larger than {self._cap_text()}",
                                      "refused, unread beyond that",
                                      self.max_body < MAX_BODY_BYTES)
            chunks.append(chunk)
        return resp.status_code, b"".join(chunks)

    def _cap_text(self) -> str:
        if self.max_body < MAX_BODY_BYTES:
            return f"the {self.max_body / 2**20:.1f} MB one answer may be"
        return f"the {MAX_BODY_BYTES // 2**20} MiB any answer may be"

    def _too_large(self, what: str, done: str, by_memory: bool) -> ApiError:
        """The refusal of an answer too large: for the memory one answer may take (the
        fix names the limit), or for any answer at all (MAX_BODY_BYTES)."""
        if not by_memory:
            return ApiError(f"{what}; {done}.")
        return ApiError(
            f"{what} under OHLCV_MAX_MEMORY_MB={self.max_memory_mb} with {self.in_flight} "
            f"download(s) in flight; {done}. Fix: raise OHLCV_MAX_MEMORY_MB (or lower "
            "OHLCV_MAX_WORKERS).")


def _refusal(answer: Classified, request: ApiRequest) -> OHLCVError:
    quoted = f"Alpha Vantage: '{answer.message}'"  # the message is safe (outside_text)
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
    if answer.outcome is Outcome.INVALID_PAYLOAD:
        return InvalidPayload(f"{answer.message}; nothing of it is stored.")
    return ApiError(answer.message)


# =========================================================================================
# 7. Parsing and validation
# =========================================================================================

PRICE_COLUMNS = ["open", "high", "low", "close"]
BASE_COLUMNS = ["timestamp", *PRICE_COLUMNS, "volume"]
ADJUSTED_COLUMNS = {"daily": ["adjusted_close", "dividend_amount", "split_coefficient"],
                    "weekly": ["adjusted_close", "dividend_amount"],
                    "monthly": ["adjusted_close", "dividend_amount"]}
# A traded price is above zero; a zero one poisons every return computed from the series.
# (Volume 0 is a real bar: no trade in that minute, or a halted day.)
POSITIVE_COLUMNS = [*PRICE_COLUMNS, "adjusted_close"]

# No bar is dated after today anywhere on Earth. The furthest-ahead time zone is UTC+14
# (the Line Islands, Pacific/Kiritimati), where it is already New York's tomorrow for most
# of New York's day; and a bar carries its exchange's own date (600104.SHH's session is
# dated in Shanghai, ahead of New York), so a daily, weekly or monthly bar may be dated up
# to today's date there and no later. A fixed offset: no time zone database can move it.
FURTHEST_AHEAD = timezone(timedelta(hours=14), "UTC+14")
# Intraday bars are New York wall times, stamped by their start; none may start after now
# there. We ask for no `entitlement`, so intraday answers are end-of-day data whose newest bar
# is hours old: the allowance is only for our clock running behind the server's. NTP keeps
# hosts within a second; a host without it, or a VM resumed from suspend, can be minutes
# off before anyone notices. Five minutes covers that and is still no room for a bar that
# has not happened (the next bar of a session is a minute to an hour away).
CLOCK_SKEW = timedelta(minutes=5)
# Timestamps exactly as Alpha Vantage writes them, ASCII digits only: pandas alone would
# also take "2024-1-2" and full-width digits, and the old daily parser cut everything after
# the 10th character ("2024-01-02garbage", "2024-01-02T23:00:00-12:00").
STAMP_SHAPES = {False: r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
                True: r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}"}


def columns_for(dataset: DatasetId) -> list[str]:
    return BASE_COLUMNS + (ADJUSTED_COLUMNS[dataset.interval] if dataset.adjusted else [])


def _wire_name(name: str) -> str:
    """'5. adjusted close' and 'adjusted close' become 'adjusted_close'."""
    return re.sub(r"^\d+[a-z]?\.\s*", "", name.strip()).replace(" ", "_").lower()


def parse_payload(answer: Classified, dataset: DatasetId, now: datetime | None = None) -> pd.DataFrame:
    """A DATA answer (JSON series or CSV body) for `dataset` as our typed table, oldest first.

    Refuses, with the reason and the first bad bar, anything that is not a valid series of
    that symbol: a Meta Data naming another symbol, missing or repeated fields, missing,
    zero or non-numeric prices, timestamps that are not exactly Alpha Vantage's, duplicate
    timestamps, bars dated after `now` (an aware datetime, by default the clock: when the
    answer arrived), high or low inconsistent with open and close, negative prices or
    volume. A refused payload stores nothing.
    """
    _check_symbol(answer.meta, dataset)
    wanted = columns_for(dataset)
    numbers = _fast_numbers(answer.payload, wanted)
    if numbers is None:  # something is off: the careful path finds it and says what
        numbers = _checked_numbers(_text_table(answer.payload), wanted)
    # Built from whole columns at once: per-column assignment and list indexing of a
    # DataFrame cost more than the parsing itself (the per-symbol benchmark's profile).
    stamps = _parse_timestamps(numbers["timestamp"], dataset, now or utc_now())
    columns: dict[str, Any] = {"timestamp": stamps}
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
    _check_prices_above_zero(frame, dataset)
    return frame


def _check_symbol(meta: Any, dataset: DatasetId) -> None:
    """An answer whose Meta Data names another symbol is another symbol's data (a proxy or
    cache that mixed answers up): never stored under ours. Alpha Vantage echoes the symbol
    in the case it was asked in ("msft"), so only ASCII case is ignored: "\u0131bm" is not IBM."""
    if not isinstance(meta, dict):
        return
    for key, named in meta.items():
        if _wire_name(str(key)) == "symbol" and not (
                isinstance(named, str) and named.isascii() and named.upper() == dataset.symbol):
            raise InvalidPayload(
                f"the answer is for another symbol: its Meta Data names '{outside_text(named)}', "
                f"not {dataset.symbol}; nothing stored. Fix: run again; if it repeats, check "
                "what answers at ALPHA_VANTAGE_BASE_URL (a proxy or cache mixing answers up).")


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
    except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError, RecursionError):
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
            row = int(bad.to_numpy().argmax())
            cell, at = raw[column].iloc[row], f"at '{outside_text(raw['timestamp'].iloc[row])}'"
            if not cell.strip():  # JSON: the field is absent; CSV: the cell is empty
                raise InvalidPayload(f"missing {column} {at}.")
            raise InvalidPayload(f"non-numeric {column} '{outside_text(cell)}' {at}.")
        numbers[column] = values
    return numbers


def _text_table(payload: Any) -> pd.DataFrame:
    """The series as a table of strings with our column names; InvalidPayload otherwise."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            raw = pd.read_csv(io.BytesIO(payload), dtype=str, keep_default_na=False,
                              encoding="utf-8-sig")
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise InvalidPayload(f"unreadable CSV: {outside_text(exc)}") from None
        names = [_wire_name(str(c)) for c in raw.columns]
    elif isinstance(payload, dict):
        if not all(isinstance(bar, dict) for bar in payload.values()):
            raise InvalidPayload("a bar of the series is not an object of fields.")
        try:
            raw = pd.DataFrame.from_dict(payload, orient="index", dtype=str)
        except RecursionError:  # a value nested deeper than str() goes
            raise InvalidPayload("a bar holds a value nested too deeply.") from None
        except UnicodeError:  # JSON may escape a lone surrogate; no text column holds one
            raise InvalidPayload("a timestamp, field name or value is not valid Unicode text "
                                 "(a lone surrogate).") from None
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
        raise InvalidPayload(f"fields named more than once: {outside_text(', '.join(repeated))}.")
    raw.columns = names
    return raw.fillna("").astype(str)


def _parse_timestamps(values: pd.Series, dataset: DatasetId, now: datetime) -> pd.Series:
    """Daily, weekly and monthly bars: exactly a date (midnight, no time zone), no later than
    today in UTC+14; intraday: exactly a New York date and time, no later than `now` there
    (plus CLOCK_SKEW). Whole-column checks; the first bad stamp is named (the earliest, for
    one dated in the future)."""
    text = values.str.strip()
    if (text == "").any():
        raise InvalidPayload("a bar has no timestamp.")
    intraday = dataset.interval in INTRADAY
    shape = "YYYY-MM-DD HH:MM:SS, New York time" if intraday else "YYYY-MM-DD"
    bad = ~text.str.fullmatch(STAMP_SHAPES[intraday]).to_numpy(dtype=bool, na_value=False)
    if bad.any():
        raise InvalidPayload(f"bad timestamp '{outside_text(text.iloc[int(bad.argmax())])}' "
                             f"(a bar is stamped {shape}).")
    try:
        stamps = pd.to_datetime(text, format="%Y-%m-%d %H:%M:%S" if intraday else "%Y-%m-%d",
                                errors="coerce")
    except (ValueError, TypeError, OverflowError):
        stamps = pd.Series(pd.NaT, index=text.index)
    bad = stamps.isna().to_numpy()
    if bad.any():
        raise InvalidPayload(f"bad timestamp '{outside_text(text.iloc[int(bad.argmax())])}' "
                             f"(it is no {'date and time' if intraday else 'date'}).")
    # Compared as wall times, before localizing: a stamp late in 9999 cannot be localized at
    # all (its UTC instant is in year 10000), and wall-time order is time order except in
    # the hour a DST change repeats, whose stamps are refused as ambiguous below.
    if intraday:
        local = now.astimezone(MARKET_TZ)
        latest = pd.Timestamp(local.replace(tzinfo=None) + CLOCK_SKEW)
        limit = f"now is {local:%Y-%m-%d %H:%M:%S} in New York"
    else:
        today = now.astimezone(FURTHEST_AHEAD).date()
        latest = pd.Timestamp(today)
        limit = f"today is {today} even in UTC+14, the furthest-ahead time zone"
    late = (stamps > latest).to_numpy()
    if late.any():
        raise InvalidPayload(f"bar dated in the future at {_bar_name(stamps[late].min(), intraday)} "
                             f"({limit}): it cannot have happened yet.")
    if intraday:  # a time the clocks skipped, or passed twice, is no instant
        stamps = stamps.dt.tz_localize(MARKET_TZ, ambiguous="NaT", nonexistent="NaT")
        bad = stamps.isna().to_numpy()
        if bad.any():
            raise InvalidPayload(f"bad timestamp '{outside_text(text.iloc[int(bad.argmax())])}' "
                                 "(New York's clocks skipped or repeated that time).")
    return stamps


def _bar_name(stamp: pd.Timestamp, intraday: bool) -> str:
    return outside_text(stamp.strftime("%Y-%m-%d %H:%M:%S") if intraday else stamp.date().isoformat())


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


def _check_prices_above_zero(frame: pd.DataFrame, dataset: DatasetId) -> None:
    """Every price of a bar from the API is above zero; the first (oldest) bar with a zero
    one is named. validate_bars does not judge this, so bars stored before this check
    existed still verify, restore and merge."""
    columns = [c for c in POSITIVE_COLUMNS if c in frame]
    if min(frame[c].to_numpy().min(initial=np.inf) for c in columns) > 0:
        return
    zero = np.column_stack([frame[c].to_numpy() <= 0 for c in columns])  # negatives: refused
    row = int(zero.any(axis=1).argmax())
    named = ", ".join(c for c, z in zip(columns, zero[row], strict=True) if z)
    stamp = _bar_name(frame["timestamp"].iloc[row], dataset.interval in INTRADAY)
    raise InvalidPayload(f"zero price ({named}) at {stamp}: not a traded price.")


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

    @property
    def identity(self) -> str:
        """What the naming key hashes into the file name, and the catalogue's key:
        daily/IBM, daily_adjusted/IBM, weekly/IBM, intraday_5min/IBM/2024-01."""
        return "/".join([self.name, self.symbol] + ([self.month] if self.month else []))

    def relative_path(self) -> Path:
        """The earlier layout's path, whose names show the symbol (daily/IBM.fernet): used
        only by --migrate-store and to restore an archive written by it (the store itself
        uses dataset_file)."""
        return Path(self.identity + FILE_SUFFIX)

    @classmethod
    def from_identity(cls, identity: str) -> DatasetId:
        """The inverse of identity; UsageError for a text the store never makes. (Plain
        string work: status parses one per catalogue entry.)"""
        parts = identity.split("/")
        if len(parts) == 3 and parts[0].startswith("intraday_"):
            return cls(parts[1], parts[0][len("intraday_"):], False, parts[2])
        if len(parts) == 2:
            interval, _, adjusted = parts[0].partition("_")
            if adjusted in ("", "adjusted"):
                return cls(parts[1], interval, adjusted == "adjusted")
        raise UsageError(f"{identity!r} is not a dataset.")

    @classmethod
    def from_meta(cls, meta: dict[str, Any], first_bar: datetime) -> DatasetId:
        """A file's dataset from its own metadata (so the catalogue can always be rebuilt
        from the files); an intraday file written before `month` was recorded is of the
        month of its first bar in the market's time zone. ValueError when it names none."""
        name, symbol, month = meta.get("dataset"), meta.get("symbol"), meta.get("month")
        if not isinstance(name, str) or not isinstance(symbol, str):
            raise ValueError("its metadata names no dataset")
        if name.startswith("intraday_") and not isinstance(month, str):
            at = first_bar.astimezone(MARKET_TZ) if first_bar.tzinfo else first_bar
            month = f"{at:%Y-%m}"
        try:
            return cls.from_identity("/".join([name, symbol] + ([month] if month else [])))
        except UsageError as exc:
            raise ValueError(f"its metadata names no valid dataset ({exc})") from None

    @classmethod
    def from_relative_path(cls, rel: Path) -> DatasetId:
        """The inverse of relative_path; UsageError for a path the store did not write."""
        if not rel.name.endswith(FILE_SUFFIX):
            raise UsageError(f"{rel} is not a dataset file.")
        try:
            return cls.from_identity(rel.as_posix()[: -len(FILE_SUFFIX)])
        except UsageError:
            raise UsageError(f"{rel} is not a dataset file.") from None

    def __str__(self) -> str:
        return f"{self.symbol} {self.name}" + (f" {self.month}" if self.month else "")


NAME_DOMAIN = b"secure-ohlcv dataset name\0"
# 256 fan-out directories by the first two hex digits: 100,000 datasets is ~390 files a
# directory, 1,000,000 is ~3,900 (docs/FORMAT.md).
DATASET_NAME = re.compile(r"([0-9a-f]{2})/\1[0-9a-f]{30}\.fernet", re.ASCII)
FAN_OUT_NAME = re.compile(r"[0-9a-f]{2}", re.ASCII)
# No dataset file this tool writes comes near this (a symbol's 1-minute month: ~1 MB); a
# larger one is not ours, and is never read into memory.
MAX_DATASET_BYTES = 1 << 30
EARLIER_LAYOUT_DIRS = frozenset([i + a for i in INTERVALS[:3] for a in ("", "_adjusted")])
EARLIER_LAYOUT = ("this store still uses the earlier layout (file names show symbols). Fix: "
                  "run `python secure_ohlcv_downloader.py --migrate-store` once.")


def dataset_file(naming_key: str, dataset: DatasetId) -> Path:
    """A dataset's file, relative to the data directory: a keyed hash of its identity,
    so a name tells nothing of symbol, interval or month to whoever lacks the key."""
    return Path(dataset_file_name(naming_key, dataset))


def dataset_file_name(naming_key: str, dataset: DatasetId) -> str:
    """dataset_file as the catalogue records it (`ab/ab3f....fernet`); a plain string, as
    status checks one per entry."""
    digest = hmac.new(base64.urlsafe_b64decode(naming_key), NAME_DOMAIN + dataset.identity.encode(),
                      hashlib.sha256).hexdigest()[:32]
    return f"{digest[:2]}/{digest}{FILE_SUFFIX}"


def naming_key_lacking(recorded: str | None) -> str:
    """Why a command stops on a store whose files are named under a naming key the key
    ring lacks (`recorded`, the catalogue's, when it is readable), and the fix."""
    key = f"naming key {recorded}" if recorded else "a naming key"
    return (f"the store's dataset files are named under {key}, which the key ring lacks; "
            "nothing was changed. Fix: offer the key ring value from your offline copy, "
            "which ends with `naming:...`; if that naming key is lost, run `python "
            "secure_ohlcv_downloader.py --migrate-store`: it gives the ring a naming key if "
            "it has none and renames every dataset to the ring's naming key.")


def put_back_fix(path: Path | str) -> str:
    """The fix for something planted where the store keeps a dataset or a fan-out directory."""
    return (f"move it out of the data directory (`mv {path} ELSEWHERE`), then restore what "
            "it stood for: `python secure_ohlcv_downloader.py --recover --from-backup ARCHIVE`.")


def fan_out_dirs(root: Path, dir_mode: int | None = None) -> list[Path]:
    """The fan-out directories of `root` (two hex digits). UnsafePathError when an entry of
    such a name is not a plain directory (a link or a file: planted, never followed) or,
    given `dir_mode`, is another user's or looser than it: its files could be anyone's.
    Entries of other names are not the store's: ignored, never read nor removed."""
    try:
        entries = [e for e in os.scandir(root) if FAN_OUT_NAME.fullmatch(e.name)]
    except (FileNotFoundError, NotADirectoryError):  # not made yet: nothing stored
        return []
    for entry in entries:
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePathError(
                f"{entry.path} is {kind_of(info)}, where this tool keeps a directory of "
                "dataset files; refusing to follow or use it (another user may have planted "
                f"it). Fix: {put_back_fix(entry.path)}")
        if dir_mode is not None:
            check_private_dir(Path(entry.path), dir_mode, info)
    return [Path(e.path) for e in entries]


def dataset_files(root: Path) -> list[Path]:
    """Every dataset file below `root`, sorted: whatever is named as dataset_file names
    them, in its fan-out directory (a link or a FIFO there is listed, so that reading it
    refuses it by name rather than the dataset going missing unseen); temp files and
    foreign names excluded."""
    return [Path(p) for p in sorted(e.path for top in fan_out_dirs(root) for e in os.scandir(top)
                                    if DATASET_NAME.fullmatch(f"{top.name}/{e.name}"))]


def read_dataset_file(path: Path, dir_mode: int) -> tuple[bytes, os.stat_result]:
    """A dataset file's token and the stat of the bytes read, by read_own_file's rules."""
    try:
        return read_own_file(path, MAX_DATASET_BYTES, dir_mode, put_back_fix(path))
    except ValueError as exc:
        raise IntegrityError(f"{exc}: no dataset file this tool writes is so large. Fix: "
                             f"{put_back_fix(path)}") from None


def uses_earlier_layout(root: Path) -> bool:
    """Whether `root` still holds the earlier layout's directories (daily/, intraday_5min/)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return any(n in EARLIER_LAYOUT_DIRS or n.startswith("intraday_") for n in names)


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
    meta = _table_meta(table.schema)
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


def _table_meta(schema: pa.Schema) -> dict[str, Any]:
    """Our metadata of a table's schema; ValueError if it is missing or of another version."""
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError("no secure_ohlcv metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError("unreadable secure_ohlcv metadata") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema version {meta.get('schema_version')!r}, "
                         f"this program reads {SCHEMA_VERSION}")
    return meta


@dataclass(frozen=True)
class TableSummary:
    """A stored table's row count, first and last bar (naive for daily and longer bars,
    in the market's time zone intraday) and metadata."""

    rows: int
    first_bar: datetime
    last_bar: datetime
    meta: dict[str, Any]


def summarise_table(data: bytes) -> TableSummary:
    """decode_table's facts without decoding a bar: the Parquet footer only (row count,
    metadata, the timestamp column's min and max statistics), so status and estimate
    never import pandas. Tables are stored sorted by time (parse_payload and merge_bars
    sort), so the minimum is the first bar. The Fernet token that held `data` already
    proved it is the table we wrote; its pages are left unread."""
    try:
        footer = pq.read_metadata(pa.BufferReader(data))
        schema = footer.schema.to_arrow_schema()
        column = schema.get_field_index("timestamp")
        stats = [footer.row_group(g).column(column).statistics
                 for g in range(footer.num_row_groups)] if column >= 0 else []
        logical = json.loads(footer.schema.column(column).logical_type.to_json()) if stats else {}
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"not a Parquet table ({exc})") from None
    meta = _table_meta(schema)
    if not stats or not all(s is not None and s.has_min_max for s in stats):
        raise ValueError("no timestamp statistics")
    tz = getattr(schema.field(column).type, "tz", None)
    first = _stored_time(min(s.min_raw for s in stats), logical, tz)
    last = _stored_time(max(s.max_raw for s in stats), logical, tz)
    return TableSummary(footer.num_rows, first, last, meta)


def table_days(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """The dates of a stored table's bars (datetime64[D], sorted; intraday bars by their
    date in the market's time zone) and its metadata: the timestamp column alone is
    decoded, and no pandas (the gap report reads thousands of files)."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        meta = _table_meta(parquet.schema_arrow)
        column = parquet.read(columns=["timestamp"], use_threads=False)["timestamp"]
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise ValueError(f"not a Parquet table ({exc})") from None
    if pa.types.is_timestamp(column.type) and column.type.tz is not None:
        column = pc.local_timestamp(column)
    if column.null_count:
        raise ValueError("a bar without a timestamp")
    # Days since 1970 read from each chunk's buffer: Arrow's to_numpy imports pandas on
    # first use (~0.3 s of a fresh gap report that needs none of it).
    days = [np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset:chunk.offset + len(chunk)]
            for chunk in column.cast(pa.date32()).chunks if len(chunk)]
    return np.concatenate([*days, np.empty(0, np.int32)]).astype(np.int64).view(
        "datetime64[D]"), meta


_TICKS_PER_SECOND = {"milliseconds": 10**3, "microseconds": 10**6, "nanoseconds": 10**9}


def _stored_time(raw: int, logical: dict[str, Any], tz: str | None) -> datetime:
    """A timestamp column's raw Parquet value: days since 1970 (Date), or ticks since 1970
    UTC (Timestamp), shown in the column's time zone. (Arrow's own conversion of a
    timestamp imports pandas.) Bars fall on whole minutes: microseconds lose nothing."""
    epoch = datetime(1970, 1, 1)
    if logical.get("Type") == "Date":
        return epoch + timedelta(days=raw)
    at = epoch + timedelta(microseconds=raw * 10**6 // _TICKS_PER_SECOND[logical["timeUnit"]])
    return at if tz is None else at.replace(tzinfo=UTC).astimezone(ZoneInfo(tz))


CATALOGUE_NAME = "catalogue.fernet"
CATALOGUE_FORMAT = 1
# Read whole before it is known to be genuine, so bounded: sealed, an entry takes about
# 700 bytes, so this holds some 300,000 datasets. A larger one is not written (status then
# reads every file's footer: slower, as right).
MAX_CATALOGUE_BYTES = 256 << 20
_ENTRY_FIELDS = {"file": str, "size": int, "mtime_ns": int, "ctime_ns": int, "ino": int,
                 "key": str, "rows": int, "first_bar": str, "last_bar": str, "meta": dict}


STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")


def stat_of(st: os.stat_result) -> dict[str, int]:
    """What proves a catalogue entry still describes its file. The change time is in it
    because no one can set it back (utime sets the mtime, and stamps the ctime now): a
    file rewritten in place to the same size, its mtime reset, is still told apart."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino}


def _entry_sound(identity: str, entry: Any, naming_key: str) -> bool:
    """A catalogue entry with every field, of the types and forms status reads, for a
    dataset whose file it names, under its one spelling of the identity (invariant 1: a
    file is only ever the dataset its name is derived from, and has one entry)."""
    if not isinstance(entry, dict) or not all(type(entry.get(k)) is t  # True is no count
                                              for k, t in _ENTRY_FIELDS.items()):
        return False
    meta = entry["meta"]
    try:
        dataset = DatasetId.from_identity(identity)
        for bar in (entry["first_bar"], entry["last_bar"]):
            datetime.fromisoformat(bar)
        for moment in (meta.get("checked_at"), meta.get("stale_after")):
            if moment not in (None, "never") and datetime.fromisoformat(moment).tzinfo is None:
                return False  # compared with an aware "now"
    except (UsageError, TypeError, ValueError):
        return False
    return (dataset.identity == identity and entry["rows"] >= 0
            and (meta.get("gaps") is None or type(meta.get("gaps")) is int)
            and dataset_file_name(naming_key, dataset) == entry["file"])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused (ValueError) when it names a key twice: json keeps the last
    silently, and a second entry for one dataset is not one the store wrote."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key appears twice")
    return document


@dataclass(frozen=True)
class Listed:
    """A dataset file as the store lists it: its path relative to the data directory, its
    dataset and catalogue entry; unreadable, the error, and the dataset and entry the
    catalogue had for that name if any (a name is the dataset's: it still says which)."""

    file: str
    dataset: DatasetId | None = None
    entry: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Catalogue:
    """The encrypted index of the data directory (docs/FORMAT.md): each dataset's file,
    its (size, mtime_ns, ino) when summarised, and the summary status shows.

    A cache proven by stat: an entry counts only while its file's stat still matches, so
    a crash between a dataset write and the catalogue write costs speed, never
    correctness. Missing, undecryptable or malformed: empty, with `problem` saying so."""

    def __init__(self, entries: dict[str, dict[str, Any]], problem: str = "",
                 recorded: str | None = None) -> None:
        self.entries = entries
        self.problem = problem  # "missing" | "damaged" | ""
        self.recorded = recorded  # the naming key fingerprint it was written under, if read
        self._by_file = {e["file"]: (identity, e) for identity, e in entries.items()}

    @classmethod
    def load(cls, root: Path, ring: KeyRing, naming_key: str, dir_mode: int) -> Catalogue:
        try:
            document = cls._document(root, ring, dir_mode)
        except FileNotFoundError:
            return cls({}, "missing")
        except (OSError, OHLCVError, InvalidToken, ValueError, RecursionError):
            return cls({}, "damaged")  # a link, a FIFO, too large, not ours, not JSON
        entries = document.get("datasets") if isinstance(document, dict) else None
        recorded = cls._recorded(document)
        if (not isinstance(entries, dict) or document.get("format") != CATALOGUE_FORMAT
                or recorded != naming_fingerprint(naming_key)):
            return cls({}, "damaged", recorded)
        sound = {identity: e for identity, e in entries.items()
                 if _entry_sound(identity, e, naming_key)}
        return cls(sound, "" if len(sound) == len(entries) else "damaged", recorded)

    @staticmethod
    def _document(root: Path, ring: KeyRing, dir_mode: int) -> Any:
        """The catalogue's JSON: read by read_own_file's rules and at most
        MAX_CATALOGUE_BYTES, decrypted, parsed with no key twice in an object."""
        token, _ = read_own_file(root / CATALOGUE_NAME, MAX_CATALOGUE_BYTES, dir_mode,
                                 f"remove it (`rm {root / CATALOGUE_NAME}`): the next "
                                 "download rebuilds it from the dataset files.")
        return json.loads(ring.decrypt(token), object_pairs_hook=_unique_keys)

    @classmethod
    def naming_fingerprint(cls, root: Path, ring: KeyRing, dir_mode: int) -> str | None:
        """The fingerprint of the naming key the catalogue was written under; None when
        there is no readable catalogue."""
        try:
            return cls._recorded(cls._document(root, ring, dir_mode))
        except (OSError, OHLCVError, InvalidToken, ValueError, RecursionError):
            return None

    @staticmethod
    def _recorded(document: Any) -> str | None:
        """The naming key fingerprint a parsed catalogue records, if it records one."""
        written = document.get("naming_key") if isinstance(document, dict) else None
        return written if isinstance(written, str) else None

    @classmethod
    def identities(cls, root: Path, ring: KeyRing, dir_mode: int) -> dict[str, tuple[str, dict[str, Any]]]:
        """Each file the catalogue names, whatever naming key it was written under, with the
        identity and entry it records (for --migrate-store: trusted only where proves()
        holds); empty when there is no readable catalogue."""
        try:
            entries = cls._document(root, ring, dir_mode).get("datasets")
        except (OSError, OHLCVError, InvalidToken, ValueError, RecursionError, AttributeError):
            return {}
        if not isinstance(entries, dict):
            return {}
        named = {}
        for identity, entry in entries.items():
            try:
                if (DatasetId.from_identity(identity).identity == identity
                        and isinstance(entry, dict) and isinstance(entry.get("file"), str)
                        and all(type(entry.get(k)) is int for k in STAT_FIELDS)):
                    named[entry["file"]] = (identity, entry)
            except UsageError:
                continue
        return named

    def named(self, file: str) -> tuple[str, dict[str, Any]] | None:
        """The identity and entry recorded for `file`, proven or not."""
        return self._by_file.get(file)

    def proven(self, file: str, st: os.stat_result) -> tuple[str, dict[str, Any]] | None:
        """The identity and entry of `file` when its stat still matches the entry's."""
        known = self._by_file.get(file)
        return known if known is not None and self.proves(known[1], st) else None

    @staticmethod
    def proves(entry: dict[str, Any], st: os.stat_result) -> bool:
        """Whether `entry` was made of the very file `st` describes."""
        return all(entry[k] == v for k, v in stat_of(st).items())

    @staticmethod
    def save(root: Path, ring: KeyRing, naming_fp: str, listed: list[Listed],
             file_mode: int) -> None:
        """Write the catalogue of `listed` under the primary key (hold the data lock).
        One larger than readers accept is not written: the one in place stays, proven
        entry by entry, and readers read the rest from the files."""
        entries = {x.dataset.identity: x.entry for x in listed if x.dataset and x.entry}
        document = {"format": CATALOGUE_FORMAT, "written_at": utc_now_iso(),
                    "naming_key": naming_fp, "datasets": entries}
        sealed = ring.encrypt(json.dumps(document).encode())
        if len(sealed) > MAX_CATALOGUE_BYTES:
            log.warning("the catalogue of %d datasets would take %d bytes, over the %d "
                        "readers accept: not rewritten; status reads the files' footers",
                        len(entries), len(sealed), MAX_CATALOGUE_BYTES)
            return
        atomic_write(root / CATALOGUE_NAME, sealed, file_mode)


def store_naming_problem(root: Path, ring: KeyRing, dir_mode: int) -> str | None:
    """Why `ring` cannot name the files of the store at `root` (naming_key_lacking), or
    None: a ring without a naming key before a store that holds dataset files or a
    catalogue (a naming key made now would orphan them all), or a catalogue written under
    another naming key."""
    if ring.naming is None:
        if dataset_files(root) or os.path.lexists(root / CATALOGUE_NAME):
            return naming_key_lacking(Catalogue.naming_fingerprint(root, ring, dir_mode))
        return None
    recorded = Catalogue.naming_fingerprint(root, ring, dir_mode)
    return naming_key_lacking(recorded) if recorded not in (None, ring.naming.fingerprint) else None


Decoded = TypeVar("Decoded")  # what EncryptedStore makes of a decrypted table


class EncryptedStore:
    """Datasets on disk: one Fernet token per file, written atomically, 0600 in 0700 dirs,
    named by dataset_file under the ring's naming key, indexed by the catalogue."""

    # Dataset files this process has decrypted, all stores together: status from a fresh
    # catalogue must decrypt none (tests count it).
    decrypted = 0

    def __init__(self, settings: Settings, key_ring: KeyRing, renaming: bool = False) -> None:
        """`renaming`: for --migrate-store alone, which renames files named under another
        naming key; every other command stops on such a store before it reads or writes."""
        self.root = settings.data_dir
        self.key_ring = key_ring
        self.file_mode = settings.file_mode
        self.dir_mode = settings.dir_mode
        self.lock_timeout = settings.lock_timeout
        self.disk_floor = settings.min_free_disk_mb * 2**20
        if uses_earlier_layout(self.root):
            raise ConfigError(EARLIER_LAYOUT)
        if key_ring.naming is None:
            raise ConfigError(store_naming_problem(self.root, key_ring, self.dir_mode)
                              or "the key ring has no naming key: " + EARLIER_LAYOUT)
        fan_out_dirs(self.root, self.dir_mode)  # one planted or loosened stops the command
        self.naming_key = key_ring.naming.key
        self.naming_fp = naming_fingerprint(self.naming_key)
        self._written: dict[str, Listed] = {}  # this store's writes: catalogue entries at hand
        self._catalogue: tuple[tuple[int, ...] | None, Catalogue] | None = None
        recorded = self.catalogue().recorded  # read once here, reused by listing and writers
        if not renaming and recorded not in (None, self.naming_fp):
            raise ConfigError(naming_key_lacking(recorded))

    def path(self, dataset: DatasetId) -> Path:
        return self.root / dataset_file(self.naming_key, dataset)

    def relative(self, path: Path) -> str:
        if path.parent.parent == self.root:  # a dataset file: its fan-out directory and name
            return f"{path.parent.name}/{path.name}"
        return path.relative_to(self.root).as_posix()

    def lock(self) -> DataDirLock:
        """The exclusive write lock of this data directory."""
        check_private_dir(self.root, self.dir_mode)
        return DataDirLock(self.root, self.lock_timeout, self.file_mode)

    def write(self, dataset: DatasetId, frame: pd.DataFrame, meta: dict[str, Any]) -> int:
        """Encrypt and store `frame`; returns the bytes written. Hold `lock()` around it."""
        path = self.path(dataset)
        ensure_private_dir(path.parent, self.dir_mode)
        meta = dict(meta, symbol=dataset.symbol, dataset=dataset.name, written_at=utc_now_iso())
        if dataset.month is not None:  # the file names its own identity: the catalogue's source
            meta["month"] = dataset.month
        token = self.key_ring.encrypt(encode_table(frame, meta))
        require_free_disk(path.parent, self.disk_floor, len(token))
        atomic_write(path, token, self.file_mode)
        if len(frame):  # what its footer would say, so the catalogue need not decrypt it again
            stamps = frame["timestamp"]
            file = self.relative(path)
            self.record(Listed(file, dataset, stat_of(path.lstat()) | {
                "file": file, "key": self.key_ring.primary.fingerprint, "rows": len(frame),
                "first_bar": stamps.min().to_pydatetime().isoformat(),
                "last_bar": stamps.max().to_pydatetime().isoformat(),
                "meta": json.loads(json.dumps(dict(meta, schema_version=SCHEMA_VERSION)))}))
        return len(token)

    def record(self, listed: Listed) -> None:
        """A writer's catalogue entry for a file it just wrote, trusted while its stat holds."""
        self._written[listed.file] = listed

    def read(self, dataset: DatasetId) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Decrypt a dataset. FileNotFoundError when absent, IntegrityError when unreadable."""
        return self._decrypted(self.path(dataset), decode_table, dataset)

    def read_file(self, path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
        return self._decrypted(path, decode_table)

    def rows(self, dataset: DatasetId) -> int:
        """A dataset's row count, from its Parquet footer (no bars decoded)."""
        return self._decrypted(self.path(dataset), summarise_table, dataset).rows

    def _decrypted(self, path: Path, decode: Callable[[bytes], Decoded],
                   dataset: DatasetId | None = None) -> Decoded:
        token, _ = read_dataset_file(path, self.dir_mode)
        EncryptedStore.decrypted += 1
        shown = f"{path} ({dataset})" if dataset else str(path)  # the name alone says nothing
        try:
            return decode(self.key_ring.decrypt(token))
        except InvalidToken:
            raise IntegrityError(f"{shown} does not decrypt with the key ring "
                                 f"({', '.join(self.key_ring.fingerprints())}): altered, "
                                 "truncated, or written under a key that is not in the ring.") from None
        except ValueError as exc:
            raise IntegrityError(f"{shown} decrypts but is not a dataset: {exc}.") from None

    def read_days(self, dataset: DatasetId) -> tuple[np.ndarray, dict[str, Any]]:
        """A dataset's bar dates and metadata (table_days)."""
        return self._decrypted(self.path(dataset), table_days, dataset)

    def catalogue(self) -> Catalogue:
        """The catalogue, decrypted once per version of its file (memoised by its stat)."""
        try:
            version: tuple[int, ...] | None = tuple(stat_of(os.lstat(self.root / CATALOGUE_NAME)).values())
        except FileNotFoundError:
            version = None
        if self._catalogue is None or self._catalogue[0] != version:
            self._catalogue = (version, Catalogue.load(self.root, self.key_ring, self.naming_key,
                                                       self.dir_mode))
        return self._catalogue[1]

    def listing(self, catalogue: Catalogue | None = None) -> list[Listed]:
        """Every dataset file, in identity order (unreadable ones last), with its entry:
        the catalogue's where the file's stat proves it, else one read from its footer."""
        catalogue = catalogue or self.catalogue()
        listed = []
        for path in dataset_files(self.root):
            file = self.relative(path)
            try:
                st = path.lstat()
                known = catalogue.proven(file, st)
                written = self._written.get(file)
                if known is None and written and Catalogue.proves(written.entry, st):
                    listed.append(written)
                    continue
                listed.append(Listed(file, DatasetId.from_identity(known[0]), known[1])
                              if known else self._summarised(path, file))
            except FileNotFoundError:
                continue  # removed by a writer since the directory was read
            except (IntegrityError, UnsafePathError) as exc:  # unreadable: named, not hidden
                known = catalogue.named(file)
                listed.append(Listed(file, DatasetId.from_identity(known[0]), known[1], str(exc))
                              if known else Listed(file, error=str(exc)))
        return sorted(listed, key=lambda x: (x.dataset is None, x.dataset.identity if x.dataset else x.file))

    def footer(self, path: Path) -> tuple[DatasetId, TableSummary, str, os.stat_result]:
        """What a file's own footer says: the dataset it holds (wherever it lies), its
        summary, the fingerprint of the key it is under, the stat of the bytes read."""
        token, st = read_dataset_file(path, self.dir_mode)
        EncryptedStore.decrypted += 1
        plaintext, key_fp = self.key_ring.decrypt_with_fingerprint(token, path)
        try:
            summary = summarise_table(plaintext)
            return DatasetId.from_meta(summary.meta, summary.first_bar), summary, key_fp, st
        except ValueError as exc:
            raise IntegrityError(f"{path} decrypts but is not a dataset: {exc}.") from None

    def check_named(self, path: Path, dataset: DatasetId) -> None:
        """IntegrityError unless `path` is the name the naming key gives `dataset`."""
        if self.path(dataset) != path:
            raise IntegrityError(f"{path} holds {dataset}, whose file under this naming key is "
                                 f"{self.relative(self.path(dataset))}: copied or renamed by "
                                 "hand. Fix: run `python secure_ohlcv_downloader.py "
                                 "--migrate-store`: it puts every dataset back in its place.")

    def _summarised(self, path: Path, file: str) -> Listed:
        """A file's catalogue entry from its own footer (the stat is of the bytes read)."""
        dataset, summary, key_fp, st = self.footer(path)
        self.check_named(path, dataset)
        meta = {k: v for k, v in summary.meta.items() if k != "scales"}
        return Listed(file, dataset, stat_of(st) | {
            "file": file, "key": key_fp, "rows": summary.rows,
            "first_bar": summary.first_bar.isoformat(), "last_bar": summary.last_bar.isoformat(),
            "meta": meta})

    def datasets(self) -> Iterator[DatasetId]:
        """Every readable dataset in the store, in identity order."""
        return iter([x.dataset for x in self.listing() if x.dataset is not None])

    def save_catalogue(self, listed: list[Listed] | None = None) -> Catalogue:
        """Rewrite the catalogue from the previous one and the files changed since (their
        footers); once, at the end of a run that changed files, under the data lock.
        Returns the catalogue as it was found (its `problem` says if it was rebuilt)."""
        found = self.catalogue()
        listed = self.listing(found) if listed is None else listed
        entries = {x.dataset.identity: x.entry for x in listed if x.dataset and x.entry}
        if found.problem or entries != found.entries:  # a run that changed nothing leaves it
            Catalogue.save(self.root, self.key_ring, self.naming_fp, listed, self.file_mode)
        return found


def stored_frame(store: EncryptedStore, symbol: str, interval: str,
                 adjusted: bool) -> pd.DataFrame:
    """One dataset's table; for intraday, its month files joined in order."""
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


def load_frame(store: EncryptedStore, symbol: str, interval: str, adjusted: bool,
               start: str | date | None, end: str | date | None) -> pd.DataFrame:
    """The stored bars of one symbol as a DataFrame indexed by timestamp, oldest first."""
    if start is not None and end is not None:  # refused before any file is read
        none = pd.Series([], dtype="datetime64[ns]")
        with contextlib.suppress(TypeError):  # one bound with a UTC offset, one without
            if _bound(start, none) > _bound(end, none):
                raise UsageError(f"--start {start} is after --end {end}: nothing could "
                                 "match. Fix: give the earlier day as --start.")
    frame = stored_frame(store, symbol, interval, adjusted)
    stamps = frame["timestamp"]
    if start is not None:
        frame = frame[stamps >= _bound(start, stamps)]
    if end is not None:
        frame = frame[frame["timestamp"] < _bound(end, stamps) + pd.Timedelta(days=1)]
    return frame.set_index("timestamp")


def load_many(store: EncryptedStore, symbols: list[str], interval: str,
              adjusted: bool) -> pd.DataFrame:
    """Many symbols' bars in one DataFrame: columns `symbol` (categorical), `timestamp`
    and the bars, symbol by symbol, oldest first.

    Memory stays near the result's own size: a first pass reads only each file's row
    count, the columns are allocated once, and each dataset is decoded straight into
    its slice, so no per-symbol frame or concatenation copy is ever held."""
    if interval in INTRADAY:
        raise UsageError("load_many takes daily, weekly or monthly bars; use load() "
                         "for intraday months.")
    datasets = [DatasetId(s, interval, adjusted) for s in symbols]
    counts = [pq.ParquetFile(pa.BufferReader(_plaintext(store, d))).metadata.num_rows
              for d in datasets]
    columns: dict[str, np.ndarray] = {}
    offset = 0
    for dataset, count in zip(datasets, counts, strict=True):
        table, _ = decode_arrow(_plaintext(store, dataset))
        for name in table.column_names:
            values = table[name].to_numpy()
            if name not in columns:
                columns[name] = np.empty(sum(counts), dtype=values.dtype)
            columns[name][offset:offset + count] = values
        offset += count
    codes = np.repeat(np.arange(len(datasets), dtype="int32"), counts)
    symbol = pd.Categorical.from_codes(codes, [d.symbol for d in datasets])
    return pd.DataFrame({"symbol": symbol, **columns}, copy=False)


def _plaintext(store: EncryptedStore, dataset: DatasetId) -> bytes:
    path = store.path(dataset)
    try:
        return store.key_ring.decrypt(read_dataset_file(path, store.dir_mode)[0])
    except FileNotFoundError:
        raise UsageError(f"nothing stored for {dataset}: download it first.") from None
    except InvalidToken:
        raise IntegrityError(f"{path} ({dataset}) does not decrypt with the key ring.") from None


def _bound(value: str | date, stamps: pd.Series) -> pd.Timestamp:
    try:
        bound = pd.Timestamp(value)
    except ValueError:
        raise UsageError(f"invalid date {value!r}: use YYYY-MM-DD.") from None
    if stamps.dt.tz is not None and bound.tz is None:
        bound = bound.tz_localize(stamps.dt.tz)
    return bound


@dataclass
class RunContext:
    """What a command's body gets: the settings, key custody, the resource monitor, where
    notes go, and the facts it leaves for the metrics file. Command bodies take this,
    never the front door, so calls only go down the file."""

    settings: Settings
    custody: KeyCustody
    monitor: ResourceMonitor
    warnings: list[str]
    notify: Callable[[str], None] = log.warning  # the CLI also shows these on stderr
    # Passing notes for a person watching (a retry being waited for): the CLI sets it on
    # a terminal only, so cron's output stays the result lines and the summary.
    progress: Callable[[str], None] | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], datetime] = utc_now  # "now" for a download; tests set their own

    @classmethod
    def build(cls, settings: Settings, keyring_store: KeyringKeyStore | None = None) -> RunContext:
        warnings = list(settings.warnings)
        return cls(settings, KeyCustody(settings, keyring_store, warnings),
                   ResourceMonitor(settings), warnings)

    def check_dirs(self) -> None:
        """Every directory a command uses must be ours, no link, and no looser than
        configured: a loose one is reported (UnsafePathError, exit 3), never used."""
        s = self.settings
        for directory in (s.data_dir, s.state_dir, s.backup_dir):
            if os.path.lexists(directory) or directory != s.backup_dir:
                try:
                    check_private_dir(directory, s.dir_mode)
                except FileNotFoundError:
                    raise UsageError(f"{directory} does not exist. Fix: run "
                                     "`python secure_ohlcv_downloader.py --init`.") from None

    def store(self) -> EncryptedStore:
        """The store for reading; writers use `exclusive()`."""
        self.check_dirs()
        return EncryptedStore(self.settings, self.custody.ring())

    @contextlib.contextmanager
    def locked(self, record: bool = True, remove_temps: bool = True) -> Iterator[None]:
        """The data-directory lock. Temp files found under it are crashed writers' and go
        (cleanup reports them instead)."""
        s = self.settings
        self.check_dirs()
        with DataDirLock(s.data_dir, s.lock_timeout, s.file_mode, record, self.notify):
            if remove_temps:
                remove_temp_files(s.data_dir)
            yield

    @contextlib.contextmanager
    def exclusive(self, record: bool = True, reload_keys: bool = True,
                  remove_temps: bool = True) -> Iterator[KeyRing]:
        """The lock, then the key ring as stored *now*: a run that waited while another
        rotated the keys must not write under the ring it read before."""
        with self.locked(record, remove_temps):
            yield self.custody.reload() if reload_keys else self.custody.ring()


# =========================================================================================
# 9. Downloader: what to fetch, how to merge, what is left
# =========================================================================================

# The exchange each of Alpha Vantage's symbol forms trades on (IBM, TSCO.LON, SHOP.TRT,
# GPV.TRV, MBG.DEX, RELIANCE.BSE, 600104.SHH, 000002.SHZ), by exchange_calendars' names.
# The TSX Venture keeps the TSX's holidays and Shenzhen Shanghai's: one calendar each pair.
EXCHANGE_OF_SUFFIX = {"": "XNYS", "LON": "XLON", "TRT": "XTSE", "TRV": "XTSE",
                      "DEX": "XETR", "BSE": "XBOM", "SHH": "XSHG", "SHZ": "XSHG"}
# Alpha Vantage's histories begin in 1999; a calendar built further back only costs time.
CALENDAR_START = "1998-01-02"
# A session's bar is on Alpha Vantage this long after the session closes.
PUBLISHED_AFTER_CLOSE = timedelta(minutes=30)


class ExchangeCalendar:
    """One exchange's sessions and closes (early closes included), from exchange_calendars.
    It knows the dates from CALENDAR_START to `last` (the end of next year, less for
    exchanges whose holidays the library lists only so far); past `last` it answers None
    and callers fall back to counting weekdays."""

    def __init__(self, code: str, zone: str, sessions: np.ndarray, opens: np.ndarray,
                 closes: np.ndarray) -> None:
        self.code = code
        self.zone = ZoneInfo(zone)
        # Sorted session dates (datetime64[D]), each session's open and close as UTC ns.
        self.sessions = sessions
        self.opens = opens
        self.closes = closes
        self.first = self.sessions[0].item()
        self.last = self.sessions[-1].item()

    @classmethod
    def build(cls, code: str, until: date) -> ExchangeCalendar:
        """The calendar from exchange_calendars (pandas imported, ~0.4 s in all): up to
        `until`, or as far as the library knows this exchange's holidays."""
        with warnings.catch_warnings():
            # exchange_calendars 4.13 uses pandas APIs pandas 3.1 deprecates (its warning,
            # not ours: nothing an operator or a test of ours could act on).
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                calendar = xcals.get_calendar(code, start=CALENDAR_START, end=until.isoformat())
            except ValueError:  # past the exchange's bound_max: the library's own end
                calendar = xcals.get_calendar(code, start=CALENDAR_START)
        return cls(code, str(calendar.tz), calendar.sessions.values.astype("datetime64[D]"),
                   calendar.opens.dt.tz_convert(None).to_numpy("datetime64[ns]").astype(np.int64),
                   calendar.closes.dt.tz_convert(None).to_numpy("datetime64[ns]").astype(np.int64))

    def knows(self, day: date) -> bool:
        return self.first <= day <= self.last

    def is_session(self, day: date) -> bool:
        index = int(np.searchsorted(self.sessions, np.datetime64(day, "D")))
        return index < len(self.sessions) and self.sessions[index].item() == day

    def sessions_between(self, first: date, last: date) -> np.ndarray:
        """The sessions from `first` to `last`, both included (datetime64[D], sorted)."""
        lo, hi = np.searchsorted(self.sessions, [np.datetime64(first, "D"),
                                                 np.datetime64(last, "D")], side="left")
        if hi < len(self.sessions) and self.sessions[hi].item() == last:
            hi += 1
        return self.sessions[lo:hi]

    def close_of(self, day: date) -> datetime:
        """When the session `day` closes (it must be a session)."""
        index = int(np.searchsorted(self.sessions, np.datetime64(day, "D")))
        return datetime.fromtimestamp(int(self.closes[index]) / 1e9, UTC)

    def latest_opened_session(self, now: datetime) -> date | None:
        """The newest session that has opened by `now` (its intraday bars have begun);
        None when `now` is past what the calendar knows."""
        return self._newest_by(self.opens, now, now)

    def latest_published_session(self, now: datetime) -> date | None:
        """The newest session whose bar Alpha Vantage has published by `now`; None when
        `now` is past what the calendar knows."""
        return self._newest_by(self.closes, now - PUBLISHED_AFTER_CLOSE, now)

    def _newest_by(self, moments: np.ndarray, cutoff: datetime, now: datetime) -> date | None:
        """The newest session whose moment (open or close, UTC ns) is at or before `cutoff`."""
        if now.astimezone(self.zone).date() > self.last:
            return None
        index = int(np.searchsorted(moments, cutoff.timestamp() * 1e9, side="right")) - 1
        return self.sessions[index].item() if index >= 0 else None


_calendars: dict[str, ExchangeCalendar] = {}
_unknown_suffixes: set[str] = set()
_calendars_lock = threading.Lock()


def calendar_for(symbol: str, settings: Settings | None = None) -> ExchangeCalendar | None:
    """The calendar of the exchange `symbol` trades on, made once per process; None for
    a suffix no calendar is known for (said once in the log: weekdays are used). With
    `settings`, made from the copy cached in the state directory when it is sound (the
    gap report then imports neither pandas nor exchange_calendars), else built and cached."""
    _, dot, suffix = symbol.rpartition(".")
    code = EXCHANGE_OF_SUFFIX.get(suffix if dot else "")
    with _calendars_lock:
        if code is None:
            if suffix not in _unknown_suffixes:
                _unknown_suffixes.add(suffix)
                log.info("no exchange calendar for symbols ending .%s (%s): sessions are "
                         "counted as weekdays, holidays learned from the API",
                         outside_text(suffix), outside_text(symbol))
            return None
        if code not in _calendars:
            until = date(utc_now().year + 1, 12, 31)
            if settings is None:
                _calendars[code] = ExchangeCalendar.build(code, until)
            else:
                _calendars[code] = CalendarCache(settings.state_dir,
                                                 settings.file_mode).calendar(code, until)
        return _calendars[code]


class CalendarCache:
    """Each exchange's sessions, opens and closes as a small JSON file in the state
    directory (`calendar-XNYS.json`, 0600), so that a fresh process reads ~100 KB instead
    of importing pandas and exchange_calendars and building the calendar (~0.4 s of a
    gap report's 2 s). The file is a copy, never an authority: it is used only when it was
    made by the installed exchange_calendars version, from CALENDAR_START, up to the same
    end of year (a calendar is built to the end of next year, so a copy serves a year and
    a fresh build would give exactly the same sessions), and when it is sound (a regular
    private file of ours, not a link, sessions and times in order). Anything else is
    rebuilt and replaced; a cache that cannot be written costs only the time."""

    MAX_BYTES = 4 * 2**20  # a calendar from 1998 is ~0.4 MB; anything larger is not ours

    def __init__(self, directory: Path, file_mode: int) -> None:
        self.directory = directory
        self.file_mode = file_mode

    def calendar(self, code: str, until: date) -> ExchangeCalendar:
        key = {"exchange": code, "library": _calendar_library_version(),
               "start": CALENDAR_START, "until": until.isoformat()}
        path = self.directory / f"calendar-{code}.json"
        cached = self._read(path, key)
        if cached is not None:
            return cached
        calendar = ExchangeCalendar.build(code, until)
        document = dict(key, zone=str(calendar.zone),
                        sessions=calendar.sessions.astype(np.int64).tolist(),
                        opens=(calendar.opens // 10**9).tolist(),
                        closes=(calendar.closes // 10**9).tolist())
        try:
            atomic_write(path, json.dumps(document, separators=(",", ":")).encode(),
                         self.file_mode, durable=False)
        except OSError as exc:
            log.info("could not cache the %s calendar in %s: %s", code, path, exc.strerror)
        return calendar

    def _read(self, path: Path, key: dict[str, str]) -> ExchangeCalendar | None:
        """The cached calendar, or None when the file is absent, unsafe or not the one
        `key` describes (logged, except absent)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.info("calendar cache %s not used (%s): rebuilding it", path, exc.strerror)
            return None
        with open(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                    or stat.S_IMODE(info.st_mode) & 0o077 or info.st_size > self.MAX_BYTES):
                log.info("calendar cache %s is not a private file of ours: rebuilding it", path)
                return None
            data = handle.read(self.MAX_BYTES + 1)
        try:
            return self._calendar_of(json.loads(data), key)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            log.info("calendar cache %s not used (%s): rebuilding it", path, outside_text(exc))
            return None

    @staticmethod
    def _calendar_of(document: dict[str, Any], key: dict[str, str]) -> ExchangeCalendar | None:
        if {k: document.get(k) for k in key} != key:
            return None  # another library version or range: silently replaced
        columns = [document[name] for name in ("sessions", "opens", "closes")]
        if (not columns[0] or len({len(c) for c in columns}) != 1
                or not all(type(v) is int for column in columns for v in column)):
            raise ValueError("sessions, opens and closes must be lists of whole numbers "
                             "of one length")
        sessions, opens, closes = (np.array(c, dtype=np.int64) for c in columns)
        if not (np.all(np.diff(sessions) > 0) and np.all(opens < closes)
                and np.all(closes[:-1] < opens[1:])
                and sessions[0] >= np.datetime64(CALENDAR_START, "D").astype(np.int64)):
            raise ValueError("sessions or times out of order")
        return ExchangeCalendar(key["exchange"], str(document["zone"]),
                                sessions.astype("datetime64[D]"), opens * 10**9, closes * 10**9)


def _calendar_library_version() -> str:
    """exchange_calendars' installed version, read without importing it (or pandas)."""
    import importlib.metadata

    return importlib.metadata.version("exchange-calendars")


@dataclass(frozen=True)
class Gaps:
    """A dataset's bar dates against its exchange's sessions: sessions with no bar (weekly
    and monthly: the last session of a period with no bar), and bars dated on days the
    exchange was closed. `unchecked` says which dates were not judged, and why."""

    missing: tuple[date, ...] = ()
    closed: tuple[date, ...] = ()
    unchecked: str = ""
    checked: bool = True  # False: no calendar, nothing judged

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.closed)


def find_gaps(days: np.ndarray, interval: str, calendar: ExchangeCalendar | None,
              month: str | None = None) -> Gaps:
    """The gaps of one dataset whose bars fall on `days` (datetime64[D], sorted; an
    intraday month's repeat) between its first and last bar. An intraday month is checked
    from its first day: a session of the month before the first bar has no bars at all.
    Sessions after the last bar are currency (status's STALE), not gaps."""
    if calendar is None:
        return Gaps(unchecked="no exchange calendar for this symbol's suffix", checked=False)
    if not len(days):
        return Gaps()
    days = days[np.append(True, days[1:] != days[:-1])]  # sorted: one of each date
    first, last = days[0].item(), days[-1].item()
    if month is not None:
        first = min(first, date(int(month[:4]), int(month[5:]), 1))
    lo, hi = max(first, calendar.first), min(last, calendar.last)
    unchecked = ""
    if (lo, hi) != (first, last):  # the calendar covers CALENDAR_START to about a year ahead
        unchecked = (f"dates outside {calendar.first}..{calendar.last}, the {calendar.code} "
                     "calendar's range, not checked")
        days = days[(days >= np.datetime64(lo, "D")) & (days <= np.datetime64(hi, "D"))]
        if lo > hi or not len(days):
            return Gaps(unchecked=unchecked)
    sessions = calendar.sessions_between(lo, hi)
    if interval not in ("weekly", "monthly") and np.array_equal(days, sessions):
        return Gaps(unchecked=unchecked)  # a whole history: a bar on every session, no other
    closed = days[~_among(days, sessions)]
    if interval in ("weekly", "monthly") and len(sessions):
        # A period's bar is dated on its last session; the newest period's (perhaps still
        # running) on the last session up to its bar, which sessions_between ends at.
        if interval == "weekly":  # Monday-based weeks: day 4 since 1970 is a Monday
            period = (sessions.astype(np.int64) - 4) // 7
        else:
            period = sessions.astype("datetime64[M]").astype(np.int64)
        sessions = sessions[np.append(period[1:] != period[:-1], True)]
    missing = sessions[~_among(sessions, days)]
    return Gaps(tuple(missing.tolist()), tuple(closed.tolist()), unchecked)


def _among(values: np.ndarray, dates: np.ndarray) -> np.ndarray:
    """Which of `values` are in `dates` (datetime64[D]): a lookup table over their days,
    3x faster than a binary search for a history (bench: the gaps scenario)."""
    return np.isin(values.view(np.int64), dates.view(np.int64), kind="table")


def frame_gaps(dataset: DatasetId, frame: pd.DataFrame) -> Gaps | None:
    """The gaps of a table in hand; None when no calendar covers the symbol."""
    calendar = calendar_for(dataset.symbol)
    if calendar is None:
        return None
    stamps = frame["timestamp"]
    if stamps.dt.tz is not None:  # intraday: the bar's date where it trades
        stamps = stamps.dt.tz_localize(None)
    days = stamps.to_numpy().astype("datetime64[D]")
    return find_gaps(days, dataset.interval, calendar, dataset.month)


def gap_count(dataset: DatasetId, frame: pd.DataFrame) -> int | None:
    """The number of gaps of a table about to be stored (its metadata's `gaps`, which
    status shows without reading a bar); None when no calendar covers the symbol."""
    found = frame_gaps(dataset, frame)
    return None if found is None else found.count


def vendor_gaps_of(meta: dict[str, Any]) -> set[date]:
    """The gap dates a repair found the vendor itself lacks (metadata `vendor_gaps`)."""
    return {date.fromisoformat(d) for d in (meta.get("vendor_gaps") or {}).get("dates", ())}


# The dates a result or gap-report line names; its counts are whole (gaps --json lists all).
DATES_SHOWN = 10


def dates_text(dates: Iterable[date]) -> str:
    listed = sorted(dates)
    return ", ".join(d.isoformat() for d in listed[:DATES_SHOWN]) + (
        f" and {len(listed) - DATES_SHOWN} more" if len(listed) > DATES_SHOWN else "")


@dataclass(frozen=True)
class Repair:
    """What `download --repair-gaps` did about one dataset's gaps."""

    filled: tuple[date, ...] = ()   # sessions missing before that have a bar now
    removed: tuple[date, ...] = ()  # bars on closed days the vendor no longer sends
    vendor: tuple[date, ...] = ()   # gaps left after the whole history: the vendor's own
    fetched: bool = True            # False: only recorded vendor gaps, no request
    whole_history: bool = True      # False: the plan refused outputsize=full
    recorded_at: str = ""           # when the vendor gaps were found (not fetched)

    @classmethod
    def of(cls, had: Gaps, left: set[date], whole: bool) -> Repair:
        """From the gaps a history `had` and those `left` after the fetch; only the
        whole history (`whole`) can tell that what is left is the vendor's."""
        return cls(filled=tuple(sorted(set(had.missing) - left)),
                   removed=tuple(sorted(set(had.closed) - left)),
                   vendor=tuple(sorted(left)) if whole else (), whole_history=whole)

    def text(self) -> str:
        if not self.fetched:
            return "no gap to repair" + (
                f"; the vendor lacks {len(self.vendor)} (recorded {self.recorded_at}, not "
                f"fetched again): {dates_text(self.vendor)}" if self.vendor else "")
        done = [f"{what} {len(dates)} {noun}: {dates_text(dates)}" for what, noun, dates in (
            ("filled", "missing session(s)", self.filled),
            ("removed", "bar(s) on closed days", self.removed)) if dates] or ["nothing filled"]
        if not self.whole_history:
            return "repair: " + "; ".join(done) + (
                "; could not see the whole history: this key's plan refuses outputsize=full, "
                "so nothing is recorded as the vendor's. Fix: repair with a premium key")
        left = (f"the vendor lacks {len(self.vendor)} (recorded, not fetched again): "
                f"{dates_text(self.vendor)}" if self.vendor else "no gap left")
        return "repair: " + "; ".join(done + [left])


# For an exchange the calendar does not know (an unknown suffix, a date past what the
# library knows) sessions are weekdays in New York, and holidays are learned from the API:
# a check made this long after the close that found no new bar means there was no session.
SESSION_CLOSE = dt_time(16, 30)
HOLIDAY_GRACE = timedelta(hours=2)
COMPACT_BARS = 100
COMPACT_MAX_GAP = 90  # weekdays; leaves room for holidays inside the 100-bar window
# An intraday answer carries extended hours: a session's last bars start up to four hours
# after its close (16:00-20:00 in New York, 13:00-17:00 after an early close).
EXTENDED_HOURS = timedelta(hours=4)


def latest_session(now: datetime | None = None) -> date:
    """By weekdays alone: the newest weekday whose bar should be published by `now` (for
    an exchange no calendar knows)."""
    now = (now or datetime.now(UTC)).astimezone(MARKET_TZ)
    day = now.date() if now.time() >= SESSION_CLOSE else now.date() - timedelta(days=1)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def weekdays_between(start: date, end: date) -> int:
    """Weekdays after `start` up to and including `end`."""
    return int(np.busday_count(start + timedelta(days=1), end + timedelta(days=1)))


def weekday_current(last_bar: date | None, checked_at: str | None, now: datetime) -> bool:
    """By weekdays alone: the bars reach latest_session(now), or a check made after its
    close (plus HOLIDAY_GRACE) found nothing newer: the API taught us a holiday."""
    expected = latest_session(now)
    if last_bar is not None and last_bar >= expected:
        return True
    close = datetime.combine(expected, SESSION_CLOSE, MARKET_TZ) + HOLIDAY_GRACE
    return bool(checked_at) and datetime.fromisoformat(checked_at or "") >= close


def month_end(month: str) -> datetime:
    """By weekdays alone: an intraday month is final once it has ended in New York (plus
    HOLIDAY_GRACE)."""
    year, number = map(int, month.split("-"))
    following = date(year + number // 12, number % 12 + 1, 1)
    return datetime.combine(following, dt_time(0), MARKET_TZ) + HOLIDAY_GRACE


def _publishing_delay(dataset: DatasetId) -> timedelta:
    """How long after a session's close its bars of `dataset` are all on Alpha Vantage."""
    return PUBLISHED_AFTER_CLOSE + (EXTENDED_HOURS if dataset.month else timedelta(0))


def expected_session(dataset: DatasetId, now: datetime) -> tuple[date, bool]:
    """The newest session whose bar of `dataset` is published by `now`, and whether its
    exchange's calendar says so (False: counted in weekdays, see latest_session)."""
    calendar = calendar_for(dataset.symbol)
    if calendar is not None:
        extra = _publishing_delay(dataset) - PUBLISHED_AFTER_CLOSE
        session = calendar.latest_published_session(now - extra)
        if session is not None:
            return session, True
    return latest_session(now), False


def is_current(dataset: DatasetId, last_bar: date | None, checked_at: str | None,
               now: datetime) -> bool:
    """Whether the stored bars of `dataset` end at the newest session published by `now`.
    No request is needed on a weekend or holiday: the calendar knows there was no session.
    Without a calendar, a check after the expected close that found nothing new also
    counts (the API taught us a holiday)."""
    expected, from_calendar = expected_session(dataset, now)
    if not from_calendar:
        return weekday_current(last_bar, checked_at, now)
    return last_bar is not None and last_bar >= expected


def month_final_at(dataset: DatasetId) -> datetime:
    """When the bars of an intraday month are all published: after its last session's
    extended hours, by its exchange's calendar; without one, after the month ends."""
    year, number = map(int, (dataset.month or "").split("-"))
    first, following = date(year, number, 1), date(year + number // 12, number % 12 + 1, 1)
    calendar = calendar_for(dataset.symbol)
    last_day = following - timedelta(days=1)
    if calendar is not None and calendar.knows(first) and calendar.knows(last_day):
        sessions = calendar.sessions_between(first, last_day)
        if len(sessions):
            return calendar.close_of(sessions[-1].item()) + _publishing_delay(dataset)
    return month_end(dataset.month or "")


def month_complete(dataset: DatasetId, checked_at: str | None) -> bool:
    """An intraday month checked after its last session's bars were published is final."""
    return bool(dataset.month and checked_at) and \
        datetime.fromisoformat(checked_at or "") >= month_final_at(dataset)


def stale_after(dataset: DatasetId, last_bar: date, checked_at: datetime) -> str | None:
    """What the file's metadata records for `status` (which reads no calendar): the UTC
    time its bars stop being current, when the next session's bar is published; "never"
    for an intraday month already final; None when no calendar knows (the file is then
    judged by weekdays)."""
    if dataset.month and checked_at >= month_final_at(dataset):
        return "never"
    calendar = calendar_for(dataset.symbol)
    if calendar is None or not calendar.knows(last_bar):
        return None
    following = calendar.sessions_between(last_bar + timedelta(days=1), calendar.last)
    if not len(following):
        return None
    published = calendar.close_of(following[0].item()) + _publishing_delay(dataset)
    return published.astimezone(UTC).isoformat()


def compact_covers(dataset: DatasetId, last_bar: date | None, now: datetime) -> bool:
    """Whether the compact window (the newest COMPACT_BARS bars) reaches back to `last_bar`."""
    if last_bar is None:
        return False
    expected, from_calendar = expected_session(dataset, now)
    if not from_calendar:
        return weekdays_between(last_bar, expected) <= COMPACT_MAX_GAP
    calendar = calendar_for(dataset.symbol)
    assert calendar is not None  # from_calendar
    missing = calendar.sessions_between(last_bar + timedelta(days=1), expected)
    return len(missing) < COMPACT_BARS


@dataclass
class DatasetResult:
    """What one dataset's download did: one line of the command's output (an intraday
    download has one for each month file it wrote)."""

    dataset: DatasetId
    outcome: str  # updated | current | nothing_yet | failed | pending
    rows: int = 0
    added: int = 0
    last_bar: str = ""
    mode: str = ""  # compact | full | none
    seconds: float = 0.0
    error: str = ""
    partial_history: bool = False
    changed: bool = True  # updated: whether the stored bars differ from before the request
    repair: Repair | None = None  # download --repair-gaps: what became of the gaps

    def line(self) -> str:
        return self._outcome_line() + (f"; {self.repair.text()}" if self.repair else "")

    def _outcome_line(self) -> str:
        head = f"{self.dataset}: "
        if self.outcome == "failed":
            return head + f"FAILED: {self.error}"
        if self.outcome == "pending":
            return head + f"not reached: {self.error}; the next run does it first"
        if self.outcome == "current":
            return head + f"current, no request ({self.rows} rows, last bar {self.last_bar})"
        if self.outcome == "nothing_yet" and self.mode == "none":
            return head + (f"nothing yet: no session of {self.dataset.month} has opened "
                           "by its exchange's calendar; no request, nothing stored")
        if self.outcome == "nothing_yet":
            return head + (f"nothing yet: no bar of {self.dataset.month} in the answer (its "
                           "first session has not opened in New York); nothing stored, the "
                           "next run asks again")
        note = " (partial history: full history needs a premium key)" if self.partial_history else ""
        if not self.changed:  # asked (--full, a month not final): the same bars came back
            return (head + f"unchanged, {self.rows} rows, last bar {self.last_bar} "
                    f"[{self.mode}, {self.seconds:.2f} s]{note}")
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


def without_unsent(merged: pd.DataFrame, closed: tuple[date, ...],
                   whole: pd.DataFrame) -> pd.DataFrame:
    """`merged` without its bars on the closed days `closed` that the vendor's whole
    history (`whole`) no longer holds: merge_bars keeps every stored bar, but a bar on a
    day the exchange was closed is a mistake once its own source has dropped it. Bars older
    than the answer's first are kept: the vendor says nothing about them."""
    if not closed or whole.empty:
        return merged
    first = whole["timestamp"].min().date()
    gone = set(closed) - set(whole["timestamp"].dt.date)
    days = merged["timestamp"].dt.date
    return merged[~(days.isin(gone) & (days >= first))].reset_index(drop=True)


class DatasetDownloader:
    """Brings one dataset up to date: decide the request, fetch, parse, merge, store.

    Shared by the worker threads of a run; each call touches one dataset file only, so
    writes to one file are never concurrent."""

    def __init__(self, store: EncryptedStore, client: AlphaVantageClient,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self.client = client
        self.clock = clock  # read as each answer arrives: no bar may be dated after it
        self.full_refused = False  # learned once per run: this key's plan has no full history
        self.full_works = False    # learned once per run: it has
        self._full_probe = threading.Lock()
        self.refused_functions: dict[str, str] = {}
        self._warned = threading.Lock()

    def run(self, dataset: DatasetId, force_full: bool, now: datetime,
            trailing: bool = False, repair: bool = False) -> list[DatasetResult]:
        """Bring `dataset` up to date: one result per file written, oldest month first.
        `trailing` (intraday without --month): fetch the trailing 30 days and store every
        month they touch, so no month end is lost. `repair`: a stored history with a gap
        not recorded as the vendor's is fetched whole; what is left after it is."""
        started = time.monotonic()
        stored, meta = self._read(dataset)
        last_bar = None if stored is None or stored.empty else stored["timestamp"].iloc[-1].date()
        final_month = not meta.get("partial_history") and month_complete(dataset,
                                                                          meta.get("checked_at"))
        recorded = meta.get("vendor_gaps") or {}
        known = vendor_gaps_of(meta)
        had = frame_gaps(dataset, stored) if repair and stored is not None else None
        repairing = had is not None and bool(set(had.missing + had.closed) - known)
        force_full = force_full or repairing
        note = None if had is None or repairing else Repair(
            vendor=tuple(sorted(known)), fetched=False, recorded_at=recorded.get("checked_at", ""))
        if not force_full and stored is not None and (
                is_current(dataset, last_bar, meta.get("checked_at"), now) or final_month):
            return [DatasetResult(dataset, "current", len(stored), 0, str(last_bar), "none",
                                  repair=note)]
        if not force_full and stored is None and self._nothing_to_ask(dataset, now, trailing):
            return [DatasetResult(dataset, "nothing_yet", mode="none")]
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
        # The run's clock, the one `now` is read from: a check is judged against it later.
        checked = self.clock().astimezone(UTC).replace(microsecond=0)
        meta = {"checked_at": checked.isoformat(), "partial_history": partial,
                "function": request.function}
        parts = {dataset: fresh}
        if trailing:  # every month the trailing window touched, each into its own file
            parts = {replace(dataset, month=month): part.reset_index(drop=True)
                     for month, part in fresh.groupby(fresh["timestamp"].dt.strftime("%Y-%m"))}
            parts.setdefault(dataset, fresh.iloc[:0])  # the month asked for has its line
        # Before the month's first session (the 1st before the open, after a holiday) the
        # answer has earlier months only: nothing to store yet, and with nothing stored the
        # next run asks again. A past month without bars is the answer's fault.
        waiting = parts[dataset].empty and (stored is None or stored.empty)
        if waiting and dataset.month != now.astimezone(MARKET_TZ).strftime("%Y-%m"):
            raise ApiError(f"no bars for {dataset.month} in the answer.")
        if waiting:
            del parts[dataset]
        mode = request.outputsize or "full"
        results = []
        for target, part in sorted(parts.items(), key=lambda item: item[0].month or ""):
            before = stored if target == dataset else self._read(target)[0]
            merged = merge_bars(before, part, target)
            fixing = had if repairing and target == dataset else None  # the gaps to repair
            if fixing is not None and mode == "full":
                merged = without_unsent(merged, fixing.closed, part)
            found = frame_gaps(target, merged)
            left = set() if found is None else set(found.missing + found.closed)
            outcome = note if target == dataset else None
            if fixing is not None:
                outcome = Repair.of(fixing, left, whole=mode == "full")
                if mode == "full":  # the whole history has been seen: what is left is the vendor's
                    known, recorded = left, {"checked_at": checked.isoformat()}
            # Recorded vendor gaps stay recorded while they are gaps (a refresh keeps them).
            vendor = sorted(known & left) if target == dataset else []
            newest = merged["timestamp"].iloc[-1].date()
            self.store.write(target, merged, meta | {
                "stale_after": stale_after(target, newest, checked),
                "gaps": None if found is None else found.count} | ({"vendor_gaps": {
                    "dates": [d.isoformat() for d in vendor],
                    "checked_at": recorded.get("checked_at")}} if vendor else {}))
            results.append(DatasetResult(
                target, "updated", len(merged), len(merged) - (0 if before is None else len(before)),
                str(merged["timestamp"].iloc[-1].date()), mode, time.monotonic() - started,
                partial_history=partial, changed=before is None or not merged.equals(before),
                repair=outcome))
        if waiting:  # the month asked for is the newest the answer could hold: it goes last
            results.append(DatasetResult(dataset, "nothing_yet", mode=mode,
                                         seconds=time.monotonic() - started))
        return results

    def _nothing_to_ask(self, dataset: DatasetId, now: datetime, trailing: bool) -> bool:
        """An intraday month whose first session has not opened yet, by its exchange's
        calendar, has no bar to ask for (once it has, the session's bars so far are served);
        a trailing request would also refresh the month before, so it is still made unless
        that month is final."""
        calendar = calendar_for(dataset.symbol) if dataset.month else None
        opened = calendar.latest_opened_session(now) if calendar is not None else None
        if dataset.month is None or opened is None or opened.strftime("%Y-%m") >= dataset.month:
            return False
        if not trailing:
            return True
        year, number = map(int, dataset.month.split("-"))
        before = replace(dataset, month=f"{year - (number == 1)}-{(number - 2) % 12 + 1:02d}")
        stored, meta = self._read(before)
        return stored is not None and not meta.get("partial_history") and \
            month_complete(before, meta.get("checked_at"))

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
        needs_full = force_full or not compact_covers(dataset, last_bar, now)
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
        answer = self.client.fetch(request)
        frame = parse_payload(answer, dataset, self.clock())
        if request.month:  # none at all is for run() to judge: the month may not have begun
            frame = frame[frame["timestamp"].dt.strftime("%Y-%m") == request.month]
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


PENDING_NAME = "pending.fernet"
PLAIN_PENDING_NAME = "pending.json"  # written before the queue was sealed: it named datasets


class PendingQueue:
    """Datasets a run could not reach before the quota ran out; the next run does them first.
    Sealed under the key ring like the datasets: their names are the holdings. Only an
    order: one that cannot be read (a key removed since) is an empty queue."""

    def __init__(self, settings: Settings, ring: KeyRing) -> None:
        self.path = settings.state_dir / PENDING_NAME
        self.file_mode = settings.file_mode
        self.ring = ring

    def load(self) -> set[str]:
        try:
            names = json.loads(self.ring.decrypt(self.path.read_bytes()))
        except (OSError, InvalidToken, ValueError):
            return set()
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def order(self, datasets: list[DatasetId]) -> list[DatasetId]:
        pending = self.load()
        return sorted(datasets, key=lambda d: str(d) not in pending)  # stable: pending first

    def save(self, report: DownloadReport) -> None:
        pending = self.load()
        pending -= {str(r.dataset) for r in report.results if r.outcome != "pending"}
        pending |= {str(r.dataset) for r in report.pending}
        atomic_write(self.path, self.ring.encrypt(json.dumps(sorted(pending)).encode()),
                     self.file_mode)
        (self.path.parent / PLAIN_PENDING_NAME).unlink(missing_ok=True)


def api_keys_of(settings: Settings) -> list[str]:
    """The API keys to use; the public demo key (IBM only) when none is set."""
    return [k.reveal() for k in settings.api_keys] or ["demo"]


def quota_facts(settings: Settings) -> list[tuple[str, int, int | None]]:
    """(key fingerprint, used today, left today or None when unlimited) per API key."""
    facts = []
    for api_key in api_keys_of(settings):
        daily = DailyQuota(settings, api_key_fingerprint(api_key))
        facts.append((daily.path.stem, daily.read()["used"], daily.left()))
    return facts


def run_download(ctx: RunContext, symbols: list[str], interval: str, adjusted: bool,
                 full: bool, month: str | None,
                 on_result: Callable[[DatasetResult], None] | None,
                 repair: bool = False) -> DownloadReport:
    """Bring each symbol's dataset up to date, within the rate limits, under the lock;
    `repair` also fetches whole each stored history with a gap not known to be the vendor's.

    Whatever goes wrong inside one dataset's work is that dataset's named failure, and the
    rest of the batch goes on. The quota running out stops the run cleanly; an error that
    would strike every dataset alike (integrity, keys, paths, a full disk) stops it too,
    raised only after every finished dataset is reported and the pending queue saved."""
    settings = ctx.settings
    now = ctx.clock()
    trailing = interval in INTRADAY and month is None
    this_month = now.astimezone(MARKET_TZ).strftime("%Y-%m")
    if repair and full:
        raise UsageError("--repair-gaps and --full together: --full already fetches every "
                         "history whole. Fix: give one of them.")
    if repair and interval in INTRADAY:
        raise UsageError("--repair-gaps repairs daily, weekly and monthly histories; an "
                         "intraday month is fetched whole by its own request. Fix: "
                         "`download --full --month YYYY-MM --interval "
                         f"{interval} SYMBOL` for the month the gap report names.")
    if trailing:
        month = this_month
    elif interval not in INTRADAY and month is not None:
        raise UsageError("--month applies to intraday intervals only.")
    elif month is not None and not MONTH_PATTERN.fullmatch(month):
        raise UsageError(f"invalid month {outside_text(month, 40)} for --month: use YYYY-MM, "
                         f"e.g. {this_month}.")
    elif month is not None and month > this_month:
        raise UsageError(f"--month {month} has not begun yet in New York (this month is "
                         f"{this_month}); no request was sent. Fix: give {this_month} or "
                         "an earlier month.")
    datasets = list(dict.fromkeys(DatasetId(s, interval, adjusted, month) for s in symbols))
    if not datasets:
        raise UsageError("no symbols given.")
    if not settings.api_keys:
        ctx.warnings.append("ALPHA_VANTAGE_API_KEY is not set: using the public demo key, "
                            "which serves IBM only. Claim a free key at "
                            "https://www.alphavantage.co/support/#api-key.")
    stats = RunStats()
    results: list[DatasetResult] = []
    finished: dict[int, list[DatasetResult]] = {}  # done, waiting for an earlier one's turn
    with ctx.exclusive() as ring:
        store = EncryptedStore(settings, ring)
        pending = PendingQueue(settings, ring)
        limiter = RateLimiter(settings, api_keys_of(settings))
        # One answer's memory is bounded by what the run has left under the limit, shared
        # by the downloads in flight (AlphaVantageClient, answer_budget).
        client = AlphaVantageClient(settings, limiter, stats,
                                    in_flight=min(settings.max_workers, len(datasets)),
                                    baseline_rss=ctx.monitor.rss())
        client.notify = ctx.progress
        worker = DatasetDownloader(store, client, ctx.clock)
        stop = threading.Event()
        fatal: list[OHLCVError] = []
        memory_stop = threading.Event()

        quota_note = "the daily API quota is spent"
        memory_note = f"the run reached OHLCV_MAX_MEMORY_MB={settings.max_memory_mb}"

        def job(dataset: DatasetId) -> list[DatasetResult]:
            # A spent quota does not skip the job: a current dataset still says so, and
            # one that needs a request gets QuotaExhausted from the limiter, unsent.
            if fatal:
                return [DatasetResult(dataset, "pending", error="the run stopped on an error "
                                     "(the FAILED line says which)")]
            if memory_stop.is_set() or not ctx.monitor.memory_ok():
                memory_stop.set()  # the datasets in hand finish; no new one starts
                return [DatasetResult(dataset, "pending", error=memory_note)]
            try:
                return worker.run(dataset, full, now, trailing, repair)
            except QuotaExhausted:
                stop.set()
                return [DatasetResult(dataset, "pending", error=quota_note)]
            except OSError as exc:  # a full disk, a file-size limit: the next would fail too
                stop.set()
                failure = OHLCVError(f"cannot write {dataset}: {exc.strerror or exc}"
                                     + (f" ({exc.filename})" if exc.filename else "")
                                     + "; the previous version of that file is intact.")
                fatal.append(failure)
                return [DatasetResult(dataset, "failed", error=str(failure))]
            except ApiError as exc:
                log.warning("%s: failed: %s", dataset, exc)
                return [DatasetResult(dataset, "failed", error=str(exc))]
            except OHLCVError as exc:  # integrity, keys, paths, disk: stop, then raise
                log.error("%s: %s: %s; the run stops here", dataset, type(exc).__name__, exc)
                stop.set()
                fatal.append(exc)
                return [DatasetResult(dataset, "failed", error=str(exc))]
            except Exception as exc:  # a defect met on this dataset's input: its failure only
                log.error("%s: failed on an unexpected %s", dataset, type(exc).__name__,
                          exc_info=exc)
                return [DatasetResult(dataset, "failed", error=(
                    f"unexpected {type(exc).__name__}: {outside_text(exc)} (the traceback is "
                    "in the log; please report it)"))]

        try:
            with ThreadPoolExecutor(settings.max_workers, "download") as pool:
                futures = {pool.submit(job, d): d for d in pending.order(datasets)}
                # Results are handed on in the order the symbols were given, each as soon
                # as it and every one before it are done (the work order may differ).
                position = {d: i for i, d in enumerate(datasets)}
                handed_on = 0  # datasets whose results are handed on
                try:
                    for future in as_completed(futures):
                        done = finished[position[futures[future]]] = future.result()
                        for result in done:  # an intraday dataset: one per month written
                            log.info("%s: %s %s rows=%d added=%d %.3fs%s", result.dataset,
                                     result.outcome, result.mode, result.rows, result.added,
                                     result.seconds,
                                     f" error={result.error}" if result.error else "")
                        while handed_on in finished:
                            batch = finished.pop(handed_on)
                            handed_on += 1
                            results += batch
                            for result in batch:
                                if on_result:
                                    on_result(result)
                except BaseException:  # Ctrl-C, or the output gone: start nothing unreported
                    for future in futures:
                        future.cancel()
                    raise
        finally:  # whatever stopped the loop, what was done is remembered
            results += [result for i in sorted(finished) for result in finished[i]]
            limiter.close()
            client.close()
            report = DownloadReport(results, stats, quota_exhausted=stop.is_set() and not fatal,
                                    memory_exceeded=memory_stop.is_set())
            pending.save(report)
        try:
            store.save_catalogue()  # once, for every file this run wrote
        except OSError as exc:  # a cache: the files are written, the next run retries it
            ctx.notify(f"the catalogue could not be rewritten ({exc}); status reads the "
                       "files it cannot vouch for until a later run rewrites it.")
    ctx.facts.update(stats=stats, results=results, quota=quota_facts(settings))
    if fatal:
        raise next((e for e in fatal if isinstance(e, IntegrityError)), fatal[0])
    return report


# =========================================================================================
# 10. Lifecycle: rotate keys, back up, verify, recover, clean up
# =========================================================================================

@dataclass
class RotationReport:
    old_fingerprint: str
    new_fingerprint: str
    rotated: int = 0
    already_done: int = 0
    seconds: float = 0.0
    new_key: NewKey | None = None  # the new ring, shown once or in a file to move offline
    awaiting_env_update: bool = False  # keys only in a variable set outside: set it, re-run
    stored_in: list[str] = field(default_factory=list)
    variable_disagrees: bool = False  # the keyring moved on; the outside variable must follow


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

    def __init__(self, ctx: RunContext, show_key: Callable[[NewKey], None] | None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.canary_path = ctx.custody.canary_path
        self.show_key = show_key

    def run(self) -> RotationReport:
        started = time.monotonic()
        with self.ctx.exclusive() as ring:
            EncryptedStore(self.settings, ring)  # the earlier layout stops it before any key changes
            canary_fp = ring.decrypt_with_fingerprint(self.canary_path.read_bytes(),
                                                      self.canary_path)[1]
            if canary_fp == ring.primary.fingerprint:  # no rotation under way: start one
                report = self._new_primary(ring)
                if report.awaiting_env_update:
                    return report
                ring = self.ctx.custody.ring()
            else:
                old = next(k for k in ring.keys if k.fingerprint == canary_fp)
                report = RotationReport(old.fingerprint, ring.primary.fingerprint)
                log.info("resuming the rotation to key %s", ring.primary.fingerprint)
            store = EncryptedStore(self.settings, ring)
            # What each file held before (from the catalogue, proven by stat): rotation
            # changes the key and the stat alone, so the new catalogue needs no decryption.
            before = {x.file: x for x in store.listing() if not x.error}
            rotate_one = functools.partial(self._rotate_file, ring, report.old_fingerprint)
            datasets = dataset_files(self.settings.data_dir)
            written: dict[Path, bytes] = {}  # SHA-256 of each token this run wrote
            with ThreadPoolExecutor(ROTATION_THREADS, thread_name_prefix="rotate") as pool:
                try:
                    for path, digest in zip(datasets, pool.map(rotate_one, datasets), strict=True):
                        if digest is None:
                            report.already_done += 1
                        else:
                            written[path], report.rotated = digest, report.rotated + 1
                    # Only once every dataset is on disk under the new key: the canary,
                    # whose old key is how a re-run after a crash knows it is unfinished.
                    digest = rotate_one(self.canary_path)
                    if digest is not None:
                        written[self.canary_path] = digest
                    # Proof that every file opens under the new key alone.
                    files = datasets + [self.canary_path]  # the lock keeps the set fixed
                    check = functools.partial(self._under_primary_alone, ring, written)
                    for path, sound in zip(files, pool.map(check, files), strict=True):
                        if not sound:
                            raise IntegrityError(f"{path} does not open under the new key "
                                                 "alone after rotation; run --rotate-key again.")
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # files already replaced stay valid
                    raise
            for path in written.keys() - {self.canary_path}:
                file = store.relative(path)
                if file in before:
                    entry = before[file].entry | stat_of(path.lstat()) | {"key": ring.primary.fingerprint}
                    store.record(Listed(file, before[file].dataset, entry))
            store.save_catalogue()  # after the canary: under the new primary, new keys named
        report.seconds = time.monotonic() - started
        log.info("rotation done: %d files re-encrypted, %d already done, %s -> %s in %.1f s",
                 report.rotated, report.already_done, report.old_fingerprint,
                 report.new_fingerprint, report.seconds)
        return report

    def _rotate_file(self, ring: KeyRing, old_fingerprint: str, path: Path) -> bytes | None:
        """Re-encrypt one file under the primary key; the SHA-256 of the token written, or
        None when the primary key already opens it (done by an earlier, interrupted run)."""
        token, _ = read_dataset_file(path, self.settings.dir_mode)
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
        """A ring with a new primary (old keys retired, the naming key unchanged: rotation
        renames nothing): first handed to a person (shown, or written to a file to move
        offline), then stored where the keys are kept."""
        custody = self.ctx.custody
        new = StoredKey(Fernet.generate_key().decode(), "primary", utc_now_iso())
        rotated = KeyRing([new] + [replace(k, status="retired") for k in ring.keys]
                          + ([ring.naming] if ring.naming is not None else []))
        report = RotationReport(ring.primary.fingerprint, new.fingerprint)
        report.new_key = custody.hand_over(rotated, self.show_key)
        if custody.source == EnvKeyStore.label:
            # The keys live in a variable set outside our reach: nothing may be encrypted
            # under a key that exists only in this process. The operator sets it, then
            # runs --rotate-key again, which finds the canary under an old key and resumes.
            report.awaiting_env_update = True
            return report
        report.stored_in, report.variable_disagrees = custody.store(rotated.stored())
        return report


@dataclass
class MigrationReport:
    naming_fingerprint: str = ""
    already_migrated: bool = False
    moved: list[str] = field(default_factory=list)  # datasets renamed by this run
    already_opaque: int = 0  # datasets found under their opaque name (an earlier run's)
    renamed: list[str] = field(default_factory=list)  # from another naming key's name
    unreadable: list[str] = field(default_factory=list)  # opaque files left where they are
    duplicates_dropped: list[str] = field(default_factory=list)
    removed_dirs: list[str] = field(default_factory=list)
    catalogue_written: bool = False
    seconds: float = 0.0
    naming: NamingKeyReport | None = None  # the naming key made now, if the ring had none

    @property
    def awaiting_env_update(self) -> bool:
        return self.naming is not None and self.naming.awaiting_env_update


@dataclass(frozen=True)
class EarlierFile:
    """A dataset file of the earlier layout and the dataset its path names."""

    path: Path
    dataset: DatasetId


def earlier_layout_files(root: Path, dir_mode: int) -> tuple[list[EarlierFile], list[Path]]:
    """The earlier layout's dataset files under `root` (`daily/IBM.fernet`,
    `intraday_5min/IBM/2024-01.fernet`), and its directories, deepest first. Checked whole
    before anything moves: each directory must be ours and private, each entry a regular
    file of ours with a dataset's name; a link, a FIFO or a foreign file stops it
    (UnsafePathError), so the migration never renames through what it did not create."""
    files: list[EarlierFile] = []
    dirs: list[Path] = []

    def refuse(path: Path, what: str) -> UnsafePathError:
        return UnsafePathError(
            f"{path} is {what}, among the earlier layout's dataset files; nothing was "
            "moved (the migration renames only files this tool wrote). Fix: move it out of "
            f"{root}, then run --migrate-store again.")

    def visit(directory: Path, depth: int) -> None:
        check_private_dir(directory, dir_mode)
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode) and depth == 1:
                visit(path, 2)
                continue
            if stat.S_ISLNK(info.st_mode):
                raise refuse(path, "a symbolic link")
            if not stat.S_ISREG(info.st_mode):
                raise refuse(path, "not a regular file (a FIFO, device, socket or directory)")
            if info.st_uid != os.geteuid():
                raise refuse(path, f"a file of uid {info.st_uid}, not this user's")
            try:
                dataset = DatasetId.from_relative_path(path.relative_to(root))
            except UsageError:
                dataset = None
            if dataset is None or dataset.relative_path() != path.relative_to(root):
                # e.g. daily/ibm.fernet: the earlier version wrote IBM.fernet, nothing else
                raise refuse(path, "not a dataset file of the earlier layout")
            files.append(EarlierFile(path, dataset))
        dirs.append(directory)

    for name in sorted(os.listdir(root)):
        if name in EARLIER_LAYOUT_DIRS or name.startswith("intraday_"):
            visit(root / name, 1 if name.startswith("intraday_") else 2)
    return files, dirs


class StoreMigration:
    """Move a store of the earlier layout (file names show symbols) to opaque names,
    crash-safely and resumably, under the exclusive lock (docs/FORMAT.md, Migration).

    (1) A ring without a naming key gets one: handed to a person, then stored (keys only
    in a variable set outside: nothing moves until the operator sets it and re-runs).
    (2) Each old file is renamed (`os.rename`, atomic) to the name the naming key gives its
    dataset, both directories fsynced: at every instant a dataset has exactly one name.
    (3) The emptied old directories go. (4) The catalogue is written last. A re-run after
    a crash at any point finds what is left and finishes it."""

    def __init__(self, ctx: RunContext, show_key: Callable[[NewKey], None] | None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.show_key = show_key

    def run(self) -> MigrationReport:
        started = time.monotonic()
        s, custody = self.settings, self.ctx.custody
        report = MigrationReport()
        with self.ctx.exclusive() as ring:
            if custody.canary_path.exists():
                custody.check_canary(ring)  # another store's keys would name files wrongly
            old, old_dirs = earlier_layout_files(s.data_dir, s.dir_mode)  # all checked first
            report.naming = custody.add_naming_key(ring, self.show_key)
            if report.awaiting_env_update:
                return report
            ring = custody.ring()
            assert ring.naming is not None
            report.naming_fingerprint = ring.naming.fingerprint
            opaque = len(dataset_files(s.data_dir))
            for item in old:
                self._move(ring.naming.key, item, report.moved, report)
            for directory in old_dirs:  # deepest first
                os.rmdir(directory)
                report.removed_dirs.append(directory.relative_to(s.data_dir).as_posix())
            if old_dirs:
                fsync_dir(s.data_dir)
            store = EncryptedStore(s, ring, renaming=True)
            found = store.catalogue()
            for item, entry in self._misnamed(store, found, report):
                self._move(ring.naming.key, item, report.renamed, report)
                if entry is not None:  # the catalogue keeps it: no footer read to rewrite it
                    target = store.path(item.dataset)
                    file = store.relative(target)
                    moved = entry | stat_of(target.lstat()) | {"file": file}
                    if _entry_sound(item.dataset.identity, moved, ring.naming.key):
                        store.record(Listed(file, item.dataset, moved))
            report.already_opaque = opaque - len(report.renamed) - len(report.unreadable)
            if (report.naming is None and not old and not report.renamed
                    and (not found.problem or not opaque)):
                report.already_migrated = True
                return report
            store.save_catalogue()  # last: it reads each moved file's footer once
            report.catalogue_written = True
        report.seconds = time.monotonic() - started
        log.info("migration done: %d datasets moved to opaque names, %d renamed from another "
                 "naming key, %d already there, %d unreadable left in place, naming key %s, "
                 "in %.1f s", len(report.moved), len(report.renamed), report.already_opaque,
                 len(report.unreadable), report.naming_fingerprint, report.seconds)
        return report

    def _misnamed(self, store: EncryptedStore, found: Catalogue,
                  report: MigrationReport) -> list[tuple[EarlierFile, dict[str, Any] | None]]:
        """The opaque files whose dataset (by their own footer) the ring's naming key names
        otherwise: named under another naming key, or renamed by hand. A file the catalogue
        proves in place is not read, nor one whose entry under the naming key it was written
        under still proves it (its identity is that entry's); one that cannot be read stays
        where it is, reported. With each, its entry in the catalogue found, if it proves it."""
        misnamed = []
        recorded = Catalogue.identities(store.root, store.key_ring, store.dir_mode)
        for path in dataset_files(store.root):
            file = store.relative(path)
            try:
                st = path.lstat()
                if found.proven(file, st):
                    continue
                known = recorded.get(file)
                if known is None or not Catalogue.proves(known[1], st):
                    known = None
                dataset = DatasetId.from_identity(known[0]) if known else store.footer(path)[0]
            except FileNotFoundError:
                continue
            except (IntegrityError, UnsafePathError) as exc:
                report.unreadable.append(f"{file}: {exc}")
                continue
            if store.path(dataset) != path:
                misnamed.append((EarlierFile(path, dataset), known[1] if known else None))
        return misnamed

    def _move(self, naming_key: str, item: EarlierFile, moved: list[str],
              report: MigrationReport) -> None:
        root, dataset = self.settings.data_dir, item.dataset
        target = root / dataset_file(naming_key, dataset)
        made = not os.path.lexists(target.parent)
        ensure_private_dir(target.parent, self.settings.dir_mode)
        if made:  # the new fan-out directory's own name, durable before a file moves in
            fsync_dir(root)
        if os.path.lexists(target):  # cannot follow from a rename; checked all the same
            info = os.lstat(target)
            if not stat.S_ISREG(info.st_mode):  # planted: never read, never renamed over
                raise UnsafePathError(
                    f"{target} is {kind_of(info)}, where {dataset} is to be moved; it was "
                    "not changed, nor was the dataset. Fix: move it out of the data "
                    "directory, then run --migrate-store again.")
            mode = self.settings.dir_mode  # the store's reader: no link followed, bounded
            if read_dataset_file(target, mode)[0] != read_dataset_file(item.path, mode)[0]:
                raise IntegrityError(
                    f"{dataset} is under two names with different content: {item.path} and "
                    f"{target}; neither was changed. Fix: check both with --recover on a "
                    "copy of the store, keep the right one, and run --migrate-store again.")
            os.unlink(item.path)
            fsync_dir(item.path.parent)
            report.duplicates_dropped.append(str(dataset))
            return
        os.rename(item.path, target)
        fsync_dir(target.parent)
        fsync_dir(item.path.parent)
        moved.append(str(dataset))


BACKUP_PREFIX = "ohlcv-backup-"
BACKUP_SUFFIX = ".tar"
BACKUP_TIME = "%Y%m%dT%H%M%S%fZ"  # the UTC time in an archive's name
_BACKUP_NAME = re.compile(r"ohlcv-backup-(\d{8}T\d{12}Z)\.tar")
MANIFEST_MEMBER = "manifest.fernet"
CANARY_MEMBER = "state/" + "canary.fernet"
MAX_MEMBER_BYTES = 1 << 30
# The manifest is the one member read before anything in the archive is known to be
# genuine: read whole, then decrypted. Sealed, it takes about 350 bytes a dataset, so this
# holds some 190,000 datasets; backup refuses to write a larger one.
MAX_MANIFEST_BYTES = 64 << 20
# What tarfile may read for one member's headers (PAX records, a GNU long name, a sparse
# map); ours take about 1.5 KB. No member data is read while the headers are.
MAX_HEADER_BYTES = 1 << 20
READ_CHUNK = 1 << 20
# An archive's name is the UTC time its writer started, and its manifest's created_at is
# that same instant (archives written before this check stamped created_at when they were
# finished: up to a backup's duration after the name). A name later than created_at is the
# mark of an older archive copied under a newer name: a rollback.
NAME_AFTER_MANIFEST = timedelta(minutes=5)
NAME_BEFORE_MANIFEST = timedelta(days=1)


def backup_archives(directory: Path) -> list[Path]:
    """The backup archives in `directory`, by name (their names sort by UTC time; what
    counts as newest is the manifests' time: archive_ages)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.glob(f"{BACKUP_PREFIX}*{BACKUP_SUFFIX}")
                  if p.is_file() and not p.name.startswith("."))


def archive_name_time(name: str) -> datetime | None:
    """The UTC time an archive's name gives; None for a name not of that form."""
    match = _BACKUP_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), BACKUP_TIME).replace(tzinfo=UTC)
    except ValueError:
        return None


def archive_name_for(when: datetime) -> str:
    return f"{BACKUP_PREFIX}{when.astimezone(UTC):{BACKUP_TIME}}{BACKUP_SUFFIX}"


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
    manifest (per file: path, size, SHA-256, key, rows, first and last bar; the time the
    archive is named for)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings

    def write(self, dest: Path | None) -> BackupReport:
        s = self.settings
        directory = ensure_private_dir(Path(os.path.abspath(dest or s.backup_dir)), s.dir_mode)
        BackupDestinations(s).add(directory)  # before the archive: remove-key must find it
        now = datetime.now(UTC)  # the name and the manifest's created_at: one instant
        name = archive_name_for(now)
        target = directory / name
        tmp = directory / f"{TEMP_PREFIX}{name}.{secrets.token_hex(6)}"
        entries = []
        with self.ctx.exclusive() as ring:
            # In name order, not identity order: members are listed in the archive's
            # table of contents, and identity order would group them by interval and
            # rank them by symbol.
            listed = sorted(EncryptedStore(s, ring).listing(), key=lambda x: x.file)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, s.file_mode)
            try:
                os.fchmod(fd, s.file_mode)
                with os.fdopen(fd, "wb") as raw:
                    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                        for item in listed:
                            path = s.data_dir / item.file
                            if item.error or item.dataset is None:
                                raise IntegrityError(item.error)
                            token, _ = read_dataset_file(path, s.dir_mode)
                            plaintext, key_fp = ring.decrypt_with_fingerprint(token, path)
                            frame, _ = decode_table(plaintext)
                            rel = item.file
                            entries.append({"path": rel, "dataset": item.dataset.identity,
                                            "size": len(token),
                                            "sha256": hashlib.sha256(token).hexdigest(), "key": key_fp,
                                            "rows": len(frame),
                                            "first_bar": str(frame["timestamp"].iloc[0]) if len(frame) else None,
                                            "last_bar": str(frame["timestamp"].iloc[-1]) if len(frame) else None})
                            tar.addfile(_tar_member("data/" + rel, len(token)), io.BytesIO(token))
                            del plaintext, frame
                        canary = self.ctx.custody.canary_path.read_bytes()
                        tar.addfile(_tar_member(CANARY_MEMBER, len(canary)), io.BytesIO(canary))
                        manifest = {"format": 1, "created_at": now.isoformat(), "datasets": entries,
                                    "primary_key": ring.primary.fingerprint,
                                    "canary": {"size": len(canary),
                                               "sha256": hashlib.sha256(canary).hexdigest()}}
                        sealed = ring.encrypt(json.dumps(manifest).encode())
                        if len(sealed) > MAX_MANIFEST_BYTES:  # it could never be verified
                            raise OHLCVError(
                                f"backup: the manifest of {len(entries)} datasets takes "
                                f"{len(sealed)} bytes, over the {MAX_MANIFEST_BYTES} that "
                                "--verify-backup and --recover read; no archive was written.")
                        tar.addfile(_tar_member(MANIFEST_MEMBER, len(sealed)), io.BytesIO(sealed))
                    raw.flush()  # the end-of-archive blocks too: tar is closed by now
                    os.fsync(raw.fileno())
                os.replace(tmp, target)
                fsync_dir(directory)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if isinstance(exc, OSError) and exc.filename is None:  # name the archive
                    raise OSError(exc.errno, exc.strerror, str(target)) from exc
                raise
        pruned, notes = prune_backups(directory, s.backup_keep, ring)
        self.ctx.warnings += notes
        size = target.stat().st_size
        log.info("backup %s: %d datasets, %d bytes; pruned %d old archive(s)", target,
                 len(entries), size, len(pruned))
        return BackupReport(target, len(entries), size, pruned)


DESTINATIONS_NAME = "backup-destinations.json"


class BackupDestinations:
    """Every directory `backup` has written an archive to (state/backup-destinations.json),
    so that remove-key can list every archive that still needs a key, wherever it went."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.state_dir / DESTINATIONS_NAME

    def read(self) -> list[Path]:
        """OHLCV_BACKUP_DIR first, then every other directory written to."""
        dirs = [Path(os.path.abspath(self.settings.backup_dir))]
        for listed in self._load()["dirs"]:
            if isinstance(listed, str) and Path(listed) not in dirs:
                dirs.append(Path(listed))
        return dirs

    def add(self, directory: Path) -> None:
        with locked_json(self.path, self._load, self.settings.file_mode,
                         self.settings.dir_mode) as state:
            if str(directory) not in state["dirs"]:
                state["dirs"].append(str(directory))

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("dirs"), list):
            return {"dirs": []}
        return data


@dataclass
class ArchiveAge:
    path: Path
    time: datetime | None  # its manifest's created_at; its name's time when that is unreadable
    problem: str = ""  # why it does not count among the newest ("" when it does)


def archive_ages(directory: Path, ring: KeyRing) -> list[ArchiveAge]:
    """Every archive in `directory`, oldest first by its manifest's time (one whose manifest
    cannot be read, by its name's). Only headers and manifests are read."""
    ages = []
    for path in backup_archives(directory):
        archive = BackupArchive(path, ring)
        if archive.created_at is not None:
            ages.append(ArchiveAge(path, archive.created_at, archive.name_problem))
        else:
            ages.append(ArchiveAge(path, archive.named_at, "its manifest cannot be read: "
                                   + brief(archive.problems)))
    never = datetime.min.replace(tzinfo=UTC)
    return sorted(ages, key=lambda age: (age.time or never, age.path.name))


def prune_backups(directory: Path, keep: int, ring: KeyRing,
                  dry_run: bool = False) -> tuple[list[Path], list[str]]:
    """Keep the newest `keep` archives by manifest (0: keep all) and remove every archive
    older than they are. An archive whose name disagrees with its manifest (a rolled-back
    copy) or whose manifest cannot be read is not counted among the newest, and is
    warned about; one of them is removed only when it is older (by manifest, or by name
    when that is all there is) than every archive kept. Returns what went (or would go)
    and the warnings."""
    if not keep:
        return [], []
    ages = archive_ages(directory, ring)
    counted = [age for age in ages if not age.problem]
    notes = [f"backup {outside_text(age.path)}: {age.problem}; not counted among the newest "
             f"{keep}." for age in ages if age.problem]
    if len(counted) <= keep:
        return [], notes
    oldest_kept = ages.index(counted[-keep])
    old = [age.path for age in ages[:oldest_kept] if age.time is not None]
    if not dry_run:
        for path in old:
            path.unlink()
    return old, notes


def newest_archive(directory: Path, ring: KeyRing) -> tuple[Path | None, list[str]]:
    """The newest archive by manifest (one whose manifest cannot be read, by its name: a
    broken newest backup is the one to check), and a warning for every archive named as
    newer that is not."""
    ages = archive_ages(directory, ring)
    if not ages:
        return None, []
    newest = ages[-1]
    return newest.path, [f"backup {outside_text(age.path)}: {age.problem}; not taken as the "
                         f"newest ({outside_text(newest.path.name)} is)." for age in ages
                         if age.problem and age.path.name > newest.path.name]


@dataclass
class VerifyReport:
    archive: Path
    members_checked: int = 0
    datasets_decrypted: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.sound else 5


def brief(problems: list[str], shown: int = 3) -> str:
    """The first few problems on one line, and how many more there are."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class ArchiveMember:
    offset: int  # where its bytes start in the archive file
    size: int


# Whatever tarfile raises on a malformed archive: its own errors, and the ValueError,
# OverflowError, IndexError, struct.error or RecursionError of a header it did not expect.
ARCHIVE_FORMAT_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, ArithmeticError,
                         LookupError, struct.error, RecursionError)

_NOT_REGULAR = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                tarfile.DIRTYPE: "a directory", tarfile.CHRTYPE: "a character device",
                tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
                tarfile.CONTTYPE: "a contiguous file"}
ALTERED = "size or SHA-256 differs from the manifest (altered)"


def _irregular(info: tarfile.TarInfo) -> str:
    """What a member is when it is not a plain regular file; "" when it is one."""
    if (info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE
            or any(key.startswith("GNU.sparse.") for key in info.pax_headers)):
        return "a sparse file"
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return ""
    return _NOT_REGULAR.get(info.type, f"of type {info.type!r}")


class _HeaderReader:
    """The archive file as tarfile sees it while BackupArchive reads the headers: member
    data is skipped by seeking, a seek outside the file is refused, and what one member's
    headers may take (PAX records, a GNU long name, a sparse map) is capped at
    MAX_HEADER_BYTES. A header that claims a gigabyte costs nothing."""

    def __init__(self, raw: io.BufferedReader, length: int) -> None:
        self.raw, self.length = raw, length
        self.budget = MAX_HEADER_BYTES

    def next_member(self) -> None:
        self.budget = MAX_HEADER_BYTES

    def read(self, size: int = -1) -> bytes:
        if not 0 <= size <= self.budget:
            raise tarfile.ReadError(f"a member's headers take over {MAX_HEADER_BYTES} bytes")
        data = self.raw.read(size)
        self.budget -= len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or not 0 <= offset <= self.length:
            raise tarfile.ReadError("a header gives a size the archive does not hold")
        return self.raw.seek(offset)

    def tell(self) -> int:
        return self.raw.tell()


class BackupArchive:
    """Reads an archive we did not necessarily write, in bounded memory whatever it claims.

    First the headers alone: member data is skipped by seeking, and what one member's
    headers may take is capped. Only regular files with our names are admitted, once each,
    of at most MAX_MEMBER_BYTES: no link, device, directory, sparse file, absolute path or
    '..'. A header tarfile cannot parse makes the whole archive unreadable (one problem
    naming it). Then the manifest, read whole (at most MAX_MANIFEST_BYTES) and decrypted.
    Only then is any other member read, streamed against its manifest entry and never past
    the size the entry gives, one at a time: all reads together stay within the manifest's
    sizes. Nothing is ever extracted to a path a member names."""

    def __init__(self, path: Path, ring: KeyRing) -> None:
        self.path = path
        self.ring = ring
        self.members: dict[str, ArchiveMember] = {}  # admitted members: where their bytes are
        self.refused: dict[str, str] = {}  # member name -> why it was refused
        self.problems: list[str] = []
        self.faulty: set[str] = set()  # names with a problem reported: each is reported once
        self.altered: set[str] = set()  # members whose bytes differ from the manifest
        self.manifest: dict[str, Any] = {}
        self.manifest_key = ""  # fingerprint of the key that opened the manifest
        self.sealed_manifest: bytes | None = None  # as read: a recovery key may prove itself on it
        self.named_at = archive_name_time(path.name)
        self.created_at: datetime | None = None  # the manifest's time, once it opened
        self.name_problem = ""  # set when the name and the manifest's time disagree
        if self._scan():
            self._open_manifest()

    def problem(self, name: str, text: str) -> None:
        self.faulty.add(name)
        self.problems.append(f"{outside_text(name)}: {text}")

    # -- pass one: the headers ---------------------------------------------------------

    def _headers(self) -> Iterator[tarfile.TarInfo]:
        with open(self.path, "rb") as raw:
            reader = _HeaderReader(raw, os.fstat(raw.fileno()).st_size)
            # Reading needs read, seek and tell only (the stub also asks for write and close).
            with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
                while (info := tar.next()) is not None:
                    tar.members.clear()  # of a member, only where its bytes are is kept
                    yield info
                    reader.next_member()

    def _scan(self) -> bool:
        headers, seen = self._headers(), set[str]()
        while True:
            try:  # only the parser is guarded here: _admit's own errors are not hidden
                info = next(headers, None)
            except ARCHIVE_FORMAT_ERRORS as exc:
                self.problem(self.path.name, "unreadable, truncated or malformed archive "
                             f"({outside_text(exc, 160)}); nothing in it is used")
                return False
            if info is None:
                return True
            self._admit(info, seen)

    def _admit(self, info: tarfile.TarInfo, seen: set[str]) -> None:
        name, kind = info.name, _irregular(info)
        if kind:
            why = f"not a regular file ({kind}); refused"
        elif not _safe_member_name(name):
            why = "unsafe member name; refused"
        elif info.size < 0:
            why = f"a size of {info.size} bytes; refused"
        elif info.size > MAX_MEMBER_BYTES:
            why = f"{info.size} bytes, over the limit of {MAX_MEMBER_BYTES}; refused"
        elif name == MANIFEST_MEMBER and info.size > MAX_MANIFEST_BYTES:
            why = f"{info.size} bytes, over the limit of {MAX_MANIFEST_BYTES} for a manifest; refused"
        elif name in seen:
            why = "appears twice; refused"
        else:
            why = ""
        seen.add(name)
        if why:
            self.refused.setdefault(name, why)
            self.problem(name, why)
        else:
            self.members[name] = ArchiveMember(info.offset_data, info.size)

    # -- the manifest, then the members against it ---------------------------------------

    def _read(self, member: ArchiveMember, keep: bool) -> tuple[str, bytes]:
        """A member's SHA-256, streamed, and its bytes when `keep`; IntegrityError when the
        archive ends or cannot be read inside it."""
        digest, kept = hashlib.sha256(), []
        try:
            with open(self.path, "rb") as raw:
                raw.seek(member.offset)
                left = member.size
                while left:
                    chunk = raw.read(min(left, READ_CHUNK))
                    if not chunk:
                        raise EOFError
                    left -= len(chunk)
                    digest.update(chunk)
                    if keep:
                        kept.append(chunk)
        except (OSError, EOFError):
            raise IntegrityError("the archive ends, or cannot be read, inside it") from None
        return digest.hexdigest(), b"".join(kept)

    def _open_manifest(self) -> None:
        member = self.members.get(MANIFEST_MEMBER)
        if member is None:
            if MANIFEST_MEMBER not in self.refused:
                self.problem(MANIFEST_MEMBER, "missing")
            return
        try:
            self.sealed_manifest = self._read(member, keep=True)[1]
            plaintext, self.manifest_key = self.ring.decrypt_with_fingerprint(
                self.sealed_manifest, self.path)
            manifest = json.loads(plaintext)
        except (IntegrityError, ValueError, RecursionError):
            self.problem(MANIFEST_MEMBER, "does not decrypt with the key ring "
                         f"({', '.join(self.ring.fingerprints())}) or is altered")
            return
        created = _manifest_time(manifest)
        if created is None or not _manifest_shape_ok(manifest):
            self.problem(MANIFEST_MEMBER, "decrypts but is not a manifest of this tool")
            return
        self.manifest, self.created_at = manifest, created
        drift = self.named_at - created if self.named_at is not None else timedelta(0)
        if drift > NAME_AFTER_MANIFEST or -drift > NAME_BEFORE_MANIFEST:
            self.name_problem = (
                f"named for {self.named_at:%Y-%m-%d %H:%M:%S} UTC but its manifest says it was "
                f"written at {created:%Y-%m-%d %H:%M:%S} UTC: a rolled-back copy of an older "
                "archive, or a renamed one; it is ordered by its manifest. Fix: find out who "
                "copied or renamed it, then delete it or give it back its own name, "
                f"{archive_name_for(created)}.")
            self.problem(self.path.name, self.name_problem)

    def entries(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("datasets", []))

    def keys_named(self) -> set[str]:
        """Fingerprints of the keys this archive needs: its manifest's and its datasets'."""
        named = {e.get("key") for e in self.entries()} | {self.manifest.get("primary_key"),
                                                         self.manifest_key}
        return {fp for fp in named if isinstance(fp, str) and fp}

    def _expected(self) -> dict[str, dict[str, Any]]:
        expected = {"data/" + e["path"]: e for e in self.entries()}
        if self.manifest:
            expected[CANARY_MEMBER] = self.manifest["canary"]
        return expected

    def check_members(self) -> int:
        """Stream every member the manifest names against its entry (a member of another
        size than the entry's is not read at all); returns how many were checked."""
        if not self.manifest:
            return 0
        expected = self._expected()
        for name, entry in expected.items():
            member = self.members.get(name)
            if member is None:
                if name not in self.refused:  # a refused member is already reported
                    self.problem(name, "missing from the archive")
                continue
            self.altered.add(name)
            if member.size != entry["size"]:
                self.problem(name, f"{member.size} bytes, the manifest says {entry['size']} "
                                   "(altered); not read")
                continue
            try:
                if self._read(member, keep=False)[0] == entry["sha256"]:
                    self.altered.discard(name)
                    continue
            except IntegrityError as exc:
                self.problem(name, str(exc))
                continue
            self.problem(name, ALTERED)
        for name in sorted(self.members.keys() - expected.keys() - {MANIFEST_MEMBER}):
            self.problem(name, "not in the manifest")
        return len(expected)

    def dataset(self, entry: dict[str, Any]) -> tuple[bytes, pd.DataFrame]:
        """A member's token, read alone and checked against its entry, and its validated
        table; IntegrityError saying what is wrong."""
        name = "data/" + entry["path"]
        shown = outside_text(name)
        member = self.members.get(name)
        if member is None:
            raise IntegrityError(f"{shown}: {self.refused.get(name, 'missing from the archive')}")
        if name in self.altered or member.size != entry["size"]:
            raise IntegrityError(f"{shown}: {ALTERED}")
        try:
            digest, token = self._read(member, keep=True)
        except IntegrityError as exc:
            raise IntegrityError(f"{shown}: {exc}") from None
        if digest != entry["sha256"]:  # what is restored is what the manifest vouches for
            self.altered.add(name)
            raise IntegrityError(f"{shown}: {ALTERED}")
        try:
            frame, _ = decode_table(self.ring.decrypt(token))
            validate_bars(frame)
        except InvalidToken:
            raise IntegrityError(f"{shown}: does not decrypt with the key ring") from None
        except (ValueError, InvalidPayload) as exc:
            raise IntegrityError(f"{shown}: decrypts but is not a valid dataset "
                                 f"({outside_text(exc, 160)})") from None
        if len(frame) != entry["rows"]:
            raise IntegrityError(f"{shown}: {len(frame)} rows, the manifest says {entry['rows']}")
        return token, frame


def _manifest_time(manifest: Any) -> datetime | None:
    """A manifest's created_at as an aware UTC time; None when it has none."""
    try:
        created = datetime.fromisoformat(manifest["created_at"])
        return created.astimezone(UTC) if created.tzinfo is not None else None
    except (TypeError, KeyError, ValueError, OverflowError):
        return None


def _manifest_shape_ok(manifest: Any) -> bool:
    """Every field the readers use is there with its type, and every dataset path is one
    of ours (a sealed manifest can still come from a buggy or older writer)."""
    def entry_ok(entry: Any, fields: dict[str, type]) -> bool:
        return isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in fields.items())

    return (isinstance(manifest, dict) and manifest.get("format") == 1
            and isinstance(manifest.get("datasets"), list)
            and all(entry_ok(e, {"path": str, "size": int, "sha256": str, "rows": int})
                    and e["size"] >= 0 and _safe_member_name("data/" + e["path"])
                    and _entry_dataset(e) is not None
                    for e in manifest["datasets"])
            and entry_ok(manifest.get("canary"), {"size": int, "sha256": str}))


def _entry_dataset(entry: dict[str, Any]) -> DatasetId | None:
    """The dataset a manifest entry holds: its `dataset`, or for an archive of the earlier
    layout, the one its path names. None when neither names one."""
    try:
        if "dataset" in entry:
            return DatasetId.from_identity(entry["dataset"])
        return DatasetId.from_relative_path(Path(entry["path"]))
    except (UsageError, TypeError):
        return None


def _safe_member_name(name: str) -> bool:
    """One of our member names: the manifest, the canary, or a dataset file of either
    layout (data/ab/<32 hex>.fernet, or the earlier data/daily/IBM.fernet)."""
    if name in (MANIFEST_MEMBER, CANARY_MEMBER):
        return True
    parts = Path(name).parts
    if name.startswith("/") or "\\" in name or ".." in parts or not name.startswith("data/"):
        return False
    if DATASET_NAME.fullmatch(name[len("data/"):]):
        return True
    try:
        DatasetId.from_relative_path(Path(*parts[1:]))
    except (UsageError, TypeError):
        return False
    return True


def verify_backup(archive: Path, ring: KeyRing, sample: int | None) -> VerifyReport:
    """Check every member against the manifest, then decrypt and validate `sample` of the
    datasets found sound (all of them when None). Each problem is reported once."""
    backup = BackupArchive(archive, ring)
    report = VerifyReport(archive)
    report.members_checked = backup.check_members()
    sound = [e for e in backup.entries() if "data/" + e["path"] not in backup.faulty]
    chosen = sound if sample is None or sample >= len(sound) else random.sample(sound, sample)
    for entry in chosen:
        try:
            backup.dataset(entry)
            report.datasets_decrypted += 1
        except IntegrityError as exc:
            backup.problems.append(str(exc))
    report.problems = backup.problems
    return report


@dataclass
class RecoverReport:
    key_source: str
    relinked: bool
    checked: int = 0
    restored: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    proven: dict[str, str] = field(default_factory=dict)  # fingerprint -> what it opened
    stored_in: list[str] = field(default_factory=list)
    variable_disagrees: bool = False
    new_key: NewKey | None = None  # a naming key made now (none anywhere), shown or in a file

    @property
    def exit_code(self) -> int:
        return 5 if self.failed else 0


@dataclass
class InitReport:
    created_dirs: list[Path]
    already_initialised: bool
    key_source: str
    fingerprints: list[str]
    new_key: NewKey | None = None  # a key generated now, shown once or in a file
    stored_in: list[str] = field(default_factory=list)
    naming_fingerprint: str = ""


def init_store(ctx: RunContext, show_key: Callable[[NewKey], None] | None) -> InitReport:
    """Create the private directories and the first key (or take the keys already held);
    a second run changes nothing."""
    s, custody = ctx.settings, ctx.custody
    created = [d for d in (s.data_dir, s.backup_dir, s.state_dir) if not os.path.lexists(d)]
    if uses_earlier_layout(s.data_dir):  # its datasets would go unseen, a new key made
        raise ConfigError(EARLIER_LAYOUT)
    ensure_private_dirs((s.data_dir, s.backup_dir, s.state_dir), s.dir_mode)
    sources = custody.sources()
    ctx.warnings += sources.warnings
    if custody.canary_path.exists():
        ring, source = sources.choose()
        custody.check_canary(ring)
        return InitReport(created, True, source, ring.fingerprints())
    new_key = None
    if sources.keyring_keys or sources.env_keys:
        ring, source = sources.choose()  # never replace a key a store already holds
        stored = dataset_files(s.data_dir)
        if stored:  # a restored data directory: the keys must open it
            proven, _ = custody.prove(ring.keys, ((str(p), read_dataset_file(p, s.dir_mode)[0])
                                                  for p in stored))
            if not proven:
                raise KeyStoreError(
                    f"the key ring from {source} ({', '.join(ring.fingerprints())}) opens none "
                    f"of the {len(stored)} datasets in {s.data_dir}; nothing was changed. Fix: "
                    "run --recover with the key from your offline copy.")
        problem = store_naming_problem(s.data_dir, ring, s.dir_mode)
        if problem:  # a naming key made now would orphan every file the store holds
            raise ConfigError(problem)
        if ring.naming is None:  # keys made by hand, or before the naming key existed
            ring = KeyRing(ring.stored() + [new_naming_key()])
            new_key = custody.hand_over(ring, show_key, new_naming=True)
    elif sources.keyring_problem and sources.backend.usable:
        # A keyring exists but fails (locked, refusing): a key generated now could be
        # kept nowhere, so stop and let the operator fix the keyring first.
        raise KeyStoreError(sources.keyring_problem)
    else:
        if dataset_files(s.data_dir) or os.path.lexists(s.data_dir / CATALOGUE_NAME):
            raise ConfigError(naming_key_lacking(None))  # keys made now would open none of it
        ring, source = KeyRing.generate(), "generated"
        new_key = custody.hand_over(ring, show_key)  # seen by a person before it is used
    stored_in, outside = custody.store(ring.stored())
    if outside:
        ctx.warnings.append(f"{KEY_VARIABLE} is set outside this program and lacks the "
                            "naming key made now. Fix: set it where it is defined to the "
                            "value just handed over (it ends with naming:...).")
    if source == "generated" and not sources.backend.usable:
        ctx.warnings.append(f"no usable OS keyring: the new key was written to "
                            f"{s.env_file} (mode {s.file_mode:04o}) as OHLCV_ENCRYPTION_KEY. "
                            "Cron jobs must run in this directory or get the variable "
                            "another way.")
    custody.write_canary(ring)
    log.info("initialised: key ring from %s, primary %s, stored in %s", source,
             ring.primary.fingerprint, ", ".join(stored_in) or "no store (already there)")
    return InitReport(created, False, source, ring.fingerprints(), new_key, stored_in,
                      ring.naming.fingerprint if ring.naming is not None else "")


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

    @property
    def exit_code(self) -> int:
        return 0 if self.sound else 3


def described_keys(keys: list[StoredKey]) -> str:
    """What a key store holds, by fingerprint: `2 key(s), primary ..., naming key ...`."""
    fernet, naming = [k for k in keys if not k.naming], naming_key_of(keys)
    return (f"{len(fernet)} key(s), primary {fernet[0].fingerprint if fernet else 'none'}"
            + (f", naming key {naming.fingerprint}" if naming else ", no naming key"))


def check_keys(ctx: RunContext) -> KeyCheckReport:
    """Prove the key store end to end; every check says what it found."""
    s, custody = ctx.settings, ctx.custody
    sources = custody.sources()
    checks = []
    backend = sources.backend
    # No backend is sound when the variable holds the keys (the headless case); an
    # insecure one is sound but warned about (sources() adds the warning).
    headless = not backend.usable and bool(sources.env_keys)
    checks.append(Check("keyring backend", backend.usable or headless,
                        f"{backend.name}: " + ("secure" if backend.secure else
                                               f"none; keys come from {sources.env_label} "
                                               "(the headless fallback)" if headless
                                               else backend.problem)))
    kr = sources.keyring_keys
    checks.append(Check("keyring entry", not sources.keyring_problem or bool(sources.env_keys),
                        described_keys(kr) if kr
                        else "no backend" if headless else sources.keyring_problem or "empty"))
    env = sources.env_keys
    checks.append(Check(KEY_VARIABLE, True,
                        f"{described_keys(env)} ({sources.env_label})"
                        if env else "not set"))
    warnings = ctx.warnings + sources.warnings + [
        f"{path} holds a new key ring that must be moved offline: copy it to your password "
        f"manager or safe, then `shred -u {path}`." for path in custody.key_files_waiting()]
    try:
        ring, source = sources.choose()
    except KeyStoreError as exc:
        checks.append(Check("key ring in use", False, str(exc)))
        return KeyCheckReport(checks, warnings)
    agree = "agree" if kr and env else "only one source"
    checks.append(Check("key ring in use", True,
                        f"from {source}: {', '.join(ring.fingerprints())} "
                        f"(primary first; keyring and variable: {agree})"))
    if custody.canary_path.exists():
        try:
            checks.append(Check("canary", True, custody.check_canary(ring)))
        except KeyStoreError as exc:
            checks.append(Check("canary", False, str(exc)))
    else:
        checks.append(Check("canary", False, f"{custody.canary_path} is missing. Fix: run --init."))
    checks.append(Check("naming key", ring.naming is not None,
                        f"fingerprint {ring.naming.fingerprint} (names the data files)"
                        if ring.naming is not None else
                        store_naming_problem(s.data_dir, ring, s.dir_mode)
                        or "no naming key: run --migrate-store"))
    catalogued = Catalogue.naming_fingerprint(s.data_dir, ring, s.dir_mode)
    if ring.naming is not None and catalogued not in (None, ring.naming.fingerprint):
        checks.append(Check("naming key of the store", False,
                            f"the ring holds naming key {ring.naming.fingerprint}, but "
                            + naming_key_lacking(catalogued)))
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
    return KeyCheckReport(checks, warnings)


@dataclass
class RemoveKeyReport:
    fingerprint: str
    needed_by: list[str] = field(default_factory=list)  # archives that need the key
    unchecked: list[str] = field(default_factory=list)  # destinations that could not be read
    removed: bool = False
    edit: str = ""  # what the operator must change in a variable set outside

    @property
    def exit_code(self) -> int:
        return 0 if self.removed else 1


def archives_needing(settings: Settings, ring: KeyRing,
                     key_fp: str) -> tuple[list[str], list[str]]:
    """Archives that need `key_fp` (or cannot be read), in the backup directory and in
    every directory `backup --dest` wrote to; and those directories that could not be
    checked (gone, unmounted, unreadable)."""
    needed, unchecked = [], []
    for directory in BackupDestinations(settings).read():
        try:
            if not directory.is_dir():
                if directory != Path(os.path.abspath(settings.backup_dir)):
                    unchecked.append(f"{directory}: not found (unmounted or moved?)")
                continue
            archives = backup_archives(directory)
        except OSError as exc:
            unchecked.append(f"{directory}: {exc.strerror}")
            continue
        for archive in archives:
            backup = BackupArchive(archive, ring)
            if key_fp in backup.keys_named() or not backup.manifest:
                needed.append(str(archive))
    return needed, unchecked


def remove_key(ctx: RunContext, key_fp: str, confirm: bool) -> RemoveKeyReport:
    """Drop a retired key from custody, after listing every archive that still needs it.
    Nothing is removed without `confirm`, nor while a destination cannot be checked."""
    custody = ctx.custody
    with ctx.exclusive() as ring:
        EncryptedStore(ctx.settings, ring)  # the earlier layout's files would go unseen below
        if ring.naming is not None and key_fp == ring.naming.fingerprint:
            raise UsageError(f"{key_fp} is the naming key: every data file's name derives "
                             "from it, so it can never be removed (rotation keeps it too).")
        target = [k for k in ring.keys if k.fingerprint == key_fp]
        if not target:
            raise UsageError(f"no key with fingerprint {key_fp} in the ring "
                             f"({', '.join(ring.fingerprints())}).")
        if target[0] is ring.primary:
            raise UsageError("the primary key cannot be removed; rotate first (--rotate-key).")
        report = RemoveKeyReport(key_fp)
        report.needed_by, report.unchecked = archives_needing(ctx.settings, ring, key_fp)
        for path in dataset_files(ctx.settings.data_dir) + [custody.canary_path]:
            token, _ = read_dataset_file(path, ctx.settings.dir_mode)
            if ring.decrypt_with_fingerprint(token, path)[1] == key_fp:
                raise IntegrityError(f"{path} is still encrypted under {key_fp}; finish "
                                     "the rotation (--rotate-key) first.")
        keys = [k for k in ring.stored() if k.fingerprint != key_fp]
        position = ring.fingerprints().index(key_fp) + 1
        edit = (f"remove item {position} (key {key_fp}) from OHLCV_ENCRYPTION_KEY where it is "
                f"set, keeping the others in order: {', '.join(k.label for k in keys)}.")
        if not confirm or report.unchecked:
            return report
        if custody.source == EnvKeyStore.label:
            report.edit = edit  # a variable set outside: only the operator can change it
            return report
        _, outside = custody.store(keys)
        report.removed = True
        report.edit = edit if outside else ""
        log.info("removed retired key %s from %s", key_fp, custody.source)
        return report


def recovery_keys(ctx: RunContext, key_file: Path | None,
                  prompt: Callable[[], str] | None) -> tuple[list[StoredKey], str]:
    """The keys a recovery offers, and where they came from: --key-file, the variable
    (environment or `.env`), the OS keyring, or a prompt on a terminal."""
    custody = ctx.custody
    if key_file is not None:
        return custody.read_key_file(key_file), f"key file {key_file}"
    held = custody.variable.load()
    if held:
        return held, custody.variable.label
    sources = custody.sources()
    if sources.keyring_keys:
        return sources.keyring_keys, KeyringKeyStore.label
    if prompt is not None:
        return ring_of(parse_key_list(prompt(), "the key typed")), "prompt"
    raise KeyStoreError("no key to recover with: set OHLCV_ENCRYPTION_KEY, give "
                        "--key-file FILE, or run on a terminal to type the key.")


def recover(ctx: RunContext, from_backup: Path | None, key_file: Path | None,
            prompt: Callable[[], str] | None,
            show_key: Callable[[NewKey], None] | None = None) -> RecoverReport:
    """On a rebuilt machine: prove the offered keys, merge them into custody (dropping
    none), check every dataset, and restore from `from_backup` what is missing or
    broken, never overwriting a sound file. The naming key comes from the offered keys
    or custody, never replacing one with another; with none anywhere, a new one is made
    and handed over (`show_key`) as --init does."""
    s, custody = ctx.settings, ctx.custody
    if from_backup is not None and not from_backup.is_file():
        raise UsageError(f"--from-backup {from_backup}: no such archive file.")
    if uses_earlier_layout(s.data_dir):  # before any key is taken into custody
        raise ConfigError(EARLIER_LAYOUT)
    ensure_private_dirs((s.data_dir, s.backup_dir, s.state_dir), s.dir_mode)
    offered, source = recovery_keys(ctx, key_file, prompt)
    sources = custody.sources()
    held = [k for k in (sources.keyring_keys or []) + (sources.env_keys or [])]
    held = list({k.key: k for k in reversed(held)}.values())[::-1]  # unique, order kept
    naming = _recovered_naming_key(offered, held, source)
    offered, held = [k for k in offered if not k.naming], [k for k in held if not k.naming]
    report = RecoverReport(source, False)
    with ctx.locked():
        offered_values = {k.key for k in offered}
        trial = KeyRing(offered + [k for k in held if k.key not in offered_values])
        archive = BackupArchive(from_backup, trial) if from_backup else None
        report.proven, unproven = custody.prove(
            offered, _proof_tokens(custody, archive, s.data_dir),
            {fp: f"the manifest of {archive.path.name}" for fp in archive.keys_named()}
            if archive is not None and archive.manifest else None)
        if not report.proven:
            raise KeyStoreError(
                f"the key(s) from {source} ({', '.join(k.fingerprint for k in offered)}) open "
                "nothing here: not the canary, " + (f"not the manifest of {from_backup.name}, "
                if from_backup else "") + "not any stored dataset. Nothing was changed. Fix: "
                "use the key from your offline copy" + ("" if from_backup else ", or give "
                "--from-backup ARCHIVE when the store is empty") + ".")
        problem = store_naming_problem(s.data_dir, KeyRing(trial.keys + ([naming] if naming else [])),
                                       s.dir_mode)
        if problem:  # a naming key made (or taken) now would orphan the files stored
            raise ConfigError(problem)
        held_values = {k.key for k in held}
        for key in (k for k in unproven if k.key not in held_values):
            report.warnings.append(
                f"key {key.fingerprint} from {source} opens nothing here (canary, manifest, "
                "datasets), so it was not taken into custody; to keep it, run --recover "
                "--from-backup with an archive it opens.")
        # Proven keys in the order offered, primary first; then every key custody already
        # held (proven or not by this recovery: custody never drops a key).
        kept = [k for k in offered if k.fingerprint in report.proven]
        kept_values = {k.key for k in kept}
        keys = [replace(k, status="primary" if i == 0 else "retired") for i, k in enumerate(kept)]
        keys += [replace(k, status="retired") for k in held if k.key not in kept_values]
        keys = _canary_opener_first(custody, keys)
        if naming is None:  # a store from before the naming key, recovered without one
            naming = new_naming_key()
            report.new_key = custody.hand_over(KeyRing(keys + [naming]), show_key, new_naming=True)
        report.stored_in, report.variable_disagrees = custody.store(keys + [naming])
        report.relinked = bool(report.stored_in)
        ring = custody.ring()
        if archive is not None:
            archive.ring = ring
            if not archive.manifest:
                # Nothing in it can be trusted; above all, its canary must not become ours.
                raise IntegrityError(f"cannot recover from {outside_text(archive.path.name)}: "
                                     + brief(archive.problems))
            archive.check_members()
            report.warnings += [f"backup {outside_text(archive.path.name)}: {p}"
                                for p in archive.problems]
        _restore(ctx, ring, archive, report)
    log.info("recover: %d checked, %d restored, %d failed", report.checked,
             len(report.restored), len(report.failed))
    return report


def _recovered_naming_key(offered: list[StoredKey], held: list[StoredKey],
                          source: str) -> StoredKey | None:
    """The one naming key among the offered and the held, or None; KeyStoreError when
    they hold two: data files are named by one, and a guess would lose them."""
    naming = list({k.key: k for k in offered + held if k.naming}.values())
    if len(naming) > 1:
        theirs = ", ".join(k.fingerprint for k in offered if k.naming)
        ours = ", ".join(k.fingerprint for k in held if k.naming)
        raise KeyStoreError(
            f"{source} offers the naming key {theirs or 'none'} but the key ring held here "
            f"has the naming key {ours}: a store has one naming key, and its data files are "
            "named by it. Nothing was changed. Fix: offer the value your offline copy holds "
            "for this store; if the naming key held here is the wrong one, remove it where "
            "it is kept (the OS keyring entry secure-ohlcv-downloader/fernet-key-ring, or "
            "OHLCV_ENCRYPTION_KEY) and run --recover again.")
    return naming[0] if naming else None


def _canary_opener_first(custody: KeyCustody, keys: list[StoredKey]) -> list[StoredKey]:
    """The key the canary is under stays primary: recovering with an older key from an
    offline copy must not make it encrypt again. Without a canary, the order given."""
    if not custody.canary_path.is_file():
        return keys
    canary = custody.canary_path.read_bytes()
    opener = next((k for k in keys if signed_by(Fernet(k.key), canary)), None)
    if opener is None or opener is keys[0]:
        return keys
    return [replace(opener, status="primary")] + [replace(k, status="retired")
                                                  for k in keys if k is not opener]


def _proof_tokens(custody: KeyCustody, archive: BackupArchive | None,
                  data_dir: Path) -> Iterator[tuple[str, bytes]]:
    """What a recovery key may open, cheapest first: the canary, the archive's manifest,
    then the stored datasets (read one by one, only while a key is still unproven)."""
    if custody.canary_path.is_file():
        yield "the canary", custody.canary_path.read_bytes()
    if archive is not None and archive.sealed_manifest is not None:
        yield f"the manifest of {archive.path.name}", archive.sealed_manifest
    for path in dataset_files(data_dir):
        try:
            token, _ = read_dataset_file(path, custody.settings.dir_mode)
        except OHLCVError:
            continue  # planted (a link, a FIFO, too large): proves nothing; _restore names it
        yield f"the dataset {path.relative_to(data_dir)}", token


def _restore(ctx: RunContext, ring: KeyRing, archive: BackupArchive | None,
             report: RecoverReport) -> None:
    """Check every stored dataset; write from `archive` what is missing or broken."""
    s, custody = ctx.settings, ctx.custody
    store = EncryptedStore(s, ring)
    broken, misnamed = set(), []
    for path in dataset_files(s.data_dir):
        report.checked += 1
        try:
            validate_bars(store.read_file(path)[0])
            held = store.footer(path)[0]
        except (IntegrityError, InvalidPayload, UnsafePathError) as exc:
            broken.add(store.relative(path))
            log.warning("recover: %s", exc)
            continue
        try:  # sound, but not where its name says: --migrate-store renames it, not a restore
            store.check_named(path, held)
        except IntegrityError as exc:
            misnamed.append(str(exc))
    for entry in archive.entries() if archive is not None else []:
        assert archive is not None
        dataset = _entry_dataset(entry)
        assert dataset is not None  # _manifest_shape_ok
        target = store.path(dataset)  # where the current naming key puts it, either layout
        rel = store.relative(target)
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
        report.restored.append(str(dataset))
    report.failed += [f"{rel}: does not decrypt or validate, and no backup copy"
                      for rel in sorted(broken)] + misnamed
    found = store.save_catalogue()
    if found.problem:
        report.warnings.append(f"the catalogue ({CATALOGUE_NAME}) was {found.problem}; "
                               "rebuilt from the datasets themselves.")
    if not custody.canary_path.exists():
        # The key ring is proven (canary, manifest or a dataset): a fresh canary under
        # its primary is the truth from here on.
        custody.write_canary(ring)
    else:
        custody.check_canary(ring)


@dataclass
class CleanupReport:
    dry_run: bool
    trimmed: list[tuple[str, int]] = field(default_factory=list)  # dataset, rows removed
    removed_files: list[Path] = field(default_factory=list)
    pruned_backups: list[Path] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)
    bytes_freed: int = 0
    # A dataset file removed whole: which dataset, and how many rows (not in `trimmed`)
    removed_rows: dict[Path, tuple[str, int]] = field(default_factory=dict)


def retention_cutoff(days: int, today: date | None = None) -> date:
    """Bars dated on or after this day are kept; older ones go."""
    return (today or market_today()) - timedelta(days=days)


def cleanup(ctx: RunContext, dry_run: bool) -> CleanupReport:
    """Apply OHLCV_RETENTION_DAYS, prune old archives, remove crashed writers' temp files."""
    s = ctx.settings
    report = CleanupReport(dry_run)
    with ctx.exclusive(record=not dry_run, remove_temps=False) as ring:
        store = EncryptedStore(s, ring)
        for root in (s.data_dir, s.state_dir, s.backup_dir):
            temps = temp_files(root)
            report.temp_files += temps
            report.bytes_freed += sum(p.stat().st_size for p in temps)
            if not dry_run:
                for path in temps:
                    path.unlink()
        if s.retention_days:
            _apply_retention(store, retention_cutoff(s.retention_days), report)
            if not dry_run:
                store.save_catalogue()
        pruned, notes = prune_backups(s.backup_dir, s.backup_keep, ring, dry_run=True)
        ctx.warnings += notes
        report.bytes_freed += sum(p.stat().st_size for p in pruned)
        if not dry_run:
            for path in pruned:
                path.unlink()
        report.pruned_backups = pruned
    return report


def _apply_retention(store: EncryptedStore, cutoff: date, report: CleanupReport) -> None:
    for item in store.listing():
        path, dataset = store.root / item.file, item.dataset
        if item.error or dataset is None:
            raise IntegrityError(item.error)
        if dataset.month is not None:
            year, number = map(int, dataset.month.split("-"))
            if date(year, number, 1) >= cutoff:
                continue  # the whole month is inside the window: no need to decrypt
        frame, meta = store.read_file(path)
        keep = frame[frame["timestamp"].dt.date >= cutoff].reset_index(drop=True)
        if len(keep) == len(frame):
            continue
        size = path.stat().st_size
        if keep.empty:  # reported once, as the file that goes
            report.removed_files.append(path)
            report.removed_rows[path] = (str(dataset), len(frame))
            report.bytes_freed += size
            if not report.dry_run:
                path.unlink()
        else:
            report.trimmed.append((str(dataset), len(frame) - len(keep)))
            if not report.dry_run:
                store.write(dataset, keep, meta)
                report.bytes_freed += max(size - path.stat().st_size, 0)


# =========================================================================================
# 11. Monitoring: resources, run records, metrics, capacity
# =========================================================================================

def _high_water_rss() -> int:
    """Peak resident memory of this process image in bytes (VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        # The kernel's own high-water mark, so nothing is missed between our samples:
        # VmHWM of this process image. Not ru_maxrss: Linux carries it over exec, so a run
        # started by a large parent (a notebook, a scheduler) reported the parent's peak.
        self.peak_rss = max(self.peak_rss, _high_water_rss())
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
        # Not fsynced: a record is bookkeeping, and a library user calling download() per
        # symbol would pay two fsyncs a call (bench/RESULTS.md, per-symbol cost).
        with locked_json(self.path, self.read, self.settings.file_mode,
                         self.settings.dir_mode, durable=False) as runs:
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
    "ohlcv_gaps": ("Gaps (missing sessions, bars on closed days) in the stored datasets", ()),
    "ohlcv_datasets_with_gaps": ("Stored datasets with at least one gap", ()),
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
                 "backup_datasets", "backup_bytes", "gaps", "datasets_with_gaps"):
        if name in facts:
            samples.append(["ohlcv_" + name, {}, facts[name]])
    return samples


def write_metrics(path: Path, file_mode: int, runs: dict[str, Any]) -> None:
    """The Prometheus text file for node_exporter's textfile collector: the last figures
    of every command (newest run wins where two commands report the same series) and the
    last run, exit code and success of each. Labels carry fingerprints, never keys."""
    registry = prometheus_client.CollectorRegistry()
    gauges: dict[str, prometheus_client.Gauge] = {}

    def set_sample(name: str, labels: dict[str, str], value: float) -> None:
        # Created on first use: a figure no command has produced is absent, not a false 0.
        if name not in gauges:
            doc, label_names = METRICS[name]
            gauges[name] = prometheus_client.Gauge(name, doc, label_names, registry=registry)
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
    atomic_write(path, prometheus_client.generate_latest(registry), file_mode)


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
    daily_quota: int | None = None  # requests a day across every key; None: no daily limit

    @property
    def refresh_fits_a_day(self) -> bool:
        """Whether one day's quota covers the daily refresh (else the plan cannot keep up)."""
        return self.daily_quota is None or self.refresh_requests <= self.daily_quota


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
                    duration(refresh), bytes_per_bar * per_day_bars,
                    settings.rate_limit_per_day * max(1, len(settings.api_keys))
                    if settings.rate_limit_per_day else None)


def _measured_bytes_per_bar(store: EncryptedStore | None, interval: str) -> tuple[float | None, bool]:
    if store is None:
        return None, False
    size = rows = 0
    for item in store.listing():
        if (item.dataset and not item.error and item.dataset.interval == interval
                and not item.dataset.adjusted):
            rows += item.entry["rows"]
            size += item.entry["size"]
            if rows > 200_000:
                break
    return (size / rows, True) if rows else (None, False)


def bar_time_text(stamp: date, intraday: bool) -> str:
    """A bar's time as export writes it: a date; intraday, the New York time with its UTC
    offset ('2024-12-04 15:45:00-05:00'). `stamp`: a stored timestamp, or the Parquet
    statistic of the column (a date; an aware datetime, in UTC)."""
    if intraday and isinstance(stamp, datetime):  # aware: stored intraday bars carry a zone
        return stamp.astimezone(MARKET_TZ).isoformat(sep=" ")
    return (stamp.date() if isinstance(stamp, datetime) else stamp).isoformat()


def stale_now(dataset: DatasetId, newest: date, meta: dict[str, Any], now: datetime) -> bool:
    """Whether a stored dataset is behind, from its metadata alone: the calendar (which
    imports pandas) was read when the file was written, and recorded when its bars stop
    being current (stale_after). A file written before that, or for an exchange no
    calendar knows, is judged by weekdays (is_current's rule)."""
    limit = meta.get("stale_after")
    if limit == "never":
        return False
    if isinstance(limit, str):
        return now >= datetime.fromisoformat(limit)
    checked_at = meta.get("checked_at")
    if dataset.month and checked_at and datetime.fromisoformat(checked_at) >= month_end(dataset.month):
        return False
    return not weekday_current(newest, checked_at, now)


def status_of(ctx: RunContext) -> dict[str, Any]:
    """Every stored dataset (rows, first and last bar, last update, key) and today's quota."""
    store = ctx.store()
    now = ctx.clock()
    datasets: list[dict[str, Any]] = []
    for item in store.listing():  # from the catalogue; a file it cannot vouch for, its footer
        if item.error or item.dataset is None:
            datasets.append({"dataset": str(item.dataset or item.file), "path": item.file,
                             "error": item.error})
            continue
        dataset, summary, meta = item.dataset, item.entry, item.entry["meta"]
        first, last = (datetime.fromisoformat(summary[k]) for k in ("first_bar", "last_bar"))
        newest, intraday = last.date(), dataset.month is not None
        datasets.append({"dataset": str(dataset), "path": item.file, "rows": summary["rows"],
                         "first_bar": bar_time_text(first, intraday),
                         "last_bar": bar_time_text(last, intraday),
                         "age_days": (market_today() - newest).days,
                         "stale": stale_now(dataset, newest, meta, now),
                         "updated_at": meta.get("written_at"), "key": summary["key"],
                         "partial_history": bool(meta.get("partial_history")),
                         "gaps": meta.get("gaps")})  # None: written before gaps were counted
    facts = quota_facts(ctx.settings)
    quota = [{"key": fp, "day": market_today().isoformat(), "used": used,
              "limit": ctx.settings.rate_limit_per_day or None, "left": left}
             for fp, used, left in facts]
    ctx.facts["quota"] = facts
    counted = [row["gaps"] for row in datasets if row.get("gaps") is not None]
    if counted:  # as recorded when each file was written; `gaps` counts afresh
        ctx.facts.update(gaps=sum(counted), datasets_with_gaps=sum(1 for n in counted if n))
    return {"datasets": datasets, "quota": quota, "runs": RunRecord(ctx.settings).read(),
            "pending": sorted(PendingQueue(ctx.settings, store.key_ring).load())}


@dataclass
class DatasetGaps:
    """One dataset's line of the gap report."""

    dataset: DatasetId
    bars: int = 0
    gaps: Gaps = field(default_factory=Gaps)
    error: str = ""  # unreadable: IntegrityError's text
    vendor: tuple[date, ...] = ()  # of the gaps, those a repair found the vendor lacks
    file: str = ""  # relative to the data directory (opaque)

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"dataset": str(self.dataset), "path": self.file}
        if self.error:
            return entry | {"error": self.error}
        return entry | {"bars": self.bars, "gaps": self.gaps.count,
                        "missing": [d.isoformat() for d in self.gaps.missing],
                        "closed": [d.isoformat() for d in self.gaps.closed],
                        "checked": self.gaps.checked, "unchecked": self.gaps.unchecked,
                        "vendor": [d.isoformat() for d in self.vendor]}


@dataclass
class GapReport:
    datasets: list[DatasetGaps]
    fail_on_gaps: bool = False

    @property
    def gaps(self) -> int:
        return sum(d.gaps.count for d in self.datasets)

    @property
    def with_gaps(self) -> int:
        return sum(1 for d in self.datasets if d.gaps.count)

    @property
    def exit_code(self) -> int:
        if any(d.error for d in self.datasets):
            return IntegrityError.exit_code
        return 1 if self.fail_on_gaps and self.gaps else 0


def gap_report(ctx: RunContext, symbols: list[str], interval: str | None,
               fail_on_gaps: bool) -> GapReport:
    """Every stored dataset (or those of `symbols`, of `interval`) against its exchange's
    calendar. Reads only, without the lock, as export does: files are replaced whole."""
    store = ctx.store()
    wanted = {validate_symbol(s) for s in symbols}
    chosen = [d for d in store.datasets() if (not wanted or d.symbol in wanted)
              and (interval is None or d.interval == interval)]
    absent = sorted(wanted - {d.symbol for d in chosen})
    if absent:
        raise UsageError(f"nothing stored for {', '.join(absent)}"
                         + (f" at {interval}" if interval else "")
                         + ". Fix: download it first, or leave it out.")

    # Every calendar before any worker starts: a worker only reads files and compares.
    calendars = {d.symbol: calendar_for(d.symbol, ctx.settings) for d in chosen}

    def examine(dataset: DatasetId) -> DatasetGaps:
        file = store.relative(store.path(dataset))
        try:
            days, meta = store.read_days(dataset)
        except IntegrityError as exc:
            return DatasetGaps(dataset, error=str(exc), file=file)
        found = find_gaps(days, dataset.interval, calendars[dataset.symbol], dataset.month)
        vendor = vendor_gaps_of(meta) & set(found.missing + found.closed)
        return DatasetGaps(dataset, len(days), found, vendor=tuple(sorted(vendor)), file=file)

    report = GapReport(in_forked_workers(examine, chosen), fail_on_gaps)
    ctx.facts.update(gaps=report.gaps, datasets_with_gaps=report.with_gaps)
    return report


# Below this many items a second process costs more than it saves.
FORK_MIN_ITEMS = 100
Item = TypeVar("Item")
Done = TypeVar("Done")
_forked_work: Callable[[Any], Any] | None = None  # what a forked worker runs (its parent's)


def in_forked_workers(work: Callable[[Item], Done], items: list[Item]) -> list[Done]:
    """`work` of each of `items`, in order, spread over one forked process per core.
    Decrypting holds the GIL (base64 decoding is ~70% of Fernet's time): threads gained
    nothing (bench: gaps). Forked workers inherit the key ring and the calendars in
    memory, so no key is ever serialised; only the items and the results cross a pipe."""
    global _forked_work
    workers = min(os.cpu_count() or 1, len(items) // FORK_MIN_ITEMS)
    if workers < 2:
        return [work(item) for item in items]
    size = -(-len(items) // (workers * 4))  # a few chunks per worker: none waits on another
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    for stream in (sys.stdout, sys.stderr):  # a worker's exit flushes its copy of them
        if stream is not None:
            stream.flush()
    _forked_work = work
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return [result for chunk in pool.map(_work_chunk, chunks) for result in chunk]
    finally:
        _forked_work = None


def _work_chunk(chunk: list[Any]) -> list[Any]:
    assert _forked_work is not None  # set by in_forked_workers before the fork
    return [_forked_work(item) for item in chunk]


def status_exit_code(status: dict[str, Any]) -> int:
    return 5 if any("error" in row for row in status["datasets"]) else 0


def finish_run(ctx: RunContext, command: str, code: int, duration: float) -> None:
    """Record the run (state/runs.json) and write the metrics file; a failure here is
    reported as a note, never fatal: the command itself is done."""
    try:
        ctx.monitor.snapshot("end")
        samples = run_samples(command, duration, ctx.monitor.peak(), ctx.facts)
        runs = RunRecord(ctx.settings).record(command, code, time.time(), samples)
        if ctx.settings.metrics_file is not None:
            write_metrics(ctx.settings.metrics_file, ctx.settings.metrics_file_mode, runs)
    except (OSError, OHLCVError) as exc:
        ctx.notify(f"could not record the run or write the metrics file: {exc}")
    log.info("command %s finished with exit code %d in %.2f s", command, code, duration)


# =========================================================================================
# 12. The library's front door
# =========================================================================================

Result = Any


class SecureOHLCVDownloader:
    """The library's front door: one object per run, built from Settings. Each command
    delegates to its section with the run context, and is recorded (state/runs.json and
    the metrics file) as it is on the command line.

    `show_key`: how a newly generated key reaches a person. None (the default, and cron):
    it is written to a 0600 file in the state directory; the CLI on a terminal prints it."""

    def __init__(self, settings: Settings, keyring_store: KeyringKeyStore | None = None) -> None:
        self.ctx = RunContext.build(settings, keyring_store)
        self.show_key: Callable[[NewKey], None] | None = None

    @classmethod
    def from_env(cls) -> SecureOHLCVDownloader:
        """Settings from the environment and `.env`; the keyring picked by `keyring`."""
        return cls(load_settings())

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def warnings(self) -> list[str]:
        return self.ctx.warnings

    def key_ring(self) -> KeyRing:
        return self.ctx.custody.ring()

    def store(self) -> EncryptedStore:
        """The encrypted store, for reading (writers take the lock: `ctx.exclusive()`)."""
        return self.ctx.store()

    @contextlib.contextmanager
    def command(self, name: str, code_of: Callable[[Result], int] | None = None,
                record: bool = True) -> Iterator[list[Result]]:
        """Time a command, then record its run and write the metrics file, whatever the
        outcome. Put the command's result in the yielded list for `code_of` to judge."""
        started = time.monotonic()
        log.info("command %s started", name)
        outcome: list[Result] = []
        code = 1
        try:
            yield outcome
            code = code_of(outcome[0]) if code_of and outcome else 0
        except BaseException as exc:
            code = exit_code_of(exc)
            raise
        finally:
            if record:
                finish_run(self.ctx, name, code, time.monotonic() - started)

    def _run(self, name: str, body: Callable[[], Result], record: bool = True) -> Result:
        with self.command(name, lambda r: getattr(r, "exit_code", 0), record) as outcome:
            outcome.append(body())
        return outcome[0]

    # -- keys ------------------------------------------------------------------------

    def init(self) -> InitReport:
        return self._run("init", lambda: init_store(self.ctx, self.show_key))

    def check_keys(self) -> KeyCheckReport:
        return self._run("check-keys", lambda: check_keys(self.ctx))

    def rotate_key(self) -> RotationReport:
        """A new primary key, every dataset re-encrypted under it; resumable."""
        return self._run("rotate-key", KeyRotation(self.ctx, self.show_key).run)

    def remove_key(self, key_fp: str, confirm: bool) -> RemoveKeyReport:
        return self._run("remove-key", lambda: remove_key(self.ctx, key_fp, confirm))

    def migrate_store(self) -> MigrationReport:
        """A store of the earlier layout moved to opaque file names; resumable."""
        return self._run("migrate-store", StoreMigration(self.ctx, self.show_key).run)

    # -- data ------------------------------------------------------------------------

    def download(self, symbols: list[str], interval: str = "daily", adjusted: bool = False,
                 full: bool = False, month: str | None = None,
                 on_result: Callable[[DatasetResult], None] | None = None,
                 repair: bool = False) -> DownloadReport:
        return self._run("download", lambda: run_download(
            self.ctx, symbols, interval, adjusted, full, month, on_result, repair))

    def load(self, symbol: str, interval: str = "daily", adjusted: bool = False,
             start: str | date | None = None, end: str | date | None = None) -> pd.DataFrame:
        """The stored bars of one symbol as a DataFrame indexed by timestamp, oldest first."""
        return load_frame(self.ctx.store(), symbol, interval, adjusted, start, end)

    def load_many(self, symbols: list[str], interval: str = "daily",
                  adjusted: bool = False) -> pd.DataFrame:
        """Many symbols in one DataFrame with a categorical `symbol` column."""
        return load_many(self.ctx.store(), symbols, interval, adjusted)

    def status(self) -> dict[str, Any]:
        with self.command("status", status_exit_code) as outcome:
            outcome.append(status_of(self.ctx))
        return outcome[0]

    def gaps(self, symbols: list[str] | None = None, interval: str | None = None,
             fail_on_gaps: bool = False) -> GapReport:
        """Each stored dataset (or those named) against its exchange's calendar."""
        return self._run("gaps", lambda: gap_report(self.ctx, symbols or [], interval,
                                                    fail_on_gaps))

    def estimate(self, symbols: int, interval: str = "daily", years: float = 20.0) -> Estimate:
        def body() -> Estimate:
            try:
                found = self.ctx.store()
                store: EncryptedStore | None = found if any(found.datasets()) else None
            except (OHLCVError, FileNotFoundError):
                store = None  # not initialised yet: estimate from the documented defaults
            return estimate(self.settings, store, symbols, interval, years)
        return self._run("estimate", body)

    # -- lifecycle -------------------------------------------------------------------

    def backup(self, dest: Path | None = None) -> BackupReport:
        def body() -> BackupReport:
            report = BackupWriter(self.ctx).write(dest)
            self.ctx.facts.update(backup_datasets=report.datasets, backup_bytes=report.bytes)
            return report
        return self._run("backup", body)

    def verify_backup(self, archive: Path | None = None, sample: int | None = 5) -> VerifyReport:
        def body() -> VerifyReport:
            ring, chosen = self.ctx.custody.ring(), archive
            if chosen is None:  # the newest by manifest, not by name
                chosen, notes = newest_archive(self.settings.backup_dir, ring)
                if chosen is None:
                    raise UsageError(f"no backup archive in {self.settings.backup_dir}; run backup first.")
                self.ctx.warnings += notes
            if not chosen.is_file():
                raise UsageError(f"{chosen} is not a file.")
            report = verify_backup(chosen, ring, sample)
            self.ctx.facts.update(verify_members_checked=report.members_checked,
                                  verify_datasets_decrypted=report.datasets_decrypted,
                                  verify_problems=len(report.problems))
            return report
        return self._run("verify-backup", body)

    def recover(self, from_backup: Path | None = None, key_file: Path | None = None,
                prompt: Callable[[], str] | None = None) -> RecoverReport:
        return self._run("recover", lambda: recover(self.ctx, from_backup, key_file, prompt,
                                                    self.show_key))

    def cleanup(self, dry_run: bool = False) -> CleanupReport:
        # A dry run changes nothing, not even the run record.
        return self._run("cleanup", lambda: cleanup(self.ctx, dry_run), record=not dry_run)


if __name__ == "__main__":
    import sys

    # Run as a script, this file is `__main__`; the CLI's `import secure_ohlcv_downloader`
    # must find this very module, not load a second copy of it.
    sys.modules.setdefault("secure_ohlcv_downloader", sys.modules[__name__])
    from secure_ohlcv_cli import main

    sys.exit(main())
