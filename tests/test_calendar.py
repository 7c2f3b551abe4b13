"""Exchange calendars: which exchange a symbol form trades on, its sessions and closes.

The calendars are exchange_calendars' own (no mock): these dates are public holidays and
early closes, checked against the exchanges' published schedules for 2026.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

import secure_ohlcv_downloader as product
from secure_ohlcv_downloader import calendar_for

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")


@pytest.mark.parametrize(("symbol", "code"), [
    ("IBM", "XNYS"), ("TSCO.LON", "XLON"), ("SHOP.TRT", "XTSE"), ("GPV.TRV", "XTSE"),
    ("MBG.DEX", "XETR"), ("RELIANCE.BSE", "XBOM"), ("600104.SHH", "XSHG"),
    ("000002.SHZ", "XSHG"),
])
def test_each_symbol_form_of_the_wire_format_has_its_exchange(symbol, code):
    calendar = calendar_for(symbol)
    assert calendar is not None and calendar.code == code


def test_one_calendar_per_exchange_per_process():
    assert calendar_for("SHOP.TRT") is calendar_for("GPV.TRV")
    assert calendar_for("IBM") is calendar_for("MSFT")


def test_an_unknown_suffix_has_no_calendar_and_is_said_once(caplog):
    product._unknown_suffixes.discard("XYZ")
    with caplog.at_level(logging.INFO, logger="secure_ohlcv"):
        assert calendar_for("ABC.XYZ") is None
        assert calendar_for("DEF.XYZ") is None
    said = [r for r in caplog.records if "ending .XYZ" in r.getMessage()]
    assert len(said) == 1
    assert "weekdays" in said[0].getMessage()


def test_us_holidays_and_weekends_are_not_sessions():
    nyse = calendar_for("IBM")
    assert not nyse.is_session(date(2026, 11, 26))  # Thanksgiving
    assert not nyse.is_session(date(2026, 12, 5))   # a Saturday
    assert nyse.is_session(date(2026, 11, 27))
    assert list(nyse.sessions_between(date(2026, 11, 25), date(2026, 11, 30)).tolist()) == [
        date(2026, 11, 25), date(2026, 11, 27), date(2026, 11, 30)]


def test_an_early_close_is_the_sessions_own_close():
    nyse = calendar_for("IBM")
    assert nyse.close_of(date(2026, 11, 27)).astimezone(NEW_YORK).hour == 13
    assert nyse.close_of(date(2026, 11, 25)).astimezone(NEW_YORK).hour == 16


@pytest.mark.parametrize(("now", "expected"), [
    (datetime(2026, 12, 5, 12, 0, tzinfo=NEW_YORK), date(2026, 12, 4)),    # Saturday
    (datetime(2026, 11, 26, 20, 0, tzinfo=NEW_YORK), date(2026, 11, 25)),  # Thanksgiving
    (datetime(2026, 11, 27, 13, 40, tzinfo=NEW_YORK), date(2026, 11, 27)),  # after early close
    (datetime(2026, 11, 27, 13, 10, tzinfo=NEW_YORK), date(2026, 11, 25)),  # not yet published
    (datetime(2026, 12, 7, 9, 0, tzinfo=NEW_YORK), date(2026, 12, 4)),     # Monday morning
])
def test_latest_published_session_in_new_york(now, expected):
    assert calendar_for("IBM").latest_published_session(now) == expected


def test_london_closes_on_its_own_holiday_while_new_york_trades():
    # 2026-08-31: the UK's summer bank holiday; a Monday on which New York trades.
    london, nyse = calendar_for("TSCO.LON"), calendar_for("IBM")
    assert not london.is_session(date(2026, 8, 31)) and nyse.is_session(date(2026, 8, 31))
    evening = datetime(2026, 8, 31, 22, 0, tzinfo=UTC)
    assert london.latest_published_session(evening) == date(2026, 8, 28)
    assert nyse.latest_published_session(evening) == date(2026, 8, 31)
    assert london.close_of(date(2026, 8, 28)).astimezone(LONDON).hour == 16


def test_past_what_the_calendar_knows_it_answers_none():
    nyse = calendar_for("IBM")
    beyond = datetime.combine(nyse.last, datetime.min.time(), UTC).replace(year=nyse.last.year + 1)
    assert not nyse.knows(beyond.date())
    assert nyse.latest_published_session(beyond) is None


# -- the calendar cache in the state directory ----------------------------------------------

UNTIL = date(2027, 12, 31)


def same_calendar(a: product.ExchangeCalendar, b: product.ExchangeCalendar) -> bool:
    return (a.code, str(a.zone), a.first, a.last) == (b.code, str(b.zone), b.first, b.last) \
        and all((x == y).all() for x, y in ((a.sessions, b.sessions), (a.opens, b.opens),
                                            (a.closes, b.closes)))


@pytest.fixture(scope="module")
def built():
    return product.ExchangeCalendar.build("XNYS", UNTIL)


@pytest.fixture
def cache(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return product.CalendarCache(state, 0o600)


def test_a_cached_calendar_is_the_calendar_built(cache, built):
    """Sessions, opens and closes (early closes too) survive the file exactly; the file
    is private."""
    first = cache.calendar("XNYS", UNTIL)
    path = cache.directory / "calendar-XNYS.json"
    again = cache.calendar("XNYS", UNTIL)

    assert same_calendar(first, built) and same_calendar(again, built)
    assert again is not first
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert again.close_of(date(2026, 11, 27)).astimezone(NEW_YORK).hour == 13  # early close


@pytest.mark.parametrize("doctor", [
    lambda doc: doc.update(sessions=doc["sessions"][::-1]),          # out of order
    lambda doc: doc.update(opens=doc["opens"][:-1]),                 # lengths differ
    lambda doc: doc.update(closes=[str(v) for v in doc["closes"]]),  # not numbers
    lambda doc: doc.update(zone="Not/AZone"),
    lambda doc: doc.pop("sessions"),
])
def test_a_malformed_cache_is_rebuilt_never_trusted(cache, built, doctor):
    cache.calendar("XNYS", UNTIL)
    path = cache.directory / "calendar-XNYS.json"
    doc = json.loads(path.read_text())
    doctor(doc)
    path.write_text(json.dumps(doc))

    assert same_calendar(cache.calendar("XNYS", UNTIL), built)
    assert same_calendar(cache.calendar("XNYS", UNTIL), built)  # the file was rewritten
    assert json.loads(path.read_text())["sessions"] == built.sessions.astype("int64").tolist()


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b"\xff\xfe"])
def test_an_unreadable_cache_is_rebuilt(cache, built, content):
    (cache.directory / "calendar-XNYS.json").write_bytes(content)

    assert same_calendar(cache.calendar("XNYS", UNTIL), built)


def test_a_copy_of_another_library_version_or_range_is_not_used(cache, built):
    """Thanksgiving removed from a copy that says it was made by another version (or for
    another year): the copy is replaced by the library's calendar, Thanksgiving closed."""
    cache.calendar("XNYS", UNTIL)
    path = cache.directory / "calendar-XNYS.json"
    doc = json.loads(path.read_text())
    thanksgiving = int(np.datetime64("2026-11-26", "D").astype("int64"))
    index = int(np.searchsorted(doc["sessions"], thanksgiving))
    doc["sessions"].insert(index, thanksgiving)
    doc["opens"].insert(index, doc["opens"][index] - 86400)
    doc["closes"].insert(index, doc["closes"][index] - 86400)
    for key, value in (("library", "0.0.1"), ("until", "2026-12-31"), ("start", "2020-01-02")):
        path.write_text(json.dumps(dict(doc, **{key: value})))
        assert not cache.calendar("XNYS", UNTIL).is_session(date(2026, 11, 26)), key


def test_a_link_at_the_cache_is_not_followed(cache, built, tmp_path):
    """A link planted where the cache goes: its target is neither read nor written, the
    link is replaced by a private file of ours."""
    target = tmp_path / "elsewhere.json"
    target.write_text("planted")
    path = cache.directory / "calendar-XNYS.json"
    path.symlink_to(target)

    assert same_calendar(cache.calendar("XNYS", UNTIL), built)
    assert target.read_text() == "planted"
    assert not path.is_symlink() and oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_cache_others_can_write_is_not_trusted(cache, built):
    cache.calendar("XNYS", UNTIL)
    path = cache.directory / "calendar-XNYS.json"
    doc = json.loads(path.read_text())
    doc["sessions"] = [s + 1 for s in doc["sessions"]]  # well formed, every date shifted
    path.write_text(json.dumps(doc))
    path.chmod(0o666)

    assert same_calendar(cache.calendar("XNYS", UNTIL), built)


def test_a_cache_that_cannot_be_written_costs_only_the_time(tmp_path, built):
    missing = product.CalendarCache(tmp_path / "no-such-dir", 0o600)

    assert same_calendar(missing.calendar("XNYS", UNTIL), built)
