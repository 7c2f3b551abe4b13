"""Campaign B, area 6: permissions of everything the tool creates, whatever the umask.

* Under umask 000, 022 and 077, with OHLCV_DIR_MODE/OHLCV_FILE_MODE 0700/0600 and 0750/0640
  (and OHLCV_METRICS_FILE_MODE 0644 or 0640), a real process runs init, downloads (daily
  and intraday), status, export, two backups (one to a new nested --dest), verify,
  rotate-key and cleanup, with the log and the state directory in new nested directories.
  Every directory it created has OHLCV_DIR_MODE, every file OHLCV_FILE_MODE (the metrics
  file OHLCV_METRICS_FILE_MODE), and so does every temp file at the moment it is renamed
  into place (os.replace is watched inside the child).
* An existing data, state or backup directory with loose modes is reported by
  validate_environment.py and --check-keys (FAIL, with the chmod fix), and every command
  that would use it refuses (exit 3, the chmod fix), leaving it untouched.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from keyring.backends import fail

from config import load_settings
from secure_ohlcv_downloader import KeyringKeyStore, SecureOHLCVDownloader
from tests.campaign.figures import is_long
from tests.download_fixtures import PREMIUM_KEY, PREMIUM_PER_MINUTE
from tests.foundation_fixtures import REPO, headless_env
from tests.lifecycle_fixtures import snapshot

# The child: set the umask, watch os.replace (the source is a temp file about to become
# a real one: its mode then is the temp file's mode), run each command line in turn.
DRIVER = r"""
import io, json, os, stat, sys
os.umask(int(sys.argv[1], 8))
sys.path.insert(0, sys.argv[2])
with open(sys.argv[3]) as handle:
    jobs = json.load(handle)
real_replace, temps = os.replace, []
def watched_replace(src, dst, *args, **kwargs):
    try:
        temps.append([os.fspath(src), os.fspath(dst), stat.S_IMODE(os.lstat(src).st_mode)])
    except OSError:
        pass
    return real_replace(src, dst, *args, **kwargs)
os.replace = watched_replace
import secure_ohlcv_cli
results = []
for argv in jobs:
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        code = secure_ohlcv_cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    out.flush()
    results.append({"argv": argv, "code": code, "stderr": err.getvalue(),
                    "stdout": out.buffer.getvalue().decode("utf-8", "replace")})
with open(sys.argv[4], "w") as handle:
    json.dump({"results": results, "temps": temps}, handle)
"""


def run_child(jobs: list[list[str]], cwd: Path, env: dict[str, str], umask: str = "022") -> dict:
    """The command lines `jobs`, one after another, in one real child process."""
    with tempfile.TemporaryDirectory(prefix="campaign-perm-") as scratch:
        spec, out = Path(scratch, "jobs.json"), Path(scratch, "out.json")
        spec.write_text(json.dumps(jobs))
        child = subprocess.run([sys.executable, "-c", DRIVER, umask, str(REPO), str(spec), str(out)],
                               cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=300, check=False)
        assert child.returncode == 0 and out.exists(), child.stderr[-2000:]
        return json.loads(out.read_text())


def in_parallel(calls: list[Callable[[], Any]], workers: int = 3) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda call: call(), calls))


def emulator_variables(av) -> dict[str, str]:
    return {"ALPHA_VANTAGE_API_KEY": PREMIUM_KEY, "ALPHA_VANTAGE_BASE_URL": av.base_url,
            "OHLCV_RATE_LIMIT_PER_MINUTE": str(PREMIUM_PER_MINUTE), "OHLCV_BACKOFF_SECONDS": "0.01"}


def fail_on(problems: list[str], title: str) -> None:
    if problems:
        pytest.fail(f"{title}:\n  " + "\n  ".join(problems), pytrace=False)


# -- modes of what the tool creates -----------------------------------------------------------

# (umask, OHLCV_DIR_MODE, OHLCV_FILE_MODE, OHLCV_METRICS_FILE_MODE)
COMBINATIONS = [("000", "0700", "0600", "0644"), ("022", "0700", "0600", "0644"),
                ("000", "0750", "0640", "0640"), ("022", "0750", "0640", "0644"),
                ("077", "0750", "0640", "0644")]
if is_long():
    COMBINATIONS += [("077", "0700", "0600", "0644"), ("027", "0750", "0640", "0640"),
                     ("002", "0700", "0600", "0600")]


def _combination_id(combo: tuple[str, ...]) -> str:
    return "umask{}-dir{}-file{}-metrics{}".format(*combo)


def _previous_month() -> str:
    first = date.today().replace(day=1)
    return (first.replace(year=first.year - 1, month=12) if first.month == 1
            else first.replace(month=first.month - 1)).strftime("%Y-%m")


def created_modes(site: Path, env: dict[str, str], umask: str) -> tuple[dict, list[list[Any]]]:
    """Run every command that creates something; the results and the temp files seen."""
    jobs = [["--init"], ["download", "IBM", "MSFT"],
            ["download", "IBM", "--interval", "5min", "--month", _previous_month()],
            ["status", "--json"], ["export", "IBM", "-o", str(site / "ibm.csv")],
            ["export", "MSFT", "--format", "parquet", "-o", str(site / "msft.parquet")],
            ["backup"], ["backup", "--dest", str(site / "offsite" / "nested")],
            ["--verify-backup", "--all"], ["--rotate-key"], ["--cleanup"]]
    outcome = run_child(jobs, site, env, umask)
    return outcome, outcome["temps"]


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_combination_id)
def test_every_created_path_has_the_configured_mode(tmp_path, emulator, figures, combo):
    umask, dir_mode, file_mode, metrics_mode = combo
    site = tmp_path / "site"
    site.mkdir()
    metrics = site / "ohlcv.prom"
    env = headless_env(tmp_path, **emulator_variables(emulator), OHLCV_DIR_MODE=dir_mode,
                       OHLCV_FILE_MODE=file_mode, OHLCV_METRICS_FILE_MODE=metrics_mode,
                       OHLCV_METRICS_FILE=str(metrics), OHLCV_STATE_DIR="var/lib/state",
                       OHLCV_LOG_FILE=str(site / "logs" / "run" / "ohlcv.log"))
    outcome, temps = created_modes(site, env, umask)
    failed = [(r["argv"], r["code"], r["stderr"][-300:]) for r in outcome["results"] if r["code"] != 0]
    assert not failed, failed
    # A new key handed over in a file is 0600 whatever OHLCV_FILE_MODE lets a group read.
    want = {"dir": int(dir_mode, 8), "file": int(file_mode, 8), "metrics": int(metrics_mode, 8),
            "key": 0o600}
    problems, checked = [], 0
    for path in sorted(site.rglob("*")):
        info = path.lstat()
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "metrics" if path == metrics else \
            "key" if path.name.startswith("new-key-") else "file"
        checked += 1
        if stat.S_IMODE(info.st_mode) != want[kind]:
            problems.append(f"{path.relative_to(site)}: {stat.S_IMODE(info.st_mode):04o}, "
                            f"configured {want[kind]:04o}")
    for _source, target, mode in temps:
        kind = "metrics" if Path(target) == metrics else \
            "key" if Path(target).name.startswith("new-key-") else "file"
        checked += 1
        if mode != want[kind]:
            problems.append(f"temp file for {Path(target).name}: {mode:04o}, configured {want[kind]:04o}")
    expected_paths = {".env", "data/catalogue.fernet", "logs/run/ohlcv.log",
                      "var/lib/state/canary.fernet", "ohlcv.prom", "ibm.csv", "offsite/nested"}
    missing = sorted(p for p in expected_paths if not (site / p).exists())
    missing += [] if len(list((site / "data").glob("??/*.fernet"))) >= 2 else ["data/<ab>/<hex>.fernet"]
    assert not missing, f"the run did not create {missing}"
    assert len(temps) >= 10, f"only {len(temps)} atomic writes were seen"
    figures.record(f"permissions/created {_combination_id(combo)}", tried=checked,
                   held=checked - len(problems), notes=f"{len(temps)} temp files watched")
    fail_on(problems, f"under umask {umask}, paths without their configured mode")


# -- loose existing directories -----------------------------------------------------------------

# Which commands use each directory, and so must refuse it when it is loose.
USES = {
    "data": ["status", "export", "download", "backup", "--cleanup", "--rotate-key"],
    "state": ["download", "backup", "--cleanup", "--rotate-key"],
    "backups": ["backup", "--cleanup"],
}
ARGS = {"status": ["status"], "export": ["export", "IBM", "-o", "EXPORT"],
        "download": ["download", "MSFT"], "backup": ["backup"], "--cleanup": ["--cleanup"],
        "--rotate-key": ["--rotate-key"], "--check-keys": ["--check-keys"]}
CHECK_NAMES = {"data": "data dir", "state": "state dir", "backups": "backup dir"}
LOOSE = {"data": "0755", "state": "0750", "backups": "0777"}
CASES = [(d, LOOSE[d]) for d in USES]
if is_long():
    CASES += [(d, m) for d in USES for m in ("0750", "0755", "0770", "0777", "0701") if m != LOOSE[d]]


def loose_site(root: Path, av) -> tuple[Path, dict[str, str]]:
    """An installation with keys in .env, IBM downloaded and one backup."""
    site = root / "site"
    site.mkdir()
    env_file = site / ".env"
    env_file.write_text(f"OHLCV_ENCRYPTION_KEY={Fernet.generate_key().decode()},naming:{Fernet.generate_key().decode()}\n")
    env_file.chmod(0o600)
    env = headless_env(root, **emulator_variables(av))
    app = SecureOHLCVDownloader(load_settings(environ=env, cwd=site), KeyringKeyStore(fail.Keyring()))
    app.init()
    assert app.download(["IBM"]).exit_code == 0
    app.backup()
    return site, env


@pytest.mark.parametrize(("directory", "mode"), CASES, ids=[f"{d}-{m}" for d, m in CASES])
def test_a_loose_directory_is_reported_and_never_used(tmp_path, emulator, figures, directory, mode):
    site, env = loose_site(tmp_path, emulator)
    loose = site / directory
    os.chmod(loose, int(mode, 8))
    fix = f"chmod 700 {loose}"
    before = snapshot(loose)
    commands = ["--check-keys", *USES[directory]]
    jobs = [[a.replace("EXPORT", str(site / "ibm.csv")) for a in ARGS[c]] for c in commands]
    outcome, validate = in_parallel([
        lambda: run_child(jobs, site, env),
        lambda: subprocess.run([sys.executable, str(REPO / "validate_environment.py"), "--json"],
                               cwd=site, env=env, capture_output=True, text=True, timeout=120,
                               check=False)])
    after = snapshot(loose)
    problems = []
    report = {c["name"]: c for c in json.loads(validate.stdout)["checks"]}
    row = report.get(CHECK_NAMES[directory], {})
    if row.get("status") != "FAIL" or fix not in row.get("fix", ""):
        problems.append(f"validate_environment.py: {row}")
    results = dict(zip(commands, outcome["results"], strict=True))
    check_keys = results.pop("--check-keys")
    if check_keys["code"] != 3 or fix not in check_keys["stdout"]:
        problems.append(f"--check-keys: exit {check_keys['code']}, no FAIL with `{fix}`")
    for command, result in results.items():
        if result["code"] != 3 or fix not in result["stderr"]:
            problems.append(f"{command}: exit {result['code']} -- used the {mode} {directory} "
                            f"directory instead of refusing it with `{fix}`")
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        problems.append(f"the loose directory was changed: {[c[0] for c in changed][:6]}")
    tried = len(commands) + 2
    figures.record(f"permissions/loose {directory} {mode}", tried=tried, held=tried - len(problems))
    fail_on(problems, f"a {directory} directory with mode {mode} (configured 0700)")
