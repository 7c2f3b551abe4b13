"""The documentation never drifts from the program: every command line that README.md and
docs/OPERATIONS.md show is run, in the order each document shows it, against the local
Alpha Vantage emulator, and must succeed.

Collected from each document: lines of fenced ```sh blocks, inline code spans, and crontab
entries in plain ``` blocks (split at `&&`, the `cd DIR` step and the five time fields
dropped, `.venv/bin/python` read as `python`, the installed path of a script or of the
symbols file read as that file in the working directory), keeping those that start with
`python secure_ohlcv_downloader.py`, `python secure_ohlcv_cli.py` or
`python validate_environment.py`. Each runs through `bash -c`, as an operator types it,
in a fresh working directory holding the project's scripts (symlinks), a symbols.txt, and
whatever the document's earlier commands left there; `python` is this test's interpreter.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.download_fixtures import start_emulator
from tests.foundation_fixtures import REPO
from tests.operations_fixtures import OpsWorkspace, describe, link_project, python_shim, with_path

SCRIPTS = ("secure_ohlcv_downloader.py", "secure_ohlcv_cli.py", "validate_environment.py")
PREFIXES = tuple(f"python {script}" for script in SCRIPTS)
DOCS = ("README.md", "docs/OPERATIONS.md")
CRON_TIME = re.compile(r"^(?:[\d*/,\-]+\s+){4}[\w*/,\-]+\s+(?P<command>.*)$")
SYMBOLS_FILE = "IBM\nMSFT\n"
# What each document's working directory holds before its first command.
HERE_FILES = (*sorted(p.name for p in REPO.glob("*.py")), "requirements-secure.txt", "symbols.txt")
# Checks of validate_environment.py that fail only because --init has not run yet.
BEFORE_INIT = {"data dir", "backup dir", "state dir"}


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    command: str
    position: int  # order in the document: line numbers repeat on crontab lines

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
    for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
        opening = re.match(r"^\s*```(\S*)\s*$", line)
        if opening:
            fence = opening[1] if fence is None else None
            continue
        if fence is None:
            candidates = re.findall(r"`([^`\n]+)`", line)
        elif fence == "sh":
            candidates = [line.strip()]
        elif fence == "":
            candidates = _cron_commands(line)
        else:
            candidates = []  # python and other languages: not command lines
        found += [DocCommand(doc, number, c.strip(), len(found) + i)
                  for i, c in enumerate(c for c in candidates if c.strip().startswith(PREFIXES))]
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


# -- running them ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    """doc -> {DocCommand: CompletedProcess}: each document's commands run in order, in its
    own fresh working directory; the two documents side by side (they share nothing but
    the emulator), which halves the wall time of some forty interpreter start-ups."""
    av = start_emulator()
    shim = python_shim(tmp_path_factory.mktemp("python-shim"))

    def run_document(doc: str) -> dict[DocCommand, subprocess.CompletedProcess]:
        cwd = tmp_path_factory.mktemp(Path(doc).stem.lower())
        link_project(cwd)
        (cwd / "symbols.txt").write_text(SYMBOLS_FILE)
        env = with_path(OpsWorkspace(cwd, av).env(), shim)
        return {command: subprocess.run(["bash", "-c", command.command], check=False, cwd=cwd,
                                        env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                        text=True, timeout=60)
                for command in COMMANDS[doc]}

    try:
        with ThreadPoolExecutor(len(DOCS)) as pool:
            yield dict(zip(DOCS, pool.map(run_document, DOCS), strict=True))
    finally:
        av.stop()


def failed_checks(table: str) -> set[str]:
    """Names of the FAIL rows of validate_environment.py's table."""
    return {m[1].strip() for m in re.finditer(r"^(\S.*?)\s{2,}FAIL\s{2}", table, re.MULTILINE)}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.id for c in ALL_COMMANDS])
def test_documented_command_succeeds(doc_runs, command):
    run = doc_runs[command.doc][command]

    if command.command.startswith("python validate_environment.py") and run.returncode == 3:
        # Before --init (section 1 runs it first) the directories do not exist yet; any
        # other failing check is a real problem.
        assert failed_checks(run.stdout) and failed_checks(run.stdout) <= BEFORE_INIT, run.stdout
        return
    assert run.returncode == 0, describe(run)


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
