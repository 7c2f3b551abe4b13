"""Check that this machine can run the Secure OHLCV Downloader, changing nothing.

Map of this file:
    Check, OK/WARN/FAIL  -- one result: name, status, detail, and the fix an operator can act on
    read_pins            -- `name==version` pins of a pip-compile file (hashes, comments, markers)
    check_*              -- one small function per check: Python, packages, settings, `.env`,
                            API key, keyring backend, encryption keys, directories, log file, disk
    initialised_by       -- whether --init has run here: before it, what --init will create
                            or choose (directories, the key, where it is kept) is no failure;
                            after it, a missing directory or key is one
    render_table         -- the human table; `--json` prints {"ok": ..., "checks": [...]}
    main                 -- runs every check; exit 0 when none failed (warnings allowed),
                            3 when one failed (configuration or key problem), 2 on usage errors

It never prompts, creates, chmods or writes anything, and never prints a secret (at most a
key fingerprint). Keyring reads go through KeyringKeyStore, which gives up after a timeout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OK, WARN, FAIL = "OK", "WARN", "FAIL"
INIT_FIX = "run python secure_ohlcv_downloader.py --init"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> tuple[dict[str, str], list[str]]:
    """Pins {canonical name: version} of a requirements file, and the lines that are not pins."""
    pins, bad = {}, []
    for line in re.sub(r"\\\r?\n", " ", text).splitlines():
        line = re.split(r"\s+--", re.sub(r"(^|\s)#.*", "", line))[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement, _, marker = line.partition(";")
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==\s*(\S+)",
                             requirement.strip())
        if not match:
            bad.append(line)
        elif _applies(marker.strip()):
            pins[canonical(match[1])] = match[3]
    return pins, bad


def _applies(marker: str) -> bool:
    """Whether an environment marker holds here; without `packaging`, check the pin anyway."""
    try:
        from packaging.markers import Marker
        return not marker or Marker(marker).evaluate()
    except Exception:
        return True


def split_fix(message: str) -> tuple[str, str]:
    """The module's messages end in 'Fix: ...'; the table shows that part as the fix."""
    problem, _, fix = message.partition(" Fix: ")
    return problem, fix


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info >= (3, 11):  # noqa: UP036 (reports an older Python instead of failing)
        return Check("python", OK, f"Python {version}")
    return Check("python", FAIL, f"Python {version}; 3.11 or newer is required",
                 "install Python 3.11 or newer and recreate the virtual environment")


def check_packages(requirements: Path) -> Check:
    fix = f"pip install -r {requirements}"
    try:
        pins, bad = read_pins(requirements.read_text(encoding="utf-8"))
    except OSError as exc:
        return Check("packages", FAIL, f"cannot read {requirements}: {exc.strerror}",
                     "restore requirements-secure.txt next to this script, "
                     "or pass --requirements PATH")
    installed: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:
            installed.setdefault(canonical(dist.metadata["Name"]), dist.version)
    problems = [f"{name} missing (pinned {pin})" if name not in installed
                else f"{name} {installed[name]} installed, {pin} pinned"
                for name, pin in sorted(pins.items())
                if name not in installed or installed[name] != pin]
    problems += [f"not an exact pin: {line}" for line in bad]
    if problems:
        return Check("packages", FAIL, "; ".join(problems), fix)
    return Check("packages", OK, f"{len(pins)} pinned packages installed at their versions")


def check_env_file(path: Path, settings_warnings: tuple[str, ...] = ()) -> Check:
    """Which state `.env` is in: absent, private, readable by others or naming unknown
    variables (WARN), or refused (a link, another user's, writable by others: FAIL)."""
    from config import ConfigError, read_env_file
    if not os.path.lexists(path):
        return Check(".env file", OK, f"absent ({path}): settings come from the environment "
                     "and the defaults")
    try:
        _, readable = read_env_file(path)
    except ConfigError as exc:
        problem, fix = split_fix(str(exc))
        return Check(".env file", FAIL, problem,
                     fix or f"replace {path} with a regular file of yours, mode 600")
    found = f"{path}: mode {stat.S_IMODE(os.lstat(path).st_mode):04o}, owned by you"
    unknown = [w for w in settings_warnings if w not in readable]
    if readable or unknown:
        fixes = ([f"chmod 600 {path}"] if readable else []) + \
                (["correct or remove the unknown variable it names"] if unknown else [])
        return Check(".env file", WARN, f"{found}; " + " ".join(readable + unknown),
                     ", and ".join(fixes))
    return Check(".env file", OK, f"{found}: private, no unknown variables")


def check_api_key(settings) -> Check:
    if not settings.api_keys:
        return Check("api key", WARN,
                     "ALPHA_VANTAGE_API_KEY is empty: the demo key serves IBM only",
                     "set ALPHA_VANTAGE_API_KEY to your key from alphavantage.co")
    return Check("api key", OK, f"{len(settings.api_keys)} key(s) set (not shown)")


def check_keyring_backend(info, env_keys: bool, initialised: str, env_file: Path) -> Check:
    if not info.usable:
        if env_keys:
            return Check("keyring backend", WARN, f"no usable OS keyring ({info.name}); the "
                         "headless fallback OHLCV_ENCRYPTION_KEY is used")
        if not initialised:  # --init keeps the new key ring in .env itself
            return Check("keyring backend", WARN, f"no usable OS keyring ({info.name}); "
                         f"--init will keep the key ring in {env_file} as "
                         "OHLCV_ENCRYPTION_KEY (the headless fallback)",
                         "to keep it in an OS keyring instead, run a Secret Service "
                         "(gnome-keyring) in this session before --init")
        problem, fix = split_fix(info.problem)
        return Check("keyring backend", FAIL, f"{info.name}: {problem}", fix)
    if not info.secure:
        return Check("keyring backend", WARN, *split_fix(info.problem))
    return Check("keyring backend", OK, info.name)


def check_encryption_keys(sod, store, env_keys, initialised: str, env_file: Path) -> Check:
    """Where the run's keys come from, by fingerprint, the naming key's too. The keyring
    read is a probe with a timeout."""
    env_ring = sod.ring_of(env_keys)
    env = env_ring and f"OHLCV_ENCRYPTION_KEY holds {sod.described_keys(env_ring)}"
    also = f"; {env}" if env else ""
    try:
        keys = store.load() if store.info.usable else None
    except sod.KeyStoreError as exc:
        problem, fix = split_fix(str(exc))
        return Check("encryption keys", WARN if env else FAIL,
                     f"keyring unreadable: {problem}{also}", fix)
    if keys:
        return with_naming_key(sod, keys, f"OS keyring holds {sod.described_keys(keys)}{also}",
                               initialised)
    if env:
        return with_naming_key(sod, env_ring, env, initialised)
    home = "the OS keyring" if store.info.usable else str(env_file)
    if not initialised:
        return Check("encryption keys", OK, f"none yet (--init generates one and stores it "
                     f"in {home})")
    return Check("encryption keys", FAIL, f"no key in {home} nor in OHLCV_ENCRYPTION_KEY, "
                 f"but this store was initialised ({initialised})",
                 "set OHLCV_ENCRYPTION_KEY to the keys from your offline copy, or run "
                 "python secure_ohlcv_downloader.py --recover --key-file FILE")


def with_naming_key(sod, keys, detail: str, initialised: str) -> Check:
    """The keys in use, which an initialised store needs with its naming key."""
    if sod.naming_key_of(keys) is not None:
        return Check("encryption keys", OK, detail)
    if not initialised:
        return Check("encryption keys", OK, f"{detail} (--init adds the naming key)")
    return Check("encryption keys", FAIL, f"{detail}: no naming key, but this store was "
                 f"initialised ({initialised})",
                 "run python secure_ohlcv_downloader.py --migrate-store")


def check_directory(sod, variable: str, path: Path, mode: int, initialised: str) -> Check:
    name = variable.removeprefix("OHLCV_").lower().replace("_", " ")
    if not os.path.lexists(path):
        if initialised:
            return Check(name, FAIL, f"{path} ({variable}) does not exist", INIT_FIX)
        parent = nearest_existing(path.parent)
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return Check(name, FAIL, f"{path} ({variable}) does not exist and cannot be "
                         f"created: {parent} is not a directory you can write",
                         f"create it as its owner (install -d -m {mode:o} {path}), or point "
                         f"{variable} at a directory you can write")
        return Check(name, OK, f"{path} not yet created (--init creates it {mode:04o})")
    try:
        sod.check_private_dir(path, mode)
    except (sod.UnsafePathError, OSError) as exc:
        problem, fix = split_fix(str(exc))
        return Check(name, FAIL, problem, fix or f"point {variable} at a directory of yours")
    return Check(name, OK, f"{path} (mode {stat.S_IMODE(os.stat(path).st_mode):04o})")


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_log_file(path: Path, file_mode: int) -> Check:
    if path.exists():
        if not path.is_file() or not os.access(path, os.W_OK):
            return Check("log file", FAIL, f"{path} is not a writable file",
                         f"chown $USER {path} && chmod {file_mode:o} {path}, or set OHLCV_LOG_FILE")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & ~file_mode:
            return Check("log file", WARN, f"{path} has mode {mode:04o}, looser than "
                         f"{file_mode:04o} (the next run tightens it)",
                         f"chmod {file_mode:o} {path}")
        return Check("log file", OK, f"{path} writable (mode {mode:04o})")
    parent = nearest_existing(path.parent)
    if os.access(parent, os.W_OK | os.X_OK):
        return Check("log file", OK, f"{path} will be created (in writable {parent})")
    return Check("log file", FAIL, f"{path} does not exist and {parent} is not writable",
                 "set OHLCV_LOG_FILE to a path in a directory you can write")


def check_disk(data_dir: Path, minimum_mb: int) -> Check:
    where = nearest_existing(data_dir)
    free_mb = shutil.disk_usage(where).free // 2**20
    if free_mb < minimum_mb:
        return Check("disk space", FAIL, f"{free_mb} MB free at {where}, below "
                     f"OHLCV_MIN_FREE_DISK_MB={minimum_mb}",
                     "free space on that filesystem or point OHLCV_DATA_DIR at a larger one")
    return Check("disk space", OK, f"{free_mb} MB free at {where} (minimum {minimum_mb} MB)")


def initialised_by(sod, settings) -> str:
    """What shows that --init has run here, "" before it: the canary, or datasets (a
    restored data directory, which a newly generated key would not open)."""
    canary = settings.state_dir / sod.CANARY_NAME
    if os.path.lexists(canary):
        return f"{canary} exists"
    datasets = len(sod.dataset_files(settings.data_dir))
    return f"{settings.data_dir} holds {datasets} dataset(s)" if datasets else ""


def project_checks(sod) -> list[Check]:
    """Every check that needs the project's settings and key store."""
    import keyring

    from config import ENV_FILE, ConfigError, load_settings
    refused = check_env_file(Path.cwd() / ENV_FILE)
    if refused.status == FAIL:  # the settings are read from it: nothing else can be judged
        return [refused]
    try:
        settings = load_settings()
    except ConfigError as exc:
        return [Check("settings", FAIL, str(exc),
                      "correct that variable in the environment or .env")]
    store = sod.KeyringKeyStore(keyring.get_keyring())
    initialised = initialised_by(sod, settings)
    return [Check("settings", OK, "every variable is well-formed"),
            check_env_file(settings.env_file, settings.warnings), check_api_key(settings),
            check_keyring_backend(store.info, bool(settings.encryption_keys), initialised,
                                  settings.env_file),
            check_encryption_keys(sod, store, settings.encryption_keys, initialised,
                                  settings.env_file),
            *(check_directory(sod, variable, getattr(settings, field), settings.dir_mode,
                              initialised)
              for variable, field in (("OHLCV_DATA_DIR", "data_dir"),
                                      ("OHLCV_BACKUP_DIR", "backup_dir"),
                                      ("OHLCV_STATE_DIR", "state_dir"))),
            check_log_file(settings.log_file, settings.file_mode),
            check_disk(settings.data_dir, settings.min_free_disk_mb)]


def render_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status:<6}  {c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<{width}}          fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"Result: {failed} failed, {warned} warning(s): " +
                 ("ready" if not failed else "NOT ready; fix the FAIL lines above"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check this machine can run the downloader; "
                                     "changes nothing.")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--requirements", type=Path, default=HERE / "requirements-secure.txt",
                        metavar="PATH", help="pinned requirements (default: %(default)s)")
    args = parser.parse_args(argv)
    sys.dont_write_bytecode = True  # not even a __pycache__ appears next to the project
    checks = [check_python(), check_packages(args.requirements)]
    redact: Callable[[str], str] | None = None  # the downloader's, once it imports
    try:
        import secure_ohlcv_downloader as sod
        from config import VARIABLES, Secret
    except ImportError as exc:  # a missing package: say so instead of a traceback
        checks.append(Check("import", FAIL, f"cannot import the downloader: {exc}",
                            f"pip install -r {args.requirements}"))
    else:  # what the environment holds is redacted even when it is malformed
        for v in VARIABLES:
            for part in os.environ.get(v.name, "").split(",") if v.secret else ():
                Secret(part.strip())
        checks += project_checks(sod)
        redact = sod.redact
    ok = all(c.status != FAIL for c in checks)
    text = (json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2)
            if args.json else render_table(checks))
    print(redact(text) if redact is not None else text)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
