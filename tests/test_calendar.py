"""Exchange calendars: which exchange a symbol form trades on, its sessions and closes.

The calendars are exchange_calendars' own (no mock): these dates are public holidays and
early closes, checked against the exchanges' published schedules for 2026.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

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
