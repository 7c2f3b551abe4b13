"""Campaign B, area 3 (continued): bars that cannot be real, end to end.

A server answers some symbols of a batch with bars that cannot have happened (dated
2200-01-01 or 9999-12-31, or after today's date even in UTC+14, the furthest-ahead time
zone), zero or missing prices, daily stamps that are not exactly a date, or a Meta Data
naming another symbol. Through the real command line (a child process) or the library with
its clock set (never the machine's date where "today" decides the verdict), over a real
socket: each such dataset fails with a line naming its first bad bar and stores nothing
(its file absent, or byte-identical to before); the other symbols of the batch are updated.
The same classes drive the parser properties in test_hostile_input.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest

from secure_ohlcv_downloader import DatasetId, DatasetResult, latest_session
from tests.campaign.test_hostile_input import HostileServer, run_batch
from tests.lifecycle_fixtures import Site, headless_site

Row = tuple[str, tuple[str | None, ...]]  # stamp, (open, high, low, close, volume); None: absent
GOOD = ("10.0000", "11.0000", "9.0000", "10.5000", "1000")
FIELDS = ("open", "high", "low", "close", "volume")


def weekdays(last: date, count: int) -> list[str]:
    """`count` weekdays up to `last`, newest first, as Alpha Vantage lists them."""
    days, day = [], last
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day.isoformat())
        day -= timedelta(days=1)
    return days


def good_rows(stamps: list[str]) -> list[Row]:
    return [(stamp, GOOD) for stamp in stamps]


def csv_body(rows: list[Row]) -> bytes:
    lines = ["timestamp," + ",".join(FIELDS)]
    lines += [stamp + "," + ",".join(cell or "" for cell in cells) for stamp, cells in rows]
    return ("\r\n".join(lines) + "\r\n").encode()


def json_body(echo: str, rows: list[Row], interval: str = "daily") -> bytes:
    """Alpha Vantage's layout: Meta Data (its keys for the function), then the series."""
    keys = [f"{n}. {name}" for n, name in enumerate(FIELDS, 1)]
    series = {stamp: {k: v for k, v in zip(keys, cells, strict=True) if v is not None}
              for stamp, cells in rows}
    if interval == "daily":
        meta = {"1. Information": "Daily Prices (open, high, low, close) and Volumes",
                "2. Symbol": echo, "3. Last Refreshed": rows[0][0], "4. Output Size": "Full size",
                "5. Time Zone": "US/Eastern"}
        key = "Time Series (Daily)"
    else:
        meta = {"1. Information": f"Intraday ({interval}) open, high, low, close prices and volume",
                "2. Symbol": echo, "3. Last Refreshed": rows[0][0], "4. Interval": interval,
                "5. Output Size": "Full size", "6. Time Zone": "US/Eastern"}
        key = f"Time Series ({interval})"
    return json.dumps({"Meta Data": meta, key: series}, indent=4).encode()


def line_of(stdout: str, symbol: str) -> str:
    return next((line for line in stdout.splitlines() if line.startswith(f"{symbol} ")), "")


def serving(site: Site, server: HostileServer, **variables: str) -> dict[str, str]:
    return site.env(ALPHA_VANTAGE_API_KEY="K", ALPHA_VANTAGE_BASE_URL=server.base_url,
                    OHLCV_MAX_RETRIES="0", OHLCV_RATE_LIMIT_PER_MINUTE="6000", **variables)


# -- through the command line: verdicts that no clock can change ---------------------------

def impossible_cases(days: list[str]) -> dict[str, tuple[Callable[[str], bytes], str]]:
    """symbol -> (its body, given the symbol; the text its FAILED line must contain).
    `days`: five past weekdays, newest first; days[2] is a bar in the middle."""
    def with_bar(bar: Row) -> list[Row]:
        rows = good_rows(days)
        rows[2] = bar
        return rows

    mid = days[2]
    future = [("9999-12-31", GOOD), ("2200-01-01", GOOD), *good_rows(days)]
    return {
        "FUTJ": (lambda s: json_body(s, future), "2200-01-01"),  # the first bad bar, oldest first
        "FUTC": (lambda s: csv_body([("9999-12-31", GOOD), *good_rows(days)]), "9999-12-31"),
        "ZEROC": (lambda s: csv_body(with_bar((mid, ("0.0000",) * 4 + ("0",)))), mid),
        "ZEROJ": (lambda s: json_body(s, with_bar((mid, ("10.0000", "11.0000", "0.0000", "10.5000", "5")))), mid),
        "MISSJ": (lambda s: json_body(s, with_bar((mid, ("10.0000", "11.0000", "9.0000", None, "5")))), mid),
        "MISSC": (lambda s: csv_body(with_bar((mid, ("", "11.0000", "9.0000", "10.5000", "5")))), mid),
        "GARBC": (lambda s: csv_body(with_bar((mid + "garbage", GOOD))), mid + "garbage"),
        "OFFSJ": (lambda s: json_body(s, with_bar((mid + "T23:00:00-12:00", GOOD))), mid + "T23:00:00-12:00"),
        "OTHER": (lambda s: json_body("MSFT", good_rows(days)), "MSFT"),
    }


def test_impossible_bars_fail_their_symbol_store_nothing_and_the_batch_goes_on(tmp_path, figures):
    """Each class, fresh (its file must stay absent) and over a stored dataset (its file must
    stay byte-identical), in one batch with a good CSV symbol and a JSON answer echoing the
    symbol in lower case (accepted: Alpha Vantage echoes the case it was asked in)."""
    days = weekdays(latest_session(), 5)
    cases = impossible_cases(days)
    stored = [symbol + "S" for symbol in cases]
    accepted = {"GOOD": lambda s: csv_body(good_rows(days)),
                "LOWER": lambda s: json_body(s.lower(), good_rows(days))}
    site = headless_site(tmp_path, key_in_variable=True)
    bodies = {s: make(s) for s, make in accepted.items()} | {s: csv_body(good_rows(days)) for s in stored}
    with HostileServer(bodies) as server:
        env = serving(site, server)
        first = run_batch([{"argv": ["download", *bodies]}], site.cwd, env)[0]
        assert first["code"] == 0, first
        before = site.files()
        for symbol, (make, _) in cases.items():
            bodies[symbol], bodies[symbol + "S"] = make(symbol), make(symbol + "S")
        run = run_batch([{"argv": ["download", *accepted, *cases, *stored, "--full"]}], site.cwd, env)[0]
    after = site.files()
    broken: dict[str, object] = {}
    for symbol in accepted:
        # fetched and stored again: updated, or unchanged (the same bars as before)
        if not re.search(r"daily: (updated|unchanged),", line_of(run["stdout"], symbol)):
            broken[symbol] = line_of(run["stdout"], symbol) or run["stdout"][-300:]
    for symbol, (_, needle) in cases.items():
        for name in (symbol, symbol + "S"):
            line = line_of(run["stdout"], name)
            rel = site.file_of(DatasetId(name)).relative_to(site.data_dir).as_posix()
            kept = after.get(rel) == before.get(rel)  # absent before and after, or the same bytes
            if not (line.startswith(f"{name} daily: FAILED: ") and needle in line and kept):
                broken[name] = (line or run["stdout"][-300:], "file changed" if not kept else "")
    if run["code"] != 1 or "Traceback" in run["stderr"] or "internal error" in run["stderr"]:
        broken["run"] = (run["code"], run["stderr"][-300:])
    tried = 2 * len(cases) + len(accepted)
    figures.record("hostile/impossible-bars-end-to-end", tried=tried, held=tried - len(broken),
                   notes=f"classes: {sorted(cases)}; accepted: {sorted(accepted)}")
    if broken:
        pytest.fail(f"impossible bars not refused by name, or the batch did not go on: {broken}",
                    pytrace=False)


# -- through the library, its clock set: the edge of "today" --------------------------------

# Monday 3 June 2024, 11:00 in New York: already 05:00 on Tuesday 4 June in UTC+14.
NOW = datetime(2024, 6, 3, 15, 0, tzinfo=UTC)
# 04:00 in New York, 22:00 in UTC+14: the same date, 3 June, in both.
EARLY = datetime(2024, 6, 3, 8, 0, tzinfo=UTC)
UP_TO_TUESDAY = weekdays(date(2024, 6, 4), 5)   # 2024-06-04 ... 2024-05-29
UP_TO_FRIDAY = weekdays(date(2024, 5, 31), 5)
MINUTES = ["2024-06-03 11:00:00", "2024-06-03 10:55:00", "2024-06-03 10:50:00", "2024-06-03 10:45:00"]


def download_at(site: Site, server: HostileServer, clock: datetime, symbols: list[str],
                **options: str) -> dict[str, DatasetResult]:
    """One download run of the library, its clock fixed at `clock`."""
    app = site.app(ALPHA_VANTAGE_API_KEY="K", ALPHA_VANTAGE_BASE_URL=server.base_url,
                   OHLCV_MAX_RETRIES="0", OHLCV_RATE_LIMIT_PER_MINUTE="6000")
    app.ctx.clock = lambda: clock
    report = app.download(symbols, **options)
    return {r.dataset.symbol: r for r in report.results}


def test_a_bar_may_be_dated_up_to_today_in_utc_plus_14_and_no_later(tmp_path, figures):
    """At 11:00 in New York on 3 June 2024: a Shanghai bar dated 4 June (tomorrow in New
    York, today in UTC+14) is stored; a bar of 5 June fails its symbol. At 04:00 in New York
    (22:00 on 3 June in UTC+14) a bar of 4 June fails. Intraday: a bar that started at now is
    stored, one at 11:30 (after now) fails. Every failure names the bar, stores nothing, and
    the good symbols of the same run are updated."""
    site = headless_site(tmp_path, key_in_variable=True)
    bodies = {
        "600104.SHH": json_body("600104.SHH", good_rows(UP_TO_TUESDAY)),
        "AHEAD": csv_body([("2024-06-05", GOOD), *good_rows(UP_TO_TUESDAY)]),
        "AHEADJ": json_body("AHEADJ", [("2024-06-05", GOOD), *good_rows(UP_TO_TUESDAY)]),
        "GOODNOW": csv_body(good_rows(UP_TO_FRIDAY)),
        "000002.SHZ": json_body("000002.SHZ", good_rows(UP_TO_TUESDAY)),
        "EARLYOK": csv_body(good_rows(UP_TO_FRIDAY)),
        "INTRA": json_body("INTRA", good_rows(MINUTES), "5min"),
        "INTRAF": csv_body([("2024-06-03 11:30:00", GOOD), *good_rows(MINUTES)]),
        "INTRAFJ": json_body("INTRAFJ", [("2024-06-03 11:30:00", GOOD), *good_rows(MINUTES)], "5min"),
    }
    expected = {  # symbol -> (outcome, text its result must carry: the last bar or the bad one)
        "600104.SHH": ("updated", "2024-06-04"), "GOODNOW": ("updated", "2024-05-31"),
        "AHEAD": ("failed", "2024-06-05"), "AHEADJ": ("failed", "2024-06-05"),
        "000002.SHZ": ("failed", "2024-06-04"), "EARLYOK": ("updated", "2024-05-31"),
        "INTRA": ("updated", "2024-06-03"),
        "INTRAF": ("failed", "2024-06-03 11:30:00"), "INTRAFJ": ("failed", "2024-06-03 11:30:00"),
    }
    with HostileServer(bodies) as server:
        results = download_at(site, server, NOW, ["600104.SHH", "AHEAD", "AHEADJ", "GOODNOW"])
        results |= download_at(site, server, EARLY, ["000002.SHZ", "EARLYOK"])
        results |= download_at(site, server, NOW, ["INTRA", "INTRAF", "INTRAFJ"],
                               interval="5min", month="2024-06")
    files = site.files()
    broken: dict[str, object] = {}
    for symbol, (outcome, needle) in expected.items():
        result = results[symbol]
        shown = result.error if outcome == "failed" else result.last_bar
        rel = site.file_of(result.dataset).relative_to(site.data_dir).as_posix()
        if result.outcome != outcome or needle not in shown or (rel in files) != (outcome == "updated"):
            broken[symbol] = (result.outcome, result.line(), sorted(files))
    assert site.app().load("600104.SHH").index[-1] == datetime(2024, 6, 4)
    figures.record("hostile/future-bars-at-the-date-line", tried=len(expected),
                   held=len(expected) - len(broken))
    if broken:
        pytest.fail(f"the date line is not where it should be: {broken}", pytrace=False)
