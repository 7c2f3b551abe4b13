"""Settings of the Secure OHLCV Downloader: the one place that knows every variable.

Map of this file:
    OHLCVError     -- the root of the error family (each class carries its exit code);
                      it lives here because every module imports this one
    VARIABLES      -- every environment variable: name, default, meaning (the README
                      table and .env.example are checked against it by the tests)
    Secret         -- a string that never shows itself in repr(), str() or logs; every
                      secret value is registered for log redaction when it is wrapped
    parse_key_list -- the one parser of key-list text (variable, `.env`, key file, prompt):
                      Fernet keys, then the naming key as `naming:<key>`
    open_private_file -- a `.env` or key file: never through a link, never another user's
    Settings       -- the frozen, validated settings of one run
    load_settings  -- reads the environment and `.env` (a real variable wins), validates
                      everything at once, raises ConfigError naming the variable

A bad value stops the program before it does anything; ConfigError is exit code 3.
Messages name the variable and the problem and never echo a secret value. Configured
paths are made absolute but never resolved: a link at a configured path is refused where
the path is used, never silently followed.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("secure_ohlcv.config")

DEFAULT_BASE_URL = "https://www.alphavantage.co/query"
KEYRING_SERVICE = "secure-ohlcv-downloader"
ENV_FILE = ".env"


class OHLCVError(Exception):
    """Base of every error the tool reports to an operator. `exit_code` is its exit code;
    secure_ohlcv_downloader.EXIT_CODES is the table the README and --help are checked
    against."""

    exit_code = 1


class ConfigError(OHLCVError, ValueError):
    """A setting or a configured file is missing, malformed or unsafe. The message names
    the variable or file and the fix."""

    exit_code = 3


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str
    secret: bool = False


# The order here is the order of the README table and of .env.example.
VARIABLES: tuple[Variable, ...] = (
    Variable("ALPHA_VANTAGE_API_KEY", "",
             "Alpha Vantage API key; several keys comma-separated share the load. "
             "Empty: the public `demo` key, which serves IBM only.", secret=True),
    Variable("ALPHA_VANTAGE_BASE_URL", DEFAULT_BASE_URL,
             "The `/query` endpoint: the real API, a proxy, a mirror or the local emulator."),
    Variable("OHLCV_ENCRYPTION_KEY", "",
             "Fernet keys, comma-separated, primary first, then `naming:<key>` (the naming "
             "key of the data files). Fallback when no OS keyring backend works (headless "
             "server, cron) and the recovery path.", secret=True),
    Variable("OHLCV_DATA_DIR", "data", "Encrypted datasets (mode OHLCV_DIR_MODE)."),
    Variable("OHLCV_BACKUP_DIR", "backups", "Encrypted backup archives."),
    Variable("OHLCV_STATE_DIR", "state",
             "Run state: the encrypted key canary, quota counters, run records."),
    Variable("OHLCV_LOG_FILE", "secure_downloader.log", "Log file (mode OHLCV_FILE_MODE)."),
    Variable("OHLCV_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR."),
    Variable("OHLCV_CONNECT_TIMEOUT", "10", "Seconds to wait for a connection."),
    Variable("OHLCV_REQUEST_TIMEOUT", "30", "Seconds to wait for the server to answer (read timeout)."),
    Variable("OHLCV_MAX_RETRIES", "5",
             "Retries of one request after connection errors, 5xx, bad bodies or throttling "
             "(a host name that does not resolve: one retry at most)."),
    Variable("OHLCV_BACKOFF_SECONDS", "2",
             "First retry delay; it doubles each retry (with jitter), capped at 60 s."),
    Variable("OHLCV_DATATYPE", "csv",
             "Wire format asked of the API: csv (smaller, faster) or json. Both give the same data."),
    Variable("OHLCV_RATE_LIMIT_PER_SECOND", "",
             "Requests per second per API key. Empty: 1, or the per-minute figure / 60 when set."),
    Variable("OHLCV_RATE_LIMIT_PER_MINUTE", "0",
             "Requests per minute per API key (your premium plan's figure); 0 means no per-minute cap."),
    Variable("OHLCV_RATE_LIMIT_PER_DAY", "",
             "Requests per day per API key. Empty: 25 (free key), or 0 = unlimited when a "
             "per-minute figure is set (premium plans have no daily cap)."),
    Variable("OHLCV_MAX_WORKERS", "4", "Requests in flight at once, all under the shared rate limiter."),
    Variable("OHLCV_RETENTION_DAYS", "0", "Days of bars to keep on cleanup; 0 keeps everything."),
    Variable("OHLCV_BACKUP_KEEP", "7", "Newest backup archives to keep."),
    Variable("OHLCV_MAX_MEMORY_MB", "1024", "Resident memory limit of a run (warning at 80%)."),
    Variable("OHLCV_MIN_FREE_DISK_MB", "100", "Refuse to start a write below this much free disk."),
    Variable("OHLCV_METRICS_FILE", "", "Prometheus text file written at the end of every command."),
    Variable("OHLCV_LOCK_TIMEOUT", "60",
             "Seconds to wait for another run's data-directory lock before giving up."),
    Variable("OHLCV_DIR_MODE", "0700", "Mode of every directory the tool creates."),
    Variable("OHLCV_FILE_MODE", "0600", "Mode of every file the tool creates."),
    Variable("OHLCV_METRICS_FILE_MODE", "0644",
             "Mode of the metrics file: node_exporter, another user, must read it; it holds "
             "counts and key fingerprints, never a key."),
)
VARIABLE_NAMES = frozenset(v.name for v in VARIABLES)
_DEFAULTS = {v.name: v.default for v in VARIABLES}


class Secret:
    """A secret string. It shows only as `Secret('***')`; `.reveal()` is the one way out.

    Wrapping is registration: every value ever wrapped is in `Secret.known()`, which the
    log and message redaction reads. Every secret enters the program through here (API
    keys and Fernet keys from the environment, `.env`, the keyring, a key file, a prompt,
    or freshly generated), so nothing can be forgotten by a caller."""

    __slots__ = ("_value",)
    _known: frozenset[str] = frozenset()
    _known_lock = threading.Lock()

    def __init__(self, value: str) -> None:
        self._value = value
        if len(value) >= 4 and value not in Secret._known:
            with Secret._known_lock:
                Secret._known = Secret._known | {value}

    @staticmethod
    def known() -> frozenset[str]:
        """Every value ever wrapped (a new set object whenever one is added)."""
        return Secret._known

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    """Every tunable of one run, validated. Build it with `load_settings()`."""

    api_keys: tuple[Secret, ...]
    base_url: str
    encryption_keys: tuple[Secret, ...]
    data_dir: Path
    backup_dir: Path
    state_dir: Path
    log_file: Path
    log_level: str
    connect_timeout: float
    request_timeout: float
    max_retries: int
    backoff_seconds: float
    datatype: str
    rate_limit_per_second: float
    rate_limit_per_minute: int
    rate_limit_per_day: int
    max_workers: int
    retention_days: int
    backup_keep: int
    max_memory_mb: int
    min_free_disk_mb: int
    metrics_file: Path | None
    lock_timeout: float
    dir_mode: int
    file_mode: int
    metrics_file_mode: int
    env_file: Path = Path(ENV_FILE)
    encryption_key_in_env_file: bool = False  # OHLCV_ENCRYPTION_KEY came from .env, not the environment
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value this run knows, for the log redaction filter."""
        return tuple(s.reveal() for s in self.api_keys + self.encryption_keys)


# -- parsing -------------------------------------------------------------------------------

def _int(name: str, raw: str, minimum: int = 0, maximum: int = 10**9) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}.") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}.")
    return value


def _seconds(name: str, raw: str, *, zero_ok: bool = False, low: float = 0.001,
             high: float = 86400.0) -> float:
    """A number of seconds (or a rate) between `low` and `high`, or 0 with `zero_ok`.
    The bounds keep values the OS cannot sleep or time out on out of the run."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}.") from None
    if value == 0 and zero_ok:
        return value
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be {'0 or ' if zero_ok else ''}between {low:g} and "
                          f"{high:g}, got {raw!r}.")
    return value


def _mode(name: str, raw: str, *, directory: bool, others_may_read: bool = False) -> int:
    try:
        value = int(raw.strip(), 8)
    except ValueError:
        raise ConfigError(f"{name} must be an octal mode such as "
                          f"{'0700' if directory else '0600'}, got {raw!r}.") from None
    needed = stat.S_IRWXU if directory else stat.S_IRUSR | stat.S_IWUSR
    if value & ~0o777 or value & needed != needed:
        raise ConfigError(f"{name}={raw.strip()} must give the owner "
                          f"{'read, write and search' if directory else 'read and write'} "
                          "and use only permission bits (e.g. 0700 / 0600).")
    if value & (stat.S_IWOTH | stat.S_IXOTH if others_may_read else stat.S_IRWXO):
        raise ConfigError(f"{name}={raw.strip()} grants access to all users; the data is "
                          "confidential. Use 0700/0600, or 0750/0640 to share with a group.")
    return value


def _secrets(name: str, raw: str, check: Callable[[str], str | None]) -> tuple[Secret, ...]:
    if not raw.strip():
        return ()
    values = [part.strip() for part in raw.split(",")]
    for position, value in enumerate(values, 1):
        problem = "is empty" if not value else check(value)
        if problem:
            where = f"item {position} of {name}" if len(values) > 1 else name
            raise ConfigError(f"{where} {problem} (the value is not shown).")
    return tuple(Secret(v) for v in values)


NAMING_PREFIX = "naming:"  # marks the naming key among the Fernet keys of a key list


def parse_key_list(text: str, source: str = "OHLCV_ENCRYPTION_KEY") -> tuple[Secret, ...]:
    """Fernet keys, primary first, then at most one naming key written `naming:<key>`, as
    the variable, `.env`, a key file or a prompt give them: separated by commas, spaces or
    new lines, '#' comments, an optional `OHLCV_ENCRYPTION_KEY=` (or `export ...=`) in
    front, quotes around. Each item comes back as written (the naming key keeps its
    prefix; its bare value is registered for redaction too). ConfigError naming `source`
    and the item when one is not a key; the value is never shown."""
    text = re.sub(r"#.*", "", text)
    text = re.sub(r"(?m)^\s*(export\s+)?OHLCV_ENCRYPTION_KEY\s*=", "", text)
    values = [v.strip().strip("'\"") for v in re.split(r"[,\s]+", text) if v.strip()]
    for position, value in enumerate(values, 1):
        bare = value.removeprefix(NAMING_PREFIX)
        Secret(bare)  # a naming key is a secret even before it is known to be a sound one
        problem = fernet_key_problem(bare)
        if problem:
            where = f"item {position} of {source}" if len(values) > 1 else source
            raise ConfigError(f"{where} {problem} (the value is not shown).")
    naming = [v for v in values if v.startswith(NAMING_PREFIX)]
    if len(naming) > 1:
        raise ConfigError(f"{source} holds {len(naming)} naming keys (items written "
                          f"{NAMING_PREFIX}...); a key ring has one. Fix: keep the one your "
                          "offline copy holds (the values are not shown).")
    if naming and len(values) == 1:
        raise ConfigError(f"{source} holds a naming key but no Fernet key. Fix: give the "
                          "whole value your offline copy holds, primary key first.")
    if naming and not values[-1].startswith(NAMING_PREFIX):
        raise ConfigError(f"{source}: the naming key (written {NAMING_PREFIX}...) must be "
                          "the last item. Fix: give the value as it was handed over, "
                          "Fernet keys first (the values are not shown).")
    return tuple(Secret(v) for v in values)


def _api_key_problem(value: str) -> str | None:
    if not value.isascii() or not value.isprintable() or " " in value:
        return "contains spaces or characters an API key never has"
    return None


def fernet_key_problem(value: str) -> str | None:
    """Why `value` is not a Fernet key, or None when it is one (32 bytes, url-safe base64)."""
    try:
        # validate=True: without it, characters outside the alphabet are silently dropped.
        raw = base64.b64decode(value.encode("ascii"), altchars=b"-_", validate=True)
        if "+" in value or "/" in value:
            raise ValueError("standard, not url-safe, base64")
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return "is not url-safe base64; a Fernet key is 44 characters ending in '='"
    if len(raw) != 32:
        return (f"decodes to {len(raw)} bytes, not 32; a Fernet key is 44 url-safe "
                "base64 characters ending in '='")
    return None


def _base_url(name: str, raw: str) -> str:
    # The value is never echoed: a mistyped URL may carry a password or an API key.
    try:
        parts = urlsplit(raw.strip())
        credentials = parts.username or parts.password
        parts.port  # noqa: B018 -- raises ValueError for a port that is not 0-65535
    except ValueError:
        raise ConfigError(f"{name} is not a URL with a valid port (the value is not shown).") from None
    if credentials or parts.query or "apikey" in raw.lower():
        raise ConfigError(f"{name} must not carry credentials or a query string (the value "
                          "is not shown); set the API key in ALPHA_VANTAGE_API_KEY.")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL such as {DEFAULT_BASE_URL} "
                          f"(got scheme {parts.scheme or '(none)'!r}).")
    return raw.strip()


def _path(name: str, raw: str, base: Path) -> Path:
    text = raw.strip()
    if not text or "\x00" in text:
        raise ConfigError(f"{name} must be a path.")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user for a user that does not exist
        raise ConfigError(f"{name}: {text.split('/')[0]} names no user on this machine.") from None
    # Absolute, never resolved: resolving would follow a link planted at the path (a shared
    # metrics directory, say) and the tool would write through it. Links are refused
    # where each path is used (lstat, O_NOFOLLOW).
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


# -- loading -------------------------------------------------------------------------------

def open_private_file(path: Path, what: str) -> tuple[str, list[str]]:
    """The text of a file that may hold keys (`.env`, a key file), and warnings about it.

    Refused (ConfigError, exit 3): a link, anything but a regular file, a file another
    user owns, or one that group or others can write (they could swap the keys or point
    ALPHA_VANTAGE_BASE_URL at their own server and receive the API key). Readable by
    group or others: a warning. Opened once with O_NOFOLLOW and checked on that very
    descriptor, so the file checked is the file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(f"{what} {path} is a symbolic link; refusing to follow it (it "
                              "may have been planted by another user). Fix: replace it with "
                              "the file itself, mode 600.") from None
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}.") from None
    with open(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file; refusing to read it.")
        if info.st_uid != os.geteuid():
            raise ConfigError(f"{what} {path} belongs to uid {info.st_uid}, not to this user "
                              f"(uid {os.geteuid()}): its content cannot be trusted. Fix: "
                              f"create your own copy and `chmod 600 {path}`.")
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{what} {path} is writable by group or others (mode {mode:04o}): "
                              f"its content cannot be trusted. Fix: `chmod 600 {path}` after "
                              "checking what it holds.")
        warnings = []
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(f"{what} {path} is readable by group or others (mode {mode:04o}); "
                            f"it may hold keys: run `chmod 600 {path}`.")
        data = handle.read(1 << 20)
    try:
        return data.decode("utf-8"), warnings
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text.") from None


def read_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """Values of a `.env` file and warnings about it; no file, no values."""
    if not os.path.lexists(path):
        return {}, []
    from dotenv import dotenv_values  # only where a .env exists: not on every start-up

    text, warnings = open_private_file(path, ".env file")
    values = {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}
    return values, warnings


def load_settings(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Settings:
    """Settings from the environment and `.env` in the working directory (the environment wins)."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    file_values, warnings = read_env_file(cwd / ENV_FILE)
    unknown = sorted(k for k in file_values if k.startswith("OHLCV_") and k not in VARIABLE_NAMES)
    warnings += [f"{ENV_FILE}: unknown variable {k} is ignored (a typo?)." for k in unknown]

    def get(name: str) -> str:
        if name in environ:
            return environ[name]
        return file_values.get(name, _DEFAULTS[name])

    per_minute = _int("OHLCV_RATE_LIMIT_PER_MINUTE", get("OHLCV_RATE_LIMIT_PER_MINUTE"))
    raw_per_second = get("OHLCV_RATE_LIMIT_PER_SECOND").strip()
    if raw_per_second:
        per_second = _seconds("OHLCV_RATE_LIMIT_PER_SECOND", raw_per_second, high=10000.0)
    else:
        per_second = per_minute / 60 if per_minute else 1.0
    raw_per_day = get("OHLCV_RATE_LIMIT_PER_DAY").strip()
    per_day = _int("OHLCV_RATE_LIMIT_PER_DAY", raw_per_day) if raw_per_day else (0 if per_minute else 25)

    level = get("OHLCV_LOG_LEVEL").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"OHLCV_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}.")
    metrics = get("OHLCV_METRICS_FILE").strip()
    datatype = get("OHLCV_DATATYPE").strip().lower()
    if datatype not in ("csv", "json"):
        raise ConfigError(f"OHLCV_DATATYPE must be csv or json, got {datatype!r}.")

    return Settings(
        api_keys=_secrets("ALPHA_VANTAGE_API_KEY", get("ALPHA_VANTAGE_API_KEY"), _api_key_problem),
        base_url=_base_url("ALPHA_VANTAGE_BASE_URL", get("ALPHA_VANTAGE_BASE_URL")),
        encryption_keys=parse_key_list(get("OHLCV_ENCRYPTION_KEY")),
        data_dir=_path("OHLCV_DATA_DIR", get("OHLCV_DATA_DIR"), cwd),
        backup_dir=_path("OHLCV_BACKUP_DIR", get("OHLCV_BACKUP_DIR"), cwd),
        state_dir=_path("OHLCV_STATE_DIR", get("OHLCV_STATE_DIR"), cwd),
        log_file=_path("OHLCV_LOG_FILE", get("OHLCV_LOG_FILE"), cwd),
        log_level=level,
        connect_timeout=_seconds("OHLCV_CONNECT_TIMEOUT", get("OHLCV_CONNECT_TIMEOUT")),
        request_timeout=_seconds("OHLCV_REQUEST_TIMEOUT", get("OHLCV_REQUEST_TIMEOUT")),
        max_retries=_int("OHLCV_MAX_RETRIES", get("OHLCV_MAX_RETRIES")),
        backoff_seconds=_seconds("OHLCV_BACKOFF_SECONDS", get("OHLCV_BACKOFF_SECONDS")),
        datatype=datatype,
        rate_limit_per_second=per_second,
        rate_limit_per_minute=per_minute,
        rate_limit_per_day=per_day,
        max_workers=_int("OHLCV_MAX_WORKERS", get("OHLCV_MAX_WORKERS"), minimum=1, maximum=64),
        retention_days=_int("OHLCV_RETENTION_DAYS", get("OHLCV_RETENTION_DAYS"), maximum=36500),
        backup_keep=_int("OHLCV_BACKUP_KEEP", get("OHLCV_BACKUP_KEEP"), minimum=1),
        max_memory_mb=_int("OHLCV_MAX_MEMORY_MB", get("OHLCV_MAX_MEMORY_MB"), minimum=1),
        min_free_disk_mb=_int("OHLCV_MIN_FREE_DISK_MB", get("OHLCV_MIN_FREE_DISK_MB")),
        metrics_file=_path("OHLCV_METRICS_FILE", metrics, cwd) if metrics else None,
        lock_timeout=_seconds("OHLCV_LOCK_TIMEOUT", get("OHLCV_LOCK_TIMEOUT"), zero_ok=True),
        dir_mode=_mode("OHLCV_DIR_MODE", get("OHLCV_DIR_MODE"), directory=True),
        file_mode=_mode("OHLCV_FILE_MODE", get("OHLCV_FILE_MODE"), directory=False),
        metrics_file_mode=_mode("OHLCV_METRICS_FILE_MODE", get("OHLCV_METRICS_FILE_MODE"),
                                directory=False, others_may_read=True),
        env_file=cwd / ENV_FILE,
        encryption_key_in_env_file="OHLCV_ENCRYPTION_KEY" not in environ
        and bool(file_values.get("OHLCV_ENCRYPTION_KEY", "").strip()),
        warnings=tuple(warnings),
    )
