"""A refresh asks Alpha Vantage only for a session its exchange has held since the last one.

Each store is downloaded and refreshed in-process with the run's clock set
(RunContext.clock), never the machine's date, over the local emulator; requests are
counted where they arrive, at the emulator. The emulator serves bars on the New York Stock
Exchange's sessions, from the same exchange_calendars calendar the product reads (no
hand-written holiday list), so no bar is ever dated on a US holiday. The dates are in the
past, so the emulator's own "no bar that has not started yet" (the machine's clock) never
cuts them.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

import secure_ohlcv_downloader as product
from secure_ohlcv_downloader import DatasetId, calendar_for
from tests.download_fixtures import Workspace, run_at, start_emulator

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
NYSE = calendar_for("IBM")
assert NYSE is not None

WEDNESDAY_EVENING = datetime(2026, 11, 25, 20, 0, tzinfo=NEW_YORK)
THANKSGIVING_EVENING = datetime(2026, 11, 26, 20, 0, tzinfo=NEW_YORK)
# Friday 27 November 2026 closes early, at 13:00 New York; its bar is published 30 min later.
FRIDAY_BEFORE_PUBLISHED = datetime(2026, 11, 27, 13, 20, tzinfo=NEW_YORK)
FRIDAY_AFTER_PUBLISHED = datetime(2026, 11, 27, 13, 45, tzinfo=NEW_YORK)
SATURDAY = datetime(2026, 11, 28, 12, 0, tzinfo=NEW_YORK)
SYMBOLS = ["IBM", "MSFT"]


@pytest.fixture
def av():
    server = start_emulator(sessions=NYSE.is_session, as_of="2026-11-25")
    try:
        yield server
    finally:
        server.stop()


def status_at(ws: Workspace, clock: datetime) -> dict[str, bool]:
    app = ws.app()
    app.ctx.clock = lambda: clock.astimezone(UTC)
    return {row["dataset"]: row["stale"] for row in app.status()["datasets"]}


def requests_during(av, call) -> list[dict]:
    before = len(av.requests)
    call()
    return av.requests[before:]


def test_a_store_refreshed_on_thanksgiving_sends_no_request(av, tmp_path):
    ws = Workspace(tmp_path, av).init()
    run_at(ws, WEDNESDAY_EVENING, SYMBOLS)

    av.as_of = "2026-11-26"  # the server's day moves on; it has no bar for a holiday
    asked = requests_during(av, lambda: run_at(ws, THANKSGIVING_EVENING, SYMBOLS))
    status = status_at(ws, THANKSGIVING_EVENING)

    assert asked == []
    assert status == {"IBM daily": False, "MSFT daily": False}


def test_the_early_close_is_waited_for_then_fetched_once_per_dataset(av, tmp_path):
    ws = Workspace(tmp_path, av).init()
    run_at(ws, WEDNESDAY_EVENING, SYMBOLS)
    av.as_of = "2026-11-27"

    before = requests_during(av, lambda: run_at(ws, FRIDAY_BEFORE_PUBLISHED, SYMBOLS))
    stale_before = status_at(ws, FRIDAY_BEFORE_PUBLISHED)
    stale_after = status_at(ws, FRIDAY_AFTER_PUBLISHED)
    after = requests_during(av, lambda: run_at(ws, FRIDAY_AFTER_PUBLISHED, SYMBOLS))

    assert before == []
    assert stale_before == {"IBM daily": False, "MSFT daily": False}
    assert stale_after == {"IBM daily": True, "MSFT daily": True}
    assert sorted(entry["symbol"] for entry in after) == SYMBOLS
    for symbol in SYMBOLS:
        days = [stamp.date() for stamp in ws.stored(DatasetId(symbol))[0]["timestamp"]]
        assert days[-2:] == [date(2026, 11, 25), date(2026, 11, 27)]  # none on the 26th


def test_a_store_refreshed_on_saturday_sends_no_request(av, tmp_path):
    ws = Workspace(tmp_path, av).init()
    av.as_of = "2026-11-27"
    run_at(ws, FRIDAY_AFTER_PUBLISHED, SYMBOLS)

    asked = requests_during(av, lambda: run_at(ws, SATURDAY, SYMBOLS))

    assert asked == []


def test_the_saturday_after_good_friday_sends_no_request(av, tmp_path):
    """Friday 3 April 2026 is Good Friday: the store's last bar, Thursday's, is the newest
    session there is on Saturday."""
    ws = Workspace(tmp_path, av).init()
    av.as_of = "2026-04-02"
    run_at(ws, datetime(2026, 4, 2, 20, 0, tzinfo=NEW_YORK), SYMBOLS)

    av.as_of = "2026-04-03"
    asked = requests_during(av, lambda: run_at(ws, datetime(2026, 4, 4, 12, 0, tzinfo=NEW_YORK),
                                               SYMBOLS))

    assert asked == []


def test_london_closed_for_a_bank_holiday_while_new_york_trades(av, tmp_path):
    """Monday 31 August 2026 is the UK's summer bank holiday; the NYSE trades."""
    ws = Workspace(tmp_path, av).init()
    symbols = ["IBM", "TSCO.LON"]
    av.as_of = "2026-08-28"
    run_at(ws, datetime(2026, 8, 28, 18, 0, tzinfo=NEW_YORK), symbols)

    av.as_of = "2026-08-31"
    monday_evening = datetime(2026, 8, 31, 18, 0, tzinfo=NEW_YORK)  # 23:00 in London
    asked = requests_during(av, lambda: run_at(ws, monday_evening, symbols))
    status = status_at(ws, monday_evening)

    assert [entry["symbol"] for entry in asked] == ["IBM"]
    assert ws.stored(DatasetId("IBM"))[0]["timestamp"].iloc[-1].date() == date(2026, 8, 31)
    assert status == {"IBM daily": False, "TSCO.LON daily": False}


def test_londons_session_is_published_by_londons_clock(av, tmp_path):
    """Tuesday 1 September 2026: London closes at 16:30 there (11:30 in New York, still
    morning): by 12:15 New York its bar is out, and the refresh asks for it."""
    ws = Workspace(tmp_path, av).init()
    av.as_of = "2026-08-28"
    run_at(ws, datetime(2026, 8, 28, 18, 0, tzinfo=NEW_YORK), ["TSCO.LON"])

    av.as_of = "2026-09-01"
    before = requests_during(av, lambda: run_at(
        ws, datetime(2026, 9, 1, 16, 45, tzinfo=LONDON), ["TSCO.LON"]))
    after = requests_during(av, lambda: run_at(
        ws, datetime(2026, 9, 1, 17, 15, tzinfo=LONDON), ["TSCO.LON"]))

    assert before == []
    assert [entry["symbol"] for entry in after] == ["TSCO.LON"]


def test_an_unknown_exchange_keeps_the_weekday_rule_and_says_so_once(av, tmp_path, caplog):
    product._unknown_suffixes.discard("XYZ")
    ws = Workspace(tmp_path, av).init()
    symbols = ["ABC.XYZ", "DEF.XYZ"]
    with caplog.at_level(logging.INFO, logger="secure_ohlcv"):
        run_at(ws, WEDNESDAY_EVENING, symbols)
        av.as_of = "2026-11-26"
        # Weekdays: Thursday should have a bar; one request each finds none (a holiday)...
        first = requests_during(av, lambda: run_at(ws, THANKSGIVING_EVENING, symbols))
        # ...and the check after the close, having found nothing, makes them current.
        second = requests_during(av, lambda: run_at(
            ws, THANKSGIVING_EVENING.replace(hour=21), symbols))

        status = status_at(ws, THANKSGIVING_EVENING.replace(hour=21))

    assert sorted(entry["symbol"] for entry in first) == symbols
    assert second == []
    assert status == {"ABC.XYZ daily": False, "DEF.XYZ daily": False}  # the same rule
    assert ws.stored(DatasetId("ABC.XYZ"))[1]["stale_after"] is None
    said = [r for r in caplog.records if "ending .XYZ" in r.getMessage()]
    assert len(said) == 1


def test_an_intraday_month_checked_after_its_last_session_is_final(av, tmp_path):
    """September 2026 ends on Wednesday the 30th: checked at 21:00 that evening (after the
    extended hours' last bars), it is final; Thursday's refresh of it asks nothing."""
    ws = Workspace(tmp_path, av).init()
    av.as_of = "2026-09-30"
    run_at(ws, datetime(2026, 9, 30, 21, 0, tzinfo=NEW_YORK), ["IBM"], interval="15min",
           month="2026-09")

    av.as_of = "2026-10-01"
    october_evening = datetime(2026, 10, 1, 20, 0, tzinfo=NEW_YORK)
    asked = requests_during(av, lambda: run_at(ws, october_evening, ["IBM"], interval="15min",
                                               month="2026-09"))
    status = status_at(ws, october_evening)

    assert asked == []
    assert status == {"IBM intraday_15min 2026-09": False}


def test_the_month_before_its_first_session_opens_needs_no_request(av, tmp_path):
    """October 2026 ends on Friday the 30th; November's first session is Monday the 2nd,
    opening at 9:30. Checked on Friday night, October is final: a trailing run on
    Sunday or on Monday morning has nothing to ask for, and says November has nothing yet."""
    ws = Workspace(tmp_path, av).init()
    av.as_of = "2026-10-30"
    run_at(ws, datetime(2026, 10, 30, 21, 0, tzinfo=NEW_YORK), ["IBM"], interval="15min")

    handed: list = []
    asked = requests_during(av, lambda: [
        run_at(ws, datetime(2026, 11, day, hour, 0, tzinfo=NEW_YORK), ["IBM"],
               interval="15min", on_result=handed.append)
        for day, hour in ((1, 12), (2, 8))])
    explicit = requests_during(av, lambda: run_at(
        ws, datetime(2026, 11, 1, 12, 0, tzinfo=NEW_YORK), ["IBM"], interval="15min",
        month="2026-11", on_result=handed.append))

    assert asked == [] and explicit == []
    assert [r.outcome for r in handed] == ["nothing_yet"] * 3
    assert "no request" in handed[0].line()


def test_a_new_month_is_asked_for_once_its_first_session_has_opened(av, tmp_path):
    """Monday 2 November 2026 at 20:00 New York: November's first session has opened (and
    its extended hours are ending), so it has bars to serve, though the currency rule counts
    them as published only at 20:30. Waiting for that left a new month unfetched through its
    whole first day (the emulator serves every bar of its day, so the clock is set after
    the last one started)."""
    ws = Workspace(tmp_path, av).init()
    av.as_of = "2026-11-02"
    handed: list = []
    asked = requests_during(av, lambda: run_at(
        ws, datetime(2026, 11, 2, 20, 0, tzinfo=NEW_YORK), ["IBM"], interval="15min",
        month="2026-11", on_result=handed.append))

    assert len(asked) == 1
    assert [r.outcome for r in handed] == ["updated"]
