"""Start-up: commands that never touch bar data never import pandas or pyarrow, and
`status` reports from each dataset's Parquet footer what a full read would show.

Each command runs as the real command line in a fresh interpreter; a small wrapper runs
the CLI as `__main__` and then writes which heavy modules the process had imported.
No timing here: the start-up figures are bench/'s (`python -m bench.run startup`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secure_ohlcv_downloader import CATALOGUE_NAME, MARKET_TZ, status_of
from tests.download_fixtures import PREMIUM_KEY, start_emulator
from tests.foundation_fixtures import CLI, MODULE, REPO, SUBPROCESS_TIMEOUT
from tests.operations_fixtures import OpsWorkspace

HEAVY = ("pandas", "pyarrow", "numpy", "exchange_calendars")

# Runs the CLI exactly as `python secure_ohlcv_cli.py ARGS` does, then reports the
# heavy modules imported (whatever the exit code) to the file named in argv[1].
WRAPPER = """
import json, runpy, sys
report, cli, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [cli, *args]
sys.path.insert(0, {repo!r})
try:
    runpy.run_path(cli, run_name="__main__")
except SystemExit as exc:
    code = exc.code
with open(report, "w") as f:
    json.dump(sorted(m for m in {heavy!r} if m in sys.modules), f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An initialised store holding a daily, an adjusted daily and an intraday month."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("startup"), av).init()
        assert ws.download(["IBM", "MSFT"]).exit_code == 0
        assert ws.download(["IBM"], adjusted=True).exit_code == 0
        assert ws.download(["IBM"], interval="5min").exit_code == 0
        yield ws
    finally:
        av.stop()


def heavy_imports(ws: OpsWorkspace, *args: str,
                  script: Path = CLI) -> tuple[subprocess.CompletedProcess, list[str]]:
    report = ws.cwd / "imported.json"
    report.unlink(missing_ok=True)
    code = WRAPPER.format(repo=str(REPO), heavy=HEAVY)
    run = subprocess.run([sys.executable, "-c", code, str(report), str(script), *args],
                         cwd=ws.cwd, env=ws.env(), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert report.exists(), run.stderr
    return run, json.loads(report.read_text())


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["download", "IBM", "--interval", "2min"], 2),  # an argument error
    (["estimate", "--symbols", "500", "--interval", "weekly"], 0),  # nothing stored to measure
    (["--check-keys"], 0),
    (["--cleanup", "--dry-run"], 0),
])
def test_a_command_that_reads_no_bars_imports_neither_pandas_nor_pyarrow(store, args, code):
    run, imported = heavy_imports(store, *args)

    assert run.returncode == code, run.stderr
    assert imported == []


def test_the_library_run_as_a_script_starts_as_light_as_the_cli(store):
    """Cron and the systemd units run secure_ohlcv_downloader.py itself."""
    run, imported = heavy_imports(store, "--check-keys", script=MODULE)

    assert run.returncode == 0, run.stderr
    assert imported == []


@pytest.mark.parametrize("args", [["status"], ["status", "--json"],
                                  ["estimate", "--symbols", "500"]])
def test_status_and_estimate_from_a_fresh_catalogue_import_neither_pandas_nor_pyarrow(store, args):
    """Every download ends by rewriting the catalogue: status and estimate read it alone
    (one Fernet token), decoding no dataset."""
    run, imported = heavy_imports(store, *args)

    assert run.returncode == 0, run.stderr
    assert imported == []
    if args[0] == "estimate":
        assert "measured in this store" in run.stdout
    else:
        assert "IBM intraday_5min" in run.stdout and "IBM daily_adjusted" in run.stdout


def test_a_gap_report_reads_the_cached_calendar_without_pandas(store):
    """The first report builds each exchange's calendar (exchange_calendars, on pandas) and
    caches its sessions in the state directory; the next fresh process reads that copy,
    and the bar dates from Arrow's buffers: pandas is never imported (~0.4 s saved)."""
    first, _ = heavy_imports(store, "gaps")
    again, imported = heavy_imports(store, "gaps")

    assert first.returncode == again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "IBM intraday_5min" in again.stdout
    assert (store.cwd / "state" / "calendar-XNYS.json").is_file()
    assert "pandas" not in imported and "exchange_calendars" not in imported


def test_status_without_its_catalogue_reads_footers_without_building_a_dataframe(store):
    """With no catalogue to vouch for a file, status reads each one's Parquet footer
    (pyarrow, which brings numpy); pandas is never imported, and nothing is written."""
    catalogue = store.cwd / "data" / CATALOGUE_NAME
    kept = catalogue.read_bytes()
    catalogue.unlink()
    try:
        run, imported = heavy_imports(store, "status")
        assert not catalogue.exists()  # readers never write it
    finally:
        catalogue.write_bytes(kept)

    assert run.returncode == 0, run.stderr
    assert "pandas" not in imported and "pyarrow" in imported
    assert "IBM intraday_5min" in run.stdout and "IBM daily_adjusted" in run.stdout


def export_form(stamp, intraday: bool) -> str:
    """A bar's time as export writes it, from the decoded table (pandas)."""
    return stamp.tz_convert(MARKET_TZ).isoformat(sep=" ") if intraday else str(stamp.date())


def test_status_shows_what_a_full_read_of_each_dataset_shows(store):
    """The footer gives the rows, the first and last bar, the metadata and the key as the
    decoded table does, for daily, adjusted and intraday (time zone kept) datasets."""
    app = store.app()
    store_ = app.store()
    rows = {row["dataset"]: row for row in status_of(app.ctx)["datasets"]}

    datasets = list(store_.datasets())
    assert len(rows) == len(datasets) >= 4  # the trailing month may span two
    for dataset in datasets:
        frame, meta = store_.read(dataset)
        path = store_.path(dataset)
        _, key = store_.key_ring.decrypt_with_fingerprint(path.read_bytes(), path)
        first, last = frame["timestamp"].iloc[[0, -1]]
        intraday = dataset.month is not None
        row = rows[str(dataset)]
        assert (row["rows"], row["first_bar"], row["last_bar"], row["updated_at"], row["key"]) \
            == (len(frame), export_form(first, intraday), export_form(last, intraday),
                meta["written_at"], key), str(dataset)
    assert PREMIUM_KEY not in json.dumps(rows)
