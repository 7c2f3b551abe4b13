"""Repair: `download --repair-gaps` re-fetches the whole history of a dataset with gaps.

Over the Alpha Vantage emulator (a real HTTP server) serving the New York Stock Exchange's
sessions from the same exchange_calendars calendar the product reads; its `misdate` plays
the vendor's mistakes (a session without a bar, a bar on a closed day) and, with
`correct`, the vendor fixing one. Each run is made in-process with the run's clock set
(RunContext.clock), never the machine's date; requests are counted where they arrive. The
command line's own output and exit code are checked in a subprocess.

The history runs from 2026-09-08 to Wednesday 2026-11-25 (no NYSE holiday inside it).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from secure_ohlcv_downloader import DatasetId, calendar_for
from tests.download_fixtures import FREE_KEY, Workspace, run_at, start_emulator

NEW_YORK = ZoneInfo("America/New_York")
NYSE = calendar_for("IBM")
assert NYSE is not None

WEDNESDAY_EVENING = datetime(2026, 11, 25, 20, 0, tzinfo=NEW_YORK)
FRIDAY_EVENING = datetime(2026, 11, 27, 20, 0, tzinfo=NEW_YORK)
FILLED = date(2026, 10, 14)      # a Wednesday session the vendor drops, then serves
VENDORS = date(2026, 10, 21)     # a Wednesday session the vendor never serves
SATURDAY = date(2026, 10, 17)    # a bar the vendor dates on a closed day
IBM = DatasetId("IBM")


@pytest.fixture
def av():
    server = start_emulator(sessions=NYSE.is_session, history_start="2026-09-08",
                            as_of="2026-11-25")
    try:
        yield server
    finally:
        server.stop()


def requests_during(av, call) -> tuple[list[dict], object]:
    before = len(av.requests)
    outcome = call()
    return av.requests[before:], outcome


def bar_days(ws: Workspace) -> set[date]:
    frame, _ = ws.stored(IBM)
    return set(frame["timestamp"].dt.date)


def stored_with_mistakes(av, tmp_path, drop=(), add=()) -> Workspace:
    av.misdate("IBM", drop=drop, add=add)
    ws = Workspace(tmp_path, av).init()
    report = run_at(ws, WEDNESDAY_EVENING, ["IBM"])
    assert report.exit_code == 0, report.results
    return ws


def test_a_session_the_vendor_now_serves_is_filled_with_one_full_request(av, tmp_path):
    ws = stored_with_mistakes(av, tmp_path, drop=[FILLED])
    assert FILLED not in bar_days(ws)
    av.misdate("IBM", correct=[FILLED])

    asked, report = requests_during(av, lambda: run_at(ws, WEDNESDAY_EVENING, ["IBM"],
                                                       repair=True))

    assert [r["outputsize"] for r in asked] == ["full"]
    (result,) = report.results
    assert result.repair.filled == (FILLED,) and result.repair.vendor == ()
    assert FILLED in bar_days(ws)
    _, meta = ws.stored(IBM)
    assert meta["gaps"] == 0 and "vendor_gaps" not in meta
    assert report.exit_code == 0


def test_a_plain_download_of_a_current_dataset_with_a_gap_asks_nothing(av, tmp_path):
    # Repair is asked for: a gap alone does not cost a request every day.
    ws = stored_with_mistakes(av, tmp_path, drop=[FILLED])
    av.misdate("IBM", correct=[FILLED])

    asked, _ = requests_during(av, lambda: run_at(ws, WEDNESDAY_EVENING, ["IBM"]))

    assert asked == [] and FILLED not in bar_days(ws)


def test_a_gap_the_vendor_keeps_is_recorded_and_not_fetched_again(av, tmp_path):
    ws = stored_with_mistakes(av, tmp_path, drop=[VENDORS])

    report = run_at(ws, WEDNESDAY_EVENING, ["IBM"], repair=True)
    (result,) = report.results
    assert result.repair.vendor == (VENDORS,) and result.repair.filled == ()
    assert report.exit_code == 0  # the repair ran: what is left is the vendor's
    _, meta = ws.stored(IBM)
    assert meta["vendor_gaps"] == {"dates": [VENDORS.isoformat()],
                                   "checked_at": WEDNESDAY_EVENING.astimezone(UTC).isoformat()}

    asked, again = requests_during(av, lambda: run_at(ws, WEDNESDAY_EVENING, ["IBM"],
                                                      repair=True))
    assert asked == []
    (result,) = again.results
    assert result.outcome == "current" and result.repair.vendor == (VENDORS,)
    assert "not fetched again" in result.line()


def test_a_normal_refresh_keeps_the_record_of_vendor_gaps(av, tmp_path):
    ws = stored_with_mistakes(av, tmp_path, drop=[VENDORS])
    run_at(ws, WEDNESDAY_EVENING, ["IBM"], repair=True)
    av.as_of = "2026-11-27"  # Thanksgiving, then Friday's early close

    asked, _ = requests_during(av, lambda: run_at(ws, FRIDAY_EVENING, ["IBM"]))
    assert [r["outputsize"] for r in asked] == ["compact"]
    _, meta = ws.stored(IBM)
    assert meta["vendor_gaps"]["dates"] == [VENDORS.isoformat()]

    asked, _ = requests_during(av, lambda: run_at(ws, FRIDAY_EVENING, ["IBM"], repair=True))
    assert asked == []


def test_a_bar_on_a_closed_day_the_vendor_no_longer_sends_is_removed(av, tmp_path):
    ws = stored_with_mistakes(av, tmp_path, add=[SATURDAY])
    assert SATURDAY in bar_days(ws)
    av.misdate("IBM", correct=[SATURDAY])

    report = run_at(ws, WEDNESDAY_EVENING, ["IBM"], repair=True)

    (result,) = report.results
    assert result.repair.removed == (SATURDAY,) and result.repair.vendor == ()
    assert SATURDAY not in bar_days(ws)
    assert ws.stored(IBM)[1]["gaps"] == 0


def test_a_bar_on_a_closed_day_the_vendor_still_sends_is_the_vendors(av, tmp_path):
    ws = stored_with_mistakes(av, tmp_path, add=[SATURDAY])

    report = run_at(ws, WEDNESDAY_EVENING, ["IBM"], repair=True)

    (result,) = report.results
    assert result.repair.vendor == (SATURDAY,) and result.repair.removed == ()
    assert SATURDAY in bar_days(ws)
    assert ws.stored(IBM)[1]["vendor_gaps"]["dates"] == [SATURDAY.isoformat()]


def test_a_weekly_history_is_repaired_by_its_one_request(av, tmp_path):
    # A week whose Friday has no bar is dated on its Thursday: the week's last session is
    # missing. Weekly answers always hold the whole history.
    friday = date(2026, 10, 16)
    av.misdate("IBM", drop=[friday])
    ws = Workspace(tmp_path, av).init()
    run_at(ws, WEDNESDAY_EVENING, ["IBM"], interval="weekly")
    av.misdate("IBM", correct=[friday])

    asked, report = requests_during(av, lambda: run_at(ws, WEDNESDAY_EVENING, ["IBM"],
                                                       interval="weekly", repair=True))

    assert len(asked) == 1
    (result,) = report.results
    assert result.repair.filled == (friday,) and result.repair.vendor == ()
    frame, meta = ws.stored(DatasetId("IBM", "weekly"))
    assert friday in set(frame["timestamp"].dt.date) and meta["gaps"] == 0


def test_a_free_key_refused_the_full_history_records_nothing_as_the_vendors(av, tmp_path):
    av.misdate("IBM", drop=[VENDORS])
    ws = Workspace(tmp_path, av, ALPHA_VANTAGE_API_KEY=FREE_KEY, OHLCV_RATE_LIMIT_PER_MINUTE=None).init()
    run_at(ws, WEDNESDAY_EVENING, ["IBM"])

    asked, report = requests_during(av, lambda: run_at(ws, WEDNESDAY_EVENING, ["IBM"],
                                                       repair=True))

    assert [r["outputsize"] for r in asked] == ["full", "compact"]  # refused, then compact
    (result,) = report.results
    assert not result.repair.whole_history and result.repair.vendor == ()
    assert "could not see the whole history" in result.line()
    assert "vendor_gaps" not in ws.stored(IBM)[1]


def test_the_command_line_reports_what_it_filled_and_what_the_vendor_lacks(av, tmp_path):
    # The real clock: the emulator's history ends in the past, so the run also refreshes.
    ws = stored_with_mistakes(av, tmp_path, drop=[FILLED, VENDORS])
    av.misdate("IBM", correct=[FILLED])

    run = ws.cli("download", "--repair-gaps", "IBM")

    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    assert line.startswith("IBM daily: updated")
    assert f"filled 1 missing session(s): {FILLED}" in line
    assert f"the vendor lacks 1 (recorded, not fetched again): {VENDORS}" in line
    assert "repair: 1 gap(s) filled, 0 removed, 1 the vendor's" in run.stderr


def test_the_gap_report_tells_the_vendors_gaps_from_unknown_ones(av, tmp_path):
    ws = stored_with_mistakes(av, tmp_path, drop=[VENDORS])
    run_at(ws, WEDNESDAY_EVENING, ["IBM"], repair=True)

    report = ws.cli("gaps", "--json", "IBM")
    text = ws.cli("gaps", "IBM")

    (row,) = json.loads(report.stdout)["datasets"]
    assert row["missing"] == [VENDORS.isoformat()] and row["vendor"] == [VENDORS.isoformat()]
    assert f"the vendor's own, found by a repair: {VENDORS}" in text.stdout


def test_repair_refuses_intraday_and_full_with_the_fix(av, tmp_path):
    ws = Workspace(tmp_path, av).init()

    intraday = ws.cli("download", "--repair-gaps", "--interval", "5min", "IBM")
    both = ws.cli("download", "--repair-gaps", "--full", "IBM")

    assert intraday.returncode == 2 and "download --full --month" in intraday.stderr
    assert both.returncode == 2 and "--full" in both.stderr
    assert av.requests == []
