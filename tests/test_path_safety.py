"""Path safety: a configured path never leads the tool into another user's trap.

Threat model: a local user who can write to a shared directory (a metrics directory, a
log directory, the site's working directory) plants a symbolic link, or a file of their
own, at a path this tool is configured to use. The tool must then never write through
the link (clobbering a file the link points at, such as the site's `.env`), never delete
or create anything in the link's target, and never trust a file it did not make itself
(a `.env` or key file that is a link, another user's, or writable by others could point
ALPHA_VANTAGE_BASE_URL at the attacker's server, or swap the keys).

Invariants, each exercised through the real command line in a subprocess, over real
files, on a headless server whose keys are in the `.env` written by `--init`:

1. the metrics file: a link planted there is replaced by the Prometheus text file, never
   written through; the temp file is made beside the metrics file;
2. the log file: a link there stops the run (exit 3, the path and a fix named); the
   link's target keeps its content and mode. So does a file another user planted there
   (they would read the log) and a FIFO (the run would block in open() for ever);
3. the data, backup and state directories: a link there stops every command that uses
   it (exit 3, the path named), and nothing in the link's target is created, changed or
   deleted (not even a crashed writer's `.tmp-*` file); `--init` refuses a dangling link
   and a directory another user planted;
4. `.env`: a link, another user's file, or one writable by group or others stops the run
   before any request; one readable by others only warns (stderr and log);
5. `--recover --key-file FILE`: the same rules for FILE; a readable-by-others FILE warns
   on stderr.

The tests run as root (so does CI): "another user's file" is one chowned to nobody
(65534); the product compares st_uid with geteuid(), so the refusal still happens.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.foundation_fixtures import CLI, REPO, headless_env, run_cli

NOBODY = 65534
LOG_NAME = "secure_downloader.log"
# Prometheus text the metrics file holds after any command.
METRIC_LINE = "ohlcv_last_run_timestamp_seconds"


# -- helpers ---------------------------------------------------------------------------

def output(result) -> str:
    return result.stdout + result.stderr


def file_state(path: Path) -> tuple[bytes, int]:
    """A file's bytes and permission bits (the file itself, never a link to it)."""
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode), f"{path} is not a regular file"
    return path.read_bytes(), stat.S_IMODE(info.st_mode)


def snapshot(root: Path) -> dict[str, tuple]:
    """`root` and everything under it: kind, mode, owner and (files) bytes; to compare."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = os.lstat(path)
        key = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            found[key] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[key] = ("dir", stat.S_IMODE(info.st_mode), info.st_uid)
        else:
            found[key] = ("file", stat.S_IMODE(info.st_mode), info.st_uid, path.read_bytes())
    return found


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*"))


class Site:
    """An initialised headless site (copied from the module's template) and its HOME."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.home = home

    @property
    def env_file(self) -> Path:
        return self.path / ".env"

    @property
    def log_file(self) -> Path:
        return self.path / LOG_NAME

    def key_line(self) -> str:
        return next(line for line in self.env_file.read_text().splitlines()
                    if line.startswith("OHLCV_ENCRYPTION_KEY="))

    def run(self, *args: str, script: Path | None = None, **variables: str):
        env = headless_env(self.home, **variables)
        if script is not None:
            return run_cli(list(args), cwd=self.path, env=env, script=script)
        return run_cli(list(args), cwd=self.path, env=env)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One `--init` for the whole module: the site every test copies."""
    root = tmp_path_factory.mktemp("path-safety-template")
    site, home = root / "site", root / "home"
    site.mkdir()
    home.mkdir()
    result = run_cli(["--init"], cwd=site, env=headless_env(home))
    assert result.returncode == 0, output(result)
    assert (site / ".env").is_file()
    for handed_over in (site / "state").glob("new-key-*.txt"):  # "moved offline"
        handed_over.unlink()
    return site


@pytest.fixture
def site(template, tmp_path) -> Site:
    path = tmp_path / "site"
    shutil.copytree(template, path, symlinks=True)
    home = tmp_path / "home"
    home.mkdir()
    return Site(path, home)


@pytest.fixture
def listener():
    """A local TCP socket nobody should ever connect to: the attacker's "API server"."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def nobody_connected(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


# -- 1. the metrics file -----------------------------------------------------------------

@pytest.mark.parametrize("command", ["status", "--check-keys"])
@pytest.mark.parametrize("given_by", ["OHLCV_METRICS_FILE", "--metrics-file"])
def test_metrics_link_to_env_is_replaced_never_written_through(site, tmp_path, command,
                                                                given_by):
    shared = tmp_path / "shared-metrics"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a world-writable, sticky textfile-collector directory
    metrics = shared / "ohlcv.prom"
    metrics.symlink_to(site.env_file)
    env_before = file_state(site.env_file)

    if given_by == "--metrics-file":
        result = site.run(command, "--metrics-file", str(metrics))
    else:
        result = site.run(command, OHLCV_METRICS_FILE=str(metrics))

    assert result.returncode == 0, output(result)
    assert file_state(site.env_file) == env_before
    assert env_before[1] == 0o600
    assert not metrics.is_symlink()
    text = file_state(metrics)[0].decode()
    assert METRIC_LINE in text and "OHLCV_ENCRYPTION_KEY" not in text
    assert os.listdir(shared) == ["ohlcv.prom"]
    assert temp_files(site.path) == []


# Runs the real command line with an audit hook that records every file created with
# os.open and every os.replace/os.rename (the audit event of both is "os.rename").
AUDIT_WRAPPER = r"""
import atexit, json, os, runpy, sys
events = []
def hook(event, args):
    if event == "os.rename":
        events.append(["rename", os.fspath(args[0]), os.fspath(args[1])])
    elif event == "open" and isinstance(args[2], int) and args[2] & os.O_CREAT \
            and isinstance(args[0], (str, bytes, os.PathLike)):
        events.append(["create", os.fsdecode(args[0]), args[2]])
def dump():
    found = list(events)
    with open(%(out)r, "w") as handle:
        json.dump(found, handle)
atexit.register(dump)
sys.addaudithook(hook)
sys.path.insert(0, %(repo)r)
runpy.run_path(%(cli)r, run_name="__main__")
"""


def test_metrics_temp_file_is_made_beside_the_metrics_file_then_renamed_over_it(site,
                                                                                tmp_path):
    shared = tmp_path / "shared-metrics"
    shared.mkdir()
    metrics = shared / "ohlcv.prom"
    metrics.symlink_to(site.env_file)
    events_file = tmp_path / "events.json"
    wrapper = tmp_path / "audited_cli.py"
    wrapper.write_text(AUDIT_WRAPPER % {"out": str(events_file), "repo": str(REPO),
                                        "cli": str(REPO / "secure_ohlcv_cli.py")})

    result = site.run("status", script=wrapper, OHLCV_METRICS_FILE=str(metrics))

    assert result.returncode == 0, output(result)
    events = json.loads(events_file.read_text())
    renames = [(src, dst) for kind, src, dst in events if kind == "rename" and dst == str(metrics)]
    assert len(renames) == 1, events
    temp = Path(renames[0][0])
    assert temp.parent == shared and temp.name.startswith(".tmp-"), temp
    created = [flags for kind, path, flags in events if kind == "create" and path == str(temp)]
    assert len(created) == 1, events
    assert created[0] & os.O_EXCL and created[0] & os.O_NOFOLLOW
    assert os.listdir(shared) == ["ohlcv.prom"] and not metrics.is_symlink()


# -- 2. the log file ---------------------------------------------------------------------

@pytest.mark.parametrize("configured", [False, True], ids=["default-path", "OHLCV_LOG_FILE"])
def test_log_file_link_stops_the_run_and_leaves_its_target_alone(site, tmp_path, configured):
    victim = tmp_path / "victim"
    victim.write_text("the victim's own content\n")
    os.chmod(victim, 0o644)
    if configured:
        shared = tmp_path / "shared-logs"
        shared.mkdir()
        link = shared / "ohlcv.log"
        variables = {"OHLCV_LOG_FILE": str(link)}
    else:
        link = site.log_file
        link.unlink()
        variables = {}
    link.symlink_to(victim)

    result = site.run("status", **variables)

    assert result.returncode == 3, output(result)
    assert str(link) in result.stderr
    assert "Fix" in result.stderr
    assert file_state(victim) == (b"the victim's own content\n", 0o644)
    assert link.is_symlink()


def planted_log(tmp_path: Path) -> Path:
    """The log file's path in a world-writable, sticky directory another user can use."""
    shared = tmp_path / "shared-logs"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    return shared / "ohlcv.log"


def test_log_file_planted_by_another_user_is_refused_and_left_alone(site, tmp_path):
    # Another user got there first: the file is theirs (writable, so that the tool can
    # append to it); whatever the tool logs there, they read.
    log_file = planted_log(tmp_path)
    log_file.write_text("another user's file\n")
    os.chown(log_file, NOBODY, NOBODY)
    os.chmod(log_file, 0o666)

    result = site.run("status", OHLCV_LOG_FILE=str(log_file))

    assert result.returncode == 3, output(result)
    assert str(log_file) in result.stderr
    assert file_state(log_file) == (b"another user's file\n", 0o666)


def test_log_file_that_is_a_fifo_is_refused_without_hanging(site, tmp_path):
    # A FIFO nobody reads: opening it for writing blocks until a reader comes; a cron
    # job would hang there for ever (and with the planter reading, it logs to them).
    log_file = planted_log(tmp_path)
    os.mkfifo(log_file, 0o666)
    env = headless_env(site.home, OHLCV_LOG_FILE=str(log_file))

    try:
        result = subprocess.run([sys.executable, str(CLI), "status"], cwd=site.path, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=8)
    except subprocess.TimeoutExpired:
        result = None  # killed: it was still blocked in open() on the FIFO

    assert result is not None, f"the run hung (killed after 8 s) on the FIFO at {log_file}"
    assert result.returncode == 3, output(result)
    assert str(log_file) in result.stderr


# -- 3. the data, backup and state directories -------------------------------------------

DIRECTORIES = {"data": "OHLCV_DATA_DIR", "backups": "OHLCV_BACKUP_DIR", "state": "OHLCV_STATE_DIR"}


@pytest.mark.parametrize("command", ["status", "--check-keys", "backup", "--cleanup"])
@pytest.mark.parametrize("directory", sorted(DIRECTORIES))
def test_directory_link_stops_the_command_and_its_target_is_untouched(site, tmp_path,
                                                                      directory, command):
    # The real directory moves elsewhere (0700, ours, with its content) and a link takes
    # its place: the only thing wrong is the link itself.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    target = elsewhere / directory
    link = site.path / directory
    shutil.move(str(link), str(target))
    os.chmod(target, 0o700)
    crashed = target / ".tmp-x"
    crashed.write_bytes(b"a crashed writer's temp file, or so it seems")
    os.chmod(crashed, 0o600)
    link.symlink_to(target, target_is_directory=True)
    before = snapshot(target)

    result = site.run(command)

    assert result.returncode == 3, output(result)
    assert str(link) in output(result)
    assert crashed.exists()
    assert snapshot(target) == before
    assert link.is_symlink()


def test_init_refuses_a_dangling_link_at_the_data_directory(tmp_path):
    fresh, home = tmp_path / "fresh-site", tmp_path / "home"
    fresh.mkdir()
    home.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    target = elsewhere / "data"
    (fresh / "data").symlink_to(target, target_is_directory=True)

    result = run_cli(["--init"], cwd=fresh, env=headless_env(home))

    assert result.returncode == 3, output(result)
    assert str(fresh / "data") in output(result)
    assert not os.path.lexists(target)
    assert os.listdir(elsewhere) == []


def test_init_refuses_a_data_directory_another_user_planted(tmp_path):
    fresh, home = tmp_path / "fresh-site", tmp_path / "home"
    fresh.mkdir()
    home.mkdir()
    planted = fresh / "data"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    before = snapshot(planted)

    result = run_cli(["--init"], cwd=fresh, env=headless_env(home))

    assert result.returncode == 3, output(result)
    assert str(planted) in output(result)
    assert snapshot(planted) == before


@pytest.mark.parametrize("command", [["--init"], ["--recover"]])
def test_a_refused_directory_leaves_no_other_directory_created(tmp_path, command):
    """The restore drill's plain `mkdir backups` (0755) is refused; the refusal must not
    leave data/ and state/ half made behind it."""
    fresh, home = tmp_path / "fresh-site", tmp_path / "home"
    fresh.mkdir()
    home.mkdir()
    (fresh / "backups").mkdir(mode=0o755)
    os.chmod(fresh / "backups", 0o755)

    result = run_cli(command, cwd=fresh, env=headless_env(home))

    assert result.returncode == 3, output(result)
    assert f"chmod 700 {fresh / 'backups'}" in output(result)
    assert not os.path.lexists(fresh / "data") and not os.path.lexists(fresh / "state")


# -- 4. the .env file --------------------------------------------------------------------

def plant_untrusted_env(site: Site, tmp_path: Path, how: str, url: str) -> Path:
    """Make the site's `.env` one this tool must not trust, holding the attacker's base
    URL (and the real key, so that nothing but the trust rule can stop the run)."""
    text = f"{site.key_line()}\nALPHA_VANTAGE_BASE_URL={url}\n"
    if how == "link":
        planted = tmp_path / "attacker.env"
        planted.write_text(text)
        os.chmod(planted, 0o600)
        site.env_file.unlink()
        site.env_file.symlink_to(planted)
        return planted
    site.env_file.write_text(text)
    if how == "owned-by-nobody":
        os.chown(site.env_file, NOBODY, NOBODY)
        os.chmod(site.env_file, 0o600)
    elif how == "group-writable":
        os.chmod(site.env_file, 0o620)
    elif how == "other-writable":
        os.chmod(site.env_file, 0o602)
    else:
        raise ValueError(how)
    return site.env_file


@pytest.mark.parametrize("how", ["link", "owned-by-nobody", "group-writable", "other-writable"])
def test_untrusted_env_file_stops_a_download_before_any_request(site, tmp_path, listener, how):
    port = listener.getsockname()[1]
    plant_untrusted_env(site, tmp_path, how, f"http://127.0.0.1:{port}/query")

    result = site.run("download", "IBM", ALPHA_VANTAGE_API_KEY="FAKEKEY123",
                      OHLCV_MAX_RETRIES="0", OHLCV_CONNECT_TIMEOUT="2",
                      OHLCV_REQUEST_TIMEOUT="2")

    assert result.returncode == 3, output(result)
    assert str(site.env_file) in result.stderr
    assert nobody_connected(listener)
    assert list((site.path / "data").rglob("*.fernet")) == []


@pytest.mark.parametrize("how", ["link", "owned-by-nobody", "group-writable", "other-writable"])
def test_untrusted_env_file_stops_status_naming_the_file(site, tmp_path, how):
    plant_untrusted_env(site, tmp_path, how, "http://127.0.0.1:9/query")

    result = site.run("status")

    assert result.returncode == 3, output(result)
    assert str(site.env_file) in result.stderr
    assert "Fix" in result.stderr


def test_env_file_readable_by_others_warns_on_stderr_and_in_the_log(site):
    os.chmod(site.env_file, 0o644)
    log_before = site.log_file.read_text()

    result = site.run("status")

    assert result.returncode == 0, output(result)
    assert "readable by group or others" in result.stderr
    assert str(site.env_file) in result.stderr
    logged = site.log_file.read_text()[len(log_before):]
    assert "readable by group or others" in logged and str(site.env_file) in logged


# -- 5. --recover --key-file -------------------------------------------------------------

def make_key_file(site: Site, tmp_path: Path, how: str) -> Path:
    """A key file holding the site's real key ring, made untrustworthy (or not) by `how`."""
    real = tmp_path / "offline-copy.txt"
    real.write_text(site.key_line() + "\n")
    os.chmod(real, 0o600)
    if how == "link":
        link = tmp_path / "key-link.txt"
        link.symlink_to(real)
        return link
    if how == "owned-by-nobody":
        os.chown(real, NOBODY, NOBODY)
    elif how == "other-writable":
        os.chmod(real, 0o602)
    elif how == "group-writable":
        os.chmod(real, 0o620)
    elif how == "readable-by-others":
        os.chmod(real, 0o644)
    else:
        raise ValueError(how)
    return real


@pytest.mark.parametrize("how", ["link", "owned-by-nobody", "group-writable", "other-writable"])
def test_untrusted_key_file_stops_recover_naming_it(site, tmp_path, how):
    key_file = make_key_file(site, tmp_path, how)
    env_before = file_state(site.env_file)
    state_before = snapshot(site.path / "state")

    result = site.run("--recover", "--key-file", str(key_file))

    assert result.returncode == 3, output(result)
    assert str(key_file) in result.stderr
    assert file_state(site.env_file) == env_before
    assert {k: v for k, v in snapshot(site.path / "state").items() if "runs" not in k} == \
        {k: v for k, v in state_before.items() if "runs" not in k}


def test_key_file_readable_by_others_is_used_with_a_warning_on_stderr(site, tmp_path):
    key_file = make_key_file(site, tmp_path, "readable-by-others")
    log_before = site.log_file.read_text()

    result = site.run("--recover", "--key-file", str(key_file))

    assert result.returncode == 0, output(result)
    assert "readable by group or others" in result.stderr
    assert str(key_file) in result.stderr
    assert "readable by group or others" in site.log_file.read_text()[len(log_before):]


def test_relative_key_file_link_is_refused_too(site, tmp_path):
    real = make_key_file(site, tmp_path, "readable-by-others")
    os.chmod(real, 0o600)
    (site.path / "key.txt").symlink_to(real)

    result = site.run("--recover", "--key-file", "key.txt")

    assert result.returncode == 3, output(result)
    assert "key.txt" in result.stderr and "symbolic link" in result.stderr

