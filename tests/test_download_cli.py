"""The download, export and status commands as an operator runs them: real subprocesses
(stdin closed, environment built from scratch) against the local Alpha Vantage emulator.

Covers the result lines and exit codes of `download` (valid, invalid and hostile symbols,
--symbols-file, no progress bar without a terminal, a free key asking for a premium
endpoint, the demo key), what `export` writes in each format, `status --json`, the library's
`load`, and that the API key never shows up anywhere even in a DEBUG log full of retries.
"""

from __future__ import annotations

import io
import json
import re
import stat
from types import SimpleNamespace

import pandas as pd
import pytest

from secure_ohlcv_downloader import fingerprint
from tests.download_fixtures import (  # noqa: F401  (emulator is a fixture)
    FREE_KEY,
    Workspace,
    emulator,
    expected_daily,
    start_emulator,
)

BASE_HEADER = "timestamp,open,high,low,close,volume"


def result_lines(run) -> dict[str, str]:
    """stdout's result lines by dataset ("IBM daily": "updated, ...")."""
    return dict(line.split(": ", 1) for line in run.stdout.splitlines())


def requested_symbols(av) -> list[str]:
    return [e["symbol"] for e in av.requests]


# -- download ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ibm_msft(tmp_path_factory):
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("ibm-msft"), av).init()
        yield SimpleNamespace(av=av, ws=ws, run=ws.cli("download", "IBM", "MSFT"))
    finally:
        av.stop()


def test_download_prints_one_result_line_per_symbol_and_exits_0(ibm_msft):
    run = ibm_msft.run

    assert run.returncode == 0, run.stderr
    lines = result_lines(run)
    assert sorted(lines) == ["IBM daily", "MSFT daily"]
    assert all(text.startswith("updated, ") for text in lines.values())
    assert len(run.stdout.splitlines()) == 2


def test_download_without_a_terminal_shows_no_progress_bar(ibm_msft):
    output = ibm_msft.run.stdout + ibm_msft.run.stderr

    assert "\r" not in output
    assert "%|" not in output


@pytest.fixture(scope="module")
def with_invalid(tmp_path_factory):
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("invalid"), av).init()
        yield SimpleNamespace(av=av, ws=ws, run=ws.cli("download", "IBM", "INVALID", "MSFT"))
    finally:
        av.stop()


def test_invalid_symbol_among_valid_ones_exits_1_naming_it(with_invalid):
    run = with_invalid.run

    assert run.returncode == 1, run.stderr
    assert result_lines(run)["INVALID daily"].startswith("FAILED: invalid symbol or request")
    assert "failed: INVALID\n" in run.stderr


def test_valid_symbols_are_stored_when_another_one_fails(with_invalid):
    app = with_invalid.ws.app()

    assert len(app.load("IBM")) == len(with_invalid.av.daily_bars("IBM"))
    assert len(app.load("MSFT")) == len(with_invalid.av.daily_bars("MSFT"))


@pytest.mark.parametrize("hostile", ["../x", "..", "IBM/../../x", "/etc/passwd", "ＩＢＭ"])
def test_hostile_symbol_exits_2_and_makes_no_request(emulator, tmp_path, hostile):
    ws = Workspace(tmp_path, emulator).init()

    run = ws.cli("download", "IBM", hostile)

    assert run.returncode == 2, run.stderr
    assert "invalid symbol" in run.stderr
    assert emulator.request_count == 0
    assert ws.dataset_files() == []


def test_symbols_file_skips_comments_and_blank_lines(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    (tmp_path / "watchlist.txt").write_text(
        "# symbols for the nightly run\nIBM   # the big one\n\n   \nMSFT, AAPL\n#TSLA\n")

    run = ws.cli("download", "--symbols-file", "watchlist.txt")

    assert run.returncode == 0, run.stderr
    assert sorted(requested_symbols(emulator)) == ["AAPL", "IBM", "MSFT"]
    assert sorted(result_lines(run)) == ["AAPL daily", "IBM daily", "MSFT daily"]


def test_free_key_asking_for_adjusted_bars_fails_naming_the_premium_plan(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_API_KEY=FREE_KEY,
                   OHLCV_RATE_LIMIT_PER_MINUTE=None).init()

    run = ws.cli("download", "IBM", "--adjusted")

    assert run.returncode == 1, run.stderr
    line = result_lines(run)["IBM daily_adjusted"]
    assert line.startswith("FAILED: ") and "premium" in line
    assert ws.dataset_files() == []


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """No API key configured: the public demo key (the emulator serves IBM only to it)."""
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("demo"), av, ALPHA_VANTAGE_API_KEY=None,
                       OHLCV_RATE_LIMIT_PER_MINUTE=None, OHLCV_RATE_LIMIT_PER_SECOND="20").init()
        yield SimpleNamespace(av=av, ws=ws, run=ws.cli("download", "IBM", "MSFT"))
    finally:
        av.stop()


def test_no_api_key_uses_the_demo_key_with_a_warning(demo_run):
    assert "warning: ALPHA_VANTAGE_API_KEY is not set: using the public demo key" in demo_run.run.stderr
    assert {e["key_kind"] for e in demo_run.av.requests} == {"demo"}


def test_demo_key_downloads_ibm(demo_run):
    assert result_lines(demo_run.run)["IBM daily"].startswith("updated, ")


def test_demo_key_fails_other_symbols_with_the_demo_message_and_exit_1(demo_run):
    assert demo_run.run.returncode == 1, demo_run.run.stderr
    line = result_lines(demo_run.run)["MSFT daily"]
    assert line.startswith("FAILED: ")
    assert "The **demo** API key is for demo purposes only." in line


# -- export, status, load ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """IBM daily and daily adjusted in the store (downloaded in-process)."""
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("export"), av).init()
        ws.download(["IBM"])
        ws.download(["IBM"], adjusted=True)
        yield SimpleNamespace(av=av, ws=ws)
    finally:
        av.stop()


@pytest.fixture(scope="module")
def ibm_csv(stored) -> str:
    run = stored.ws.cli("export", "IBM")
    assert run.returncode == 0, run.stderr
    return run.stdout


def csv_frame(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype={"timestamp": str})


def test_export_csv_header_is_exactly_the_documented_one(ibm_csv):
    assert ibm_csv.splitlines()[0] == BASE_HEADER


def test_export_csv_is_oldest_first(ibm_csv):
    dates = csv_frame(ibm_csv)["timestamp"].tolist()

    assert dates == sorted(dates) and len(set(dates)) == len(dates)


def test_export_csv_holds_the_served_bars(stored, ibm_csv):
    expected = expected_daily(stored.av, "IBM")
    expected["timestamp"] = expected["timestamp"].dt.strftime("%Y-%m-%d")

    pd.testing.assert_frame_equal(csv_frame(ibm_csv), expected, check_dtype=False)


def test_export_adjusted_adds_the_adjustment_columns(stored):
    run = stored.ws.cli("export", "IBM", "--adjusted")

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == BASE_HEADER + ",adjusted_close,dividend_amount,split_coefficient"


def test_export_start_and_end_are_inclusive(stored):
    days = [bar["date"] for bar in stored.av.daily_bars("IBM")]
    start, end = days[-10], days[-5]

    run = stored.ws.cli("export", "IBM", "--start", str(start), "--end", str(end))

    assert run.returncode == 0, run.stderr
    assert csv_frame(run.stdout)["timestamp"].tolist() == [str(d) for d in days[-10:-4]]


def test_export_json_holds_the_same_records_as_the_csv(stored, ibm_csv):
    run = stored.ws.cli("export", "IBM", "--format", "json")

    assert run.returncode == 0, run.stderr
    pd.testing.assert_frame_equal(pd.DataFrame(json.loads(run.stdout)), csv_frame(ibm_csv),
                                  check_dtype=False)


def test_export_parquet_file_is_private_and_equals_the_csv(stored, ibm_csv):
    target = stored.ws.cwd / "ibm.parquet"

    run = stored.ws.cli("export", "IBM", "--format", "parquet", "-o", "ibm.parquet")

    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    frame = pd.read_parquet(target)
    frame["timestamp"] = frame["timestamp"].dt.strftime("%Y-%m-%d")
    pd.testing.assert_frame_equal(frame, csv_frame(ibm_csv), check_dtype=False)


def test_status_json_describes_each_dataset(stored):
    run = stored.ws.cli("status", "--json")

    assert run.returncode == 0, run.stderr
    datasets = {d["dataset"]: d for d in json.loads(run.stdout)["datasets"]}
    assert sorted(datasets) == ["IBM daily", "IBM daily_adjusted"]
    days = [bar["date"] for bar in stored.av.daily_bars("IBM")]
    key_fp = fingerprint(stored.ws.variables["OHLCV_ENCRYPTION_KEY"].split(",")[0])
    for entry in datasets.values():
        assert entry["rows"] == len(days)
        assert entry["first_bar"].startswith(str(days[0]))
        assert entry["last_bar"].startswith(str(days[-1]))
        assert re.fullmatch(r"[0-9a-f]{12}", entry["key"]) and entry["key"] == key_fp


def test_status_json_shows_todays_quota_per_api_key(stored):
    run = stored.ws.cli("status", "--json")

    assert run.returncode == 0, run.stderr
    [quota] = json.loads(run.stdout)["quota"]
    assert re.fullmatch(r"av-[0-9a-f]{8}", quota["key"])
    assert quota["used"] == stored.av.request_count
    assert quota["limit"] is None  # a premium plan has no daily cap


LOAD_PROGRAM = """
from secure_ohlcv_downloader import SecureOHLCVDownloader
frame = SecureOHLCVDownloader.from_env().load("IBM", interval="daily")
frame.to_parquet("loaded.parquet")
"""


def test_library_load_returns_the_export_indexed_by_timestamp(stored, ibm_csv):
    run = stored.ws.python(LOAD_PROGRAM)

    assert run.returncode == 0, run.stderr
    frame = pd.read_parquet(stored.ws.cwd / "loaded.parquet")
    assert frame.index.name == "timestamp"
    assert isinstance(frame.index, pd.DatetimeIndex)
    frame = frame.reset_index()
    frame["timestamp"] = frame["timestamp"].dt.strftime("%Y-%m-%d")
    pd.testing.assert_frame_equal(frame, csv_frame(ibm_csv), check_dtype=False)


# -- secrets -------------------------------------------------------------------------------

SECRET_KEY = "ZZSECRETAPIKEY123"
REFUSED_KEY = "ZZSECRETBADKEY456"


@pytest.fixture(scope="module")
def secret_runs(tmp_path_factory):
    """A DEBUG-logged day of work with a distinctive key: retries after faults, the daily
    quota message that echoes the key, status, exports, then a key the API refuses."""
    av = start_emulator(premium_keys={SECRET_KEY: 6000}, accept_unknown_keys=False)
    try:
        ws = Workspace(tmp_path_factory.mktemp("secrets"), av, ALPHA_VANTAGE_API_KEY=SECRET_KEY,
                       OHLCV_LOG_LEVEL="DEBUG", OHLCV_MAX_RETRIES="3",
                       OHLCV_REQUEST_TIMEOUT="0.5").init()
        av.inject("http_503", times=1, symbol="IBM")
        av.inject("html", times=1, symbol="IBM")
        av.inject("reset", times=1, symbol="MSFT")
        av.inject("stall", times=1, symbol="MSFT", seconds=1.0)
        av.inject("truncated", times=1, symbol="AAPL")
        av.inject("throttle_burst", times=1, symbol="AAPL")
        runs = {"download": ws.cli("download", "IBM", "MSFT", "AAPL")}
        av.inject("throttle_daily_key", times=1)
        runs["quota spent"] = ws.cli("download", "IBM", "--full")
        runs["status"] = ws.cli("status", "--json")
        runs["export"] = ws.cli("export", "IBM")
        runs["export to file"] = ws.cli("export", "IBM", "--format", "json", "-o", "ibm.json")
        runs["refused key"] = ws.cli("download", "IBM", "--full", ALPHA_VANTAGE_API_KEY=REFUSED_KEY)
        yield SimpleNamespace(av=av, ws=ws, runs=runs)
    finally:
        av.stop()


def test_secret_scenario_went_through_retries_quota_and_refusal(secret_runs):
    codes = {name: run.returncode for name, run in secret_runs.runs.items()}

    assert codes == {"download": 0, "quota spent": 4, "status": 0, "export": 0,
                     "export to file": 0, "refused key": 3}
    assert set(secret_runs.av.faults_applied) >= {"http_503", "html", "reset", "stall",
                                                  "truncated", "throttle_burst",
                                                  "throttle_daily_key"}


def test_urllib3_request_lines_are_in_the_debug_log_redacted(secret_runs):
    log = secret_runs.ws.log_text()

    assert '"GET /query?' in log
    assert "apikey=[REDACTED]" in log


@pytest.mark.parametrize("key", [SECRET_KEY, REFUSED_KEY])
def test_api_key_is_not_in_the_log_file(secret_runs, key):
    assert key not in secret_runs.ws.log_text()


@pytest.mark.parametrize("key", [SECRET_KEY, REFUSED_KEY])
def test_api_key_is_not_on_stdout_or_stderr(secret_runs, key):
    for name, run in secret_runs.runs.items():
        assert key not in run.stdout, name
        assert key not in run.stderr, name


def test_api_key_is_not_in_status_json(secret_runs):
    run = secret_runs.runs["status"]

    assert json.loads(run.stdout)["quota"]
    assert SECRET_KEY not in run.stdout


def test_api_key_is_not_in_exported_files(secret_runs):
    exported = (secret_runs.ws.cwd / "ibm.json").read_text()

    assert json.loads(exported)
    assert SECRET_KEY not in exported


@pytest.mark.parametrize("key", [SECRET_KEY, REFUSED_KEY])
def test_no_file_the_tool_wrote_holds_the_api_key(secret_runs, key):
    holding = [str(path) for path in secret_runs.ws.cwd.rglob("*")
               if path.is_file() and key.encode() in path.read_bytes()]

    assert holding == []
