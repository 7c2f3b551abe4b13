"""The documentation never drifts from the program: every command line that README.md and
docs/OPERATIONS.md show is run, in the order each document shows it, against the local
Alpha Vantage emulator, and must succeed.

Collected from each document: lines of fenced ```sh blocks, inline code spans, and crontab
entries in plain ``` blocks (split at `&&`, the `cd DIR` step and the five time fields
dropped, `.venv/bin/python` read as `python`, the installed path of a script or of the
symbols file read as that file in the working directory), keeping those that start with
`python secure_ohlcv_downloader.py`, `python secure_ohlcv_cli.py` or
`python validate_environment.py`, and the `mkdir` and `cp` lines of ```sh blocks (the
restore drill's). Each runs through `bash -c`, as an operator types it, in a fresh
working directory holding the project's scripts (symlinks), a symbols.txt, and whatever
the document's earlier commands left there; `python` is this test's interpreter.

A fresh machine: no OHLCV_ENCRYPTION_KEY and no keyring backend, so `--init` generates the
key and keeps it in `.env`. The restore drill's commands run on a second fresh machine
(its own working directory), given the first one's key ring in OHLCV_ENCRYPTION_KEY (the
operator's offline copy) and its backup directory as OFFSITE.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import read_env_file
from secure_ohlcv_downloader import dataset_files
from tests.download_fixtures import start_emulator
from tests.foundation_fixtures import REPO, headless_env
from tests.operations_fixtures import OpsWorkspace, describe, link_project, python_shim, with_path

SCRIPTS = ("secure_ohlcv_downloader.py", "secure_ohlcv_cli.py", "validate_environment.py")
PREFIXES = tuple(f"python {script}" for script in SCRIPTS)
SHELL_STEPS = ("mkdir ", "cp ")  # taken from ```sh blocks only
DRILL = "Restore drill"  # the section whose commands run on the spare machine
DOCS = ("README.md", "docs/OPERATIONS.md")
CRON_TIME = re.compile(r"^(?:[\d*/,\-]+\s+){4}[\w*/,\-]+\s+(?P<command>.*)$")
SYMBOLS_FILE = "IBM\nMSFT\n"
# What each document's working directory holds before its first command.
HERE_FILES = (*sorted(p.name for p in REPO.glob("*.py")), "requirements-secure.txt", "symbols.txt")


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    command: str
    position: int  # order in the document: line numbers repeat on crontab lines
    section: str  # the `## ` heading it appears under

    @property
    def on_spare_machine(self) -> bool:
        return DRILL in self.section

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}: {self.command}"


def _deployed_to_here(step: str) -> str:
    """A crontab step as it runs in the test's working directory: the venv's interpreter
    is `python`, and an installed path of a file this directory holds (a script, the
    symbols file) is that file here."""
    step = re.sub(r"(?<!\S)\S*\.venv/bin/python(?!\S)", "python", step)
    return re.sub(rf"(?<!\S)/\S*/({'|'.join(map(re.escape, HERE_FILES))})(?!\S)", r"\1", step)


def _cron_commands(line: str) -> list[str]:
    match = CRON_TIME.match(line.strip())
    if not match:
        return [line.strip()]
    steps = [step.strip() for step in match["command"].split("&&")]
    return [_deployed_to_here(step) for step in steps if step and not step.startswith("cd ")]


def doc_commands(doc: str) -> list[DocCommand]:
    """The documented command lines of `doc`, in order of appearance."""
    found: list[DocCommand] = []
    fence: str | None = None  # the language of the open fenced block, "" when plain
    section = ""
    for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
        opening = re.match(r"^\s*```(\S*)\s*$", line)
        if opening:
            fence = opening[1] if fence is None else None
            continue
        prefixes = PREFIXES
        if fence is None:
            section = line[3:].strip() if line.startswith("## ") else section
            candidates = re.findall(r"`([^`\n]+)`", line)
        elif fence == "sh":
            candidates, prefixes = [line.strip()], PREFIXES + SHELL_STEPS
        elif fence == "":
            candidates = _cron_commands(line)
        else:
            candidates = []  # python and other languages: not command lines
        found += [DocCommand(doc, number, c.strip(), len(found) + i, section)
                  for i, c in enumerate(c for c in candidates if c.strip().startswith(prefixes))]
    return found


COMMANDS = {doc: doc_commands(doc) for doc in DOCS}
ALL_COMMANDS = [command for doc in DOCS for command in COMMANDS[doc]]


def test_readme_commands_are_found_in_the_command_table_and_the_text():
    commands = [c.command for c in COMMANDS["README.md"]]

    assert len(commands) >= 12
    assert "python secure_ohlcv_downloader.py --init" in commands
    assert "python validate_environment.py" in commands


def test_operations_commands_are_found_in_sh_blocks_crontab_lines_and_the_text():
    commands = [c.command for c in COMMANDS["docs/OPERATIONS.md"]]

    assert len(commands) >= 20
    assert [c for c in commands if c.endswith(" download --symbols-file symbols.txt")]  # cron
    assert "python secure_ohlcv_cli.py status --json" in commands  # sh block
    assert not [c for c in commands if ".venv/" in c or "&&" in c or c.startswith("cd ")]


def test_the_restore_drill_is_run_from_a_private_backups_directory_on_a_spare_machine():
    drill = [c.command for c in COMMANDS["docs/OPERATIONS.md"] if c.on_spare_machine]

    assert drill[:3] == ["mkdir -m 700 backups", 'cp "$OFFSITE"/ohlcv-backup-*.tar backups/',
                         "python validate_environment.py"]
    assert [c for c in drill if c.startswith("python secure_ohlcv_downloader.py --recover")]
    assert not [c for c in COMMANDS["README.md"] if c.command.startswith(SHELL_STEPS)]


# -- running them ---------------------------------------------------------------------------------

def fresh_machine(tmp_path_factory, name: str) -> Path:
    """A new working directory holding the project's scripts and a symbols file."""
    cwd = tmp_path_factory.mktemp(name)
    link_project(cwd)
    (cwd / "symbols.txt").write_text(SYMBOLS_FILE)
    return cwd


def run_step(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """One command line as an operator types it, umask 022 as on most machines."""
    return subprocess.run(["bash", "-c", command], check=False, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          umask=0o022)


def key_ring_of(cwd: Path) -> str:
    """OHLCV_ENCRYPTION_KEY as --init and --rotate-key keep it in `cwd`'s .env."""
    return read_env_file(cwd / ".env")[0]["OHLCV_ENCRYPTION_KEY"]


@dataclass
class DocRun:
    machine: Path
    spare: Path | None  # the restore drill's machine, once the drill has started
    results: dict[DocCommand, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    """doc -> DocRun: each document's commands run in order on a fresh machine, the
    restore drill's on a second one; the two documents side by side (they share nothing
    but the emulator), which halves the wall time of some forty interpreter start-ups."""
    av = start_emulator()
    shim = python_shim(tmp_path_factory.mktemp("python-shim"))

    def run_document(doc: str) -> DocRun:
        run = DocRun(fresh_machine(tmp_path_factory, Path(doc).stem.lower()), None, {})
        env = with_path(OpsWorkspace(run.machine, av).env(OHLCV_ENCRYPTION_KEY=None), shim)
        spare_env: dict[str, str] = {}
        for command in COMMANDS[doc]:
            cwd, step_env = run.machine, env
            if command.on_spare_machine:
                if run.spare is None:  # the drill starts: the key as in the offline copy
                    run.spare = fresh_machine(tmp_path_factory, "spare-machine")
                    spare_env = dict(env, OHLCV_ENCRYPTION_KEY=key_ring_of(run.machine),
                                     OFFSITE=str(run.machine / "backups"))
                cwd, step_env = run.spare, spare_env
            run.results[command] = run_step(command.command, cwd, step_env)
        return run

    try:
        with ThreadPoolExecutor(len(DOCS)) as pool:
            yield dict(zip(DOCS, pool.map(run_document, DOCS), strict=True))
    finally:
        av.stop()


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.id for c in ALL_COMMANDS])
def test_documented_command_succeeds(doc_runs, command):
    run = doc_runs[command.doc].results[command]

    assert run.returncode == 0, describe(run)
    if command.command.startswith("python validate_environment.py"):
        assert "FAIL" not in run.stdout, run.stdout


def test_the_drill_restored_the_first_machines_datasets_on_the_spare_one(doc_runs):
    run = doc_runs["docs/OPERATIONS.md"]

    assert run.spare is not None
    restored = {p.relative_to(run.spare / "data") for p in dataset_files(run.spare / "data")}
    assert restored
    assert restored <= {p.relative_to(run.machine / "data")
                        for p in dataset_files(run.machine / "data")}


# -- a directory made without -m 700 ---------------------------------------------------------

def machine_env(cwd: Path, shim: Path, **variables: str) -> dict[str, str]:
    return with_path(headless_env(cwd, **variables), python_shim(shim))


def test_drill_with_a_plain_mkdir_is_refused_naming_the_chmod_fix(doc_runs, tmp_path):
    # `mkdir backups` under umask 022 gives 0755: the check and --recover both refuse it
    # and name the fix, which then works. Hence the drill's `mkdir -m 700`.
    first = doc_runs["docs/OPERATIONS.md"].machine
    spare = tmp_path / "spare"
    spare.mkdir()
    link_project(spare)
    env = machine_env(spare, tmp_path / "bin", OHLCV_ENCRYPTION_KEY=key_ring_of(first),
                      OFFSITE=str(first / "backups"))
    drill = [c.command for c in COMMANDS["docs/OPERATIONS.md"] if c.on_spare_machine]
    recover = next(c for c in drill if " --recover " in c)
    fix = f"chmod 700 {spare / 'backups'}"

    assert run_step("mkdir backups", spare, env).returncode == 0
    assert run_step(drill[1], spare, env).returncode == 0  # the cp
    check = run_step("python validate_environment.py", spare, env)
    assert check.returncode == 3 and f"fix: {fix}" in check.stdout, describe(check)
    refused = run_step(recover, spare, env)
    assert refused.returncode == 3 and f"Fix: {fix}" in refused.stderr, describe(refused)

    assert run_step(fix, spare, env).returncode == 0
    recovered = run_step(recover, spare, env)
    assert recovered.returncode == 0, describe(recovered)


def test_backup_dest_others_can_read_is_refused_naming_the_chmod_fix(doc_runs, tmp_path):
    first = doc_runs["docs/OPERATIONS.md"].machine
    env = machine_env(first, tmp_path / "bin")
    loose = tmp_path / "loose"
    private = tmp_path / "private"

    assert run_step(f"mkdir {loose}", first, env).returncode == 0
    refused = run_step(f"python secure_ohlcv_cli.py backup --dest {loose}", first, env)
    assert refused.returncode == 3 and f"Fix: chmod 700 {loose}" in refused.stderr, \
        describe(refused)
    assert list(loose.iterdir()) == []

    # As docs/OPERATIONS.md section 4 says to create one.
    assert "install -d -m 700 DIR" in (REPO / "docs/OPERATIONS.md").read_text()
    assert run_step(f"install -d -m 700 {private}", first, env).returncode == 0
    written = run_step(f"python secure_ohlcv_cli.py backup --dest {private}", first, env)
    assert written.returncode == 0, describe(written)
    assert [p.name for p in private.glob("ohlcv-backup-*.tar")]


# -- --help ---------------------------------------------------------------------------------------

def readme_table_commands() -> list[str]:
    """The command of each row of README.md's command table (`--init` -> init)."""
    names = []
    for line in (REPO / "README.md").read_text().splitlines():
        match = re.match(r"^\| `python (secure_ohlcv_downloader|secure_ohlcv_cli)\.py (\S+)", line)
        if match:
            names.append(match[2].removeprefix("--").rstrip("`"))
    return names


def test_readme_command_table_names_the_commands():
    assert len(readme_table_commands()) >= 10


@pytest.mark.parametrize("script", SCRIPTS[:2])
def test_help_lists_every_command_of_the_readme_table_with_an_example(script, tmp_path):
    link_project(tmp_path)
    env = with_path({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                    python_shim(tmp_path / "bin"))
    run = subprocess.run(["bash", "-c", f"python {script} --help"], check=False, cwd=tmp_path,
                         env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60)

    assert run.returncode == 0, describe(run)
    # Each command: "  NAME  help" in the epilog, then "e.g. python ..." on the next line.
    missing = [name for name in readme_table_commands()
               if not re.search(rf"^  {re.escape(name)}\s.*\n\s+e\.g\. python ", run.stdout,
                                re.MULTILINE)]
    assert missing == [], run.stdout
