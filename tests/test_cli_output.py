"""What the command line says, and what it refuses before any work: a reader that leaves
early (`| head`), the program name and option help, dates checked locally, the estimate's
verdict on a plan, result lines in the order given.

Every run is the real command line in a subprocess (stdin closed, environment built from
scratch) against the local Alpha Vantage emulator, as in test_download_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from secure_ohlcv_cli import COMMANDS, build_parser
from secure_ohlcv_downloader import MARKET_TZ
from tests.download_fixtures import (  # noqa: F401  (emulator is a fixture)
    FREE_KEY,
    Workspace,
    emulator,
    start_emulator,
)
from tests.foundation_fixtures import CLI, MODULE, SUBPROCESS_TIMEOUT, headless_env, run_cli


def runs(ws: Workspace) -> dict:
    return json.loads((ws.cwd / "state" / "runs.json").read_text())


def quiet(stderr: str) -> bool:
    """No error and no broken pipe said anywhere on stderr."""
    return not re.search(r"error|broken ?pipe", stderr, re.IGNORECASE)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store with IBM daily (about 2,000 bars: a CSV export well over a pipe's 64 KiB)."""
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("stored"), av).init()
        first = ws.cli("download", "IBM")
        assert first.returncode == 0, first.stderr
        yield SimpleNamespace(av=av, ws=ws)
    finally:
        av.stop()


def popen(ws: Workspace, args: list[str], stdout: int, stderr_path: Path) -> subprocess.Popen:
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen([sys.executable, str(CLI), *args], cwd=ws.cwd, env=ws.env(),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)


# -- 4: a reader that leaves early -----------------------------------------------------------

def test_status_into_a_pipe_already_closed_ends_quietly_with_exit_0_recorded(stored, tmp_path):
    """`status | head -1` with head gone before status writes: no error, nothing logged as
    an I/O error, exit 0, and the run recorded as the success it was."""
    ws = stored.ws
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        child = popen(ws, ["status"], write_end, tmp_path / "stderr")
    finally:
        os.close(write_end)
    code = child.wait(timeout=SUBPROCESS_TIMEOUT)
    stderr = (tmp_path / "stderr").read_text()

    assert quiet(stderr), stderr
    assert code == 0, stderr
    assert "I/O error" not in ws.log_text()
    assert runs(ws)["status"]["exit_code"] == 0


def test_export_read_one_line_then_closed_ends_quietly_and_the_export_is_recorded_ok(
        stored, tmp_path):
    """`export IBM | head -1`: the reader takes one line of far more than a pipe holds and
    closes its end while the export is still writing."""
    ws = stored.ws
    child = popen(ws, ["export", "IBM"], subprocess.PIPE, tmp_path / "stderr")
    assert child.stdout is not None
    first = child.stdout.readline()
    child.stdout.close()
    code = child.wait(timeout=SUBPROCESS_TIMEOUT)
    stderr = (tmp_path / "stderr").read_text()

    assert first.startswith(b"timestamp,open,high,low,close,volume")
    assert quiet(stderr), stderr
    assert code == 0, stderr
    assert "I/O error" not in ws.log_text()
    assert runs(ws)["export"]["exit_code"] == 0


# -- 5: program name, one command list, every option explained ------------------------------

@pytest.mark.parametrize("script", [CLI, MODULE], ids=["cli", "module"])
def test_help_and_usage_errors_name_the_script_actually_run(tmp_path, script):
    env = headless_env(tmp_path)

    helped = run_cli(["--help"], tmp_path, env, script=script)
    wrong = run_cli(["estimate"], tmp_path, env, script=script)

    other = (MODULE if script == CLI else CLI).name
    assert helped.stdout.startswith(f"usage: {script.name} ")
    assert f"python {script.name} --init" in helped.stdout
    assert other not in helped.stdout
    assert wrong.returncode == 2
    assert wrong.stderr.startswith(f"usage: {script.name} estimate ")


def test_top_level_help_lists_each_command_once(tmp_path):
    out = run_cli(["--help"], tmp_path, headless_env(tmp_path)).stdout

    for name, (_, help_, _) in COMMANDS.items():
        assert len(re.findall(rf"^\s+{re.escape(name)}\s", out, re.MULTILINE)) == 1, name
        assert out.count(help_) == 1, name


def test_estimate_help_documents_each_option_and_its_default(tmp_path):
    out = run_cli(["estimate", "--help"], tmp_path, headless_env(tmp_path)).stdout
    flat = " ".join(out.split())

    assert re.search(r"--symbols N how many symbols .*\(required\)", flat), out
    assert re.search(r"--interval INTERVAL bar size: daily, .* \(default: daily\)", flat), out
    assert re.search(r"--years Y years of history .* \(default: 20\)", flat), out


def test_every_option_of_every_command_has_help_naming_its_default():
    parser = build_parser("secure_ohlcv_cli.py")
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = []
    for name, command in commands.items():
        for action in command._actions:
            if action.dest == "help":
                continue
            text = action.help or ""
            if not text:
                missing.append(f"{name} {action.dest}: no help")
            elif action.option_strings and not re.search(r"default|required", text):
                missing.append(f"{name} {action.option_strings[0]}: no default named")

    assert set(commands) == set(COMMANDS)
    assert not missing, missing


# -- 6: refused locally, before any request or output --------------------------------------

def next_month_in_new_york() -> str:
    today = datetime.now(MARKET_TZ)
    return f"{today.year + today.month // 12}-{today.month % 12 + 1:02d}"


@pytest.mark.parametrize("month", [next_month_in_new_york(), "2099-01", "2026-13", "26-01"])
def test_download_of_a_future_or_malformed_month_is_refused_with_exit_2_and_no_request(
        emulator, tmp_path, month):
    ws = Workspace(tmp_path, emulator).init()

    result = ws.cli("download", "IBM", "--interval", "5min", "--month", month)

    assert result.returncode == 2, result.stdout + result.stderr
    assert emulator.requests == []
    assert result.stdout == ""
    assert "--month" in result.stderr and "YYYY-MM" not in result.stdout
    assert "invalid symbol" not in result.stderr


def test_export_with_start_after_end_is_refused_with_exit_2_and_no_output(stored):
    result = stored.ws.cli("export", "IBM", "--start", "2026-12-05", "--end", "2026-11-01")

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "--start 2026-12-05 is after --end 2026-11-01" in result.stderr
    assert "Fix:" in result.stderr


# -- 9: the estimate's verdict on a plan -----------------------------------------------------

def estimate(tmp_path: Path, symbols: int, keys: str = FREE_KEY, **variables: str) -> str:
    env = headless_env(tmp_path, ALPHA_VANTAGE_API_KEY=keys, **variables)
    result = run_cli(["estimate", "--symbols", str(symbols)], tmp_path, env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_estimate_says_plainly_when_a_free_key_cannot_keep_up_and_what_would_fix_it(tmp_path):
    out = estimate(tmp_path, 100)

    assert "CANNOT KEEP UP" in out
    assert "needs 100 requests a day" in out and "allow 25 a day" in out
    for fix in ("more API keys", "premium plan", "at most 25 symbols"):
        assert fix in out, fix
    assert "operations guide" not in out


def test_estimate_counts_every_key_and_stays_quiet_when_the_plan_keeps_up(tmp_path):
    assert "CANNOT" not in estimate(tmp_path, 25)
    assert "CANNOT" not in estimate(tmp_path, 40, keys="FREEKEY,OTHERKEY")
    assert "allow 50 a day" in estimate(tmp_path, 60, keys="FREEKEY,OTHERKEY")
    assert "CANNOT" not in estimate(tmp_path, 5000, OHLCV_RATE_LIMIT_PER_MINUTE="75")


# -- 10: result lines ------------------------------------------------------------------------

def test_a_full_download_that_brings_nothing_new_says_unchanged(stored):
    result = stored.ws.cli("download", "IBM", "--full")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("IBM daily: unchanged, "), result.stdout
    assert "(+0)" not in result.stdout
    assert result.stderr.startswith("done: 0 updated, 1 unchanged, ")


def test_result_lines_come_in_the_order_the_symbols_were_given(emulator, tmp_path):
    """The first symbol's answer is held back a second: it finishes last, is printed first."""
    ws = Workspace(tmp_path, emulator).init()
    emulator.inject("latency", symbol="AAPL", seconds=1.0)
    symbols = ["AAPL", "MSFT", "IBM", "GOOG", "NVDA", "AMZN"]

    result = ws.cli("download", *symbols)

    assert result.returncode == 0, result.stderr
    assert [line.split(" ", 1)[0] for line in result.stdout.splitlines()] == symbols
