"""The Alpha Vantage emulator, tested as a client sees it: over a real socket with requests.

The expected texts below are copied from the wire-format reference (section 3), not imported
from the emulator, so a typo on either side fails a test.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

import pytest
import requests

from tests.alphavantage_emulator import AlphaVantageEmulator

REPO = Path(__file__).resolve().parent.parent
AS_OF = date(2025, 6, 30)           # a Monday
PREMIUM = "PREMIUM-TEST-KEY"

APIKEY_MISSING = ("the parameter apikey is invalid or missing. Please claim your free API key on "
                  "(https://www.alphavantage.co/support/#api-key). It should take less than 20 seconds.")
FREE_DAILY = ("Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per day. "
              "Please subscribe to any of the premium plans at https://www.alphavantage.co/premium/ "
              "to instantly remove all daily rate limits.")
FREE_BURST = ("Thank you for using Alpha Vantage! Please consider spreading out your free API requests "
              "more sparingly (1 request per second). You may subscribe to any of the premium plans at "
              "https://www.alphavantage.co/premium/ to lift the free key rate limit (25 requests per "
              "day), raise the per-second burst limit, and instantly unlock all premium endpoints")
PREMIUM_BURST = ("Burst pattern detected. Please consider spreading out your API requests more evenly "
                 "across a 1-minute window and query no more than 5 requests per second.")
HIGH_VOLUME = ("Thank you for using Alpha Vantage! Please contact premium@alphavantage.co if you are "
               "targeting a higher API call volume.")
LEGACY_NOTE = ("Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per "
               "minute and 500 calls per day. Please visit https://www.alphavantage.co/premium/ if you "
               "would like to target a higher API call frequency.")
PREMIUM_ENDPOINT = ("Thank you for using Alpha Vantage! This is a premium endpoint. You may subscribe "
                    "to any of the premium plans at https://www.alphavantage.co/premium/ to instantly "
                    "unlock all premium endpoints")
PREMIUM_PARAMETER = ("Thank you for using Alpha Vantage! The outputsize=full parameter value is a "
                     "premium feature for the TIME_SERIES_DAILY endpoint. You may subscribe to any of "
                     "the premium plans at https://www.alphavantage.co/premium/ to instantly unlock "
                     "all premium features")
DEMO = ("The **demo** API key is for demo purposes only. Please claim your free API key at "
        "(https://www.alphavantage.co/support/#api-key) to explore our full API offerings. "
        "It takes fewer than 20 seconds.")


def invalid_call(function: str) -> str:
    return ("Invalid API call. Please retry or visit the documentation "
            f"(https://www.alphavantage.co/documentation/) for {function}.")


def message_body(key: str, text: str) -> str:
    return json.dumps({key: text}, indent=4)


@pytest.fixture
def av():
    emulator = AlphaVantageEmulator(premium_keys={PREMIUM: 60_000}, as_of=AS_OF)
    with emulator:
        yield emulator


@pytest.fixture
def client():
    with requests.Session() as session:
        yield session


def call(session: requests.Session, emulator: AlphaVantageEmulator, timeout: float = 10,
         **params: str) -> requests.Response:
    params.setdefault("apikey", PREMIUM)
    return session.get(emulator.base_url, params=params, timeout=timeout)


def series_of(response: requests.Response) -> dict:
    body = response.json()
    (key,) = [k for k in body if k != "Meta Data"]
    return body[key]


ALL_FUNCTIONS = ["TIME_SERIES_INTRADAY", "TIME_SERIES_DAILY", "TIME_SERIES_DAILY_ADJUSTED",
                 "TIME_SERIES_WEEKLY", "TIME_SERIES_WEEKLY_ADJUSTED", "TIME_SERIES_MONTHLY",
                 "TIME_SERIES_MONTHLY_ADJUSTED"]


def params_for(function: str) -> dict[str, str]:
    params = {"function": function, "symbol": "IBM"}
    if function == "TIME_SERIES_INTRADAY":
        params["interval"] = "5min"
    return params


# ---------------------------------------------------------------------------------------------
# Non-data messages: exact text, exact layout, HTTP 200

def test_missing_apikey_gets_the_apikey_error_message(av, client):
    r = client.get(av.base_url, params={"function": "TIME_SERIES_DAILY", "symbol": "IBM"}, timeout=5)
    assert (r.status_code, r.text) == (200, message_body("Error Message", APIKEY_MISSING))


def test_empty_apikey_gets_the_apikey_error_message(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="")
    assert (r.status_code, r.text) == (200, message_body("Error Message", APIKEY_MISSING))


def test_unknown_function_is_named_in_the_error(av, client):
    r = call(client, av, function="TIME_SERIES_DAYLY", symbol="IBM")
    assert (r.status_code, r.text) == (
        200, message_body("Error Message", "This API function (TIME_SERIES_DAYLY) does not exist."))


def test_missing_function_gives_empty_parentheses(av, client):
    r = call(client, av, symbol="IBM")
    assert r.json() == {"Error Message": "This API function () does not exist."}


@pytest.mark.parametrize("symbol", ["INVALID", "nosuch", "", "BAD SYMBOL", "A" * 16, "IBM;DROP"])
def test_invalid_symbol_is_an_invalid_api_call(av, client, symbol):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol=symbol)
    assert (r.status_code, r.text) == (200, message_body("Error Message",
                                                         invalid_call("TIME_SERIES_DAILY")))


def test_missing_symbol_is_an_invalid_api_call(av, client):
    r = call(client, av, function="TIME_SERIES_WEEKLY")
    assert r.json() == {"Error Message": invalid_call("TIME_SERIES_WEEKLY")}


@pytest.mark.parametrize("bad", [{"interval": "2min"}, {"interval": ""}, {"outputsize": "huge"},
                                 {"month": "2009-13"}, {"month": "1999-12"}, {"month": "2030-01"},
                                 {"extended_hours": "maybe"}])
def test_bad_intraday_parameter_is_an_invalid_api_call(av, client, bad):
    params = {"function": "TIME_SERIES_INTRADAY", "symbol": "IBM", "interval": "5min", **bad}
    r = call(client, av, **params)
    assert r.json() == {"Error Message": invalid_call("TIME_SERIES_INTRADAY")}


def test_errors_are_json_even_when_csv_was_requested(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="INVALID", datatype="csv")
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"Error Message": invalid_call("TIME_SERIES_DAILY")}


def test_free_key_gets_premium_endpoint_message_for_intraday(av, client):
    r = call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM", interval="5min",
             apikey="FREEKEY")
    assert (r.status_code, r.text) == (200, message_body("Information", PREMIUM_ENDPOINT))


def test_free_key_gets_premium_endpoint_message_for_daily_adjusted(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY_ADJUSTED", symbol="IBM", apikey="FREEKEY")
    assert r.text == message_body("Information", PREMIUM_ENDPOINT)


def test_free_key_gets_premium_parameter_message_for_full_daily(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", outputsize="full",
             apikey="FREEKEY")
    assert (r.status_code, r.text) == (200, message_body("Information", PREMIUM_PARAMETER))


def test_free_intraday_switch_serves_intraday_to_free_keys(av, client):
    av.free_intraday = True
    r = call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM", interval="5min",
             apikey="FREEKEY")
    assert len(series_of(r)) == 100


def test_any_non_empty_key_is_served_as_a_free_key(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="SOME-RANDOM-KEY")
    assert len(series_of(r)) == 100
    assert av.requests[-1]["key_kind"] == "free"


def test_unknown_keys_are_rejected_when_configured(av, client):
    av.accept_unknown_keys = False
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="SOME-RANDOM-KEY")
    assert r.json() == {"Error Message": APIKEY_MISSING}


def test_demo_key_serves_ibm_full_history(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY_ADJUSTED", symbol="IBM", outputsize="full",
             apikey="demo")
    assert len(series_of(r)) > 6000


def test_demo_key_refuses_other_symbols_with_the_220_byte_message(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="MSFT", apikey="demo")
    assert (r.status_code, r.text) == (200, message_body("Information", DEMO))
    assert len(r.content) == 220


def test_premium_key_gets_full_daily_adjusted(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY_ADJUSTED", symbol="IBM", outputsize="full")
    assert len(series_of(r)) > 6000


# ---------------------------------------------------------------------------------------------
# Data layout

@pytest.mark.parametrize("function", ALL_FUNCTIONS)
def test_json_body_is_exactly_json_dumps_indent_4(av, client, function):
    r = call(client, av, **params_for(function))
    assert r.text == json.dumps(json.loads(r.text), indent=4)


def test_json_has_content_type_application_json(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert r.headers["Content-Type"] == "application/json"


META_KEYS = {
    "TIME_SERIES_INTRADAY": ["1. Information", "2. Symbol", "3. Last Refreshed", "4. Interval",
                             "5. Output Size", "6. Time Zone"],
    "TIME_SERIES_DAILY": ["1. Information", "2. Symbol", "3. Last Refreshed", "4. Output Size",
                          "5. Time Zone"],
    "TIME_SERIES_DAILY_ADJUSTED": ["1. Information", "2. Symbol", "3. Last Refreshed",
                                   "4. Output Size", "5. Time Zone"],
    "TIME_SERIES_WEEKLY": ["1. Information", "2. Symbol", "3. Last Refreshed", "4. Time Zone"],
    "TIME_SERIES_WEEKLY_ADJUSTED": ["1. Information", "2. Symbol", "3. Last Refreshed",
                                    "4. Time Zone"],
    "TIME_SERIES_MONTHLY": ["1. Information", "2. Symbol", "3. Last Refreshed", "4. Time Zone"],
    "TIME_SERIES_MONTHLY_ADJUSTED": ["1. Information", "2. Symbol", "3. Last Refreshed",
                                     "4. Time Zone"],
}
SERIES_KEYS = {
    "TIME_SERIES_INTRADAY": "Time Series (5min)",
    "TIME_SERIES_DAILY": "Time Series (Daily)",
    "TIME_SERIES_DAILY_ADJUSTED": "Time Series (Daily)",
    "TIME_SERIES_WEEKLY": "Weekly Time Series",
    "TIME_SERIES_WEEKLY_ADJUSTED": "Weekly Adjusted Time Series",
    "TIME_SERIES_MONTHLY": "Monthly Time Series",
    "TIME_SERIES_MONTHLY_ADJUSTED": "Monthly Adjusted Time Series",
}
PLAIN_BAR = ["1. open", "2. high", "3. low", "4. close", "5. volume"]
DAILY_ADJUSTED_BAR = ["1. open", "2. high", "3. low", "4. close", "5. adjusted close", "6. volume",
                      "7. dividend amount", "8. split coefficient"]
BAR_KEYS = {
    "TIME_SERIES_INTRADAY": PLAIN_BAR, "TIME_SERIES_DAILY": PLAIN_BAR,
    "TIME_SERIES_WEEKLY": PLAIN_BAR, "TIME_SERIES_MONTHLY": PLAIN_BAR,
    "TIME_SERIES_DAILY_ADJUSTED": DAILY_ADJUSTED_BAR,
    "TIME_SERIES_WEEKLY_ADJUSTED": DAILY_ADJUSTED_BAR[:7],
    "TIME_SERIES_MONTHLY_ADJUSTED": DAILY_ADJUSTED_BAR[:7],
}
CSV_HEADERS = {
    "TIME_SERIES_INTRADAY": "timestamp,open,high,low,close,volume",
    "TIME_SERIES_DAILY": "timestamp,open,high,low,close,volume",
    "TIME_SERIES_WEEKLY": "timestamp,open,high,low,close,volume",
    "TIME_SERIES_MONTHLY": "timestamp,open,high,low,close,volume",
    "TIME_SERIES_DAILY_ADJUSTED": "timestamp,open,high,low,close,adjusted_close,volume,"
                                  "dividend_amount,split_coefficient",
    "TIME_SERIES_WEEKLY_ADJUSTED": "timestamp,open,high,low,close,adjusted close,volume,"
                                   "dividend amount",
    "TIME_SERIES_MONTHLY_ADJUSTED": "timestamp,open,high,low,close,adjusted close,volume,"
                                    "dividend amount",
}


@pytest.mark.parametrize("function", ALL_FUNCTIONS)
def test_meta_data_comes_first_with_the_documented_keys(av, client, function):
    body = call(client, av, **params_for(function)).json()
    assert list(body) == ["Meta Data", SERIES_KEYS[function]]
    assert list(body["Meta Data"]) == META_KEYS[function]


@pytest.mark.parametrize("function", ALL_FUNCTIONS)
def test_every_bar_has_the_documented_keys(av, client, function):
    series = series_of(call(client, av, **params_for(function)))
    assert {tuple(bar) for bar in series.values()} == {tuple(BAR_KEYS[function])}


def test_weekly_adjusted_bars_have_no_split_coefficient(av, client):
    series = series_of(call(client, av, function="TIME_SERIES_WEEKLY_ADJUSTED", symbol="IBM"))
    assert not any("8. split coefficient" in bar for bar in series.values())


def test_prices_have_four_decimals_and_volume_is_an_integer_string(av, client):
    bar = next(iter(series_of(call(client, av, function="TIME_SERIES_DAILY_ADJUSTED",
                                   symbol="IBM")).values()))
    assert all(len(bar[k].split(".")[1]) == 4 for k in DAILY_ADJUSTED_BAR[:5])
    assert bar["6. volume"].isdigit()
    assert bar["8. split coefficient"] == "1.0"


@pytest.mark.parametrize("function", ALL_FUNCTIONS)
def test_csv_header_matches_the_function(av, client, function):
    r = call(client, av, datatype="csv", **params_for(function))
    assert r.text.split("\r\n")[0] == CSV_HEADERS[function]


def test_csv_rows_are_newest_first_with_crlf_and_a_final_crlf(av, client):
    text = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", datatype="csv").text
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    stamps = [line.split(",")[0] for line in text.split("\r\n")[1:-1]]
    assert stamps == sorted(stamps, reverse=True) and stamps[0] == AS_OF.isoformat()


def test_csv_is_sent_as_a_download_attachment(av, client):
    r = call(client, av, function="TIME_SERIES_INTRADAY", symbol="AAPL", interval="15min",
             datatype="csv")
    assert r.headers["Content-Type"] == "application/x-download"
    assert r.headers["Content-Disposition"] == "attachment; filename=intraday_15min_AAPL.csv"


def test_symbol_is_echoed_in_the_requested_case(av, client):
    body = call(client, av, function="TIME_SERIES_DAILY", symbol="msft").json()
    assert body["Meta Data"]["2. Symbol"] == "msft"


def test_compact_daily_has_the_latest_100_bars_newest_first(av, client):
    stamps = list(series_of(call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")))
    assert len(stamps) == 100
    assert stamps == sorted(stamps, reverse=True) and stamps[0] == AS_OF.isoformat()


def test_full_daily_has_the_whole_history(av, client):
    stamps = list(series_of(call(client, av, function="TIME_SERIES_DAILY", symbol="IBM",
                                 outputsize="full")))
    assert 6000 < len(stamps) < 7000
    assert stamps[-1] == "2000-01-03"


def test_full_daily_output_size_is_labelled_full_size(av, client):
    body = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", outputsize="full").json()
    assert body["Meta Data"]["4. Output Size"] == "Full size"


def test_intraday_compact_is_100_start_labelled_bars_ending_19_55(av, client):
    stamps = list(series_of(call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM",
                                 interval="5min")))
    assert len(stamps) == 100
    assert stamps[0] == f"{AS_OF} 19:55:00"


def test_intraday_regular_session_runs_09_30_to_15_55(av, client):
    stamps = list(series_of(call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM",
                                 interval="5min", extended_hours="false", outputsize="full")))
    today = sorted(s[11:] for s in stamps if s.startswith(str(AS_OF)))
    assert (today[0], today[-1], len(today)) == ("09:30:00", "15:55:00", 78)


def test_intraday_serves_no_bar_that_has_not_started(client):
    """With as_of after today, the days still to come have no bars (a real server has none;
    the downloader refuses a bar dated after now)."""
    ahead = date.today() + timedelta(days=7)
    with AlphaVantageEmulator(premium_keys={PREMIUM: 60_000}, as_of=ahead, skip_holidays=False) as av:
        stamps = list(series_of(call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM",
                                     interval="60min", outputsize="full")))
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)
    assert stamps and max(datetime.fromisoformat(s) for s in stamps) <= now


def test_intraday_month_full_covers_the_whole_month(av, client):
    stamps = list(series_of(call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM",
                                 interval="60min", month="2009-01", outputsize="full")))
    days = sorted({s[:10] for s in stamps})
    assert days == [d.isoformat() for d in av.trading_days("2009-01-01", "2009-01-31")]
    assert days[0] == "2009-01-02" and days[-1] == "2009-01-30"


def test_intraday_full_covers_the_trailing_30_days(av, client):
    stamps = list(series_of(call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM",
                                 interval="60min", outputsize="full")))
    days = sorted({s[:10] for s in stamps})
    assert days[0] == "2025-06-02" and days[-1] == str(AS_OF)


def test_json_is_gzipped_with_a_correct_content_length_when_asked(av):
    connection = http.client.HTTPConnection("127.0.0.1", av.port, timeout=5)
    connection.request("GET", "/query?function=TIME_SERIES_DAILY&symbol=IBM&apikey=" + PREMIUM,
                       headers={"Accept-Encoding": "gzip"})
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    assert response.getheader("Content-Encoding") == "gzip"
    assert int(response.getheader("Content-Length")) == len(raw)
    assert json.loads(gzip.decompress(raw))["Meta Data"]["2. Symbol"] == "IBM"


def test_json_is_plain_when_gzip_is_not_asked(av):
    connection = http.client.HTTPConnection("127.0.0.1", av.port, timeout=5)
    connection.request("GET", "/query?function=TIME_SERIES_DAILY&symbol=IBM&apikey=" + PREMIUM)
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    assert response.getheader("Content-Encoding") is None
    assert int(response.getheader("Content-Length")) == len(raw)
    assert json.loads(raw)["Meta Data"]["2. Symbol"] == "IBM"


def test_connection_is_kept_alive_between_requests(av):
    connection = http.client.HTTPConnection("127.0.0.1", av.port, timeout=5)
    path = "/query?function=TIME_SERIES_DAILY&symbol=IBM&apikey=" + PREMIUM
    connection.request("GET", path)
    first = connection.getresponse()
    first.read()
    socket_used = connection.sock
    connection.request("GET", path)
    connection.getresponse().read()
    assert not first.will_close and connection.sock is socket_used
    connection.close()


def test_other_paths_are_404(av, client):
    assert client.get(av.origin + "/nothing", timeout=5).status_code == 404


# ---------------------------------------------------------------------------------------------
# Synthetic prices

@pytest.mark.parametrize("symbol", ["IBM", "AAPL", "MSFT", "BRK.B", "X"])
def test_ohlc_is_valid_over_the_whole_history(av, symbol):
    for bar in av.daily_bars(symbol):
        assert 0 < bar["low"] <= min(bar["open"], bar["close"]), bar
        assert bar["high"] >= max(bar["open"], bar["close"]), bar
        assert bar["adjusted_close"] > 0 and isinstance(bar["volume"], int) and bar["volume"] > 0


def test_intraday_ohlc_is_valid(av, client):
    series = series_of(call(client, av, function="TIME_SERIES_INTRADAY", symbol="IBM",
                            interval="1min", outputsize="full"))
    for bar in series.values():
        o, h, low, c = (float(bar[k]) for k in PLAIN_BAR[:4])
        assert 0 < low <= min(o, c) and h >= max(o, c)


def test_served_daily_bars_equal_the_helper(av, client):
    series = series_of(call(client, av, function="TIME_SERIES_DAILY_ADJUSTED", symbol="AAPL",
                            outputsize="full"))
    expected = {b["date"].isoformat(): b for b in av.daily_bars("AAPL")}
    assert list(series) == sorted(expected, reverse=True)
    for stamp, bar in series.items():
        want = expected[stamp]
        assert float(bar["4. close"]) == want["close"]
        assert float(bar["5. adjusted close"]) == want["adjusted_close"]
        assert int(bar["6. volume"]) == want["volume"]


def test_two_emulators_serve_identical_bars(av, client):
    with AlphaVantageEmulator(premium_keys={PREMIUM: 60_000}, as_of=AS_OF) as other:
        first = call(client, av, function="TIME_SERIES_DAILY_ADJUSTED", symbol="AAPL",
                     outputsize="full").text
        second = call(client, other, function="TIME_SERIES_DAILY_ADJUSTED", symbol="AAPL",
                      outputsize="full").text
    assert first == second


def test_different_symbols_have_different_prices(av):
    assert av.daily_bars("AAPL")[-1]["close"] != av.daily_bars("MSFT")[-1]["close"]


def test_advancing_as_of_adds_exactly_one_bar(av, client):
    before = series_of(call(client, av, function="TIME_SERIES_DAILY", symbol="IBM",
                            outputsize="full"))
    av.advance()
    after = series_of(call(client, av, function="TIME_SERIES_DAILY", symbol="IBM",
                           outputsize="full"))
    newest, *older = after
    assert (newest, older) == ("2025-07-01", list(before))
    assert all(after[d] == before[d] for d in before)


def test_every_symbol_has_a_few_builtin_splits(av):
    for symbol in ("IBM", "AAPL", "MSFT"):
        splits = av.splits(symbol)
        assert 1 <= len(splits) <= 3 and set(splits.values()) <= {2.0, 3.0}


def test_dividends_are_paid_quarterly(av):
    paid = [b for b in av.daily_bars("IBM") if b["date"].year == 2024 and b["dividend_amount"] > 0]
    assert len(paid) == 4


def test_added_split_sets_the_split_coefficient(av, client):
    av.add_split("ACME", AS_OF, 2.0)
    bar = series_of(call(client, av, function="TIME_SERIES_DAILY_ADJUSTED", symbol="ACME"))[str(AS_OF)]
    assert bar["8. split coefficient"] == "2.0"


def test_added_split_drops_the_as_traded_price_by_the_ratio(av):
    before = av.daily_bars("ACME")[-2:]
    av.add_split("ACME", AS_OF, 2.0)
    previous, split_day = av.daily_bars("ACME")[-2:]
    assert split_day["close"] / previous["close"] == pytest.approx(before[1]["close"] / before[0]["close"] / 2, rel=1e-3)
    assert 0.4 < split_day["close"] / previous["close"] < 0.6


def test_misdate_drops_a_session_and_dates_a_bar_on_a_closed_day(av):
    saturday, wednesday = date(2025, 6, 21), date(2025, 6, 18)
    av.misdate("ACME", drop=[wednesday], add=[saturday])

    days = [bar["date"] for bar in av.daily_bars("ACME")]
    assert wednesday not in days and saturday in days
    assert saturday in [bar["date"] for bar in av.weekly_bars("ACME")]  # its week ends there
    assert wednesday in [bar["date"] for bar in av.daily_bars("MSFT")]  # ACME's alone


def test_adjusted_close_is_continuous_across_a_split(av):
    av.add_split("ACME", AS_OF, 2.0)
    previous, split_day = av.daily_bars("ACME")[-2:]
    assert 0.85 < split_day["adjusted_close"] / previous["adjusted_close"] < 1.18
    assert previous["adjusted_close"] == pytest.approx(previous["close"] / 2, rel=1e-3)


def test_weekly_bars_are_keyed_by_the_last_trading_day_of_the_week(av, client):
    av.as_of = "2025-07-11"
    stamps = list(series_of(call(client, av, function="TIME_SERIES_WEEKLY", symbol="IBM")))
    assert stamps[:2] == ["2025-07-11", "2025-07-03"]     # Friday 4 July is a holiday


def test_sessions_given_decide_the_trading_days(client):
    """A real exchange calendar passed in replaces the hand-written holiday list: no bar on
    Thanksgiving or Good Friday (both missing from that list), one on the Friday after."""
    from secure_ohlcv_downloader import calendar_for

    nyse = calendar_for("IBM")
    with AlphaVantageEmulator(premium_keys={PREMIUM: 60_000}, as_of="2026-11-27",
                              sessions=nyse.is_session) as av:
        stamps = set(series_of(call(client, av, function="TIME_SERIES_DAILY", symbol="IBM",
                                    outputsize="full")))
        days = av.trading_days("2026-04-01", "2026-04-07")
    assert {"2026-11-25", "2026-11-27"} <= stamps and "2026-11-26" not in stamps
    assert [d.isoformat() for d in days] == ["2026-04-01", "2026-04-02", "2026-04-06", "2026-04-07"]


def test_current_partial_month_is_keyed_by_the_latest_trading_day(av, client):
    av.as_of = "2025-07-09"
    stamps = list(series_of(call(client, av, function="TIME_SERIES_MONTHLY", symbol="IBM")))
    assert stamps[:2] == ["2025-07-09", "2025-06-30"]


def test_weekly_adjusted_dividend_is_the_sum_ex_dated_in_the_week(av, client):
    series = series_of(call(client, av, function="TIME_SERIES_WEEKLY_ADJUSTED", symbol="IBM"))
    per_week: dict[tuple[int, int], float] = {}
    for bar in av.daily_bars("IBM"):
        week = bar["date"].isocalendar()[:2]
        per_week[week] = per_week.get(week, 0.0) + bar["dividend_amount"]
    for stamp, bar in series.items():
        week = date.fromisoformat(stamp).isocalendar()[:2]
        assert float(bar["7. dividend amount"]) == pytest.approx(per_week[week])
    assert any(float(bar["7. dividend amount"]) > 0 for bar in series.values())


def test_revised_bar_is_served_with_the_new_values(av, client):
    av.revise("IBM", "2025-06-27", close=123.45, volume=42)
    bar = series_of(call(client, av, function="TIME_SERIES_DAILY", symbol="IBM"))["2025-06-27"]
    assert (bar["4. close"], bar["5. volume"]) == ("123.4500", "42")


def test_full_daily_is_served_fast_after_the_first_time(av, client):
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", outputsize="full")
    started = time.perf_counter()
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", outputsize="full")
    assert time.perf_counter() - started < 0.1


# ---------------------------------------------------------------------------------------------
# Faults

MESSAGE_FAULTS = [
    ("throttle_note", "Note", LEGACY_NOTE),
    ("throttle_burst", "Information", FREE_BURST),
    ("throttle_daily", "Information", FREE_DAILY),
    ("premium_burst", "Information", PREMIUM_BURST),
    ("high_volume", "Information", HIGH_VOLUME),
    ("premium_endpoint", "Information", PREMIUM_ENDPOINT),
    ("premium_parameter", "Information", PREMIUM_PARAMETER),
    ("demo", "Information", DEMO),
    ("error_message", "Error Message", invalid_call("TIME_SERIES_DAILY")),
]


@pytest.mark.parametrize("kind, key, text", MESSAGE_FAULTS)
def test_message_fault_sends_the_exact_message_with_http_200(av, client, kind, key, text):
    av.inject(kind)
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert (r.status_code, r.text) == (200, message_body(key, text))


def test_daily_key_fault_echoes_the_key(av, client):
    av.inject("throttle_daily_key")
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="ECHO-ME")
    assert r.json() == {"Information": (
        "We have detected your API key as ECHO-ME and our standard API rate limit is 25 requests "
        "per day. Please subscribe to any of the premium plans at "
        "https://www.alphavantage.co/premium/ to instantly remove all daily rate limits.")}


def test_empty_fault_sends_an_empty_object(av, client):
    av.inject("empty")
    assert call(client, av, function="TIME_SERIES_DAILY", symbol="IBM").text == "{}"


@pytest.mark.parametrize("kind, status", [("http_500", 500), ("http_503", 503)])
def test_http_error_fault_sends_the_status(av, client, kind, status):
    av.inject(kind)
    assert call(client, av, function="TIME_SERIES_DAILY", symbol="IBM").status_code == status


def test_html_fault_sends_an_html_page_with_http_200(av, client):
    av.inject("html")
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert r.text.lstrip().lower().startswith("<!doctype html")


def test_truncated_fault_breaks_the_body_read(av, client):
    av.inject("truncated")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")


def test_reset_fault_resets_the_connection(av, client):
    av.inject("reset")
    with pytest.raises(requests.exceptions.ConnectionError) as caught:
        call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert "reset" in repr(caught.value).lower()


def test_stall_fault_times_the_client_out(av, client):
    av.inject("stall", seconds=5)
    with pytest.raises(requests.exceptions.ReadTimeout):
        call(client, av, timeout=0.3, function="TIME_SERIES_DAILY", symbol="IBM")


def test_latency_fault_delays_the_answer(av, client):
    av.inject("latency", seconds=0.3)
    started = time.perf_counter()
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert r.status_code == 200 and time.perf_counter() - started >= 0.3


def test_global_latency_delays_every_answer(av, client):
    av.latency = 0.2
    started = time.perf_counter()
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert time.perf_counter() - started >= 0.4


def test_fault_hits_only_matching_requests_and_only_as_often_as_asked(av, client):
    av.inject("http_503", times=2, symbol="MSFT")
    codes = [call(client, av, function="TIME_SERIES_DAILY", symbol=s).status_code
             for s in ("IBM", "msft", "MSFT", "MSFT")]
    assert codes == [200, 503, 503, 200]


def test_fault_can_match_on_any_query_parameter(av, client):
    av.inject("http_500", outputsize="full")
    compact = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    full = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", outputsize="full")
    assert (compact.status_code, full.status_code) == (200, 500)


def test_random_faults_follow_the_fault_rate(av, client):
    av.fault_rate, av.fault_kinds = 1.0, ("http_503",)
    codes = {call(client, av, function="TIME_SERIES_DAILY", symbol="IBM").status_code
             for _ in range(3)}
    assert codes == {503} and av.faults_applied["http_503"] == 3


def test_injected_throttle_is_not_a_violation(av, client):
    av.inject("throttle_burst")
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    assert av.violations == 0 and av.requests[-1]["outcome"] == "fault:throttle_burst"


def test_unknown_fault_kind_is_refused(av):
    with pytest.raises(ValueError):
        av.inject("meteor")


def test_stop_does_not_wait_for_a_stalled_connection():
    emulator = AlphaVantageEmulator(premium_keys={PREMIUM: 60_000}, as_of=AS_OF).start()
    emulator.inject("stall", seconds=60)
    errors: list[Exception] = []

    def stalled_request() -> None:
        try:
            call(requests.Session(), emulator, timeout=30, function="TIME_SERIES_DAILY",
                 symbol="IBM")
        except requests.RequestException as error:
            errors.append(error)

    worker = threading.Thread(target=stalled_request)
    worker.start()
    time.sleep(0.2)
    started = time.perf_counter()
    emulator.stop()
    worker.join(timeout=5)
    assert time.perf_counter() - started < 1.0 and len(errors) == 1


def test_stop_does_not_wait_for_an_idle_keep_alive_connection(client):
    emulator = AlphaVantageEmulator(premium_keys={PREMIUM: 60_000}, as_of=AS_OF).start()
    call(client, emulator, function="TIME_SERIES_DAILY", symbol="IBM")
    started = time.perf_counter()
    emulator.stop()
    assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------------------------------------
# Rate limits

def test_second_free_request_within_a_second_is_throttled_with_the_burst_text(av, client):
    first = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-A")
    second = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-A")
    assert "Meta Data" in first.json()
    assert (second.status_code, second.text) == (200, message_body("Information", FREE_BURST))
    assert (av.violations, av.violations_by_kind["per_second"]) == (1, 1)


def test_free_daily_quota_is_enforced_with_the_daily_text(av, client):
    av.free_per_second, av.free_per_day = None, 3
    bodies = [call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-B").text
              for _ in range(4)]
    assert all("Meta Data" in b for b in bodies[:3])
    assert bodies[3] == message_body("Information", FREE_DAILY)
    assert (av.violations, av.violations_by_kind["per_day"]) == (1, 1)


def test_daily_quota_counts_against_the_as_of_day(av, client):
    av.free_per_second, av.free_per_day = None, 1
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-C")
    av.advance()
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-C")
    assert "Meta Data" in r.json() and av.violations == 0


def test_rate_limits_are_counted_per_key(av, client):
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-D")
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-E")
    assert av.violations == 0


def test_premium_throttle_uses_the_burst_pattern_text(av, client):
    av.premium_keys["SLOW-PREMIUM"] = 60          # one request per second
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="SLOW-PREMIUM")
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="SLOW-PREMIUM")
    assert (r.status_code, r.text) == (200, message_body("Information", PREMIUM_BURST))


def test_premium_per_second_cap_defaults_to_per_minute_over_60(av, client):
    av.premium_keys["PLAN-1200"] = 1200           # 20 per second
    av.daily_bars("IBM")
    outcomes = [call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="PLAN-1200")
                for _ in range(21)]
    assert ["Meta Data" in r.json() for r in outcomes] == [True] * 20 + [False]


def test_premium_per_minute_cap_is_enforced(av, client):
    av.premium_keys["PLAN-3"] = 3
    av.premium_per_second = 100
    for _ in range(4):
        call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="PLAN-3")
    assert av.violations_by_kind == {"per_minute": 1}


def test_throttled_request_is_logged_and_not_served(av, client):
    for _ in range(2):
        call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-F")
    assert [e["outcome"] for e in av.requests] == ["data", "throttled"]
    assert av.requests[-1]["violation"] == "per_second"


def _paced_violations(av: AlphaVantageEmulator, session: requests.Session, spacing: float,
                      count: int) -> int:
    av.premium_keys["PLAN-600"] = 600             # 10 per second
    av.daily_bars("IBM")
    # Every 11 requests span at least 10 spacings (the cap is 10 a second), counted from
    # when the 10th request back had surely arrived: its answer was back. Pacing by the
    # schedule alone let a late send (a loaded machine) come 20 ms closer to the request
    # 10 after it: a real burst, which the emulator rightly throttled.
    answered: list[float] = []
    started = time.monotonic()
    for i in range(count):
        due = started + i * spacing
        if i >= 10:
            due = max(due, answered[i - 10] + 10 * spacing)
        time.sleep(max(0.0, due - time.monotonic()))
        call(session, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="PLAN-600")
        answered.append(time.monotonic())
    return av.violations


def test_client_paced_at_exactly_the_allowed_rate_gets_no_violations(av, client):
    assert _paced_violations(av, client, spacing=0.1, count=21) == 0


def test_client_paced_slightly_too_fast_gets_violations(av, client):
    assert _paced_violations(av, client, spacing=0.08, count=13) > 0


def _wait_stopped(pid: int) -> None:
    """Until the kernel has really stopped `pid` (SIGSTOP is delivered asynchronously)."""
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.01)


def test_request_is_judged_by_when_it_arrived_not_when_a_busy_server_read_it():
    # The first request arrives while the server cannot run (stopped, as a descheduled
    # handler thread on a loaded machine); the second comes well over a second after it.
    # A server stamping a request when it gets round to it saw 0.5 s between them.
    secret = "ARRIVAL-FREE-KEY"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.alphavantage_emulator", "--port", "0", "--free-key", secret,
         "--as-of", "2025-06-30"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = urlsplit(process.stdout.readline().strip())
        path = url.path + "?" + urlencode({"function": "TIME_SERIES_DAILY", "symbol": "IBM",
                                           "apikey": secret})
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.connect()
        os.kill(process.pid, signal.SIGSTOP)
        _wait_stopped(process.pid)
        conn.request("GET", path)
        first_sent = time.monotonic()
        time.sleep(0.6)
        os.kill(process.pid, signal.SIGCONT)
        first = conn.getresponse().read()
        time.sleep(max(0.0, first_sent + 1.1 - time.monotonic()))
        conn.request("GET", path)
        second = conn.getresponse().read()
        conn.close()
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.communicate(timeout=10)
    assert "Meta Data" in json.loads(first)
    assert "Meta Data" in json.loads(second), second


def test_reset_counters_clears_counts_log_and_windows(av, client):
    for _ in range(2):
        call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-G")
    av.reset_counters()
    call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey="FREE-G")
    assert (av.request_count, av.violations, len(av.requests)) == (1, 0, 1)


def test_request_log_and_byte_count_describe_each_answer(av, client):
    r = call(client, av, function="TIME_SERIES_DAILY", symbol="IBM")
    entry = av.requests[-1]
    assert (entry["function"], entry["symbol"], entry["outcome"]) == ("TIME_SERIES_DAILY", "IBM", "data")
    assert entry["bytes"] == av.bytes_sent == int(r.headers["Content-Length"])


def test_request_log_never_holds_the_key(av, client):
    secret = "SECRET-KEY-7f3a9c"
    av.inject("throttle_daily_key")
    for _ in range(2):
        call(client, av, function="TIME_SERIES_DAILY", symbol="IBM", apikey=secret)
    assert secret not in json.dumps(av.requests, default=str)
    assert av.requests[-1]["key_fingerprint"] == av.key_fingerprint(secret)


# ---------------------------------------------------------------------------------------------
# Throughput and the standalone server

def test_sustains_25_requests_per_second_with_150ms_latency(av):
    av.latency = 0.15
    av.daily_bars("IBM")

    def worker() -> None:
        with requests.Session() as session:
            for _ in range(6):
                assert call(session, av, function="TIME_SERIES_DAILY", symbol="IBM").status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(8)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert av.request_count == 48 and 48 / elapsed >= 25


def test_standalone_server_prints_its_url_serves_and_never_prints_the_key():
    secret = "CLI-SECRET-KEY-42"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.alphavantage_emulator", "--port", "0", "--free-key", secret,
         "--as-of", "2025-06-30"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        r = requests.get(url, params={"function": "TIME_SERIES_DAILY", "symbol": "IBM",
                                      "apikey": secret}, timeout=10)
        assert r.json()["Meta Data"]["3. Last Refreshed"] == "2025-06-30"
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert secret not in out + err
