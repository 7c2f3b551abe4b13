"""The Alpha Vantage client: every documented answer classified by its exact text, every
function in both wire formats fetched over a real socket from the local emulator, retries of
every fault kind, refusals that are never retried, and the parser's refusals (with property
tests on arbitrary input).

The message texts below are copied from the wire-format reference (section 3), not imported
from the emulator or the product, so a typo on any side fails a test.
"""

from __future__ import annotations

import json
import re
import string
import threading
import time
from datetime import date
from itertools import pairwise

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import load_settings
from secure_ohlcv_downloader import (
    RATE_SLACK,
    AlphaVantageClient,
    ApiError,
    ApiRequest,
    Classified,
    DailyQuota,
    DatasetId,
    InvalidPayload,
    Outcome,
    QuotaExhausted,
    RateLimiter,
    RunStats,
    api_key_fingerprint,
    classify_response,
    columns_for,
    parse_payload,
    validate_bars,
)
from tests.download_fixtures import (  # noqa: F401  (emulator is a fixture)
    PREMIUM_KEY,
    Workspace,
    client_settings,
    emulator,
    expected_daily,
    make_client,
    start_emulator,
)

# -- the exact texts (wire-format reference, section 3) ------------------------------------

FREE_DAILY = ("Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per "
              "day. Please subscribe to any of the premium plans at https://www.alphavantage.co/"
              "premium/ to instantly remove all daily rate limits.")
FREE_DAILY_KEY = ("We have detected your API key as ABCDEF1234567890 and our standard API rate "
                  "limit is 25 requests per day. Please subscribe to any of the premium plans at "
                  "https://www.alphavantage.co/premium/ to instantly remove all daily rate limits.")
FREE_BURST = ("Thank you for using Alpha Vantage! Please consider spreading out your free API "
              "requests more sparingly (1 request per second). You may subscribe to any of the "
              "premium plans at https://www.alphavantage.co/premium/ to lift the free key rate "
              "limit (25 requests per day), raise the per-second burst limit, and instantly "
              "unlock all premium endpoints")
PREMIUM_BURST = ("Burst pattern detected. Please consider spreading out your API requests more "
                 "evenly across a 1-minute window and query no more than 5 requests per second.")
HIGH_VOLUME = ("Thank you for using Alpha Vantage! Please contact premium@alphavantage.co if you "
               "are targeting a higher API call volume.")
LEGACY_NOTE = ("Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per "
               "minute and 500 calls per day. Please visit https://www.alphavantage.co/premium/ "
               "if you would like to target a higher API call frequency.")
TRANSITIONAL_NOTE = ("Thank you for using Alpha Vantage! Our standard API call frequency is 5 "
                     "calls per minute and 100 calls per day. Please visit https://www.alphavantage"
                     ".co/premium/ if you would like to target a higher API call frequency.")
PRE_2018 = ("Thank you for using Alpha Vantage! Please visit https://www.alphavantage.co/premium/ "
            "if you would like to have a higher API call volume.")
PREMIUM_ENDPOINT = ("Thank you for using Alpha Vantage! This is a premium endpoint. You may "
                    "subscribe to any of the premium plans at https://www.alphavantage.co/premium/"
                    " to instantly unlock all premium endpoints")
PREMIUM_ENDPOINT_2022 = ("Thank you for using Alpha Vantage! This is a premium endpoint and there "
                         "are multiple ways to unlock premium endpoints: (1) become a holder of "
                         "Alpha Vantage Coin (AVC), ... (2) subscribe to any of the premium plans "
                         "at https://www.alphavantage.co/premium/ to instantly unlock all premium "
                         "endpoints")
PREMIUM_PARAMETER = ("Thank you for using Alpha Vantage! The outputsize=full parameter value is a "
                     "premium feature for the TIME_SERIES_DAILY endpoint. You may subscribe to "
                     "any of the premium plans at https://www.alphavantage.co/premium/ to "
                     "instantly unlock all premium features")
DEMO = ("The **demo** API key is for demo purposes only. Please claim your free API key at "
        "(https://www.alphavantage.co/support/#api-key) to explore our full API offerings. "
        "It takes fewer than 20 seconds.")
DEMO_OLDER = ("The **demo** API key is for demo purposes only. Please claim your free API key at "
              "(https://www.alphavantage.co/support/#api-key) to explore our full API offerings. "
              "It takes fewer than 20 seconds, and we are committed to making it free forever.")
INVALID_CALL = ("Invalid API call. Please retry or visit the documentation "
                "(https://www.alphavantage.co/documentation/) for TIME_SERIES_DAILY.")
UNKNOWN_FUNCTION = "This API function (TIME_SERIES_DAYLY) does not exist."
EMPTY_FUNCTION = "This API function () does not exist."
APIKEY_MISSING = ("the parameter apikey is invalid or missing. Please claim your free API key on "
                  "(https://www.alphavantage.co/support/#api-key). It should take less than 20 "
                  "seconds.")
APIKEY_MISSING_OLDER = ("the parameter apikey is invalid or missing. Please claim your free API "
                        "key on (https://www.alphavantage.co/support/#api-key). It should take "
                        "less than 20 seconds, and is free permanently.")


def wire(obj: object) -> bytes:
    """A JSON body laid out as the API sends it: json.dumps(indent=4), no trailing newline."""
    return json.dumps(obj, indent=4).encode()


# -- classify_response ---------------------------------------------------------------------

MESSAGES = [
    ("daily quota", "Information", FREE_DAILY, Outcome.QUOTA_SPENT),
    ("daily quota naming the key", "Information", FREE_DAILY_KEY, Outcome.QUOTA_SPENT),
    ("free burst", "Information", FREE_BURST, Outcome.THROTTLED),
    ("premium burst", "Information", PREMIUM_BURST, Outcome.THROTTLED),
    ("premium burst as a note", "Note", PREMIUM_BURST, Outcome.THROTTLED),
    ("high volume", "Information", HIGH_VOLUME, Outcome.THROTTLED),
    ("legacy note", "Note", LEGACY_NOTE, Outcome.THROTTLED),
    ("transitional note", "Note", TRANSITIONAL_NOTE, Outcome.THROTTLED),
    ("pre-2018 information", "Information", PRE_2018, Outcome.THROTTLED),
    ("premium endpoint", "Information", PREMIUM_ENDPOINT, Outcome.PREMIUM_ENDPOINT),
    ("premium endpoint 2022 wording", "Information", PREMIUM_ENDPOINT_2022,
     Outcome.PREMIUM_ENDPOINT),
    ("premium parameter", "Information", PREMIUM_PARAMETER, Outcome.PREMIUM_PARAMETER),
    ("demo key", "Information", DEMO, Outcome.DEMO_KEY),
    ("demo key older wording", "Information", DEMO_OLDER, Outcome.DEMO_KEY),
    ("invalid API call", "Error Message", INVALID_CALL, Outcome.INVALID_REQUEST),
    ("unknown function", "Error Message", UNKNOWN_FUNCTION, Outcome.INVALID_REQUEST),
    ("empty function", "Error Message", EMPTY_FUNCTION, Outcome.INVALID_REQUEST),
    ("missing apikey", "Error Message", APIKEY_MISSING, Outcome.INVALID_KEY),
    ("missing apikey older wording", "Error Message", APIKEY_MISSING_OLDER, Outcome.INVALID_KEY),
]


@pytest.mark.parametrize("key, text, outcome", [m[1:] for m in MESSAGES],
                         ids=[m[0] for m in MESSAGES])
def test_message_is_classified_by_its_exact_text(key, text, outcome):
    answer = classify_response(wire({key: text}))

    assert answer.outcome is outcome
    assert answer.message == text


def test_empty_object_means_no_data():
    assert classify_response(wire({})).outcome is Outcome.EMPTY


def test_html_error_page_is_not_json():
    page = (b"<!DOCTYPE html>\n<html>\n<head><title>Alpha Vantage - Server Error</title></head>\n"
            b"<body><h1>Server Error</h1></body>\n</html>\n")

    assert classify_response(page).outcome is Outcome.NOT_JSON


def test_malformed_json_is_not_json():
    body = wire({"Meta Data": {"1. Information": "Daily Prices"}, "Time Series (Daily)": {}})

    assert classify_response(body[: len(body) // 2]).outcome is Outcome.NOT_JSON


def test_csv_body_is_data_kept_as_bytes():
    body = (b"timestamp,open,high,low,close,volume\r\n"
            b"2024-01-03,10.0000,11.0000,9.5000,10.5000,1000\r\n")

    answer = classify_response(body)

    assert (answer.outcome, answer.payload) == (Outcome.DATA, body)


def test_json_series_is_data_whose_payload_is_the_series():
    series = {"2024-01-03": {"1. open": "10.0000", "2. high": "11.0000", "3. low": "9.5000",
                             "4. close": "10.5000", "5. volume": "1000"}}
    body = wire({"Meta Data": {"1. Information": "Daily Prices (open, high, low, close) and "
                               "Volumes", "2. Symbol": "IBM"}, "Time Series (Daily)": series})

    answer = classify_response(body)

    assert (answer.outcome, answer.payload) == (Outcome.DATA, series)


# -- every function, both wire formats, over a real socket ---------------------------------

VARIANTS = [("daily", False), ("daily", True), ("weekly", False), ("weekly", True),
            ("monthly", False), ("monthly", True),
            ("1min", False), ("5min", False), ("15min", False), ("30min", False), ("60min", False)]
VARIANT_IDS = [f"{i}{'_adjusted' if a else ''}" for i, a in VARIANTS]
SYMBOL = "IBM"


def dataset_for(interval: str, adjusted: bool) -> DatasetId:
    month = "2024-01" if interval.endswith("min") else None
    return DatasetId(SYMBOL, interval, adjusted, month)


def request_for(interval: str, adjusted: bool) -> ApiRequest:
    if interval.endswith("min"):
        return ApiRequest(SYMBOL, interval, outputsize="compact")
    if interval == "daily":
        return ApiRequest(SYMBOL, interval, adjusted, "full")
    return ApiRequest(SYMBOL, interval, adjusted)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A module-wide emulator and a cached fetch: (interval, adjusted, datatype) -> table."""
    av = start_emulator()
    tables: dict[tuple[str, bool, str], pd.DataFrame] = {}

    def table(interval: str, adjusted: bool, datatype: str) -> pd.DataFrame:
        if (interval, adjusted, datatype) not in tables:
            cwd = tmp_path_factory.mktemp("client")
            client, _, _ = make_client(client_settings(cwd, av, OHLCV_DATATYPE=datatype))
            try:
                answer = client.fetch(request_for(interval, adjusted))
            finally:
                client.close()
            tables[(interval, adjusted, datatype)] = parse_payload(answer, dataset_for(interval, adjusted))
        return tables[(interval, adjusted, datatype)]

    try:
        yield av, table
    finally:
        av.stop()


@pytest.mark.parametrize("interval, adjusted", VARIANTS, ids=VARIANT_IDS)
def test_json_and_csv_give_the_same_table(served, interval, adjusted):
    _, table = served

    pd.testing.assert_frame_equal(table(interval, adjusted, "json"), table(interval, adjusted, "csv"))


@pytest.mark.parametrize("interval, adjusted", VARIANTS, ids=VARIANT_IDS)
def test_table_has_the_documented_columns_and_types(served, interval, adjusted):
    _, table = served
    frame = table(interval, adjusted, "csv")

    extra = {"daily": ["adjusted_close", "dividend_amount", "split_coefficient"],
             "weekly": ["adjusted_close", "dividend_amount"],
             "monthly": ["adjusted_close", "dividend_amount"]}.get(interval, []) if adjusted else []
    assert list(frame.columns) == ["timestamp", "open", "high", "low", "close", "volume", *extra]
    for column in ["open", "high", "low", "close", *extra]:
        assert frame[column].dtype == "float64", column
    assert frame["volume"].dtype == "int64"
    assert len(frame) > 0


@pytest.mark.parametrize("interval, adjusted", [v for v in VARIANTS if not v[0].endswith("min")],
                         ids=[i for i in VARIANT_IDS if not i[0].isdigit()])
def test_daily_and_longer_bars_are_dated_at_midnight_without_a_time_zone(served, interval, adjusted):
    _, table = served
    stamps = table(interval, adjusted, "csv")["timestamp"]

    assert pd.api.types.is_datetime64_dtype(stamps)
    assert stamps.dt.tz is None
    assert (stamps == stamps.dt.normalize()).all()


@pytest.mark.parametrize("interval", ["1min", "5min", "15min", "30min", "60min"])
def test_intraday_bars_are_stamped_in_new_york_time(served, interval):
    _, table = served
    stamps = table(interval, False, "csv")["timestamp"]

    assert str(stamps.dt.tz) == "America/New_York"
    # The emulator's session runs 04:00-20:00 ET; bars are labelled by their start.
    assert stamps.dt.hour.between(4, 19).all()


@pytest.mark.parametrize("interval, adjusted", VARIANTS, ids=VARIANT_IDS)
def test_table_is_oldest_first(served, interval, adjusted):
    _, table = served
    stamps = table(interval, adjusted, "json")["timestamp"]

    assert stamps.is_monotonic_increasing and stamps.is_unique


@pytest.mark.parametrize("adjusted", [False, True], ids=["daily", "daily_adjusted"])
def test_daily_values_equal_the_emulators_bars(served, adjusted):
    av, table = served

    pd.testing.assert_frame_equal(table("daily", adjusted, "csv"),
                                  expected_daily(av, SYMBOL, adjusted), check_dtype=False)


@pytest.mark.parametrize("interval", ["weekly", "monthly"])
def test_weekly_and_monthly_values_equal_the_emulators_bars(served, interval):
    av, table = served
    bars = pd.DataFrame(av.weekly_bars(SYMBOL) if interval == "weekly" else av.monthly_bars(SYMBOL))
    frame = table(interval, True, "json")

    assert frame["timestamp"].dt.date.tolist() == bars["date"].tolist()
    for column in ("open", "high", "low", "close", "volume", "adjusted_close", "dividend_amount"):
        assert frame[column].tolist() == bars[column].tolist(), column


# -- faults: retried, then served; or given up with a clear message ------------------------

STALL_TIMEOUT = "0.3"        # OHLCV_REQUEST_TIMEOUT for the stall and slow-answer faults
RETRYABLE = ["latency", "http_500", "http_503", "html", "truncated", "reset", "stall",
             "throttle_note", "throttle_burst", "premium_burst", "high_volume"]
GIVE_UP_CAUSE = {"latency": "network error", "http_500": "HTTP 500", "http_503": "HTTP 503",
                 "html": "neither JSON nor our CSV", "truncated": "network error",
                 "reset": "network error", "stall": "network error",
                 "throttle_note": "5 calls per minute", "throttle_burst": "spreading out",
                 "premium_burst": "Burst pattern detected", "high_volume": "higher API call volume"}


def inject(av, kind: str, times: int) -> None:
    # latency and stall last past the short read timeout, so each costs one attempt.
    seconds = {"latency": 1.0, "stall": 1.0}.get(kind)
    av.inject(kind, times=times, symbol=SYMBOL, seconds=seconds)


@pytest.fixture
def premium_client(emulator, tmp_path):
    """(client, run stats) on the premium key, with a short read timeout."""
    client, _, stats = make_client(client_settings(tmp_path, emulator,
                                                   OHLCV_REQUEST_TIMEOUT=STALL_TIMEOUT))
    yield client, stats
    client.close()


@pytest.mark.parametrize("kind", RETRYABLE)
def test_fault_twice_is_retried_then_served(emulator, premium_client, kind):
    client, stats = premium_client
    inject(emulator, kind, times=2)

    answer = client.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))

    assert answer.outcome is Outcome.DATA
    assert emulator.request_count == 3
    assert stats.retries == 2


def test_slow_answer_within_the_timeout_is_waited_for_not_retried(emulator, tmp_path):
    client, _, stats = make_client(client_settings(tmp_path, emulator, OHLCV_REQUEST_TIMEOUT="5"))
    emulator.inject("latency", times=1, symbol=SYMBOL, seconds=0.5)

    answer = client.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))
    client.close()

    assert answer.outcome is Outcome.DATA
    assert (emulator.request_count, stats.retries) == (1, 0)


@pytest.mark.parametrize("kind", RETRYABLE)
def test_fault_beyond_max_retries_fails_the_symbol_and_stores_nothing(emulator, tmp_path, kind):
    ws = Workspace(tmp_path, emulator, OHLCV_MAX_RETRIES="2",
                   OHLCV_REQUEST_TIMEOUT=STALL_TIMEOUT).init()
    inject(emulator, kind, times=3)

    report = ws.download([SYMBOL])

    [result] = report.results
    assert result.outcome == "failed"
    assert "gave up after 3 attempts" in result.error
    assert GIVE_UP_CAUSE[kind] in result.error
    assert emulator.request_count == 3
    assert ws.dataset_files() == []


def test_invalid_api_call_is_never_retried(emulator, premium_client):
    client, stats = premium_client
    emulator.inject("error_message", times=1, symbol=SYMBOL)

    with pytest.raises(ApiError, match="invalid symbol or request"):
        client.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))

    assert emulator.request_count == 1
    assert stats.retries == 0


def test_unlisted_symbol_fails_after_one_request(emulator, premium_client):
    client, _ = premium_client

    with pytest.raises(ApiError, match="Invalid API call"):
        client.fetch(ApiRequest("INVALID", "daily", outputsize="compact"))

    assert emulator.request_count == 1


@pytest.mark.parametrize("kind", ["throttle_daily", "throttle_daily_key"])
def test_daily_quota_message_marks_the_key_spent(emulator, tmp_path, kind):
    settings = client_settings(tmp_path, emulator)
    client, _, _ = make_client(settings)
    emulator.inject(kind, times=1, symbol=SYMBOL)

    with pytest.raises(QuotaExhausted):
        client.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))
    client.close()

    assert emulator.request_count == 1
    assert DailyQuota(settings, api_key_fingerprint(PREMIUM_KEY)).read()["exhausted"] is True


def test_a_spent_key_sends_nothing_in_the_next_run(emulator, tmp_path):
    settings = client_settings(tmp_path, emulator)
    first, _, _ = make_client(settings)
    emulator.inject("throttle_daily", times=1, symbol=SYMBOL)
    with pytest.raises(QuotaExhausted):
        first.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))
    first.close()
    second, _, _ = make_client(settings)

    with pytest.raises(QuotaExhausted):
        second.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))
    second.close()

    assert emulator.request_count == 1


# -- the rate limiter's schedule, on a simulated clock --------------------------------------
#
# The one thing simulated here is time: the clock below stands in for time.monotonic and
# time.sleep so that a schedule can be checked to the nanosecond without a timed assertion.
# Everything else is real: the day's count goes through DailyQuota's file, lock and fsync.
# Over a real socket, the emulator counts violations (test_download, the benchmark).

class SimulatedClock:
    """Every reading costs `step` seconds of work; sleep(d) lets exactly d pass."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1_000.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def limiter_settings(tmp_path, keys: tuple[str, ...] = (PREMIUM_KEY,), **variables: str):
    environ = {"ALPHA_VANTAGE_API_KEY": ",".join(keys), "OHLCV_RATE_LIMIT_PER_SECOND": "20",
               "OHLCV_RATE_LIMIT_PER_MINUTE": "1200", **variables}
    return load_settings(environ=environ, cwd=tmp_path)


def simulated_limiter(tmp_path, clock: SimulatedClock, keys: tuple[str, ...] = (PREMIUM_KEY,),
                      **variables: str) -> RateLimiter:
    """The real limiter (and quota file in tmp_path) on the simulated clock."""
    return RateLimiter(limiter_settings(tmp_path, keys, **variables), list(keys),
                       clock.monotonic, clock.sleep)


def send_times(tmp_path, clock: SimulatedClock, count: int, **variables: str) -> list[float]:
    limiter = simulated_limiter(tmp_path, clock, **variables)
    times = []
    for _ in range(count):
        limiter.acquire()
        times.append(clock.now)  # the request leaves when acquire returns
    return times


def test_back_to_back_requests_leave_exactly_one_spacing_apart(tmp_path):
    """The work of each acquire (the count's fsync among it) overlaps the wait for the
    slot: a limiter that stamped each request after that work would lose a few ms per
    request, about 10% of the quota at 20 requests a second. Only the look at the clock
    on waking, which stamps the request as it leaves, comes after the wait."""
    step = 0.007
    times = send_times(tmp_path, SimulatedClock(step), 40)

    gaps = [b - a for a, b in pairwise(times)]
    assert gaps == pytest.approx([RATE_SLACK / 20 + step] * 39, abs=1e-9)


@pytest.mark.parametrize("step", [0.0, 0.01, 0.2], ids=["instant", "10ms", "slower-than-a-slot"])
def test_no_two_requests_ever_closer_than_the_spacing(tmp_path, step):
    times = send_times(tmp_path, SimulatedClock(step), 30)

    assert min(b - a for a, b in pairwise(times)) >= 1 / 20 - 1e-9


class WokenLateOnce(SimulatedClock):
    """The first wait ends `late` seconds after it should: a thread that a loaded machine
    did not run on time."""

    def __init__(self, late: float) -> None:
        super().__init__(step=0.0)
        self.late: float | None = late

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds + (self.late or 0.0))
        self.late = None


def test_a_request_that_left_late_pushes_the_next_one_back(tmp_path):
    """The server counts from when a request arrived: spacing from the slot a late request
    missed put the next one 30 ms too close to it (a free key throttled under load)."""
    times = send_times(tmp_path, WokenLateOnce(late=0.03), 6)

    assert min(b - a for a, b in pairwise(times)) >= RATE_SLACK / 20 - 1e-9


def test_a_request_written_late_pushes_the_next_one_back(tmp_path):
    """The server counts from when a request arrived: spaced from the moment acquire
    returned, a request that a loaded machine kept 50 ms from the socket put the next one
    50 ms too close to it (with 6 ms of slack at 5 a second: a free key's request lost)."""
    clock = SimulatedClock(step=0.0)
    limiter = simulated_limiter(tmp_path, clock)
    limiter.acquire()
    clock.sleep(0.05)  # GIL, CPU or a new connection's handshake before the bytes go out
    limiter.written()
    written_at = clock.now

    limiter.acquire()

    assert clock.now >= written_at + RATE_SLACK / 20 - 1e-9


def test_a_request_not_yet_written_holds_the_next_one_of_its_key(tmp_path):
    """Real threads, real clock: the second request waits until the first is on the wire,
    then one spacing more, however long the first took to get there."""
    limiter = RateLimiter(limiter_settings(tmp_path), [PREMIUM_KEY])
    first_written: list[float] = []
    second_left: list[float] = []
    acquired = threading.Event()

    def first() -> None:
        limiter.acquire()
        acquired.set()
        time.sleep(0.3)  # the write is slow: nothing of the second may leave meanwhile
        first_written.append(time.monotonic())
        limiter.written()

    def second() -> None:
        acquired.wait()
        limiter.acquire()
        second_left.append(time.monotonic())
        limiter.done()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert second_left and first_written
    assert second_left[0] >= first_written[0] + RATE_SLACK / 20 - 1e-3


class WriteRecordingLimiter(RateLimiter):
    """The real limiter, counting the write reports it receives."""

    reports = 0

    def written(self) -> None:
        self.reports += 1
        super().written()


def test_the_client_reports_each_request_when_its_connection_wrote_it(tmp_path, emulator):
    settings = client_settings(tmp_path, emulator)
    limiter = WriteRecordingLimiter(settings, [PREMIUM_KEY])
    client = AlphaVantageClient(settings, limiter, RunStats())
    try:
        for _ in range(3):
            client.fetch(ApiRequest(SYMBOL, "daily", outputsize="compact"))
    finally:
        client.close()

    # once by the connection as it wrote, once more (a no-op) when the answer began
    assert limiter.reports == 6
    assert not limiter._pending[limiter.keys[0].fingerprint]


def test_the_per_minute_cap_holds_in_every_sliding_minute(tmp_path):
    times = send_times(tmp_path, SimulatedClock(step=0.001), 25, OHLCV_RATE_LIMIT_PER_MINUTE="10")

    assert all(times[i + 10] - times[i] >= 60 for i in range(len(times) - 10))
    assert times[10] - times[0] == pytest.approx(60 * RATE_SLACK, abs=0.01)


class ServerAnswersDuringTheWait(SimulatedClock):
    """The first wait of a request is interrupted by another worker's answer: the server
    throttled that key, or said its day is spent (what the client then tells the limiter)."""

    def __init__(self, answer) -> None:
        super().__init__(step=0.001)
        self.answer, self.limiter = answer, None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        answer, self.answer = self.answer, None
        if answer is not None:
            answer(self.limiter)


def test_a_key_throttled_while_a_request_waits_sends_nothing_before_the_penalty_ends(tmp_path):
    clock = ServerAnswersDuringTheWait(None)
    limiter = clock.limiter = simulated_limiter(tmp_path, clock)
    limiter.acquire()
    key = limiter.keys[0]
    penalty_end: list[float] = []

    def throttle(lim: RateLimiter) -> None:
        lim.throttled(key, 5.0, "Burst pattern detected.")
        penalty_end.append(clock.now + 5.0)
    clock.answer = throttle

    assert limiter.acquire() is key
    assert clock.now >= penalty_end[0]
    assert DailyQuota(limiter_settings(tmp_path), key.fingerprint).read()["used"] == 2


def test_a_key_declared_spent_while_a_request_waits_hands_the_request_to_another_key(tmp_path):
    second_key = "SECONDPREMIUMKEY"
    clock = ServerAnswersDuringTheWait(None)
    limiter = clock.limiter = simulated_limiter(tmp_path, clock, (PREMIUM_KEY, second_key))
    first = limiter.acquire()
    limiter.acquire()  # the other key, free at once
    clock.answer = lambda lim: lim.exhausted(first)

    third = limiter.acquire()

    assert third.fingerprint != first.fingerprint
    clock.answer = lambda lim: lim.exhausted(third)
    with pytest.raises(QuotaExhausted):
        limiter.acquire()


def test_every_request_is_counted_on_disk_before_it_leaves(tmp_path):
    limiter = simulated_limiter(tmp_path, SimulatedClock(step=0.001))
    quota = DailyQuota(limiter_settings(tmp_path), api_key_fingerprint(PREMIUM_KEY))

    assert [(limiter.acquire(), quota.read()["used"])[1] for _ in range(5)] == [1, 2, 3, 4, 5]


# -- parser refusals -----------------------------------------------------------------------

DAILY = DatasetId("IBM", "daily")
WIRE_KEYS = ["1. open", "2. high", "3. low", "4. close", "5. volume"]
COLUMNS = ["open", "high", "low", "close", "volume"]
GOOD = [["2024-01-03", "10.0000", "11.0000", "9.5000", "10.5000", "1000"],
        ["2024-01-02", "9.8000", "10.2000", "9.7000", "10.0000", "2000"]]


def as_json(rows: list[list[str]], drop: str | None = None) -> dict:
    return {row[0]: {key: value
                     for key, column, value in zip(WIRE_KEYS, COLUMNS, row[1:], strict=True)
                     if column != drop} for row in rows}


def as_csv(rows: list[list[str]], drop: str | None = None) -> bytes:
    keep = [i for i, name in enumerate(["timestamp", *COLUMNS]) if name != drop]
    lines = [",".join(["timestamp", *COLUMNS][i] for i in keep)]
    lines += [",".join(row[i] for i in keep) for row in rows]
    return ("\r\n".join(lines) + "\r\n").encode()


def changed(column: str, value: str, row: int = 0) -> list[list[str]]:
    rows = [list(r) for r in GOOD]
    rows[row][["timestamp", *COLUMNS].index(column)] = value
    return rows


# reason -> (rows, dropped column, JSON rows override or None, expected words)
REFUSALS = {
    "missing field": (GOOD, "volume", None, "missing fields: volume"),
    "non-numeric value": (changed("open", "n/a"), None, None, "non-numeric open"),
    "high below max(open, close)": (changed("high", "10.4000"), None, None,
                                    "high below max(open, close)"),
    "low above min(open, close)": (changed("low", "10.1000"), None, None,
                                   "low above min(open, close)"),
    "negative price": (changed("low", "-0.5000"), None, None, "negative price"),
    "negative volume": (changed("volume", "-5"), None, None, "negative price or volume"),
    "duplicate timestamps": (GOOD + [list(GOOD[0])], None,
                             # JSON keys are unique: a space before the date (stripped)
                             # names the same day twice.
                             GOOD + [[" 2024-01-03", *GOOD[0][1:]]],
                             "duplicate timestamp"),
}


@pytest.mark.parametrize("reason", list(REFUSALS))
@pytest.mark.parametrize("wire_format", ["json", "csv"])
def test_parser_refuses_an_invalid_series_naming_the_reason(reason, wire_format):
    rows, drop, json_rows, words = REFUSALS[reason]
    payload = as_csv(rows, drop) if wire_format == "csv" else as_json(json_rows or rows, drop)

    with pytest.raises(InvalidPayload, match=re.escape(words)):
        parse_payload(Classified(Outcome.DATA, payload=payload), DAILY)


@pytest.mark.parametrize("wire_format", ["json", "csv"])
def test_parser_accepts_a_valid_series_oldest_first(wire_format):
    payload = as_csv(GOOD) if wire_format == "csv" else as_json(GOOD)

    frame = parse_payload(Classified(Outcome.DATA, payload=payload), DAILY)

    assert frame["timestamp"].dt.date.tolist() == [date(2024, 1, 2), date(2024, 1, 3)]
    assert frame["close"].tolist() == [10.0, 10.5]


@pytest.mark.parametrize("wire_format", ["json", "csv"])
def test_parser_refuses_a_bar_without_a_timestamp(wire_format):
    rows = changed("timestamp", "", row=1)
    payload = as_csv(rows) if wire_format == "csv" else as_json(rows)

    with pytest.raises(InvalidPayload):
        parse_payload(Classified(Outcome.DATA, payload=payload), DAILY)


def test_parser_refuses_a_json_series_whose_bars_are_not_objects():
    series = {"2024-01-02": "10.0", "2024-01-03": ["10.0", "11.0"]}

    with pytest.raises(InvalidPayload):
        parse_payload(Classified(Outcome.DATA, payload=series), DAILY)


@pytest.mark.parametrize("wire_format", ["json", "csv"])
def test_parser_refuses_a_field_named_twice(wire_format):
    if wire_format == "json":
        payload = {stamp: dict(bar, **{"6. open": bar["1. open"]})
                   for stamp, bar in as_json(GOOD).items()}
    else:
        payload = as_csv(GOOD).replace(b"volume\r\n", b"volume,Open\r\n", 1) \
            .replace(b"1000\r\n", b"1000,10.0000\r\n").replace(b"2000\r\n", b"2000,9.8000\r\n")

    with pytest.raises(InvalidPayload):
        parse_payload(Classified(Outcome.DATA, payload=payload), DAILY)


# -- property tests: nothing but InvalidPayload, whatever arrives --------------------------

number_text = st.one_of(
    st.floats(min_value=-5, max_value=500, allow_nan=False).map(lambda x: f"{x:.4f}"),
    st.integers(min_value=-10, max_value=10**7).map(str),
    st.sampled_from(["", " ", "nan", "inf", "-0", "1e400", "0x10", "1,5", "None", "12.5.1"]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                        st.text(max_size=8), number_text)
json_value = st.one_of(json_scalar, st.lists(json_scalar, max_size=3),
                       st.dictionaries(st.text(max_size=4), json_scalar, max_size=2))
date_text = st.one_of(
    st.dates(min_value=date(1990, 1, 1), max_value=date(2030, 12, 31)).map(str),
    st.dates(min_value=date(1990, 1, 1), max_value=date(2030, 12, 31)).map(lambda d: f"{d} 16:00:00"),
    st.text(max_size=12))
bar_key = st.one_of(st.sampled_from(WIRE_KEYS + ["5. adjusted close", "6. open", "timestamp",
                                                 "open", "Close", "", "7. dividend amount"]),
                    st.text(max_size=10))
# Mostly near-valid bars (every field present, plus a few extra keys) so that the parser's
# later stages are reached, and some arbitrary dictionaries.
complete_bar = st.builds(lambda base, extra: {**base, **extra},
                         st.fixed_dictionaries({key: number_text for key in WIRE_KEYS}),
                         st.dictionaries(bar_key, st.one_of(number_text, json_value), max_size=2))
bar = st.one_of(complete_bar, complete_bar,
                st.dictionaries(bar_key, st.one_of(number_text, json_value), max_size=8))
json_series = st.dictionaries(date_text, st.one_of(bar, bar, bar, json_value), max_size=6)

csv_cell = st.one_of(number_text, date_text, st.text(alphabet=string.printable, max_size=6))
header_extra = st.one_of(st.sampled_from(["Open", "1. open", "Volume", "2. high", "adjusted close",
                                          "timestamp", "open"]),
                         st.text(alphabet=string.ascii_letters + " _.", max_size=8))


def _header(required: list[str], extra: list[str], drop: int) -> list[str]:
    names = [name for i, name in enumerate(required) if i != drop]  # drop >= 6 keeps all
    return names + extra


csv_header = st.builds(_header, st.permutations(["timestamp", *COLUMNS]),
                       st.lists(header_extra, max_size=2), st.integers(0, 12))
csv_text = st.one_of(
    st.text(max_size=200),
    st.builds(lambda header, rows: "\r\n".join([",".join(header)] + [",".join(r) for r in rows]),
              csv_header, st.lists(st.lists(csv_cell, min_size=5, max_size=8), max_size=5)))

PROPERTY = settings(max_examples=250, deadline=None, derandomize=True, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow])


def _parse_or_refuse(payload: object) -> None:
    try:
        frame = parse_payload(Classified(Outcome.DATA, payload=payload), DAILY)
    except InvalidPayload:
        return
    assert list(frame.columns) == columns_for(DAILY)
    validate_bars(frame)


@PROPERTY
@given(json_series)
def test_parser_on_any_json_series_returns_valid_bars_or_raises_invalid_payload(series):
    _parse_or_refuse(series)


@PROPERTY
@given(csv_text)
def test_parser_on_any_csv_text_returns_valid_bars_or_raises_invalid_payload(text):
    _parse_or_refuse(text.encode("utf-8"))


@PROPERTY
@given(st.binary(max_size=200))
def test_parser_on_any_csv_bytes_returns_valid_bars_or_raises_invalid_payload(body):
    _parse_or_refuse(b"timestamp," + body)
