"""A local Alpha Vantage API emulator: a real HTTP server for the tests and benchmarks.

It speaks the wire format of the project's Alpha Vantage reference (alphavantage-wire-format.md):
`GET /query`, JSON laid out exactly as `json.dumps(obj, indent=4)` with no trailing newline,
CSV newest first with CRLF, every API-level error or throttle as a one-key JSON object with
HTTP 200 (also for `datatype=csv`). Standard library only, so it runs anywhere.

Map of this file, in the order a request meets it:
    messages, FUNCTIONS    -- the exact non-data texts and the served time-series functions
    TradingCalendar        -- which dates are trading days
    PriceModel             -- deterministic synthetic prices per symbol (random walk, splits,
                              dividends, CRSP-style adjusted close, revisions, weekly/monthly
                              aggregation, intraday bars), cached per symbol and as-of date
    WireFormat             -- bodies byte for byte: JSON messages, series JSON, CSV
    RateLimiter            -- sliding 1 s / 60 s windows and a per-day count per API key,
                              judged at each request's arrival (kernel receive stamp)
    Fault, FaultQueue      -- faults queued by a test (or drawn at random) for the next requests
    ApiRequest, Reply      -- one parsed request; the decision about its answer
    QueryService           -- request -> reply: faults, key, limits, plan rules, validation, data
    QueryHandler           -- the HTTP side: keep-alive, gzip, latency, faults on the socket
    AlphaVantageEmulator   -- the facade tests use: settings, lifecycle, counters, helpers
    main                   -- `python -m tests.alphavantage_emulator --port 8765 ...`

Typical use:

    with AlphaVantageEmulator(premium_keys={"PREMIUMKEY": 600}) as av:
        requests.get(av.base_url, params={"function": "TIME_SERIES_DAILY",
                                          "symbol": "IBM", "apikey": "PREMIUMKEY"})
        av.inject("reset", times=2, symbol="MSFT")
        assert av.violations == 0

The API key is never printed or logged; the request log keeps only a short fingerprint.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import io
import json
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# ---------------------------------------------------------------------------------------------
# Messages: section 3 of the wire-format reference, verbatim (note the missing final periods).

_PREMIUM_URL = "https://www.alphavantage.co/premium/"
MSG_APIKEY = ("the parameter apikey is invalid or missing. Please claim your free API key on "
              "(https://www.alphavantage.co/support/#api-key). It should take less than 20 seconds.")
MSG_INVALID_CALL = ("Invalid API call. Please retry or visit the documentation "
                    "(https://www.alphavantage.co/documentation/) for {function}.")
MSG_UNKNOWN_FUNCTION = "This API function ({function}) does not exist."
MSG_FREE_DAILY = ("Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per "
                  f"day. Please subscribe to any of the premium plans at {_PREMIUM_URL} to instantly "
                  "remove all daily rate limits.")
MSG_FREE_DAILY_KEY = ("We have detected your API key as {key} and our standard API rate limit is 25 "
                      f"requests per day. Please subscribe to any of the premium plans at {_PREMIUM_URL}"
                      " to instantly remove all daily rate limits.")
MSG_FREE_BURST = ("Thank you for using Alpha Vantage! Please consider spreading out your free API "
                  "requests more sparingly (1 request per second). You may subscribe to any of the "
                  f"premium plans at {_PREMIUM_URL} to lift the free key rate limit (25 requests per "
                  "day), raise the per-second burst limit, and instantly unlock all premium endpoints")
MSG_PREMIUM_BURST = ("Burst pattern detected. Please consider spreading out your API requests more "
                     "evenly across a 1-minute window and query no more than 5 requests per second.")
MSG_HIGH_VOLUME = ("Thank you for using Alpha Vantage! Please contact premium@alphavantage.co if you "
                   "are targeting a higher API call volume.")
MSG_LEGACY_NOTE = ("Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per "
                   f"minute and 500 calls per day. Please visit {_PREMIUM_URL} if you would like to "
                   "target a higher API call frequency.")
MSG_PREMIUM_ENDPOINT = ("Thank you for using Alpha Vantage! This is a premium endpoint. You may "
                        f"subscribe to any of the premium plans at {_PREMIUM_URL} to instantly unlock "
                        "all premium endpoints")
MSG_PREMIUM_PARAMETER = ("Thank you for using Alpha Vantage! The outputsize=full parameter value is a "
                         "premium feature for the TIME_SERIES_DAILY endpoint. You may subscribe to any "
                         f"of the premium plans at {_PREMIUM_URL} to instantly unlock all premium "
                         "features")
MSG_DEMO = ("The **demo** API key is for demo purposes only. Please claim your free API key at "
            "(https://www.alphavantage.co/support/#api-key) to explore our full API offerings. "
            "It takes fewer than 20 seconds.")

JSON_TYPE = "application/json"
CSV_TYPE = "application/x-download"
HTML_TYPE = "text/html; charset=utf-8"

HTML_ERROR_PAGE = ("<!DOCTYPE html>\n<html>\n<head><title>Alpha Vantage - Server Error</title></head>\n"
                   "<body><h1>Server Error</h1><p>Sorry, something went wrong. "
                   "Please try again later.</p></body>\n</html>\n")
HTML_500_PAGE = ("<!doctype html>\n<html>\n<head><title>Server Error (500)</title></head>\n"
                 "<body>\n<h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n")
HTML_503_PAGE = ("<!DOCTYPE html>\n<html>\n<head><title>Application Error</title></head>\n<body>"
                 "<h1>503 Service Unavailable</h1><p>An error occurred in the application and your "
                 "page could not be served.</p></body>\n</html>\n")
HTML_404_PAGE = ("<!doctype html>\n<html>\n<head><title>Not Found</title></head>\n<body>\n"
                 "<h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n"
                 "</body>\n</html>\n")

# The real site sends these on every answer; clients should not care, but may log them.
_SITE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Allow", "GET, HEAD, OPTIONS"),
    ("Vary", "Cookie, Origin"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)

INTERVALS: dict[str, int] = {"1min": 1, "5min": 5, "15min": 15, "30min": 30, "60min": 60}
SYMBOL_PATTERN = re.compile(r"[A-Z0-9.\-]{1,15}", re.IGNORECASE | re.ASCII)
MONTH_PATTERN = re.compile(r"(\d{4})-(0[1-9]|1[0-2])", re.ASCII)

_PLAIN_KEYS = ("1. open", "2. high", "3. low", "4. close", "5. volume")
_DAILY_ADJUSTED_KEYS = ("1. open", "2. high", "3. low", "4. close", "5. adjusted close",
                        "6. volume", "7. dividend amount", "8. split coefficient")
_PERIOD_ADJUSTED_KEYS = _DAILY_ADJUSTED_KEYS[:7]
_PLAIN_CSV = "timestamp,open,high,low,close,volume"


@dataclass(frozen=True)
class SeriesFunction:
    """One served time-series function: its wire names and which bars it draws from."""

    name: str
    period: str            # "intraday", "daily", "weekly" or "monthly"
    adjusted: bool
    information: str       # "1. Information" (intraday: a template on the interval)
    series_key: str        # the series object's key (intraday: a template on the interval)
    bar_keys: tuple[str, ...]
    csv_header: str
    file_stem: str         # CSV filename is f"{file_stem}_{symbol}.csv"

    @property
    def has_outputsize(self) -> bool:
        return self.period in ("intraday", "daily")


FUNCTIONS: dict[str, SeriesFunction] = {f.name: f for f in (
    SeriesFunction("TIME_SERIES_INTRADAY", "intraday", False,
                   "Intraday ({interval}) open, high, low, close prices and volume",
                   "Time Series ({interval})", _PLAIN_KEYS, _PLAIN_CSV, "intraday_{interval}"),
    SeriesFunction("TIME_SERIES_DAILY", "daily", False,
                   "Daily Prices (open, high, low, close) and Volumes",
                   "Time Series (Daily)", _PLAIN_KEYS, _PLAIN_CSV, "daily"),
    SeriesFunction("TIME_SERIES_DAILY_ADJUSTED", "daily", True,
                   "Daily Time Series with Splits and Dividend Events", "Time Series (Daily)",
                   _DAILY_ADJUSTED_KEYS,
                   "timestamp,open,high,low,close,adjusted_close,volume,dividend_amount,"
                   "split_coefficient", "daily_adjusted"),
    SeriesFunction("TIME_SERIES_WEEKLY", "weekly", False,
                   "Weekly Prices (open, high, low, close) and Volumes", "Weekly Time Series",
                   _PLAIN_KEYS, _PLAIN_CSV, "weekly"),
    SeriesFunction("TIME_SERIES_WEEKLY_ADJUSTED", "weekly", True,
                   "Weekly Adjusted Prices and Volumes", "Weekly Adjusted Time Series",
                   _PERIOD_ADJUSTED_KEYS,
                   "timestamp,open,high,low,close,adjusted close,volume,dividend amount",
                   "weekly_adjusted"),
    SeriesFunction("TIME_SERIES_MONTHLY", "monthly", False,
                   "Monthly Prices (open, high, low, close) and Volumes", "Monthly Time Series",
                   _PLAIN_KEYS, _PLAIN_CSV, "monthly"),
    SeriesFunction("TIME_SERIES_MONTHLY_ADJUSTED", "monthly", True,
                   "Monthly Adjusted Prices and Volumes", "Monthly Adjusted Time Series",
                   _PERIOD_ADJUSTED_KEYS,
                   "timestamp,open,high,low,close,adjusted close,volume,dividend amount",
                   "monthly_adjusted"),
)}


# ---------------------------------------------------------------------------------------------
# Calendar

class TradingCalendar:
    """Trading days: Monday to Friday, optionally minus New Year, Independence Day and
    Christmas (with the NYSE weekend rules). Enough to produce Thursday-keyed weeks.
    `sessions`, when given, decides instead (a real exchange calendar's is_session, which a
    test passes in: this file imports no such library)."""

    def __init__(self, skip_holidays: bool = True,
                 sessions: Callable[[date], bool] | None = None) -> None:
        self.skip_holidays = skip_holidays
        self.sessions = sessions
        self._holidays: dict[int, frozenset[date]] = {}

    @property
    def rule(self) -> Any:
        """What the trading days depend on: part of every cache key of bars built on them."""
        return self.skip_holidays if self.sessions is None else self.sessions

    def holidays(self, year: int) -> frozenset[date]:
        if year not in self._holidays:
            found: set[date] = set()
            new_year = date(year, 1, 1)
            if new_year.weekday() == 6:
                found.add(date(year, 1, 2))
            elif new_year.weekday() < 5:
                found.add(new_year)
            # A Saturday New Year is not observed on the Friday before (NYSE rule 51).
            for fixed in (date(year, 7, 4), date(year, 12, 25)):
                shift = {5: -1, 6: 1}.get(fixed.weekday(), 0)
                found.add(fixed + timedelta(days=shift))
            self._holidays[year] = frozenset(found)
        return self._holidays[year]

    def is_trading_day(self, day: date) -> bool:
        if self.sessions is not None:
            return self.sessions(day)
        if day.weekday() >= 5:
            return False
        return not (self.skip_holidays and day in self.holidays(day.year))

    def days(self, start: date, end: date) -> list[date]:
        out: list[date] = []
        day = start
        one = timedelta(days=1)
        while day <= end:
            if self.is_trading_day(day):
                out.append(day)
            day += one
        return out

    def on_or_after(self, day: date) -> date:
        while not self.is_trading_day(day):
            day += timedelta(days=1)
        return day


# ---------------------------------------------------------------------------------------------
# Price model

PRICE_FIELDS = ("open", "high", "low", "close", "adjusted_close", "volume", "dividend_amount")


@dataclass(frozen=True, slots=True)
class DailyBar:
    """One as-traded daily bar plus its adjustment data; prices already rounded to 4 dp."""

    date: date
    open: float
    high: float
    low: float
    close: float
    adjusted_close: float
    volume: int
    dividend_amount: float
    split_coefficient: float

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class PeriodBar:
    """A weekly or monthly bar, keyed by the last trading day it contains."""

    date: date
    open: float
    high: float
    low: float
    close: float
    adjusted_close: float
    volume: int
    dividend_amount: float

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class IntradayBar:
    """One intraday bar labelled by its start time (US/Eastern, naive)."""

    timestamp: datetime
    open: float
    high: float
    low: float
    close: float
    volume: int


def _fmt_price(value: float) -> str:
    return f"{value:.4f}"


def _fmt_coefficient(ratio: float) -> str:
    text = repr(float(ratio))
    return text if len(text) <= 8 else f"{ratio:.4f}"


def _symbol_digest(symbol: str) -> bytes:
    return hashlib.sha256(symbol.upper().encode("utf-8")).digest()


# Built-in splits fall before this date so that every history has them whatever as_of is.
_SPLIT_WINDOW_END = date(2024, 12, 31)


@dataclass(frozen=True)
class SymbolProfile:
    """The fixed character of one symbol's synthetic history, derived from sha256(symbol)."""

    start_price: float
    sigma: float
    drift: float
    base_volume: float
    dividend_yield: float        # per quarter, as a fraction of the previous close
    dividend_day: int
    dividend_months: tuple[int, ...]
    splits: tuple[tuple[date, float], ...]

    @classmethod
    def derive(cls, symbol: str, calendar: TradingCalendar, history_start: date) -> SymbolProfile:
        rng = random.Random(_symbol_digest(symbol) + b"/profile")
        start_price = rng.uniform(15.0, 150.0)
        sigma = rng.uniform(0.011, 0.024)
        first_month = rng.randint(1, 3)
        splits: list[tuple[date, float]] = []
        window_start = history_start + timedelta(days=400)
        span = (_SPLIT_WINDOW_END - window_start).days
        if span > 0:
            for _ in range(rng.choice((2, 2, 3))):
                day = calendar.on_or_after(window_start + timedelta(days=rng.randrange(span)))
                ratio = rng.choice((2.0, 2.0, 3.0))
                if all(abs((day - other).days) > 200 for other, _ in splits):
                    splits.append((day, ratio))
        # The walk grows the unsplit price by about the product of the split ratios, so the
        # as-traded price stays in a familiar range for the whole history.
        growth = math.prod(r for _, r in splits) * rng.uniform(0.8, 2.5)
        years = max(1.0, (_SPLIT_WINDOW_END - history_start).days / 365.25 + 1)
        return cls(start_price=start_price, sigma=sigma,
                   drift=math.log(growth) / (252 * years),
                   base_volume=rng.uniform(1e6, 2e7),
                   dividend_yield=rng.uniform(0.002, 0.009),
                   dividend_day=rng.randint(3, 20),
                   dividend_months=tuple(first_month + 3 * q for q in range(4)),
                   splits=tuple(sorted(splits)))


class EconomicWalk:
    """The unsplit price path of one symbol, one step per trading day from history_start.
    It depends only on the symbol and the step index, so moving as_of just extends it, and
    every emulator in the process can share it (see `shared`)."""

    _KAPPA = 0.002          # pull toward the trend keeps 26 years of walk within sane prices
    _MAX_MOVE = 0.12        # cap on one day's log move keeps split days recognisable
    _SHARED_LIMIT = 128     # about 300 KB per walk of 26 years
    _shared: ClassVar[OrderedDict[tuple[str, date, Any], EconomicWalk]] = OrderedDict()
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, symbol: str, profile: SymbolProfile) -> None:
        self._rng = random.Random(_symbol_digest(symbol) + b"/walk")
        self._profile = profile
        self._lock = threading.Lock()
        self._log_price = math.log(profile.start_price)
        self._trend = self._log_price
        self.opens = array("d")
        self.highs = array("d")
        self.lows = array("d")
        self.closes = array("d")
        self.volumes = array("d")

    @classmethod
    def shared(cls, symbol: str, profile: SymbolProfile, history_start: date,
               rule: Any) -> EconomicWalk:
        # Generating the walk is most of the cost of a first request; tests start many
        # emulators, so one walk per (symbol, start, calendar) serves them all.
        key = (symbol, history_start, rule)
        with cls._shared_lock:
            walk = cls._shared.get(key)
            if walk is None:
                walk = cls._shared[key] = cls(symbol, profile)
                while len(cls._shared) > cls._SHARED_LIMIT:
                    cls._shared.popitem(last=False)
            else:
                cls._shared.move_to_end(key)
            return walk

    def extend(self, n: int) -> None:
        with self._lock:
            self._extend(n)

    def _extend(self, n: int) -> None:
        rng, p = self._rng, self._profile
        while len(self.closes) < n:
            prev_close = math.exp(self._log_price)
            self._trend += p.drift
            move = p.drift + self._KAPPA * (self._trend - self._log_price) + p.sigma * rng.gauss(0, 1)
            move = max(-self._MAX_MOVE, min(self._MAX_MOVE, move))
            opening = prev_close * math.exp(rng.gauss(0, p.sigma * 0.35)) if self.closes else prev_close
            self._log_price += move
            close = math.exp(self._log_price)
            self.opens.append(opening)
            self.closes.append(close)
            self.highs.append(max(opening, close) * math.exp(abs(rng.gauss(0, p.sigma * 0.6))))
            self.lows.append(min(opening, close) * math.exp(-abs(rng.gauss(0, p.sigma * 0.6))))
            self.volumes.append(p.base_volume * math.exp(rng.gauss(0, 0.35)) * (1 + 4 * abs(move)))


class DailySeries:
    """All daily bars of one symbol up to one as-of date, with the derived views
    (weekly, monthly, wire-ready strings) computed once and cached."""

    def __init__(self, symbol: str, bars: list[DailyBar]) -> None:
        self.symbol = symbol
        self.bars = bars
        self.index = {bar.date: i for i, bar in enumerate(bars)}
        self._views: dict[str, Any] = {}
        self._lock = threading.RLock()   # one view may build on another

    def _view(self, name: str, build: Callable[[], Any]) -> Any:
        with self._lock:
            if name not in self._views:
                self._views[name] = build()
            return self._views[name]

    def weekly(self) -> list[PeriodBar]:
        return self._view("weekly", lambda: self._aggregate(lambda d: d.isocalendar()[:2]))

    def monthly(self) -> list[PeriodBar]:
        return self._view("monthly", lambda: self._aggregate(lambda d: (d.year, d.month)))

    def _aggregate(self, period_of: Callable[[date], tuple[int, int]]) -> list[PeriodBar]:
        out: list[PeriodBar] = []
        group: list[DailyBar] = []
        for bar in self.bars:
            if group and period_of(bar.date) != period_of(group[0].date):
                out.append(self._period_bar(group))
                group = []
            group.append(bar)
        if group:
            out.append(self._period_bar(group))
        return out

    @staticmethod
    def _period_bar(group: list[DailyBar]) -> PeriodBar:
        last = group[-1]
        return PeriodBar(date=last.date, open=group[0].open,
                         high=max(b.high for b in group), low=min(b.low for b in group),
                         close=last.close, adjusted_close=last.adjusted_close,
                         volume=sum(b.volume for b in group),
                         dividend_amount=round(sum(b.dividend_amount for b in group), 4))

    def wire_rows(self, function: SeriesFunction,
                  newest: int | None = None) -> list[tuple[str, tuple[str, ...]]]:
        """(date key, value strings) newest first, in the function's bar-key order;
        only the `newest` rows when given (a compact request need not format 26 years)."""
        name = f"rows:{function.period}:{function.adjusted}"
        with self._lock:
            whole = self._views.get(name)
        if whole is not None:
            return whole if newest is None else whole[:newest]
        if function.period == "daily":
            source: Sequence[DailyBar | PeriodBar] = self.bars
        else:
            source = self.weekly() if function.period == "weekly" else self.monthly()
        if newest is not None:
            return self._format(function, source[-newest:] if newest else [])
        return self._view(name, lambda: self._format(function, source))

    @staticmethod
    def _format(function: SeriesFunction,
                source: Sequence[DailyBar | PeriodBar]) -> list[tuple[str, tuple[str, ...]]]:
        rows = []
        for bar in reversed(source):
            prices = (_fmt_price(bar.open), _fmt_price(bar.high), _fmt_price(bar.low),
                      _fmt_price(bar.close))
            if not function.adjusted:
                values = prices + (str(bar.volume),)
            else:
                values = prices + (_fmt_price(bar.adjusted_close), str(bar.volume),
                                   _fmt_price(bar.dividend_amount))
                if isinstance(bar, DailyBar):
                    values += (_fmt_coefficient(bar.split_coefficient),)
            rows.append((bar.date.isoformat(), values))
        return rows


class PriceModel:
    """Deterministic synthetic prices: the same symbol always gives the same bars.

    As-traded prices are the unsplit walk divided by the cumulative split ratio, so the price
    drops by the ratio on a split's ex-date; volumes rise by it. Dividends are ex-dated
    quarterly. The adjusted close uses CRSP-style multiplicative factors of later events."""

    _CACHED_SERIES = 24           # about 2 MB each for 26 years of bars
    _shared_series: ClassVar[OrderedDict[tuple[Any, ...], DailySeries]] = OrderedDict()
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()
    _CACHED_INTRADAY_DAYS = 4096

    def __init__(self, calendar: TradingCalendar, history_start: date) -> None:
        self.calendar = calendar
        self._lock = threading.RLock()
        self._history_start = history_start
        self._reset()

    def _reset(self) -> None:
        self._days: list[date] = []
        self._horizon = self._history_start - timedelta(days=1)
        self._profiles: dict[str, SymbolProfile] = {}
        self._splits: dict[str, dict[date, float]] = {}
        self._added_splits: dict[str, dict[date, float]] = {}
        self._revisions: dict[str, dict[date, dict[str, float]]] = {}
        # A vendor's calendar mistakes, per symbol: days with no bar, bars on closed days.
        self._dropped: dict[str, set[date]] = {}
        self._extra: dict[str, set[date]] = {}
        self._versions: Counter[str] = Counter()
        self._intraday: OrderedDict[tuple[str, date, int, int], list[IntradayBar]] = OrderedDict()
        self.generation = getattr(self, "generation", 0) + 1

    @property
    def history_start(self) -> date:
        return self._history_start

    @history_start.setter
    def history_start(self, value: date) -> None:
        # Built-in splits and the walk depend on the start; a test's own edits survive.
        with self._lock:
            revisions, added = self._revisions, self._added_splits
            dropped, extra = self._dropped, self._extra
            self._history_start = value
            self._reset()
            self._revisions, self._added_splits = revisions, added
            self._dropped, self._extra = dropped, extra

    def version(self, symbol: str) -> int:
        return self._versions[symbol.upper()]

    def _ensure_days(self, until: date) -> None:
        if until > self._horizon:
            # Grow in one-year steps: repeated small as_of advances stay cheap.
            self._horizon = max(until, self._horizon + timedelta(days=366))
            self._days = self.calendar.days(self._history_start, self._horizon)

    def profile(self, symbol: str) -> SymbolProfile:
        key = symbol.upper()
        with self._lock:
            if key not in self._profiles:
                self._profiles[key] = SymbolProfile.derive(key, self.calendar, self._history_start)
            return self._profiles[key]

    def splits(self, symbol: str) -> dict[date, float]:
        key = symbol.upper()
        with self._lock:
            if key not in self._splits:
                table = dict(self.profile(key).splits)
                for day, ratio in self._added_splits.get(key, {}).items():
                    if ratio == 1.0:
                        table.pop(day, None)
                    else:
                        table[day] = ratio
                self._splits[key] = table
            return self._splits[key]

    def add_split(self, symbol: str, day: date, ratio: float) -> None:
        if not self.calendar.is_trading_day(day):
            raise ValueError(f"{day} is not a trading day; a split needs a trading day")
        if not ratio > 0:
            raise ValueError("a split ratio must be positive, e.g. 2.0 for a 2-for-1 split")
        key = symbol.upper()
        with self._lock:
            self._added_splits.setdefault(key, {})[day] = float(ratio)
            self._splits.pop(key, None)
            self._versions[key] += 1

    def revise(self, symbol: str, day: date, fields: Mapping[str, float]) -> None:
        unknown = set(fields) - set(PRICE_FIELDS)
        if unknown:
            raise ValueError(f"cannot revise {sorted(unknown)}; revisable fields: {PRICE_FIELDS} "
                             "(use add_split for split coefficients)")
        if not self.calendar.is_trading_day(day):
            raise ValueError(f"{day} is not a trading day")
        with self._lock:
            self._revisions.setdefault(symbol.upper(), {}).setdefault(day, {}).update(fields)
            self._versions[symbol.upper()] += 1

    def misdate(self, symbol: str, drop: Iterable[date], add: Iterable[date],
                correct: Iterable[date] = ()) -> None:
        """Leave the trading days `drop` without a bar, and give the days `add` one
        whatever the calendar says (weekly, monthly and intraday bars follow); the days
        `correct` are served by the calendar again (the vendor fixed its mistake)."""
        key = symbol.upper()
        with self._lock:
            self._dropped.setdefault(key, set()).update(drop)
            self._extra.setdefault(key, set()).update(add)
            for day in correct:
                self._dropped[key].discard(day)
                self._extra[key].discard(day)
            self._versions[key] += 1

    def daily(self, symbol: str, as_of: date) -> DailySeries:
        key = symbol.upper()
        with self._lock:
            # Keyed by everything the bars depend on, so emulators in one process share
            # series (tests start many), and a test's edits never leak into another emulator.
            edits = (tuple(sorted(self._added_splits.get(key, {}).items())),
                     tuple(sorted((d, tuple(sorted(f.items())))
                                  for d, f in self._revisions.get(key, {}).items())),
                     tuple(sorted(self._dropped.get(key, ()))), tuple(sorted(self._extra.get(key, ()))))
            cache_key = (key, self._history_start, self.calendar.rule, as_of, edits)
        with PriceModel._shared_lock:
            series = PriceModel._shared_series.get(cache_key)
            if series is not None:
                PriceModel._shared_series.move_to_end(cache_key)
                return series
        with self._lock:
            series = DailySeries(key, self._build_daily(key, as_of))
        with PriceModel._shared_lock:
            PriceModel._shared_series[cache_key] = series
            while len(PriceModel._shared_series) > self._CACHED_SERIES:
                PriceModel._shared_series.popitem(last=False)
        return series

    def _dividend_dates(self, profile: SymbolProfile, until: date) -> set[date]:
        out: set[date] = set()
        for year in range(self._history_start.year, until.year + 1):
            for month in profile.dividend_months:
                out.add(self.calendar.on_or_after(date(year, month, profile.dividend_day)))
        return out

    def _build_daily(self, key: str, as_of: date) -> list[DailyBar]:
        self._ensure_days(as_of)
        n = bisect.bisect_right(self._days, as_of)
        days = self._days[:n]
        dropped, extra = self._dropped.get(key, set()), self._extra.get(key, set())
        if dropped or extra:
            days = sorted((set(days) - dropped) | {d for d in extra
                                                   if self._history_start <= d <= as_of})
            n = len(days)
        profile = self.profile(key)
        walk = EconomicWalk.shared(key, profile, self._history_start, self.calendar.rule)
        walk.extend(n)
        splits = self.splits(key)
        revisions = self._revisions.get(key, {})
        ex_dates = self._dividend_dates(profile, as_of)

        opens, highs, lows, closes, volumes = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
        dividends, coefficients = [0.0] * n, [1.0] * n
        cumulative = 1.0
        for i, day in enumerate(days):
            ratio = splits.get(day)
            if ratio is not None:
                cumulative *= ratio
                coefficients[i] = ratio
            o = max(0.01, round(walk.opens[i] / cumulative, 4))
            c = max(0.01, round(walk.closes[i] / cumulative, 4))
            opens[i], closes[i] = o, c
            highs[i] = max(round(walk.highs[i] / cumulative, 4), o, c)
            lows[i] = max(0.01, min(round(walk.lows[i] / cumulative, 4), o, c))
            volumes[i] = int(walk.volumes[i] * cumulative)
            if i and day in ex_dates:
                dividends[i] = max(0.01, round(profile.dividend_yield * closes[i - 1], 2))

        override_adjusted: dict[int, float] = {}
        for day, changed in revisions.items():
            i = bisect.bisect_left(days, day)
            if i >= n or days[i] != day:
                continue
            opens[i] = float(changed.get("open", opens[i]))
            highs[i] = float(changed.get("high", highs[i]))
            lows[i] = float(changed.get("low", lows[i]))
            closes[i] = float(changed.get("close", closes[i]))
            volumes[i] = int(changed.get("volume", volumes[i]))
            dividends[i] = float(changed.get("dividend_amount", dividends[i]))
            if "adjusted_close" in changed:
                override_adjusted[i] = float(changed["adjusted_close"])

        # Events on day i adjust every earlier close: walk backwards accumulating the factor.
        adjusted = [0.0] * n
        factor = 1.0
        for i in range(n - 1, -1, -1):
            adjusted[i] = round(closes[i] * factor, 4)
            if dividends[i] and i and closes[i - 1] > dividends[i]:
                factor *= 1.0 - dividends[i] / closes[i - 1]
            factor /= coefficients[i]
        for i, value in override_adjusted.items():
            adjusted[i] = value

        return [DailyBar(days[i], opens[i], highs[i], lows[i], closes[i], adjusted[i], volumes[i],
                         dividends[i], coefficients[i]) for i in range(n)]

    def intraday_day(self, series: DailySeries, day: date, minutes: int) -> list[IntradayBar]:
        """All extended-hours bars (04:00-20:00 ET) of one trading day, as traded."""
        i = series.index[day]
        bar = series.bars[i]
        key = (series.symbol, day, minutes, self._versions[series.symbol])
        with self._lock:
            cached = self._intraday.get(key)
            if cached is not None:
                self._intraday.move_to_end(key)
                return cached
        prev_close = series.bars[i - 1].close if i else bar.open
        bars = _intraday_bars(series.symbol, bar, prev_close, minutes)
        with self._lock:
            self._intraday[key] = bars
            while len(self._intraday) > self._CACHED_INTRADAY_DAYS:
                self._intraday.popitem(last=False)
        return bars


_SESSION_OPEN, _SESSION_CLOSE = 9 * 60 + 30, 16 * 60
_EXTENDED_OPEN, _EXTENDED_CLOSE = 4 * 60, 20 * 60


def in_regular_session(minute: int, length: int) -> bool:
    """A bar belongs to the regular session when it overlaps 09:30-16:00 ET."""
    return minute + length > _SESSION_OPEN and minute < _SESSION_CLOSE


def _intraday_bars(symbol: str, bar: DailyBar, prev_close: float, minutes: int) -> list[IntradayBar]:
    # A Brownian bridge around a line through prev close -> open -> close: deterministic per
    # (symbol, day, interval) and roughly consistent with the daily bar.
    rng = random.Random(f"{symbol}|{bar.date.isoformat()}|{minutes}".encode())
    starts = list(range(_EXTENDED_OPEN, _EXTENDED_CLOSE, minutes))
    n = len(starts)
    after_hours = bar.close * math.exp(rng.gauss(0, 0.003))
    anchors = ((_EXTENDED_OPEN, prev_close), (_SESSION_OPEN, bar.open),
               (_SESSION_CLOSE, bar.close), (_EXTENDED_CLOSE, after_hours))

    def anchor(t: int) -> float:
        for (t0, p0), (t1, p1) in pairwise(anchors):
            if t <= t1:
                return p0 + (p1 - p0) * (t - t0) / (t1 - t0)
        return anchors[-1][1]

    step = max(bar.high - bar.low, bar.close * 0.002) / (2 * math.sqrt(390 / minutes))
    walk = [0.0]
    for _ in range(n):
        walk.append(walk[-1] + rng.gauss(0, step))
    points = [max(0.01, anchor(_EXTENDED_OPEN + k * minutes) + walk[k] - walk[n] * k / n)
              for k in range(n + 1)]

    weights = []
    for start in starts:
        if in_regular_session(start, minutes):
            x = (start + minutes / 2 - 765) / 195   # -1 at the open, +1 at the close
            weights.append(1.0 + 1.5 * x * x)
        else:
            weights.append(0.05)
    total_weight = sum(weights)

    out = []
    day = datetime(bar.date.year, bar.date.month, bar.date.day)
    for k, start in enumerate(starts):
        o, c = round(points[k], 4), round(points[k + 1], 4)
        h = max(o, c, round(max(points[k], points[k + 1]) + abs(rng.gauss(0, step * 0.5)), 4))
        lo = max(0.01, min(o, c, round(min(points[k], points[k + 1]) - abs(rng.gauss(0, step * 0.5)), 4)))
        volume = 1 + int(bar.volume * weights[k] / total_weight * rng.uniform(0.6, 1.4))
        out.append(IntradayBar(day + timedelta(minutes=start), o, h, lo, c, volume))
    return out


# ---------------------------------------------------------------------------------------------
# Wire format

_encode_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


class WireFormat:
    """Bodies byte for byte as the real API sends them.

    JSON equals json.dumps(obj, indent=4) (no trailing newline). The series part is written
    from a per-bar template because the pure-Python indenting encoder would take a few hundred
    milliseconds for a full daily history; the tests check the two agree."""

    @staticmethod
    def message(key: str, text: str) -> bytes:
        return json.dumps({key: text}, indent=4).encode("utf-8")

    @staticmethod
    def json_object(obj: Mapping[str, Any]) -> bytes:
        return json.dumps(obj, indent=4).encode("utf-8")

    @staticmethod
    def _bar_template(bar_keys: Sequence[str]) -> str:
        # Safe to template: dates, the fixed keys and formatted numbers never need escaping.
        fields = ",".join(f'\n            "{key}": "{{}}"' for key in bar_keys)
        return '\n        "{}": {{' + fields + "\n        }}"

    @classmethod
    def series_json(cls, meta: Mapping[str, str], series_key: str, bar_keys: Sequence[str],
                    rows: Iterable[tuple[str, Sequence[str]]]) -> bytes:
        meta_text = json.dumps(meta, indent=4).replace("\n", "\n    ")
        template = cls._bar_template(bar_keys)
        bars = ",".join([template.format(stamp, *values) for stamp, values in rows])
        series = "{" + bars + "\n    }" if bars else "{}"
        text = ('{\n    "Meta Data": ' + meta_text + ",\n    " + _encode_string(series_key)
                + ": " + series + "\n}")
        return text.encode("utf-8")

    @staticmethod
    def csv(header: str, rows: Iterable[tuple[str, Sequence[str]]]) -> bytes:
        lines = [header] + [stamp + "," + ",".join(values) for stamp, values in rows]
        return ("\r\n".join(lines) + "\r\n").encode("ascii")


# ---------------------------------------------------------------------------------------------
# Rate limiting

@dataclass(frozen=True)
class Limits:
    """The caps that apply to one key; None means no cap."""

    per_second: int | None
    per_minute: int | None
    per_day: int | None


class RateLimiter:
    """Sliding windows per key (1 s and 60 s) plus a count per (key, day).

    Every request is recorded, throttled or not, so a client that keeps hammering stays
    throttled. A request violates a window when the earlier requests inside it (shortened by
    `tolerance`) already reach the cap: a client spaced at exactly the allowed rate passes
    even with a few milliseconds of scheduling jitter."""

    def __init__(self, tolerance: float = 0.01) -> None:
        self.tolerance = tolerance
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}
        self._daily: Counter[tuple[str, date]] = Counter()

    def admit(self, key: str, limits: Limits, now: float, day: date) -> str | None:
        """Record one request; return the kind of limit it broke, or None."""
        with self._lock:
            recent = self._recent.setdefault(key, deque())
            minute_edge = now - (60.0 - self.tolerance)
            while recent and recent[0] <= minute_edge:
                recent.popleft()
            second_edge = now - (1.0 - self.tolerance)
            in_second = 0
            for stamp in reversed(recent):
                if stamp <= second_edge:
                    break
                in_second += 1
            used_today = self._daily[(key, day)]
            recent.append(now)
            self._daily[(key, day)] += 1
        if limits.per_day is not None and used_today >= limits.per_day:
            return "per_day"
        if limits.per_second is not None and in_second >= limits.per_second:
            return "per_second"
        if limits.per_minute is not None and len(recent) - 1 >= limits.per_minute:
            return "per_minute"
        return None

    def used_today(self, key: str, day: date) -> int:
        with self._lock:
            return self._daily[(key, day)]

    def reset(self) -> None:
        with self._lock:
            self._recent.clear()
            self._daily.clear()


# ---------------------------------------------------------------------------------------------
# Faults

# kind -> (JSON key, text) for the faults that answer with an API message.
_MESSAGE_FAULTS: dict[str, tuple[str, str]] = {
    "throttle_note": ("Note", MSG_LEGACY_NOTE),
    "throttle_burst": ("Information", MSG_FREE_BURST),
    "throttle_daily": ("Information", MSG_FREE_DAILY),
    "throttle_daily_key": ("Information", MSG_FREE_DAILY_KEY),
    "premium_burst": ("Information", MSG_PREMIUM_BURST),
    "high_volume": ("Information", MSG_HIGH_VOLUME),
    "premium_endpoint": ("Information", MSG_PREMIUM_ENDPOINT),
    "premium_parameter": ("Information", MSG_PREMIUM_PARAMETER),
    "demo": ("Information", MSG_DEMO),
    "error_message": ("Error Message", MSG_INVALID_CALL),
}
FAULT_KINDS: frozenset[str] = frozenset(_MESSAGE_FAULTS) | {
    "latency", "http_500", "http_503", "html", "truncated", "reset", "stall", "empty"}
DEFAULT_RANDOM_FAULTS: tuple[str, ...] = ("http_503", "html", "truncated", "reset")


@dataclass
class Fault:
    """One queued fault: which requests it hits, how often, and its options."""

    kind: str
    remaining: int | None                 # None: every matching request, until cleared
    symbol: str | None = None
    function: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None          # latency and stall
    fraction: float = 0.5                 # truncated: share of the body sent

    def matches(self, request: ApiRequest) -> bool:
        if self.symbol is not None and (request.symbol or "").upper() != self.symbol.upper():
            return False
        if self.function is not None and (request.function or "").upper() != self.function.upper():
            return False
        return all(request.params.get(name) == value for name, value in self.params.items())


class FaultQueue:
    """Faults waiting for matching requests, in the order they were queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, request: ApiRequest) -> list[Fault]:
        """Consume every matching latency fault and the first matching other fault."""
        taken: list[Fault] = []
        with self._lock:
            other_taken = False
            for fault in list(self._faults):
                if not fault.matches(request):
                    continue
                if fault.kind != "latency":
                    if other_taken:
                        continue
                    other_taken = True
                taken.append(fault)
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
        return taken

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()


# ---------------------------------------------------------------------------------------------
# Request and reply

@dataclass(frozen=True)
class ApiRequest:
    """The query parameters of one GET /query (the last value wins, as in Django)."""

    params: dict[str, str]
    accepts_gzip: bool = False

    @classmethod
    def parse(cls, query: str, accept_encoding: str = "") -> ApiRequest:
        values = parse_qs(query, keep_blank_values=True)
        params = {name: items[-1] for name, items in values.items()}
        codings = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
        return cls(params, "gzip" in codings)

    def get(self, name: str) -> str | None:
        return self.params.get(name)

    def option(self, name: str, default: str) -> str:
        # An empty optional parameter behaves as if absent.
        return self.params.get(name) or default

    @property
    def function(self) -> str | None:
        return self.params.get("function")

    @property
    def symbol(self) -> str | None:
        return self.params.get("symbol")

    @property
    def apikey(self) -> str:
        return self.params.get("apikey", "")


class Payload:
    """A response body, with its gzip form computed once when a client asks for it."""

    def __init__(self, body: bytes, content_type: str = JSON_TYPE,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self._gzipped: bytes | None = None

    @property
    def compressible(self) -> bool:
        return self.content_type == JSON_TYPE

    def gzipped(self) -> bytes:
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.body, compresslevel=3, mtime=0)
        return self._gzipped


@dataclass
class Reply:
    """What the handler should do with one request."""

    payload: Payload
    status: int = 200
    outcome: str = "data"
    action: str | None = None             # None, "truncated", "reset" or "stall"
    delay: float = 0.0
    stall_seconds: float = 0.0
    truncate_fraction: float = 0.5
    log_entry: dict[str, Any] | None = None


def _message_reply(key: str, text: str, outcome: str) -> Reply:
    return Reply(Payload(WireFormat.message(key, text)), outcome=outcome)


# ---------------------------------------------------------------------------------------------
# Query service

class QueryService:
    """Decides the answer to one request, in the order the real service seems to:
    faults (infrastructure) -> API key -> rate limits -> function -> plan rules ->
    parameter validation -> data. Reads its settings from the emulator at every request,
    so tests may change them while the server runs."""

    _CACHED_BODIES = 16

    def __init__(self, emulator: AlphaVantageEmulator) -> None:
        self._emu = emulator
        self._bodies: OrderedDict[tuple[Any, ...], Payload] = OrderedDict()
        self._lock = threading.Lock()

    # -- entry point --------------------------------------------------------------------

    def resolve(self, request: ApiRequest, arrived: float) -> Reply:
        emu = self._emu
        faults = emu._faults.take(request)
        if all(f.kind == "latency" for f in faults):
            drawn = emu._draw_random_fault()
            if drawn is not None:
                faults.append(Fault(drawn, 1))
        delay = emu.latency + sum((f.seconds if f.seconds is not None else 1.0)
                                  for f in faults if f.kind == "latency")
        fault = next((f for f in faults if f.kind != "latency"), None)

        violation = None
        key_kind = emu.key_kind(request.apikey)
        if fault is not None:
            # Simulated infrastructure trouble: it never reaches the limiter.
            reply = self._fault_reply(fault, request, key_kind)
        elif key_kind is None:
            reply = _message_reply("Error Message", MSG_APIKEY, "error")
        else:
            limits = emu.limits_for(request.apikey)
            if limits is not None:
                violation = emu._limiter.admit(request.apikey, limits, arrived, emu.as_of)
            reply = self._throttle_reply(key_kind, violation) if violation else \
                self._answer(request, key_kind)
        reply.delay = delay
        reply.log_entry = emu._record(request, key_kind, reply, violation,
                                      [f.kind for f in faults])
        return reply

    # -- throttling and faults ----------------------------------------------------------

    @staticmethod
    def _throttle_reply(key_kind: str, violation: str) -> Reply:
        if key_kind == "premium":
            return _message_reply("Information", MSG_PREMIUM_BURST, "throttled")
        text = MSG_FREE_DAILY if violation == "per_day" else MSG_FREE_BURST
        return _message_reply("Information", text, "throttled")

    def _fault_reply(self, fault: Fault, request: ApiRequest, key_kind: str | None) -> Reply:
        outcome = f"fault:{fault.kind}"
        kind = fault.kind
        if kind in _MESSAGE_FAULTS:
            key, text = _MESSAGE_FAULTS[kind]
            text = text.format(key=request.apikey, function=request.function or "")
            return _message_reply(key, text, outcome)
        if kind == "empty":
            return Reply(Payload(WireFormat.json_object({})), outcome=outcome)
        if kind in ("http_500", "http_503", "html"):
            page = {"http_500": HTML_500_PAGE, "http_503": HTML_503_PAGE}.get(kind, HTML_ERROR_PAGE)
            status = {"http_500": 500, "http_503": 503}.get(kind, 200)
            return Reply(Payload(page.encode(), HTML_TYPE), status=status, outcome=outcome)
        if kind == "truncated":
            # Cut a genuine answer, so the client sees the start of a plausible body.
            whole = self._answer(request, key_kind) if key_kind else \
                _message_reply("Error Message", MSG_APIKEY, "error")
            return Reply(whole.payload, outcome=outcome, action="truncated",
                         truncate_fraction=fault.fraction)
        if kind == "reset":
            return Reply(Payload(b""), outcome=outcome, action="reset")
        if kind == "stall":
            seconds = 30.0 if fault.seconds is None else fault.seconds
            return Reply(Payload(b""), outcome=outcome, action="stall", stall_seconds=seconds)
        raise AssertionError(f"unhandled fault kind {kind}")

    # -- the API proper -----------------------------------------------------------------

    def _answer(self, request: ApiRequest, key_kind: str) -> Reply:
        emu = self._emu
        name = request.function or ""
        function = FUNCTIONS.get(name)
        if function is None:
            return _message_reply("Error Message", MSG_UNKNOWN_FUNCTION.format(function=name), "error")
        symbol = request.symbol or ""
        if key_kind == "demo" and symbol.upper() not in emu.demo_symbols:
            return _message_reply("Information", MSG_DEMO, "demo")
        if key_kind == "free" and (
                (name == "TIME_SERIES_INTRADAY" and not emu.free_intraday)
                or (name == "TIME_SERIES_DAILY_ADJUSTED" and not emu.free_daily_adjusted)):
            return _message_reply("Information", MSG_PREMIUM_ENDPOINT, "premium")
        if self._invalid(request, function):
            return _message_reply("Error Message", MSG_INVALID_CALL.format(function=name), "error")
        outputsize = request.option("outputsize", "compact").lower()
        if key_kind == "free" and name == "TIME_SERIES_DAILY" and outputsize == "full" \
                and not emu.free_full_daily:
            return _message_reply("Information", MSG_PREMIUM_PARAMETER, "premium")
        return Reply(self._data(request, function), outcome="data")

    def _invalid(self, request: ApiRequest, function: SeriesFunction) -> str | None:
        """The reason a request is an "Invalid API call", or None."""
        emu = self._emu
        symbol = request.symbol or ""
        if not SYMBOL_PATTERN.fullmatch(symbol):
            return "symbol"
        if symbol.upper() in {s.upper() for s in emu.unlisted_symbols}:
            return "unlisted symbol"
        if request.option("datatype", "json").lower() not in ("json", "csv"):
            return "datatype"
        if function.has_outputsize and request.option("outputsize", "compact").lower() not in (
                "compact", "full"):
            return "outputsize"
        if function.period == "intraday":
            if request.get("interval") not in INTERVALS:
                return "interval"
            for flag in ("extended_hours", "adjusted"):
                if request.option(flag, "true").lower() not in ("true", "false"):
                    return flag
            month = request.get("month")
            if month:
                found = MONTH_PATTERN.fullmatch(month)
                if not found or month < "2000-01" or month > emu.as_of.strftime("%Y-%m"):
                    return "month"
        return None

    def _data(self, request: ApiRequest, function: SeriesFunction) -> Payload:
        emu = self._emu
        symbol = request.symbol or ""
        datatype = request.option("datatype", "json").lower()
        outputsize = request.option("outputsize", "compact").lower()
        cache_key = (function.name, symbol, datatype, outputsize if function.has_outputsize else "",
                     request.get("interval"), request.get("month") or "",
                     request.option("extended_hours", "true").lower(),
                     request.option("adjusted", "true").lower(),
                     emu.as_of, emu._model.version(symbol), emu._model.generation)
        with self._lock:
            cached = self._bodies.get(cache_key)
            if cached is not None:
                self._bodies.move_to_end(cache_key)
                return cached
        payload = self._render(request, function, symbol, datatype, outputsize)
        with self._lock:
            self._bodies[cache_key] = payload
            while len(self._bodies) > self._CACHED_BODIES:
                self._bodies.popitem(last=False)
        return payload

    def _render(self, request: ApiRequest, function: SeriesFunction, symbol: str, datatype: str,
                outputsize: str) -> Payload:
        emu = self._emu
        series = emu._model.daily(symbol, emu.as_of)
        interval = request.get("interval") or ""
        if function.period == "intraday":
            rows = self._intraday_rows(request, series, interval, outputsize)
            last = rows[0][0] if rows else f"{emu.as_of.isoformat()} 00:00:00"
        else:
            compact = function.period == "daily" and outputsize == "compact"
            rows = series.wire_rows(function, 100 if compact else None)
            last = rows[0][0] if rows else emu.as_of.isoformat()

        if datatype == "csv":
            stem = function.file_stem.format(interval=interval)
            headers = (("Content-Disposition", f"attachment; filename={stem}_{symbol}.csv"),)
            return Payload(WireFormat.csv(function.csv_header, rows), CSV_TYPE, headers)

        size = "Full size" if outputsize == "full" else "Compact"
        meta: dict[str, str] = {"1. Information": function.information.format(interval=interval),
                                "2. Symbol": symbol, "3. Last Refreshed": last}
        if function.period == "intraday":
            meta.update({"4. Interval": interval, "5. Output Size": size, "6. Time Zone": "US/Eastern"})
        elif function.period == "daily":
            meta.update({"4. Output Size": size, "5. Time Zone": "US/Eastern"})
        else:
            meta["4. Time Zone"] = "US/Eastern"
        series_key = function.series_key.format(interval=interval)
        return Payload(WireFormat.series_json(meta, series_key, function.bar_keys, rows))

    def _intraday_rows(self, request: ApiRequest, series: DailySeries, interval: str,
                       outputsize: str) -> list[tuple[str, tuple[str, ...]]]:
        emu = self._emu
        minutes = INTERVALS[interval]
        extended = request.option("extended_hours", "true").lower() == "true"
        adjusted = request.option("adjusted", "true").lower() == "true"
        month = request.get("month")
        days = [bar.date for bar in series.bars]
        if month:
            first = date(int(month[:4]), int(month[5:7]), 1)
            following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
            days = days[bisect.bisect_left(days, first):bisect.bisect_left(days, following)]
        elif outputsize == "full":
            days = days[bisect.bisect_right(days, emu.as_of - timedelta(days=30)):]

        rows: list[tuple[str, tuple[str, ...]]] = []
        # No server has a bar that has not started yet: with as_of today (session_day()
        # after 16:30 New York time), the evening's extended-hours bars are still to come.
        started = _now_in_new_york()
        for day in reversed(days):
            bar = series.bars[series.index[day]]
            factor = bar.adjusted_close / bar.close if adjusted and bar.close else 1.0
            for item in reversed(emu._model.intraday_day(series, day, minutes)):
                start = item.timestamp.hour * 60 + item.timestamp.minute
                if (not extended and not in_regular_session(start, minutes)) or item.timestamp > started:
                    continue
                prices = tuple(_fmt_price(max(0.0001, round(p * factor, 4)))
                               for p in (item.open, item.high, item.low, item.close))
                rows.append((item.timestamp.strftime("%Y-%m-%d %H:%M:%S"), prices + (str(item.volume),)))
            if outputsize == "compact" and len(rows) >= 100:
                return rows[:100]
        return rows[:100] if outputsize == "compact" else rows


# ---------------------------------------------------------------------------------------------
# HTTP side

# Linux's SO_TIMESTAMPNS and SCM_TIMESTAMPNS (Python's socket module does not name them):
# the kernel stamps each received segment with the wall-clock time it arrived.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")


class _ArrivalReader(io.RawIOBase):
    """A connection's raw input that remembers when its last bytes reached this machine.

    A request is judged by the rate limits at the moment it arrived. Stamping it when the
    handler thread got round to it (after a wake-up, the GIL, parsing) is unfair to a correct
    client on a loaded machine: a request read 40 ms late looks 40 ms closer to the next one,
    and a client paced at exactly the allowed rate was throttled. The kernel's receive stamp
    (wall clock) is turned into our monotonic clock by its age; without one (not Linux), the
    moment the bytes were read is the best there is."""

    def __init__(self, connection: socket.socket) -> None:
        super().__init__()
        self._connection = connection
        self.arrived = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size, ancillary, _, _ = self._connection.recvmsg_into(
            [buffer], socket.CMSG_SPACE(_TIMESPEC.size))
        self.arrived = time.monotonic()
        for level, kind, data in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, _SO_TIMESTAMPNS) and len(data) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                age = max(0.0, time.time() - (seconds + nanoseconds / 1e9))
                self.arrived -= age
        return size


class _EmulatorServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, so stop() can cut them."""

    daemon_threads = True
    block_on_close = False      # joining would wait for stalled or idle keep-alive threads
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: QueryService,
                 emulator: AlphaVantageEmulator) -> None:
        self.service = service
        self.emulator = emulator
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, QueryHandler)

    def server_bind(self) -> None:
        # Accepted connections inherit it, and segments that arrive before accept() are
        # stamped too (_ArrivalReader).
        if sys.platform == "linux":
            self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().server_bind()

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def cut_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class QueryHandler(BaseHTTPRequestHandler):
    """Serves GET /query over HTTP/1.1 keep-alive; carries out latency and socket faults."""

    server: _EmulatorServer
    protocol_version = "HTTP/1.1"
    server_version = "cloudflare"
    disable_nagle_algorithm = True   # header and body go out as separate writes
    timeout = 120                    # an idle keep-alive connection is dropped eventually

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: it would keep the socket open
        self._arrival = _ArrivalReader(self.connection)
        self.rfile = io.BufferedReader(self._arrival)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes the request line to stderr, and the request line holds the key.
        return

    def do_GET(self) -> None:
        arrived = self._arrival.arrived  # when the request came in, not when we read it
        parts = urlsplit(self.path)
        if parts.path.rstrip("/") != "/query":
            self._send(404, Payload(HTML_404_PAGE.encode(), HTML_TYPE))
            return
        request = ApiRequest.parse(parts.query, self.headers.get("Accept-Encoding", ""))
        reply = self.server.service.resolve(request, arrived)
        self._deliver(reply, request.accepts_gzip)

    def _deliver(self, reply: Reply, accepts_gzip: bool) -> None:
        stopping = self.server.stopping
        if reply.delay > 0 and stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.action == "stall":
            stopping.wait(reply.stall_seconds)
            self.close_connection = True
            return
        if reply.action == "reset":
            self._reset()
            return
        gzip_it = (accepts_gzip and reply.action is None and reply.payload.compressible
                   and self.server.emulator.gzip_enabled)
        self._send(reply.status, reply.payload, gzip_it, reply.action == "truncated",
                   reply.truncate_fraction, reply.log_entry)

    def _send(self, status: int, payload: Payload, gzip_it: bool = False, truncate: bool = False,
              fraction: float = 0.5, log_entry: dict[str, Any] | None = None) -> None:
        body = payload.gzipped() if gzip_it else payload.body
        self.send_response(status)
        self.send_header("Content-Type", payload.content_type)
        for name, value in payload.headers + _SITE_HEADERS:
            self.send_header(name, value)
        if gzip_it:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if truncate:
            body = body[:min(len(body) - 1, max(1, int(len(body) * fraction)))]
            self.close_connection = True
        if log_entry is not None:
            # Counted before writing: a client that has read the answer must see the count.
            self.server.emulator._count_bytes(log_entry, len(body))
        try:
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _reset(self) -> None:
        # Linger 0 turns close() into a TCP RST: the client sees ECONNRESET, not a clean EOF.
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Facade

def _previous_weekday(today: date) -> date:
    day = today - timedelta(days=1)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def _now_in_new_york() -> datetime:
    """The wall clock in New York, naive (as the emulator's intraday stamps are)."""
    try:
        return datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)
    except ZoneInfoNotFoundError:  # no tz database here: UTC is close enough for a default
        return datetime.now(UTC).replace(tzinfo=None)


def _today_in_new_york() -> date:
    return _now_in_new_york().date()


def _as_date(value: date | str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(value)


class AlphaVantageEmulator:
    """A local Alpha Vantage: start it, point the client at `base_url`, inspect the counters.

    Settings are plain attributes read at every request, so a test can change them while the
    server runs. Keys: `demo` serves IBM only; keys in `premium_keys` get their per-minute
    plan; every other non-empty key is a free key (unless `accept_unknown_keys` is False).

    Choices where the real API's behaviour is unknown:
    - every request with an accepted key counts against its windows and daily quota, even
      when it is throttled or refused (premium endpoint, bad parameter);
    - the daily quota counts against the `as_of` date, so advancing it starts a new day;
    - the demo key is not rate limited; injected faults never reach the limiter and are
      never violations (latency faults excepted: they only delay a normal answer);
    - rate limits are checked before the function and parameters are validated."""

    demo_key = "demo"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 free_keys: Iterable[str] = ("FREEKEY",),
                 premium_keys: Mapping[str, int] | None = None,
                 accept_unknown_keys: bool = True,
                 free_per_second: int | None = 1, free_per_minute: int | None = None,
                 free_per_day: int | None = 25,
                 premium_per_second: int | None = None, premium_per_day: int | None = None,
                 free_intraday: bool = False, free_daily_adjusted: bool = False,
                 free_full_daily: bool = False,
                 demo_symbols: Iterable[str] = ("IBM",),
                 unlisted_symbols: Iterable[str] = ("INVALID", "NOSUCH"),
                 as_of: date | str | None = None, history_start: date | str = date(2000, 1, 3),
                 skip_holidays: bool = True, sessions: Callable[[date], bool] | None = None,
                 latency: float = 0.0, fault_rate: float = 0.0,
                 fault_kinds: Sequence[str] = DEFAULT_RANDOM_FAULTS, fault_seed: int = 0,
                 tolerance: float = 0.01, gzip_enabled: bool = True) -> None:
        self.host, self.port = host, port
        self.free_keys: set[str] = set(free_keys)
        self.premium_keys: dict[str, int] = dict({"PREMIUMKEY": 75} if premium_keys is None
                                                 else premium_keys)
        self.accept_unknown_keys = accept_unknown_keys
        self.free_per_second, self.free_per_minute, self.free_per_day = (
            free_per_second, free_per_minute, free_per_day)
        self.premium_per_second, self.premium_per_day = premium_per_second, premium_per_day
        self.free_intraday = free_intraday
        self.free_daily_adjusted = free_daily_adjusted
        self.free_full_daily = free_full_daily
        self.demo_symbols: set[str] = {s.upper() for s in demo_symbols}
        self.unlisted_symbols: set[str] = set(unlisted_symbols)
        self.as_of = as_of if as_of is not None else _previous_weekday(_today_in_new_york())
        self.latency = latency
        self.fault_rate = fault_rate
        self.fault_kinds: Sequence[str] = tuple(fault_kinds)
        self._fault_rng = random.Random(fault_seed)
        self.gzip_enabled = gzip_enabled

        self._calendar = TradingCalendar(skip_holidays, sessions)
        self._model = PriceModel(self._calendar, _as_date(history_start))
        self._limiter = RateLimiter(tolerance)
        self._faults = FaultQueue()
        self._service = QueryService(self)
        self._state_lock = threading.Lock()
        self._server: _EmulatorServer | None = None
        self._thread: threading.Thread | None = None
        self.reset_counters()

    # -- settings that need conversion --------------------------------------------------

    @property
    def as_of(self) -> date:
        """The last date with data; also the day the daily quota counts against."""
        return self._as_of

    @as_of.setter
    def as_of(self, value: date | str) -> None:
        self._as_of = _as_date(value)

    @property
    def history_start(self) -> date:
        return self._model.history_start

    @history_start.setter
    def history_start(self, value: date | str) -> None:
        self._model.history_start = _as_date(value)

    @property
    def tolerance(self) -> float:
        return self._limiter.tolerance

    @tolerance.setter
    def tolerance(self, value: float) -> None:
        self._limiter.tolerance = value

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = _EmulatorServer((self.host, self.port), self._service, self)
        self.port = self._server.server_address[1]
        # A short poll keeps stop() quick: shutdown() waits for the loop's next wake-up.
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02},
                                        name=f"alphavantage-emulator:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()           # wakes stalls and latency sleeps
        server.shutdown()
        server.server_close()
        server.cut_connections()        # idle keep-alive readers get EOF and exit
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        """http://host:port, without a path."""
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The /query endpoint, the value for ALPHA_VANTAGE_BASE_URL."""
        return self.origin + "/query"

    url = base_url

    # -- keys and limits ----------------------------------------------------------------

    @staticmethod
    def key_fingerprint(key: str) -> str:
        """A short, one-way label for a key: what the request log stores instead of it."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12] if key else ""

    def key_kind(self, key: str) -> str | None:
        """Classify a key: "demo", "premium", "free", or None when the API would reject it."""
        if not key:
            return None
        if key == self.demo_key:
            return "demo"
        if key in self.premium_keys:
            return "premium"
        if key in self.free_keys or self.accept_unknown_keys:
            return "free"
        return None

    def limits_for(self, key: str) -> Limits | None:
        """The caps on `key`; None for the demo key (shared, not limited here) or a rejected key.
        A premium plan allows ceil(per_minute / 60) per second unless premium_per_second is set."""
        kind = self.key_kind(key)
        if kind == "premium":
            per_minute = self.premium_keys[key]
            per_second = self.premium_per_second
            if per_second is None:
                per_second = math.ceil(per_minute / 60)
            return Limits(per_second, per_minute, self.premium_per_day)
        if kind == "free":
            return Limits(self.free_per_second, self.free_per_minute, self.free_per_day)
        return None

    # -- test helpers: data -------------------------------------------------------------

    def daily_bars(self, symbol: str, as_of: date | str | None = None) -> list[dict[str, Any]]:
        """The daily bars the API would serve for `symbol`, oldest first, as plain data:
        date (datetime.date), open, high, low, close, adjusted_close (floats as on the wire),
        volume (int), dividend_amount, split_coefficient (floats)."""
        day = self.as_of if as_of is None else _as_date(as_of)
        return [bar.as_dict() for bar in self._model.daily(symbol, day).bars]

    def weekly_bars(self, symbol: str) -> list[dict[str, Any]]:
        """Weekly bars as served (oldest first), keyed by the week's last trading day."""
        return [bar.as_dict() for bar in self._model.daily(symbol, self.as_of).weekly()]

    def monthly_bars(self, symbol: str) -> list[dict[str, Any]]:
        """Monthly bars as served (oldest first), keyed by the month's last trading day."""
        return [bar.as_dict() for bar in self._model.daily(symbol, self.as_of).monthly()]

    def splits(self, symbol: str) -> dict[date, float]:
        """Split ex-dates and ratios of a symbol (including ones not yet reached by as_of)."""
        return dict(self._model.splits(symbol))

    def revise(self, symbol: str, day: date | str, **fields: float) -> None:
        """Override fields of one daily bar (a data correction): open, high, low, close,
        adjusted_close, volume, dividend_amount. A revised close or dividend also moves the
        adjusted closes before it."""
        self._model.revise(symbol, _as_date(day), fields)

    def add_split(self, symbol: str, day: date | str, ratio: float) -> None:
        """Place a split (ratio 2.0 = 2-for-1) on a trading day; ratio 1.0 removes one."""
        self._model.add_split(symbol, _as_date(day), ratio)

    def misdate(self, symbol: str, drop: Iterable[date | str] = (),
                add: Iterable[date | str] = (), correct: Iterable[date | str] = ()) -> None:
        """A vendor's calendar mistakes: no bar on the trading days `drop`, a bar on each
        day of `add` even when the exchange was closed (a holiday, a weekend); `correct`
        undoes either for its days."""
        self._model.misdate(symbol, map(_as_date, drop), map(_as_date, add),
                            map(_as_date, correct))

    def trading_days(self, start: date | str, end: date | str) -> list[date]:
        return self._calendar.days(_as_date(start), _as_date(end))

    def advance(self, days: int = 1) -> date:
        """Move as_of forward by `days` trading days (new bars appear); returns the new as_of."""
        day = self.as_of
        for _ in range(days):
            day = self._calendar.on_or_after(day + timedelta(days=1))
        self.as_of = day
        return day

    # -- test helpers: faults -----------------------------------------------------------

    def inject(self, kind: str, times: int | None = 1, symbol: str | None = None,
               function: str | None = None, *, seconds: float | None = None,
               fraction: float = 0.5, **params: str) -> Fault:
        """Queue a fault for the next `times` matching requests (None: until cleared).

        Match on symbol, function and any other query parameter given as a keyword
        (e.g. outputsize="full"). Options: seconds (latency, stall), fraction (truncated)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {sorted(FAULT_KINDS)}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for every matching request")
        fault = Fault(kind, times, symbol, function, {k: str(v) for k, v in params.items()},
                      seconds, fraction)
        self._faults.add(fault)
        return fault

    def pending_faults(self) -> list[Fault]:
        return self._faults.pending()

    def clear_faults(self) -> None:
        self._faults.clear()

    def _draw_random_fault(self) -> str | None:
        if self.fault_rate <= 0 or not self.fault_kinds:
            return None
        with self._state_lock:
            if self._fault_rng.random() >= self.fault_rate:
                return None
            return self._fault_rng.choice(list(self.fault_kinds))

    # -- counters -----------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the counters, the request log and the rate-limit windows (not queued faults)."""
        with self._state_lock:
            self.request_count = 0
            self.violations = 0
            self.violations_by_kind: Counter[str] = Counter()
            self.faults_applied: Counter[str] = Counter()
            self.outcomes: Counter[str] = Counter()
            self.requests: list[dict[str, Any]] = []
            self.bytes_sent = 0
        self._limiter.reset()

    def used_today(self, key: str) -> int:
        """Requests counted against `key` on the current as_of day."""
        return self._limiter.used_today(key, self.as_of)

    def _record(self, request: ApiRequest, key_kind: str | None, reply: Reply,
                violation: str | None, faults: list[str]) -> dict[str, Any]:
        entry = {
            "time": time.time(),
            "function": request.function,
            "symbol": request.symbol,
            "interval": request.get("interval"),
            "outputsize": request.get("outputsize"),
            "datatype": request.get("datatype"),
            "month": request.get("month"),
            "key_kind": key_kind or "missing",
            "key_fingerprint": self.key_fingerprint(request.apikey),
            "outcome": reply.outcome,
            "status": reply.status,
            "violation": violation,
            "faults": faults,
            "bytes": 0,
        }
        with self._state_lock:
            self.request_count += 1
            self.outcomes[reply.outcome] += 1
            if violation:
                self.violations += 1
                self.violations_by_kind[violation] += 1
            for kind in faults:
                self.faults_applied[kind] += 1
            self.requests.append(entry)
        return entry

    def _count_bytes(self, entry: dict[str, Any], sent: int) -> None:
        with self._state_lock:
            self.bytes_sent += sent
            entry["bytes"] = sent


# ---------------------------------------------------------------------------------------------
# Command line

def _premium_key(text: str) -> tuple[str, int]:
    key, sep, per_minute = text.rpartition(":")
    if not sep or not key or not per_minute.isdigit() or int(per_minute) < 1:
        raise argparse.ArgumentTypeError("expected KEY:PER_MINUTE, e.g. MYKEY:75")
    return key, int(per_minute)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.alphavantage_emulator",
                                     description="Serve a local Alpha Vantage API emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--free-key", action="append", default=[], metavar="KEY")
    parser.add_argument("--premium-key", action="append", default=[], type=_premium_key,
                        metavar="KEY:PER_MINUTE")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--as-of", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD")
    args = parser.parse_args(argv)

    options: dict[str, Any] = {"host": args.host, "port": args.port, "latency": args.latency,
                               "as_of": args.as_of}
    if args.free_key:
        options["free_keys"] = args.free_key
    if args.premium_key:
        options["premium_keys"] = dict(args.premium_key)
    finished = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: finished.set())
    with AlphaVantageEmulator(**options) as emulator:
        print(emulator.base_url, flush=True)
        print(f"serving data up to {emulator.as_of}; {len(emulator.free_keys)} free and "
              f"{len(emulator.premium_keys)} premium keys configured; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        try:
            while not finished.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
