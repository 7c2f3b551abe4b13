"""The gap report: stored histories against their exchange's calendar.

Everything runs over the Alpha Vantage emulator (a real HTTP server) and the real command
line in subprocesses; the calendars are exchange_calendars' own. The emulator's
`misdate` plays a vendor's calendar mistakes: a session left without a bar, a bar on a
day the exchange was closed. Its histories are short and end on fixed dates in the past
(no bar may be dated after the download's own clock), so what the report finds does not
move with today's date.

NYSE in these windows: 2026-09-08 to 2026-11-30 has one holiday, Thanksgiving
(Thursday 2026-11-26); March and April 2026 have one, Good Friday (2026-04-03).
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from tests.download_fixtures import Workspace, start_emulator

THANKSGIVING = "2026-11-26"
GOOD_FRIDAY = "2026-04-03"
MISSING = "2026-10-14"  # a Wednesday session


def report_lines(run) -> dict[str, str]:
    """stdout's lines by dataset ("IBM daily": "...")."""
    return dict(line.split(": ", 1) for line in run.stdout.splitlines())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """IBM: one session missing and one bar on Thanksgiving; MSFT: whole; IBM's October
    5-minute month without the missing session's bars; XYZ.ABC: an exchange no calendar
    knows."""
    av = start_emulator(history_start="2026-09-08", as_of="2026-11-30")
    try:
        av.misdate("IBM", drop=[MISSING], add=[THANKSGIVING])
        av.misdate("MSFT", drop=[THANKSGIVING])  # whatever the emulator's own holidays
        ws = Workspace(tmp_path_factory.mktemp("gaps"), av).init()
        metrics = ws.cwd / "secure_ohlcv.prom"
        downloads = [ws.cli("download", "IBM", "MSFT", "XYZ.ABC"),
                     ws.cli("download", "IBM", "--interval", "5min", "--month", "2026-10")]
        assert all(run.returncode == 0 for run in downloads), [r.stderr for r in downloads]
        yield SimpleNamespace(
            ws=ws, metrics=metrics,
            text=ws.cli("gaps", "--interval", "daily", "IBM", "MSFT"),
            json=ws.cli("gaps", "--json", "--metrics-file", str(metrics)),
            strict=ws.cli("gaps", "--fail-on-gaps", "IBM"),
            strict_clean=ws.cli("gaps", "--fail-on-gaps", "MSFT"),
            status=ws.cli("status"), status_json=ws.cli("status", "--json"))
    finally:
        av.stop()


def test_the_report_names_the_missing_session_and_the_bar_on_a_holiday(store):
    run = store.text

    assert run.returncode == 0, run.stderr
    line = report_lines(run)["IBM daily"]
    assert f"1 missing session(s): {MISSING}" in line
    assert f"1 bar(s) on a day the exchange was closed: {THANKSGIVING}" in line
    assert "gaps: 2 in 1 of 2 dataset(s)" in run.stderr
    assert "Fix: `download --repair-gaps SYMBOL`" in run.stderr


def test_a_whole_series_reports_no_gaps(store):
    assert re.fullmatch(r"no gaps in \d+ bars", report_lines(store.text)["MSFT daily"])


def test_json_lists_every_gap_with_its_date(store):
    assert store.json.returncode == 0, store.json.stderr
    report = json.loads(store.json.stdout)
    rows = {row["dataset"]: row for row in report["datasets"]}
    assert rows["IBM daily"]["missing"] == [MISSING]
    assert rows["IBM daily"]["closed"] == [THANKSGIVING]
    assert rows["IBM daily"]["gaps"] == 2
    assert rows["MSFT daily"]["gaps"] == 0 and rows["MSFT daily"]["checked"]
    assert (report["gaps"], report["datasets_with_gaps"]) == (3, 2)  # the 5-minute month too


def test_an_intraday_month_names_the_session_with_no_bars(store):
    rows = {row["dataset"]: row for row in json.loads(store.json.stdout)["datasets"]}

    month = rows["IBM intraday_5min 2026-10"]
    assert month["missing"] == [MISSING] and month["closed"] == []


def test_an_exchange_without_a_calendar_is_not_checked_rather_than_guessed(store):
    rows = {row["dataset"]: row for row in json.loads(store.json.stdout)["datasets"]}

    assert rows["XYZ.ABC daily"]["checked"] is False
    assert rows["XYZ.ABC daily"]["gaps"] == 0
    assert "1 not checked (no exchange calendar)" in store.json.stderr


def test_fail_on_gaps_exits_1_on_a_gap_and_0_without(store):
    assert store.strict.returncode == 1, store.strict.stderr
    assert store.strict_clean.returncode == 0, store.strict_clean.stderr


def test_status_shows_the_gap_count_recorded_when_each_file_was_written(store):
    assert store.status.returncode == 0, store.status.stderr
    lines = {line[:28].strip(): line for line in store.status.stdout.splitlines()}
    assert "  gaps 2" in lines["IBM daily"]
    assert "  gaps 0" in lines["MSFT daily"]
    assert "  gaps -" in lines["XYZ.ABC daily"]  # no calendar: no count
    rows = {row["dataset"]: row for row in json.loads(store.status_json.stdout)["datasets"]}
    assert rows["IBM daily"]["gaps"] == 2
    assert rows["IBM intraday_5min 2026-10"]["gaps"] == 1


def test_a_file_written_before_gaps_were_counted_shows_a_dash(store):
    from secure_ohlcv_downloader import DatasetId

    store.ws.backdate(DatasetId("MSFT"))  # rewrites it with the metadata of an older run
    run = store.ws.cli("status")
    assert "  gaps -" in next(line for line in run.stdout.splitlines()
                              if line.startswith("MSFT daily"))
    assert report_lines(store.ws.cli("gaps", "MSFT"))["MSFT daily"].startswith("no gaps")


def test_the_metrics_file_carries_the_gap_figures(store):
    text = store.metrics.read_text()

    assert re.search(r"^ohlcv_gaps 3(\.0)?$", text, re.M), text
    assert re.search(r"^ohlcv_datasets_with_gaps 2(\.0)?$", text, re.M), text


def test_a_symbol_not_stored_is_a_usage_error(store):
    run = store.ws.cli("gaps", "NOPE")

    assert run.returncode == 2
    assert "nothing stored for NOPE" in run.stderr and "Fix:" in run.stderr


@pytest.fixture(scope="module")
def weekly(tmp_path_factory):
    """Weekly and monthly bars over Good Friday: AAPL as the vendor keys them (the week
    on Thursday), ORCL with a bar on Good Friday itself."""
    av = start_emulator(history_start="2026-03-02", as_of="2026-04-30")
    try:
        av.misdate("AAPL", drop=[GOOD_FRIDAY])
        av.misdate("ORCL", add=[GOOD_FRIDAY])
        ws = Workspace(tmp_path_factory.mktemp("weekly"), av).init()
        for interval in ("weekly", "monthly"):
            run = ws.cli("download", "AAPL", "ORCL", "--interval", interval)
            assert run.returncode == 0, run.stderr
        report = json.loads(ws.cli("gaps", "--json").stdout)
        yield {row["dataset"]: row for row in report["datasets"]}
    finally:
        av.stop()


def test_a_week_keyed_on_thursday_before_a_friday_holiday_is_no_gap(weekly):
    assert weekly["AAPL weekly"]["gaps"] == 0
    assert weekly["AAPL monthly"]["gaps"] == 0


def test_a_weekly_bar_on_a_holiday_is_a_gap_and_its_week_lacks_its_bar(weekly):
    assert weekly["ORCL weekly"]["closed"] == [GOOD_FRIDAY]
    assert weekly["ORCL weekly"]["missing"] == ["2026-04-02"]  # the week's last session
    assert weekly["ORCL monthly"]["gaps"] == 0  # April's bar is on its last day, the 30th


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """More histories than one process takes on (FORK_MIN_ITEMS per worker): one whole
    IBM series stored under 2 * FORK_MIN_ITEMS + 7 names, every 10th without one session."""
    from secure_ohlcv_downloader import FORK_MIN_ITEMS, DatasetId

    av = start_emulator(history_start="2026-09-08", as_of="2026-11-30")
    try:
        av.misdate("IBM", drop=[THANKSGIVING])
        ws = Workspace(tmp_path_factory.mktemp("many"), av).init()
        assert ws.download(["IBM"]).exit_code == 0
        frame, meta = ws.stored(DatasetId("IBM"))
        store = ws.app().store()
        names = [f"H{i:03d}" for i in range(2 * FORK_MIN_ITEMS + 7)]
        with store.lock():
            for i, name in enumerate(names):
                holed = frame[frame["timestamp"] != MISSING] if i % 10 == 3 else frame
                store.write(DatasetId(name), holed.reset_index(drop=True), meta)
        yield SimpleNamespace(names=names, run=ws.cli("gaps", "--json"))
    finally:
        av.stop()


def test_a_report_spread_over_processes_lists_each_history_once_in_order(many):
    """The histories are split among forked workers: each comes back exactly once, in
    the store's order, with its own findings; the report is printed once."""
    assert many.run.returncode == 0, many.run.stderr
    report = json.loads(many.run.stdout)  # one JSON document: no worker printed a copy
    rows = report["datasets"]
    expected = sorted(["IBM daily"] + [f"{name} daily" for name in many.names])

    assert [row["dataset"] for row in rows] == expected
    holed = {f"{name} daily" for i, name in enumerate(many.names) if i % 10 == 3}
    for row in rows:
        assert row["missing"] == ([MISSING] if row["dataset"] in holed else []), row
    assert (report["gaps"], report["datasets_with_gaps"]) == (len(holed), len(holed))
    assert many.run.stderr.count("gaps: ") == 1
