"""Campaign B, area 4: secrets never leave the key stores.

Every command runs as a real process at OHLCV_LOG_LEVEL=DEBUG with distinctive API keys
and Fernet keys configured; the server echoes an API key back in one answer, faults and a
dead port drive the error paths, bad values drive the configuration errors. Then every
byte the tool produced is scanned -- stdout, stderr, the log, the metrics file, the status
JSON, exported files, the state files, the backup archives and (decrypted) their manifests
and members -- for every key in several encodings: zero occurrences. The key stores
themselves (`.env`, the key file given to --recover, the OS keyring) and the hand-over of a
new key off a terminal (`state/new-key-<fingerprint>.txt`, 0600, to be moved offline) are the
only places a key may be.

Also: a running download's command line (/proc/<pid>/cmdline, and its children's) never
carries a key; no option of any subcommand takes a key (parsed from --help), and an option
that looks like one (--key, --api-key, ...) is refused as unknown rather than taken for
something else, with the value kept out of the log.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, quote_plus

import psutil
import pytest
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from config import KEYRING_SERVICE
from secure_ohlcv_cli import COMMANDS
from secure_ohlcv_downloader import KEYRING_USERNAME, DatasetId, dataset_file, fingerprint
from tests.campaign.figures import is_long
from tests.download_fixtures import start_emulator
from tests.foundation_fixtures import (
    CLI,
    REPO,
    headless_env,
    keyring_backend,  # noqa: F401  (a fixture)
    run_cli,
    secret_service_env,
)


def distinctive_api_key(tag: str) -> str:
    # '+' and '/' change under URL encoding: the encoded forms are scanned for too.
    return f"AV{tag}{secrets.token_hex(8).upper()}+Q/{secrets.token_hex(2)}"


API_KEY_1 = distinctive_api_key("ONE")
API_KEY_2 = distinctive_api_key("TWO")
REFUSED_API_KEY = distinctive_api_key("BAD")  # a key the server does not know


@pytest.fixture(scope="module")
def emulator():
    av = start_emulator(premium_keys={API_KEY_1: 6000, API_KEY_2: 6000})
    try:
        yield av
    finally:
        av.stop()


# -- secrets and where to look for them ---------------------------------------------------

class Secrets:
    """Every secret of a run, labelled; each is looked for in several encodings."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def add(self, label: str, value: str) -> None:
        if value and value not in self.values.values():
            self.values[f"{label}#{len(self.values)}"] = value

    def add_fernet_keys(self, label: str, text: str) -> None:
        for key in re.findall(r"[A-Za-z0-9_\-]{43}=", text):
            self.add(label, key)

    def forms(self) -> dict[str, bytes]:
        """label/encoding -> bytes to look for."""
        found: dict[str, bytes] = {}
        for label, value in self.values.items():
            found[f"{label}/raw"] = value.encode()
            if label.startswith("api"):
                found[f"{label}/url"] = quote(value, safe="").encode()
                found[f"{label}/url+"] = quote_plus(value).encode()
            elif label.startswith("fernet"):
                raw = base64.urlsafe_b64decode(value)
                found[f"{label}/bytes"] = raw
                found[f"{label}/hex"] = raw.hex().encode()
                found[f"{label}/std-base64"] = base64.b64encode(raw)
                found[f"{label}/signing-half"] = raw[:16]
                found[f"{label}/encryption-half"] = raw[16:]
        return found

    def fernets(self) -> MultiFernet:
        return MultiFernet([Fernet(v) for k, v in self.values.items() if k.startswith("fernet")])


class Scan:
    """Places looked at and what was found there (labels only: never the secret)."""

    def __init__(self, keys: Secrets) -> None:
        self.keys = keys
        self.places: list[str] = []
        self.leaks: dict[str, list[str]] = {}

    def look(self, place: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        self.places.append(place)
        hits = [label for label, needle in self.keys.forms().items() if needle in data]
        if hits:
            self.leaks[place] = hits

    def outputs(self, runs: Iterable[tuple[str, subprocess.CompletedProcess]]) -> None:
        for name, result in runs:
            self.look(f"{name}: stdout", result.stdout)
            self.look(f"{name}: stderr", result.stderr)

    def tree(self, root: Path, skip: Iterable[Path] = ()) -> None:
        """Every file below `root` (raw bytes); Fernet tokens decrypted; backup archives
        opened and their members (manifest included) decrypted."""
        skip = {p.resolve() for p in skip}
        ring = self.keys.fernets()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            if path.resolve() in skip:
                continue
            place = str(path.relative_to(root))
            data = path.read_bytes()
            self.look(place, data)
            if path.suffix == ".fernet":
                self._decrypted(place, data, ring)
            if path.suffix == ".tar" and tarfile.is_tarfile(path):
                with tarfile.open(path) as tar:
                    for info in tar:
                        if info.isfile():
                            member = tar.extractfile(info).read()
                            self.look(f"{place}!{info.name}", member)
                            self._decrypted(f"{place}!{info.name}", member, ring)

    def _decrypted(self, place: str, token: bytes, ring: MultiFernet) -> None:
        try:
            self.look(f"{place} (decrypted)", ring.decrypt(token))
        except InvalidToken:
            self.places.append(f"{place} (not decryptable with the known keys)")

    def report(self) -> str:
        return "\n".join(f"- {place}: {', '.join(hits)}" for place, hits in sorted(self.leaks.items()))


def run_stage(calls: dict[str, Callable[[], subprocess.CompletedProcess]],
              workers: int = 3) -> list[tuple[str, subprocess.CompletedProcess]]:
    """Independent commands, run side by side (each its own process)."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        return [(name, future.result()) for name, future in futures.items()]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expect(runs: list[tuple[str, subprocess.CompletedProcess]], codes: dict[str, int]) -> None:
    """The commands did what they were run for (a leak scan of a failed run proves little)."""
    wrong = {name: (result.returncode, result.stderr.strip()[-300:])
             for name, result in runs if name in codes and result.returncode != codes[name]}
    assert not wrong, f"unexpected exit codes: {wrong}"


def handed_over(site: Path) -> list[Path]:
    """New keys handed over off a terminal: a key store by design, checked to exist."""
    files = sorted(site.rglob("new-key-*.txt"))
    assert files, "init/rotate-key ran without a terminal: a new-key file must exist"
    return files


# -- every command, headless: keys in .env and the environment ---------------------------

def test_no_command_leaks_a_key_anywhere(tmp_path, emulator, figures):
    """Keys in .env (as --init writes them on a headless server) and API keys in the
    environment; every command at DEBUG; error paths included; then scan everything."""
    keys = Secrets()
    fernet_key = Fernet.generate_key().decode()
    wrong_fernet, malformed_fernet = Fernet.generate_key().decode(), Fernet.generate_key().decode()[:-2]
    for label, value in (("api", API_KEY_1), ("api", API_KEY_2), ("api", REFUSED_API_KEY),
                         ("fernet", fernet_key), ("fernet", wrong_fernet)):
        keys.add(label, value)
    keys.add("malformed", malformed_fernet)
    naming_key = Fernet.generate_key().decode()
    keys.add("naming", naming_key)
    spaced_api_key = distinctive_api_key("SPC")
    keys.add("api", spaced_api_key)

    site, home = tmp_path / "site", tmp_path / "home"
    site.mkdir()
    home.mkdir()
    env_file = site / ".env"
    env_file.write_text(f"OHLCV_ENCRYPTION_KEY={fernet_key},naming:{naming_key}\n")
    env_file.chmod(0o600)
    env = headless_env(home, ALPHA_VANTAGE_API_KEY=f"{API_KEY_1},{API_KEY_2}",
                       ALPHA_VANTAGE_BASE_URL=emulator.base_url, OHLCV_LOG_LEVEL="DEBUG",
                       OHLCV_RATE_LIMIT_PER_MINUTE="6000", OHLCV_BACKOFF_SECONDS="0.01",
                       OHLCV_MAX_RETRIES="3", OHLCV_METRICS_FILE=str(site / "metrics.prom"))

    def cli(*args: str, **overrides: str) -> Callable[[], subprocess.CompletedProcess]:
        return lambda: run_cli(list(args), site, dict(env, **overrides))

    runs: list[tuple[str, subprocess.CompletedProcess]] = []
    runs += run_stage({"init": cli("--init")})
    expect(runs, {"init": 0})
    # The server echoes the key in its daily-limit text (as Alpha Vantage does); an
    # invalid symbol, an HTML page, a cut body and a reset drive the retry and error paths.
    emulator.inject("throttle_daily_key", times=1)
    emulator.inject("html", times=1, symbol="MSFT")
    emulator.inject("truncated", times=1, symbol="AAPL")
    emulator.inject("reset", times=1, symbol="AAPL")
    runs += run_stage({"download": cli("download", "IBM", "MSFT", "AAPL", "INVALID")})
    emulator.clear_faults()
    exports = site / "exports"
    exports.mkdir()
    extra = {  # more of the same kinds of run: long mode only
        "download (intraday)": cli("download", "IBM", "--interval", "5min"),
        "status": cli("status"), "export stdout": cli("export", "MSFT", "--start", "2024-01-01"),
        "export json": cli("export", "IBM", "--format", "json", "-o", str(exports / "ibm.json")),
        "cleanup --dry-run": cli("--cleanup", "--dry-run"),
    } if is_long() else {}
    emulator.accept_unknown_keys = False
    try:
        runs += run_stage({
            "download (dead port)": cli("download", "NETFAIL", ALPHA_VANTAGE_BASE_URL=
                                        f"http://127.0.0.1:{closed_port()}/query", OHLCV_MAX_RETRIES="1"),
            "download (refused key)": cli("download", "REFUSED", ALPHA_VANTAGE_API_KEY=REFUSED_API_KEY),
            "status --json": cli("status", "--json"),
            "export csv": cli("export", "IBM", "-o", str(exports / "ibm.csv")),
            "export parquet": cli("export", "IBM", "--format", "parquet", "-o", str(exports / "ibm.parquet")),
            "estimate": cli("estimate", "--symbols", "50"), **extra,
        }, workers=4)
    finally:
        emulator.accept_unknown_keys = True
    runs += run_stage({
        "check-keys": cli("--check-keys"), "backup": cli("backup"),
        "remove-key": cli("remove-key", fingerprint(fernet_key), "--yes"),
    })
    runs += run_stage({"verify-backup": cli("--verify-backup", "--all"), "rotate-key": cli("--rotate-key")},
                      workers=1)
    keys.add_fernet_keys("fernet", env_file.read_text())
    key_file = tmp_path / "keys.txt"  # the operator's offline copy, outside the site
    key_file.write_text(env_file.read_text())
    key_file.chmod(0o600)
    (site / "data" / dataset_file(naming_key, DatasetId("MSFT"))).unlink()
    archive = max((site / "backups").glob("*.tar"))
    runs += run_stage({"recover": cli("--recover", "--key-file", str(key_file), "--from-backup", str(archive))})
    runs += run_stage({
        "cleanup": cli("--cleanup"),
        "config error: api key": cli("status", ALPHA_VANTAGE_API_KEY=f"{spaced_api_key} extra"),
        "config error: fernet key": cli("status", OHLCV_ENCRYPTION_KEY=malformed_fernet),
        "wrong fernet key": cli("--check-keys", OHLCV_ENCRYPTION_KEY=wrong_fernet),
        "validate_environment": lambda: subprocess.run(
            [sys.executable, str(REPO / "validate_environment.py"), "--json"], cwd=site, env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False),
    }, workers=4)
    keys.add_fernet_keys("fernet", env_file.read_text())
    expect(runs, {"download": 1, "download (dead port)": 1, "download (refused key)": 3,
                  "status --json": 0, "export csv": 0, "export parquet": 0, "backup": 0,
                  "verify-backup": 0, "rotate-key": 0, "recover": 0, "cleanup": 0,
                  "config error: api key": 3, "config error: fernet key": 3, "wrong fernet key": 3})
    assert "IBM daily: updated" in dict(runs)["download"].stdout
    assert json.loads(dict(runs)["status --json"].stdout)["datasets"]

    control = Scan(keys)  # the scanner finds a key where one is: the key store itself
    control.tree(site)
    assert ".env" in control.leaks, "the scan cannot see a key even in .env"
    scan = Scan(keys)
    scan.outputs(runs)
    scan.tree(site, skip=[env_file, *handed_over(site)])
    figures.record("secrets/headless-every-command", tried=len(scan.places),
                   held=len(scan.places) - len(scan.leaks),
                   notes=f"{len(runs)} runs, {len(keys.values)} secrets x {len(keys.forms())} forms")
    if scan.leaks:
        pytest.fail("a key appears outside the key stores:\n" + scan.report(), pytrace=False)


# -- the OS keyring (a real Secret Service) at DEBUG --------------------------------------

def test_keyring_commands_leak_no_key(tmp_path, emulator, secret_service,
                                     keyring_backend, figures):  # noqa: F811
    """Keys in the Secret Service: the keyring, secretstorage and D-Bus layers log at
    DEBUG too; nothing of the key ring may reach the log or the output."""
    keys = Secrets()
    first, naming = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    keys.add("fernet", first)
    keys.add("naming", naming)
    keys.add("api", API_KEY_1)
    site, home = tmp_path / "site", tmp_path / "home"
    site.mkdir()
    home.mkdir()
    env = secret_service_env(secret_service, home, ALPHA_VANTAGE_API_KEY=API_KEY_1,
                             ALPHA_VANTAGE_BASE_URL=emulator.base_url, OHLCV_LOG_LEVEL="DEBUG",
                             OHLCV_RATE_LIMIT_PER_MINUTE="6000",
                             OHLCV_METRICS_FILE=str(site / "metrics.prom"))
    steps = [("init (imports the variable)", ["--init"], {"OHLCV_ENCRYPTION_KEY": f"{first},naming:{naming}"}),
             ("download", ["download", "IBM"], {}), ("rotate-key", ["--rotate-key"], {}),
             ("remove-key", ["remove-key", fingerprint(first), "--yes"], {})]
    if is_long():
        steps[2:2] = [("check-keys", ["--check-keys"], {}), ("backup", ["backup"], {}),
                      ("verify-backup", ["--verify-backup", "--all"], {})]
        steps.append(("status --json", ["status", "--json"], {}))
    runs = [(name, run_cli(args, site, dict(env, **extra))) for name, args, extra in steps]
    wrong = [(n, r.returncode, r.stderr[-300:]) for n, r in runs if r.returncode != 0]
    assert not wrong, wrong
    stored = keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)
    keys.add_fernet_keys("fernet", stored or "")
    assert len(keys.values) >= 3, "the rotation should have added a key to the keyring"
    control = Scan(keys)
    control.look("keyring entry", stored or "")
    assert control.leaks, "the scan cannot see a key even in the keyring entry"
    scan = Scan(keys)
    scan.outputs(runs)
    scan.tree(site, skip=handed_over(site))
    figures.record("secrets/keyring-commands", tried=len(scan.places),
                   held=len(scan.places) - len(scan.leaks), notes=f"{len(runs)} runs")
    if scan.leaks:
        pytest.fail("a key appears outside the keyring:\n" + scan.report(), pytrace=False)


# -- the command line of a running process --------------------------------------------------

def test_running_download_command_line_carries_no_key(tmp_path, emulator, figures):
    """While a download runs against a slow server, /proc/<pid>/cmdline of the process
    and of any child it starts holds no key (keys come from the environment or files)."""
    fernet_key = Fernet.generate_key().decode()
    keys = Secrets()
    keys.add("api", API_KEY_1)
    keys.add("fernet", fernet_key)
    naming_key = Fernet.generate_key().decode()
    keys.add("naming", naming_key)
    needles = keys.forms()
    site = tmp_path / "site"
    site.mkdir()
    env = headless_env(tmp_path, ALPHA_VANTAGE_API_KEY=API_KEY_1,
                       OHLCV_ENCRYPTION_KEY=f"{fernet_key},naming:{naming_key}",
                       ALPHA_VANTAGE_BASE_URL=emulator.base_url, OHLCV_RATE_LIMIT_PER_MINUTE="6000",
                       OHLCV_MAX_WORKERS="1", OHLCV_LOG_LEVEL="DEBUG")
    assert run_cli(["--init"], site, env).returncode == 0
    symbols = ["IBM", "MSFT", "AAPL", "GOOG", "AMZN"]
    emulator.latency = 0.4
    try:
        proc = subprocess.Popen([sys.executable, str(CLI), "download", *symbols], cwd=site, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        samples, leaks, seen = 0, set(), set()
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                family = [psutil.Process(proc.pid)]
                family += family[0].children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for member in family:
                try:
                    cmdline = Path(f"/proc/{member.pid}/cmdline").read_bytes()
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                samples += 1
                seen.add(cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
                leaks |= {label for label, needle in needles.items() if needle in cmdline}
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
    finally:
        emulator.latency = 0.0
    figures.record("secrets/process-cmdline", tried=samples, held=samples if not leaks else 0,
                   notes=f"command lines seen: {len(seen)}")
    assert proc.returncode == 0, err[-500:]
    assert samples >= 10, f"the download ended before its command line could be read ({samples})"
    assert not leaks, f"a key is on a command line: {sorted(leaks)}"


# -- options: none takes a key -----------------------------------------------------------

KEYISH = re.compile(r"key|secret|token|passw|credential|fernet", re.IGNORECASE)
ALLOWED_KEYISH = {"--key-file", "--check-keys", "--rotate-key", "--remove-key"}
HELP_DRIVER = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import secure_ohlcv_cli
pages = {}
for name in [None, *secure_ohlcv_cli.COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = secure_ohlcv_cli.main(([name] if name else []) + ["--help"])
    pages[name or ""] = [code, out.getvalue()]
print(json.dumps(pages))
"""


def test_no_option_of_any_subcommand_takes_a_key(tmp_path, figures):
    """--help of the program and of every subcommand, parsed: no option or argument that
    looks like a key (--key, --api-key, ...); --key-file takes a FILE, not a key."""
    result = subprocess.run([sys.executable, "-c", HELP_DRIVER, str(REPO)], cwd=tmp_path,
                            env=headless_env(tmp_path), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-1000:]
    pages = json.loads(result.stdout)
    assert set(pages) == {"", *COMMANDS}
    offending, options_seen = [], 0
    for command, (code, text) in pages.items():
        assert code == 0 and "usage:" in text, (command, code, text[:200])
        usage = text.split("\n\n")[0]
        pairs = re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?: ([A-Z][A-Z_.\-]*))?", usage)
        options_seen += len(pairs)
        for option, metavar in pairs:
            if KEYISH.search(option) and option not in ALLOWED_KEYISH:
                offending.append(f"{command or '(top)'}: option {option}")
            if metavar and KEYISH.search(metavar):
                offending.append(f"{command or '(top)'}: {option} takes {metavar}")
            if option == "--key-file" and metavar != "FILE":
                offending.append(f"{command}: --key-file takes {metavar}, not a FILE")
        for word in re.findall(r"\b[A-Z][A-Z_]{2,}\b", usage):
            if KEYISH.search(word):
                offending.append(f"{command}: argument {word}")
    figures.record("secrets/help-options", tried=options_seen, held=options_seen - len(offending))
    assert not offending, offending


ABBREVIATION_DRIVER = r"""
import contextlib, io, json, os, sys
sys.path.insert(0, sys.argv[1])
import secure_ohlcv_cli
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = secure_ohlcv_cli.main(argv)
    results.append([argv, code, err.getvalue()])
print(json.dumps(results))
"""
REQUIRED = {"export": ["IBM"], "remove-key": ["0123456789ab"], "estimate": ["--symbols", "1"],
            "download": ["IBM"]}
KEYISH_OPTIONS = ("--key", "--api-key", "--apikey", "--encryption-key", "--fernet-key",
                  "--secret", "--token", "--password")


def test_a_key_given_as_an_option_is_refused_and_not_logged(tmp_path, figures):
    """An operator who types `--key <KEY>` or `--api-key <KEY>` must get "unrecognized
    arguments" (exit 2), for every subcommand; argparse must not take it for a longer
    option (prefix matching: `--key` -> `--key-file`), and the value must not be logged."""
    typed_key = Fernet.generate_key().decode()
    site = tmp_path / "site"
    site.mkdir()
    argvs = [[command, *REQUIRED.get(command, []), option, typed_key]
             for command in COMMANDS for option in KEYISH_OPTIONS]
    result = subprocess.run([sys.executable, "-c", ABBREVIATION_DRIVER, str(REPO), json.dumps(argvs)],
                            cwd=site, env=headless_env(tmp_path, OHLCV_LOG_LEVEL="DEBUG"),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-1000:]
    accepted = [f"{argv[0]} {argv[-2]}: exit {code}, {err.strip().splitlines()[-1][:100] if err.strip() else ''}"
                for argv, code, err in json.loads(result.stdout)
                if code != 2 or "unrecognized arguments" not in err]
    logged = [str(p.relative_to(site)) for p in site.rglob("*")
              if p.is_file() and typed_key.encode() in p.read_bytes()]
    figures.record("secrets/keyish-options", tried=len(argvs), held=len(argvs) - len(accepted),
                   notes=f"files holding the typed key: {logged}")
    problems = []
    if accepted:
        problems.append("options that look like a key were accepted as something else:\n  "
                        + "\n  ".join(accepted))
    if logged:
        problems.append(f"the typed key was written to {logged}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)

