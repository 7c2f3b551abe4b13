"""Campaign B, area 3: hostile input, property-based.

What is attacked, and the property each test holds the product to:

* the response classifier and the parser (classify_response, parse_payload) on arbitrary
  bytes, arbitrary JSON, near-valid series and arbitrary CSV: nothing raises outside our
  error family (OHLCVError), and a table that is accepted is a valid one (docs/FORMAT.md
  invariants; never empty, since the JSON form of an empty series is refused) of real bars
  (no zero price, none dated after the parser's clock, daily stamps exactly a date, not
  another symbol's answer: test_hostile_bars.py drives the same classes end to end); the CSV and
  JSON forms of the same bars give the same verdict and the same table (README: "Both give
  the same data"); end to end, a hostile body fails its own symbol, not the whole run;
* symbols, intervals and months: refused (UsageError, exit 2) or mapped to a path inside
  the data directory; nothing is ever written outside it;
* configuration values: every value is either accepted and usable, or refused with
  ConfigError naming the variable (exit 3 on the command line), never echoing a secret;
* archives for --verify-backup and --recover: byte-level and member-level mutations,
  truncation, oversized members, traversal and absolute names, links and devices, a
  manifest with the wrong structure: refused and named, nothing accepted that differs from
  what was backed up, nothing written outside the store.

Property tests use hypothesis with `campaign_budget(50, 1000)` examples. Where one test
covers several classes of input, violations are collected (one smallest example per class)
and reported together, so a run names every defect class at once; figures record tried and
held. Command-line checks run the real CLI in subprocesses against real files, and the
emulator or a small hostile HTTP server over a real socket.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import tarfile
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from config import VARIABLES, ConfigError, load_settings
from secure_ohlcv_downloader import (
    INTERVALS,
    INTRADAY,
    MAX_MEMBER_BYTES,
    RATE_SLACK,
    Classified,
    DatasetId,
    EncryptedStore,
    KeyRing,
    OHLCVError,
    Outcome,
    UsageError,
    classify_response,
    columns_for,
    dataset_files,
    decode_table,
    latest_session,
    parse_payload,
    validate_bars,
    verify_backup,
)
from tests.campaign.figures import campaign_budget
from tests.download_fixtures import PREMIUM_KEY, PREMIUM_PER_MINUTE
from tests.foundation_fixtures import REPO, headless_env, new_key_ring
from tests.lifecycle_fixtures import (
    file_member,
    headless_site,
    link_member,
    read_members,
    sample_datasets,
    snapshot,
    write_members,
)

EXAMPLES = campaign_budget(50, 1000)
ARCHIVE_EXAMPLES = campaign_budget(25, 600)
PRODUCT_FILES = ("secure_ohlcv_downloader.py", "secure_ohlcv_cli.py", "config.py")


def _settings(examples: int = EXAMPLES) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- collecting violations -----------------------------------------------------------------

class Tally:
    """Examples tried and held; one (smallest) example per class of violation."""

    def __init__(self) -> None:
        self.tried = 0
        self.held = 0
        self.violations: dict[str, str] = {}

    def add(self, problem: tuple[str, str] | None) -> None:
        self.tried += 1
        if problem is None:
            self.held += 1
            return
        kind, detail = problem
        if kind not in self.violations or len(detail) < len(self.violations[kind]):
            self.violations[kind] = detail

    def report(self) -> str:
        return "\n".join(f"- {kind}\n    e.g. {detail}" for kind, detail in sorted(self.violations.items()))


def run_property(strategy: st.SearchStrategy, check: Callable[[Any], tuple[str, str] | None],
                 figures, area: str, *, examples: list[Any] = (), budget: int = EXAMPLES,
                 notes: str = "") -> Tally:
    """Run `check` on `budget` drawn values (and the explicit `examples`), collecting every
    class of violation; record the figures; fail naming each class with an example."""
    tally = Tally()

    def prop(value: Any) -> None:
        tally.add(check(value))

    test = given(strategy)(prop)
    for value in examples:
        test = example(value)(test)
    _settings(budget)(test)()
    held_note = notes + (f"; violation classes: {sorted(tally.violations)}" if tally.violations else "")
    figures.record(area, tried=tally.tried, held=tally.held, notes=held_note)
    if tally.violations:
        pytest.fail(f"{area}: {tally.tried - tally.held} of {tally.tried} inputs broke the "
                    f"property:\n{tally.report()}", pytrace=False)
    return tally


def crash_kind(exc: BaseException) -> str:
    """`ExcType at function (file:line)`, the innermost frame in a product file."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.basename(f.filename) in PRODUCT_FILES]
    where = f" at {frames[-1].name} ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" \
        if frames else ""
    return f"{type(exc).__name__}{where}"


# -- the real command line, several invocations per child process ------------------------

BATCH_DRIVER = r"""
import io, json, os, stat, sys
sys.path.insert(0, sys.argv[1])
with open(sys.argv[2]) as handle:
    jobs = json.load(handle)
import secure_ohlcv_cli
base_env, base_cwd, results = dict(os.environ), os.getcwd(), []
for job in jobs:
    os.environ.clear()
    os.environ.update(base_env)
    for name, value in job.get("env", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.chdir(job.get("cwd") or base_cwd)
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        code = secure_ohlcv_cli.main(job["argv"])
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    out.flush()
    results.append({"code": code, "stdout": out.buffer.getvalue().decode("utf-8", "replace"),
                    "stderr": err.getvalue()})
with open(sys.argv[3], "w") as handle:
    json.dump(results, handle)
"""


def run_batch(jobs: list[dict], cwd: Path, env: dict[str, str]) -> list[dict]:
    """Run `secure_ohlcv_cli.main(argv)` for each job ({"argv", "cwd"?, "env"?}) in one
    child process (the imports are paid once), each with its own stdout and stderr."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="campaign-batch-") as scratch:
        spec, out = Path(scratch, "jobs.json"), Path(scratch, "results.json")
        spec.write_text(json.dumps(jobs))
        child = subprocess.run([sys.executable, "-c", BATCH_DRIVER, str(REPO), str(spec), str(out)],
                               cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=300, check=False)
        assert child.returncode == 0 and out.exists(), child.stderr[-2000:]
        return json.loads(out.read_text())


# =========================================================================================
# The classifier and the parser
# =========================================================================================

DATASETS = (DatasetId("IBM"), DatasetId("IBM", adjusted=True), DatasetId("IBM", "weekly", True),
            DatasetId("IBM", "monthly"), DatasetId("IBM", "5min", month="2024-01"))
MESSAGE_KEYS = ("Information", "Note", "Error Message")

# The parser's clock in these properties (never the machine's): Monday 3 June 2024, 11:00 in
# New York, already 05:00 on Tuesday 4 June in UTC+14, the furthest-ahead time zone.
CAMPAIGN_NOW = datetime(2024, 6, 3, 15, 0, tzinfo=UTC)
LATEST_DATE = CAMPAIGN_NOW.astimezone(timezone(timedelta(hours=14))).date()  # 2024-06-04
# Stamps of bars that cannot have happened by CAMPAIGN_NOW, and the latest that can.
FUTURE_STAMPS = {False: ("2200-01-01", "9999-12-31", str(LATEST_DATE + timedelta(days=1))),
                 True: ("2200-01-01 09:30:00", "9999-12-31 19:55:00", "2024-06-03 11:30:00",
                        "2024-06-04 04:00:00")}
EDGE_STAMPS = {False: (str(LATEST_DATE), "2024-06-03"),  # tomorrow in New York: allowed
               True: ("2024-06-03 11:00:00", "2024-06-03 10:55:00")}
PRICES = ("open", "high", "low", "close", "adjusted_close")

# column -> (JSON bar key, CSV header name), per dataset kind, as Alpha Vantage sends them
_PLAIN_WIRE = {"open": ("1. open", "open"), "high": ("2. high", "high"), "low": ("3. low", "low"),
               "close": ("4. close", "close"), "volume": ("5. volume", "volume")}
_DAILY_ADJ_WIRE = {**{k: v for k, v in _PLAIN_WIRE.items() if k != "volume"},
                   "adjusted_close": ("5. adjusted close", "adjusted_close"),
                   "volume": ("6. volume", "volume"),
                   "dividend_amount": ("7. dividend amount", "dividend_amount"),
                   "split_coefficient": ("8. split coefficient", "split_coefficient")}
_PERIOD_ADJ_WIRE = {**{k: v for k, v in _PLAIN_WIRE.items() if k != "volume"},
                    "adjusted_close": ("5. adjusted close", "adjusted close"),
                    "volume": ("6. volume", "volume"),
                    "dividend_amount": ("7. dividend amount", "dividend amount")}
SERIES_KEY = {"daily": "Time Series (Daily)", "weekly": "Weekly Time Series",
              "monthly": "Monthly Time Series", "5min": "Time Series (5min)"}


def wire(dataset: DatasetId) -> dict[str, tuple[str, str]]:
    if not dataset.adjusted:
        return _PLAIN_WIRE
    return _DAILY_ADJ_WIRE if dataset.interval == "daily" else _PERIOD_ADJ_WIRE


def table_problem(frame: pd.DataFrame, dataset: DatasetId) -> str | None:
    """Why an accepted table is not a valid one (docs/FORMAT.md), or one that holds a bar
    that cannot be real (a zero price, a bar after CAMPAIGN_NOW); None when it is sound."""
    wanted = columns_for(dataset)
    if list(frame.columns) != wanted:
        return f"columns {list(frame.columns)}, expected {wanted}"
    if frame.empty:
        return "an empty series was accepted (its JSON form is refused as EMPTY)"
    stamps = frame["timestamp"]
    if stamps.isna().any():
        return "a missing timestamp was accepted"
    if stamps.duplicated().any() or not stamps.is_monotonic_increasing:
        return "timestamps not unique and oldest first"
    if (dataset.interval in INTRADAY) != (stamps.dt.tz is not None):
        return "intraday timestamps must carry the market time zone, others none"
    values = frame[wanted[1:]].to_numpy(dtype="float64")
    if not np.isfinite(values).all():
        return "a non-finite number was accepted"
    if frame["volume"].dtype != np.int64:
        return f"volume stored as {frame['volume'].dtype}"
    if (frame[["open", "high", "low", "close", "volume"]] < 0).any().any():
        return "a negative price or volume was accepted"
    if (frame["high"] < frame[["open", "close"]].max(axis=1)).any():
        return "high below max(open, close) was accepted"
    if (frame["low"] > frame[["open", "close"]].min(axis=1)).any():
        return "low above min(open, close) was accepted"
    if (frame[[c for c in PRICES if c in frame]] <= 0).any().any():
        return "a zero price was accepted"
    if dataset.interval in INTRADAY:
        if (stamps > pd.Timestamp(CAMPAIGN_NOW) + pd.Timedelta(minutes=5)).any():
            return "an intraday bar after now was accepted"
    elif (stamps.dt.date > LATEST_DATE).any():
        return "a bar dated after today in UTC+14 was accepted"
    return None


def _symbol_named(payload: Any, symbol: str) -> str | None:
    """The other symbol a JSON answer's Meta Data names, or None (ours, in any ASCII case,
    or none named)."""
    meta = payload.get("Meta Data") if isinstance(payload, dict) else None
    if not isinstance(meta, dict):
        return None
    for key, value in meta.items():
        if re.sub(r"^\d+[a-z]?\.\s*", "", key.strip()).lower() == "symbol" and not (
                isinstance(value, str) and value.isascii() and value.upper() == symbol):
            return repr(value)
    return None


def classify_and_parse(body: bytes, dataset: DatasetId) -> tuple[str, Any]:
    """('refused', reason) | ('accepted', frame) | ('crash', kind, detail)."""
    try:
        answer = classify_response(body)
    except Exception as exc:  # noqa: BLE001 - the property is about exactly this
        return ("crash", f"classify_response raised {crash_kind(exc)}", f"{exc}")
    if not isinstance(answer, Classified) or not isinstance(answer.outcome, Outcome) \
            or not isinstance(answer.message, str):
        return ("crash", "classify_response returned something else", repr(answer)[:80])
    if answer.outcome is not Outcome.DATA:
        return ("refused", answer.outcome.value)
    try:
        return ("accepted", parse_payload(answer, dataset, CAMPAIGN_NOW))
    except OHLCVError as exc:
        return ("refused", str(exc))
    except Exception as exc:  # noqa: BLE001
        return ("crash", f"parse_payload raised {crash_kind(exc)}", f"{exc}")


def body_problem(body: bytes, dataset: DatasetId) -> tuple[str, str] | None:
    """The parser property for one body: our errors only, and only valid tables accepted."""
    shown = f"{dataset}: {body[:160]!r}"
    verdict = classify_and_parse(body, dataset)
    if verdict[0] == "crash":
        return verdict[1], f"{shown} -> {verdict[2][:100]}"
    with contextlib.suppress(ValueError):
        payload = json.loads(body)
        if isinstance(payload, dict) and any(k in payload for k in MESSAGE_KEYS) \
                and verdict[0] == "accepted":
            return "an API message body was accepted as data", shown
        if verdict[0] == "accepted" and _symbol_named(payload, dataset.symbol):
            return "an answer naming another symbol was accepted", shown
        if verdict[0] == "accepted" and dataset.interval not in INTRADAY:
            series = next(v for k, v in payload.items() if k.startswith(("Time Series", "Weekly", "Monthly")))
            if not all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", k.strip()) for k in series):
                return "a daily stamp that is not exactly a date was accepted", shown
    if verdict[0] == "accepted" and dataset.interval not in INTRADAY and b'"' not in body \
            and not body.lstrip().startswith((b"{", b"[")):  # CSV, unquoted: the stamps as sent
        stamps = [line.split(b",")[0].strip() for line in body.splitlines()[1:] if line.strip()]
        if not all(re.fullmatch(rb"[0-9]{4}-[0-9]{2}-[0-9]{2}", stamp) for stamp in stamps):
            return "a daily stamp that is not exactly a date was accepted", shown
    if verdict[0] == "accepted":
        problem = table_problem(verdict[1], dataset)
        if problem:
            return f"accepted: {problem}", shown
    return None


# -- strategies ------------------------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)

HOSTILE_CELLS = ("", " ", "NaN", "nan", "inf", "-inf", "1e309", "-1", "-0.01", "0x1A", "1,000",
                 "\u0661\u0662", "1_000", "None", "null", "1.5", "9" * 25, "+5", ".5", "5.", "1e2",
                 "12abc", "\x00", "\u00a0", '"', "1;2", "-0", "0.000000001", "1e-400", "Infinity")
HOSTILE_STAMPS = ("", "2024-02-30", "2024-13-01", "yesterday", "2024-01-02T09:30:00Z",
                  "2023-11-05 01:30:00", "2024-03-10 02:30:00", "2024-01-02 25:00:00",
                  "0001-01-01", "9999-12-31", "2024-01-02\x00", "20240102", "2024-1-2",
                  " 2024-01-03", "2024-01-02 09:30:00.5",
                  # a date with something after it: a daily stamp is exactly a date
                  "2024-01-02garbage", "2024-01-02T23:00:00-12:00", "2024-01-02 00:00:00",
                  "2024-01-02 09:30:00-05:00", "2024-01-02 09:30:00garbage",
                  "\uff12\uff10\uff12\uff14-01-02", "2024-01-02 \uff10\uff19:30:00", "2200-01-01")
ZERO_CELLS = ("0", "0.0000", "0.0", "-0", "0e0", "0.00000000")


@st.composite
def bar_rows(draw, dataset: DatasetId) -> list[tuple[str, dict[str, str]]]:
    """Consistent bars (as wire strings) for `dataset`, newest first; maybe none."""
    count = draw(st.integers(0, 6))
    if dataset.interval in INTRADAY:
        starts = draw(st.lists(st.integers(0, 19 * 12 * 16), min_size=count, max_size=count,
                               unique=True))
        stamps = [pd.Timestamp("2024-01-02 04:00") + pd.Timedelta(minutes=5 * (s % 192))
                  + pd.Timedelta(days=s // 192) for s in starts]
        texts = [s.strftime("%Y-%m-%d %H:%M:%S") for s in stamps]
    else:
        offsets = draw(st.lists(st.integers(0, 4000), min_size=count, max_size=count, unique=True))
        texts = [str(date(2010, 1, 4) + timedelta(days=o)) for o in offsets]
    rows = []
    decimals = draw(st.integers(0, 4))
    for text in sorted(texts, reverse=True):
        # Traded prices are above zero, even once formatted (a zero is a mutation below).
        low = draw(st.floats(10.0**-decimals, 5000, allow_nan=False))
        spread = draw(st.floats(0, 100, allow_nan=False))
        o, c = (draw(st.floats(0, 1)) for _ in range(2))
        high = low + spread
        values = {"open": low + o * spread, "high": high, "low": low, "close": low + c * spread}
        cells = {k: f"{v:.{decimals}f}" for k, v in values.items()}
        # Formatting rounds: keep the bar consistent after rounding.
        nums = {k: float(v) for k, v in cells.items()}
        cells["high"] = f"{max(nums.values()):.{decimals}f}"
        cells["low"] = f"{min(nums.values()):.{decimals}f}"
        cells["volume"] = str(draw(st.integers(0, 10**12)))
        if dataset.adjusted:
            cells["adjusted_close"] = cells["close"]
            cells["dividend_amount"] = draw(st.sampled_from(["0.0000", "0.2500", "1.1000"]))
            if dataset.interval == "daily":
                cells["split_coefficient"] = draw(st.sampled_from(["1.0", "2.0", "0.5"]))
        rows.append((text, cells))
    return rows


@st.composite
def value_mutations(draw, dataset: DatasetId, rows: list) -> list:
    """Mutations both wire forms can express: bad cells, bad stamps, high/low swapped,
    zero and missing prices, bars dated after CAMPAIGN_NOW (and right at its edge)."""
    rows = [(t, dict(c)) for t, c in rows]
    intraday = dataset.interval in INTRADAY
    for _ in range(draw(st.integers(0, 2))):
        if not rows:
            break
        i = draw(st.integers(0, len(rows) - 1))
        text, cells = rows[i]
        kind = draw(st.sampled_from(["cell", "stamp", "swap", "negative", "zero", "allzero",
                                     "missing", "future", "edge"]))
        if kind == "cell":
            column = draw(st.sampled_from(sorted(cells)))
            cells[column] = draw(st.sampled_from(HOSTILE_CELLS) | st.text(max_size=6))
        elif kind == "stamp":
            text = draw(st.sampled_from(HOSTILE_STAMPS))
        elif kind == "zero":  # one price at zero, the bar still consistent (low is the min)
            column = draw(st.sampled_from(["low", *(["adjusted_close"] if dataset.adjusted else [])]))
            cells[column] = draw(st.sampled_from(ZERO_CELLS))
        elif kind == "allzero":
            for column in ("open", "high", "low", "close"):
                cells[column] = draw(st.sampled_from(ZERO_CELLS))
        elif kind == "missing":  # JSON: the key is absent; CSV: the cell is empty
            cells.pop(draw(st.sampled_from([c for c in PRICES if c in cells])))
        elif kind == "future":
            text = draw(st.sampled_from(FUTURE_STAMPS[intraday]))
        elif kind == "edge":
            text = draw(st.sampled_from(EDGE_STAMPS[intraday]))
        elif kind == "swap" and cells.get("high", "") != cells.get("low", ""):
            cells["high"], cells["low"] = cells.get("low", ""), cells.get("high", "")
        elif kind == "negative":  # (a missing price stays missing)
            column = draw(st.sampled_from([c for c in ("open", "low", "volume") if c in cells]))
            cells[column] = "-" + cells[column].lstrip("-") if cells[column] not in ("0", "0.0") else "-1"
        rows[i] = (text, cells)
    if len({t for t, _ in rows}) != len(rows):  # JSON cannot hold two bars of one stamp
        rows = list({t: (t, c) for t, c in rows}.values())
    return rows


def render_json(dataset: DatasetId, rows: list, series_key: str | None = None,
                extra: dict | None = None) -> bytes:
    keys = wire(dataset)
    series = {text: {keys[col][0]: cells[col] for col in keys if col in cells} for text, cells in rows}
    payload = {"Meta Data": {"1. Information": "Daily Prices", "2. Symbol": dataset.symbol}}
    payload[series_key or SERIES_KEY[dataset.interval]] = series
    payload.update(extra or {})
    return json.dumps(payload, indent=4).encode()


def render_csv(dataset: DatasetId, rows: list, eol: str = "\r\n") -> bytes:
    keys = wire(dataset)
    lines = ["timestamp," + ",".join(keys[col][1] for col in keys)]
    lines += [text + "," + ",".join(cells.get(col, "") for col in keys) for text, cells in rows]
    return (eol.join(lines) + eol).encode()


@st.composite
def near_valid_json(draw) -> tuple[DatasetId, bytes]:
    """A series object close to Alpha Vantage's, with structural mutations."""
    dataset = draw(st.sampled_from(DATASETS))
    rows = draw(value_mutations(dataset, draw(bar_rows(dataset))))
    keys = wire(dataset)
    series = {text: {keys[c][0]: v for c, v in cells.items()} for text, cells in rows}
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["alias", "timestamp", "drop", "extra", "nonstring",
                                     "nondict", "nested", "emptybar"]))
        if not series:
            break
        text = draw(st.sampled_from(sorted(series)))
        bar = series[text]
        if not isinstance(bar, dict):  # an earlier mutation replaced it: leave it so
            continue
        if kind == "alias" and bar:  # the same field under a second wire name
            wire_key = draw(st.sampled_from(sorted(bar)))
            bar[re.sub(r"^\d+\.\s*", "", wire_key)] = bar[wire_key]
        elif kind == "timestamp":
            bar["timestamp"] = text
        elif kind == "drop" and bar:
            bar.pop(draw(st.sampled_from(sorted(bar))))
        elif kind == "extra":
            bar[draw(st.text(max_size=8))] = draw(json_leaf)
        elif kind == "nonstring" and bar:
            bar[draw(st.sampled_from(sorted(bar)))] = draw(json_any)
        elif kind == "nondict":
            series[text] = draw(json_any)
        elif kind == "nested" and bar:
            bar[draw(st.sampled_from(sorted(bar)))] = {"v": "1"}
        elif kind == "emptybar":
            series[text] = {}
    series_key = draw(st.sampled_from([SERIES_KEY[dataset.interval], "Time Series (Daily)",
                                       "Weekly Adjusted Time Series", "Monthly", "Time Series"]))
    symbols = st.sampled_from([dataset.symbol, dataset.symbol.lower(), "MSFT", "msft", "\u0131bm",
                               " IBM", "IBM\u200b", "", None, 5, ["IBM"]])
    meta = draw(json_any | st.builds(lambda key, symbol: {"1. Information": "Daily Prices",
                                                          key: symbol},
                                     st.sampled_from(["2. Symbol", "Symbol", "01. symbol"]),
                                     symbols))
    payload: dict[str, Any] = {"Meta Data": meta, series_key: series}
    if draw(st.integers(0, 9)) == 0:
        payload[draw(st.sampled_from(MESSAGE_KEYS))] = draw(st.text(max_size=30))
    body = json.dumps(payload, indent=draw(st.sampled_from([None, 4]))).encode()
    return dataset, draw(st.sampled_from([b"", b" \n", b"\xef\xbb\xbf"])) + body


CSV_TOKENS = ("timestamp", "open", "high", "low", "close", "volume", "adjusted_close",
              "adjusted close", "dividend_amount", "dividend amount", "split_coefficient",
              "1. open", "Open", "VOLUME", "", "x", "timestamp ", "2. high")


@st.composite
def arbitrary_csv(draw) -> tuple[DatasetId, bytes]:
    dataset = draw(st.sampled_from(DATASETS))
    if draw(st.booleans()):
        rows = draw(value_mutations(dataset, draw(bar_rows(dataset))))
        header = ["timestamp"] + [wire(dataset)[c][1] for c in wire(dataset)]
        lines = [[text] + [cells.get(c, "") for c in wire(dataset)] for text, cells in rows]
        if lines and draw(st.booleans()):
            lines.append(list(draw(st.sampled_from(lines))))  # a duplicate row
    else:
        header = ["timestamp"] + draw(st.lists(st.sampled_from(CSV_TOKENS), max_size=9))
        cell = st.sampled_from(HOSTILE_CELLS + HOSTILE_STAMPS) | st.text(max_size=8) \
            | st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str)
        lines = draw(st.lists(st.lists(cell, min_size=0, max_size=len(header) + 2), max_size=5))
    mutation = draw(st.sampled_from(["none", "alias", "reorder", "ragged", "quote", "drop"]))
    if mutation == "alias" and len(header) > 1:
        header.append("1. " + header[1])
        lines = [row + row[1:2] for row in lines]
    elif mutation == "reorder" and len(header) > 2:
        order = [0] + draw(st.permutations(range(1, len(header))))
        header = [header[i] for i in order]
        lines = [[row[i] if i < len(row) else "" for i in order] for row in lines]
    elif mutation == "ragged" and lines:
        lines[0] = lines[0] + ["1", "2"]
    elif mutation == "quote" and lines and lines[0]:
        lines[0][0] = '"' + str(lines[0][0])
    elif mutation == "drop" and len(header) > 1:
        header.pop()
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    text = eol.join(",".join(str(c) for c in row) for row in [header] + lines) + eol
    bom = draw(st.sampled_from(["", "\ufeff"]))
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    return dataset, (bom + text).encode(encoding, errors="replace")


prefixes = st.sampled_from([b"", b"{", b"[", b" \n{", b"timestamp,", b"\xef\xbb\xbftimestamp,",
                            b'{"Information": ', b'{"Time Series (Daily)": {"2024-01-02": ',
                            b'{"Note": "', b'{"\xff', b"\x00"])
arbitrary_bytes = st.tuples(prefixes, st.binary(max_size=160)).map(lambda pair: pair[0] + pair[1])


# -- tests: classifier and parser --------------------------------------------------------

def test_classifier_answers_every_body_with_an_outcome(figures):
    """classify_response is total: any byte string gets an Outcome, never an exception,
    and a body carrying an API message (Information, Note, Error Message) is never DATA."""
    def check(body: bytes) -> tuple[str, str] | None:
        try:
            answer = classify_response(body)
        except Exception as exc:  # noqa: BLE001
            return f"classify_response raised {crash_kind(exc)}", f"{body[:60]!r}: {exc}"
        if not isinstance(answer.outcome, Outcome) or not isinstance(answer.message, str):
            return "classify_response returned no outcome", repr(answer)[:80]
        with contextlib.suppress(ValueError):
            payload = json.loads(body)
            if isinstance(payload, dict) and any(k in payload for k in MESSAGE_KEYS) \
                    and answer.outcome is Outcome.DATA:
                return "an API message was classified as DATA", repr(body[:80])
        return None

    run_property(arbitrary_bytes, check, figures, "hostile/classifier-bytes",
                 examples=[b'{"\xff": 1}', b"[\x80]", b"   ", b"\xef\xbb\xbf{}"])


def test_parser_on_arbitrary_json(figures):
    """Arbitrary JSON documents: refused with our errors, never a crash."""
    bodies = st.tuples(st.sampled_from(DATASETS), json_any.map(lambda v: json.dumps(v).encode()))
    run_property(bodies, lambda pair: body_problem(pair[1], pair[0]), figures,
                 "hostile/parser-arbitrary-json")


def test_parser_on_near_valid_json_series(figures):
    """Series objects shaped like Alpha Vantage's with mutated bars: only valid tables are
    accepted, everything else is refused with our errors."""
    day = DatasetId("IBM")
    bar = {"1. open": "1.0", "2. high": "2.0", "3. low": "0.5", "4. close": "1.5", "5. volume": "10"}
    zero = dict(bar, **{k: "0.0000" for k in ("1. open", "2. high", "3. low", "4. close")})

    def answer(series: dict, symbol: str = "IBM") -> bytes:
        return json.dumps({"Meta Data": {"1. Information": "Daily Prices", "2. Symbol": symbol},
                           "Time Series (Daily)": series}).encode()

    known = [  # found by this property; kept as explicit regressions
        (day, json.dumps({"Time Series (Daily)": {"2024-01-02": dict(bar, open="1.0")}}).encode()),
        (day, json.dumps({"Time Series (Daily)": {"2024-01-02": 5}}).encode()),
        (day, json.dumps({"Time Series (Daily)": {"2024-01-02": dict(bar, timestamp="x")}}).encode()),
        # issue 12: future bars, an all-zero bar, stamps cut to a date, another symbol
        (day, answer({"2200-01-01": bar, "2024-01-02": bar})),
        (day, answer({"9999-12-31": bar})),
        (day, answer({str(LATEST_DATE + timedelta(days=1)): bar})),
        (day, answer({"2024-01-02": zero, "2024-01-03": bar})),
        (day, answer({"2024-01-02garbage": bar})),
        (day, answer({"2024-01-02T23:00:00-12:00": bar})),
        (day, answer({"2024-01-02": bar}, symbol="MSFT")),
        (DatasetId("IBM", "5min", month="2024-06"),
         json.dumps({"Time Series (5min)": {"2024-06-03 11:30:00": bar}}).encode()),
    ]
    run_property(near_valid_json(), lambda pair: body_problem(pair[1], pair[0]), figures,
                 "hostile/parser-near-valid-json", examples=known)


def test_parser_on_arbitrary_csv(figures):
    """CSV bodies with arbitrary headers, cells, quoting, line ends and encodings."""
    day = DatasetId("IBM")
    header = b"timestamp,open,high,low,close,volume\r\n"
    known = [
        (day, b"timestamp,open,1. open,high,low,close,volume\r\n2024-01-02,1,1,2,0.5,1,10\r\n"),
        (day, b"timestamp,open,high,low,close,volume\r\n"),
        # issue 12: future bars, an all-zero bar, a missing price, stamps cut to a date
        (day, header + b"2200-01-01,1,2,0.5,1,10\r\n2024-01-02,1,2,0.5,1,10\r\n"),
        (day, header + b"9999-12-31,1,2,0.5,1,10\r\n"),
        (day, header + b"2024-01-02,0,0,0,0,0\r\n"),
        (day, header + b"2024-01-02,1,2,0.5,,10\r\n"),
        (day, header + b"2024-01-02garbage,1,2,0.5,1,10\r\n"),
        (day, header + b"2024-01-02T23:00:00-12:00,1,2,0.5,1,10\r\n"),
    ]
    run_property(arbitrary_csv(), lambda pair: body_problem(pair[1], pair[0]), figures,
                 "hostile/parser-arbitrary-csv", examples=known)


@st.composite
def same_bars_both_forms(draw) -> tuple[DatasetId, list]:
    dataset = draw(st.sampled_from(DATASETS))
    return dataset, draw(value_mutations(dataset, draw(bar_rows(dataset))))


def test_csv_and_json_forms_give_the_same_verdict(figures):
    """README: OHLCV_DATATYPE csv or json, "both give the same data". For the same bars the
    two wire forms must be accepted or refused alike, and accepted ones give equal tables."""
    def check(case: tuple[DatasetId, list]) -> tuple[str, str] | None:
        dataset, rows = case
        as_json = classify_and_parse(render_json(dataset, rows), dataset)
        as_csv = classify_and_parse(render_csv(dataset, rows), dataset)
        shown = f"{dataset}, {len(rows)} bar(s): {rows[:2]}"
        for form, verdict in (("json", as_json), ("csv", as_csv)):
            if verdict[0] == "crash":
                return f"{form}: {verdict[1]}", shown
        if as_json[0] != as_csv[0]:
            return (f"json {as_json[0]} but csv {as_csv[0]}",
                    f"{shown}; json: {str(as_json[1])[:60]}; csv: {str(as_csv[1])[:60]}")
        if as_json[0] == "accepted":
            try:
                pd.testing.assert_frame_equal(as_json[1], as_csv[1], check_exact=True)
            except AssertionError as exc:
                return "the two forms give different tables", f"{shown}: {str(exc)[:120]}"
        return None

    run_property(same_bars_both_forms(), check, figures, "hostile/csv-json-agree",
                 examples=[(DatasetId("IBM"), [])])


# -- end to end: a hostile body from the server ------------------------------------------

class HostileServer:
    """A real HTTP server on 127.0.0.1 answering each symbol with a fixed body."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.bodies = bodies
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                symbol = parse_qs(urlsplit(self.path).query).get("symbol", [""])[0]
                body = outer.bodies.get(symbol, b'{"Error Message": "Invalid API call."}')
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/query"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def good_csv(last: date, bars: int = 5) -> bytes:
    days, day = [], last
    while len(days) < bars:
        if day.weekday() < 5:
            days.append(day)
        day -= timedelta(days=1)
    rows = "".join(f"{d},10.0000,11.0000,9.0000,10.5000,1000\r\n" for d in days)
    return ("timestamp,open,high,low,close,volume\r\n" + rows).encode()


def test_hostile_body_fails_its_symbol_not_the_run(tmp_path, figures):
    """A server (or proxy) answering one symbol with a hostile body must cost that symbol
    only: its line says FAILED, the other symbols are stored, exit 1 -- not an internal
    error that aborts the whole cron run."""
    hostile = {
        "BADUTF": b'{"\xff\xfe": "not UTF-8"}',
        "DUPCOL": b"timestamp,open,1. open,high,low,close,volume\r\n2024-01-02,1,1,2,0.5,1,10\r\n",
        "SCALAR": json.dumps({"Time Series (Daily)": {"2024-01-02": 5}}).encode(),
    }
    bodies = dict(hostile, GOOD=good_csv(latest_session()))
    cwd = tmp_path / "site"
    cwd.mkdir()
    with HostileServer(bodies) as server:
        env = headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=new_key_ring(), ALPHA_VANTAGE_API_KEY="K",
                           ALPHA_VANTAGE_BASE_URL=server.base_url, OHLCV_MAX_RETRIES="0",
                           OHLCV_RATE_LIMIT_PER_MINUTE="6000", OHLCV_MAX_WORKERS="1")
        jobs = [{"argv": ["--init"]}] + [{"argv": ["download", symbol, "GOOD", "--full"]}
                                         for symbol in hostile]  # one hostile body per run
        init, *runs = run_batch(jobs, cwd, env)
    assert init["code"] == 0, init
    results = dict(zip(hostile, runs, strict=True))
    held = [s for s, r in results.items()
            if r["code"] == 1 and f"{s} daily: FAILED" in r["stdout"]
            and re.search(r"^GOOD daily: (updated|unchanged),", r["stdout"], re.MULTILINE)
            and "internal error" not in r["stderr"]]
    figures.record("hostile/server-bodies-end-to-end", tried=len(hostile), held=len(held))
    log = (cwd / "secure_downloader.log").read_text()
    errors = sorted(set(re.findall(r"^(\w+Error: .{0,80})$", log, re.MULTILINE)))
    broken = {s: (r["code"], r["stdout"].strip()[-120:], r["stderr"].strip()[-120:])
              for s, r in results.items() if s not in held}
    if broken:
        pytest.fail(f"a hostile body aborted the run instead of failing one symbol: {broken}; "
                    f"log: {errors}", pytrace=False)


# =========================================================================================
# Symbols, intervals, months: no path outside the data directory
# =========================================================================================

HOSTILE_SYMBOLS = ("..", "../x", "A/..", "A/B", "/etc/passwd", "\\x", "A..B", ".A", "-A",
                   "A\x00", "\uff29\uff22\uff2d", "\u0130BM", "\u0131bm", "ibm", "brk.b", "A" * 21,
                   "~", "$HOME", "%2e%2e", "A\n", " IBM", "IBM ", ".", "A.", "A-", "CON",
                   "A/../../..", "..\\..", "IBM\u200b", "I\u0307BM", "\u212aO", "")
symbol_text = (st.sampled_from(HOSTILE_SYMBOLS) | st.text(max_size=24)
               | st.from_regex(r"[A-Za-z0-9.\-/\\~ ]{1,24}", fullmatch=True)
               | st.from_regex(r"[A-Z0-9][A-Z0-9.\-]{0,19}", fullmatch=True))
interval_text = st.sampled_from(INTERVALS) | st.sampled_from(("../daily", "daily/..", "5min/../..",
                                                               "", "DAILY", "intraday_5min"))
month_text = (st.none() | st.from_regex(r"\d{4}-\d{2}", fullmatch=True)
              | st.sampled_from(("../2024-01", "2024-01/..", "2024-1", "2024-00", "2024-13",
                                 "\uff12\uff10\uff12\uff14-01", "2024-01\n")) | st.text(max_size=10))


def test_symbols_never_map_outside_the_data_directory(tmp_path, figures):
    """Every (symbol, interval, adjusted, month): UsageError, or a dataset whose file lies
    strictly inside the data directory, that round-trips through its relative path, and
    whose write creates nothing anywhere else."""
    outer = tmp_path / "outer"
    outer.mkdir()
    settings_ = load_settings(environ={"OHLCV_DATA_DIR": str(outer / "data")}, cwd=outer)
    root = settings_.data_dir
    root.mkdir(mode=0o700)
    store = EncryptedStore(settings_, KeyRing.generate())
    daily = pd.DataFrame({"timestamp": pd.to_datetime(["2024-01-02"]), "open": [1.0],
                          "high": [2.0], "low": [0.5], "close": [1.5], "volume": [10]})
    intraday = daily.assign(timestamp=pd.to_datetime(["2024-01-02 09:30"]).tz_localize("America/New_York"))
    outside_before = {p for p in outer.rglob("*") if root not in p.parents and p != root}

    def check(case: tuple) -> tuple[str, str] | None:
        symbol, interval, adjusted, month = case
        try:
            dataset = DatasetId(symbol, interval, adjusted, month)
        except UsageError:
            return None
        except Exception as exc:  # noqa: BLE001
            return f"DatasetId raised {crash_kind(exc)}", repr(case)
        path = store.path(dataset)
        resolved = path.resolve()
        if root not in resolved.parents:
            return "a dataset path outside the data directory", f"{case!r} -> {path}"
        if not re.fullmatch(r"[A-Z0-9][A-Z0-9.\-]{0,19}", dataset.symbol) or ".." in dataset.symbol:
            return "a symbol outside the documented alphabet was accepted", repr(case)
        try:
            if DatasetId.from_relative_path(dataset.relative_path()) != dataset:
                return "relative path does not round-trip", repr(case)
        except UsageError as exc:
            return "relative path does not round-trip", f"{case!r}: {exc}"
        store.write(dataset, intraday if interval in INTRADAY else daily, {})
        outside = {p for p in outer.rglob("*") if root not in p.parents and p != root}
        if outside != outside_before:
            return "a write created a path outside the data directory", f"{case!r}: {outside - outside_before}"
        return None

    cases = st.tuples(symbol_text, interval_text, st.booleans(), month_text)
    run_property(cases, check, figures, "hostile/symbols-and-paths",
                 examples=[("../../etc", "daily", False, None), ("IBM", "5min", False, "../2024-01"),
                           ("BRK.B", "daily", True, None), ("A" * 20, "60min", False, "2024-12")])


def _emulator_env(home: Path, av, **variables: str) -> dict[str, str]:
    return headless_env(home, OHLCV_ENCRYPTION_KEY=variables.pop("OHLCV_ENCRYPTION_KEY", new_key_ring()),
                        ALPHA_VANTAGE_API_KEY=PREMIUM_KEY, ALPHA_VANTAGE_BASE_URL=av.base_url,
                        OHLCV_RATE_LIMIT_PER_MINUTE=str(PREMIUM_PER_MINUTE),
                        OHLCV_BACKOFF_SECONDS="0.01", **variables)


CLI_HOSTILE_INPUTS = [
    (["download", "../../outside"], "invalid symbol"),
    (["download", "IBM/../../x"], "invalid symbol"),
    (["download", "\uff29\uff22\uff2d"], "invalid symbol"),
    (["download", ".."], "invalid symbol"),
    (["export", "../../../etc/passwd"], "invalid symbol"),
    (["download", "IBM", "--interval", "5min", "--month", "../../2024-01"], "invalid month"),
    (["download", "--symbols-file", "SYMBOLS"], "invalid symbol"),
]


def test_cli_refuses_hostile_symbols_and_writes_nothing(tmp_path, emulator, figures):
    """The command line: exit 2 naming the input; the data directory and everything
    outside the installation unchanged (the log and run record may note the attempt)."""
    cwd = tmp_path / "site"
    cwd.mkdir()
    env = _emulator_env(tmp_path, emulator)
    setup = run_batch([{"argv": ["--init"]}, {"argv": ["download", "IBM"]}], cwd, env)
    assert [r["code"] for r in setup] == [0, 0], setup
    (cwd / "SYMBOLS").write_text("MSFT\n../../evil  # traversal\n")
    excluded = (cwd / "secure_downloader.log", cwd / "state")
    before = snapshot(tmp_path, exclude=excluded)
    results = run_batch([{"argv": args} for args, _ in CLI_HOSTILE_INPUTS], cwd, env)
    held, broken = 0, []
    for (args, words), result in zip(CLI_HOSTILE_INPUTS, results, strict=True):
        if result["code"] == 2 and words in result["stderr"]:
            held += 1
        else:
            broken.append((args, result["code"], result["stderr"].strip()[-200:]))
    after = snapshot(tmp_path, exclude=excluded)
    figures.record("hostile/cli-symbols", tried=len(CLI_HOSTILE_INPUTS), held=held)
    assert not broken, f"hostile input not refused with exit 2: {broken}"
    assert after == before, "a refused run changed files: " + str(
        sorted(set(after.items()) ^ set(before.items()))[:6])


# =========================================================================================
# Configuration values
# =========================================================================================

SECRET_VARIABLES = {v.name for v in VARIABLES if v.secret}
CONFIG_EDGE_VALUES = (
    "", " ", "0", "-1", "1", "1e308", "1e-320", "nan", "inf", "-inf", "0o777", "0777", "0750",
    "0640", "07777", "0x1F", "~nosuchuser-campaign/x", "~", "~/x", "http://h:abc/q",
    "http://h:99999/q", "http://h:0/q", "ftp://h/q", "http://user:pw@h/q", "http://h/q?apikey=1",
    "http:///q", "https://h/q#frag", "debug", "TRACE", "json", "xml", "a,b", ",", "1_000",
    "\u0665", "99999999999999999999999", "/", ".", "..", "a\nb", "http://[::1/q", "1e-9", "0.0001",
)
config_values = (st.sampled_from(CONFIG_EDGE_VALUES) | st.text(max_size=30)
                 | st.integers(-10**6, 10**20).map(str) | st.floats().map(repr)
                 | st.from_regex(r"0[0-7]{3,4}", fullmatch=True))
SECRET_MARK = "QX7"
secret_values = st.tuples(st.sampled_from(["", " ", ",", "a b ", "\u00e9", "+", "="]),
                          st.text("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789",
                                  min_size=10, max_size=10),
                          st.sampled_from(["", " x", ",", "\t", "==", "\u00e9"]))


def _usability_problem(name: str, settings_) -> str | None:
    """An accepted value must be usable by the library that receives it."""
    if name == "ALPHA_VANTAGE_BASE_URL":
        try:
            requests.Request("GET", settings_.base_url, params={"symbol": "IBM"}).prepare()
        except requests.RequestException as exc:
            return f"accepted, but requests refuses the URL ({type(exc).__name__})"
    if name in ("OHLCV_CONNECT_TIMEOUT", "OHLCV_REQUEST_TIMEOUT"):
        with socket.socket() as sock:
            try:
                sock.settimeout(settings_.connect_timeout if "CONNECT" in name else settings_.request_timeout)
            except (OverflowError, ValueError) as exc:
                return f"accepted, but no socket takes it as a timeout ({exc})"
    if name == "OHLCV_RATE_LIMIT_PER_SECOND":
        spacing = RATE_SLACK / settings_.rate_limit_per_second
        if not math.isfinite(spacing) or spacing > threading.TIMEOUT_MAX:
            return f"accepted, but the request spacing ({spacing:g} s) cannot be slept"
    return None


def test_every_configuration_value_is_accepted_and_usable_or_refused_by_name(tmp_path, figures):
    """load_settings on one variable set to an arbitrary value: accepted and usable, or
    ConfigError naming the variable; never another exception; a secret never echoed."""
    def check(case: tuple[str, Any]) -> tuple[str, str] | None:
        name, raw = case
        token = ""
        if isinstance(raw, tuple):  # a secret with a recognisable middle
            token = SECRET_MARK + raw[1]
            raw = raw[0] + token + raw[2]
        try:
            settings_ = load_settings(environ={name: raw}, cwd=tmp_path)
        except ConfigError as exc:
            if name not in str(exc):
                return f"{name}: the message does not name the variable", f"{raw!r}: {exc}"
            if token and token in str(exc):
                return f"{name}: the message echoes the secret", f"{raw!r}: {exc}"
            return None
        except Exception as exc:  # noqa: BLE001
            return f"{name}: {crash_kind(exc)} instead of ConfigError", f"{raw!r}: {exc}"
        problem = _usability_problem(name, settings_)
        return (f"{name}: {problem.split(' (')[0]}", f"{raw!r}: {problem}") if problem else None

    names = [v.name for v in VARIABLES]
    plain = st.tuples(st.sampled_from([n for n in names if n not in SECRET_VARIABLES]), config_values)
    secret = st.tuples(st.sampled_from(sorted(SECRET_VARIABLES)), secret_values)
    run_property(plain | secret, check, figures, "hostile/config-values", budget=EXAMPLES * 4,
                 examples=[("OHLCV_DATA_DIR", "~nosuchuser-campaign/data"),
                           ("OHLCV_CONNECT_TIMEOUT", "1e308"),
                           ("OHLCV_RATE_LIMIT_PER_SECOND", "1e-320"),
                           ("ALPHA_VANTAGE_BASE_URL", "http://127.0.0.1:abc/query")])


# (variable, value, command needing it) -> exit 3 naming the variable, no traceback.
BAD_CONFIG = [
    ("OHLCV_MAX_RETRIES", "-1", "status"), ("OHLCV_BACKOFF_SECONDS", "0", "status"),
    ("OHLCV_LOG_LEVEL", "TRACE", "status"), ("OHLCV_DATATYPE", "xml", "status"),
    ("OHLCV_DIR_MODE", "0777", "status"), ("OHLCV_FILE_MODE", "0644", "status"),
    ("OHLCV_METRICS_FILE_MODE", "0666", "status"), ("OHLCV_LOCK_TIMEOUT", "-1", "status"),
    ("OHLCV_MAX_WORKERS", "0", "status"), ("OHLCV_RATE_LIMIT_PER_DAY", "many", "status"),
    ("ALPHA_VANTAGE_BASE_URL", "ftp://127.0.0.1/query", "status"),
    ("OHLCV_ENCRYPTION_KEY", "not-a-fernet-key", "status"),
    ("ALPHA_VANTAGE_API_KEY", "two words", "status"), ("OHLCV_CONNECT_TIMEOUT", "nan", "status"),
    # Accepted by the parser today; each breaks the first run that uses it.
    ("OHLCV_DATA_DIR", "~nosuchuser-campaign/data", "status"),
    ("OHLCV_LOG_FILE", "~nosuchuser-campaign/x.log", "status"),
    ("ALPHA_VANTAGE_BASE_URL", "http://127.0.0.1:abc/query", "download"),
    ("ALPHA_VANTAGE_BASE_URL", "http://127.0.0.1:99999/query", "download"),
    ("OHLCV_CONNECT_TIMEOUT", "1e308", "download"),
    ("OHLCV_RATE_LIMIT_PER_SECOND", "1e-320", "download"),
]


def test_cli_bad_configuration_exits_3_naming_the_variable(tmp_path, emulator, figures):
    """README: "A bad value stops the program before it does anything, with exit code 3
    and a message naming the variable". A value the parser lets through but the run cannot
    use (a port that is no port, a timeout no socket takes) is a bad value too."""
    site = tmp_path / "site"
    site.mkdir()
    base = _emulator_env(tmp_path, emulator, OHLCV_MAX_RETRIES="0")
    assert run_batch([{"argv": ["--init"]}], site, base)[0]["code"] == 0
    jobs, empties = [], []
    for index, (name, value, command) in enumerate(BAD_CONFIG):
        if command == "status":  # a fresh directory and environment: a refused run creates nothing
            cwd = tmp_path / f"empty-{index}"
            cwd.mkdir()
            empties.append(cwd)
            unset = {k: None for k in base if k not in ("PATH", "HOME", "PYTHON_KEYRING_BACKEND")}
            jobs.append({"argv": ["status"], "cwd": str(cwd), "env": dict(unset, **{name: value})})
        else:
            empties.append(None)
            jobs.append({"argv": ["download", f"CFG{index}"], "cwd": str(site), "env": {name: value}})
    broken = []
    results = run_batch(jobs, site, base)
    for (name, value, command), cwd, result in zip(BAD_CONFIG, empties, results, strict=True):
        created = sorted(p.name for p in cwd.iterdir()) if cwd else []
        ok = (result["code"] == 3 and name in result["stderr"] and "Traceback" not in result["stderr"]
              and "internal error" not in result["stderr"] and not created)
        if not ok:
            broken.append(f"{name}={value!r} ({command}): exit {result['code']}, created {created}, "
                          f"stderr {result['stderr'].strip()[-140:]!r}")
    figures.record("hostile/cli-config", tried=len(BAD_CONFIG), held=len(BAD_CONFIG) - len(broken))
    if broken:
        pytest.fail("bad configuration not refused with exit 3 naming it:\n  " + "\n  ".join(broken),
                    pytrace=False)


# =========================================================================================
# Archives: --verify-backup and --recover
# =========================================================================================

class ArchiveLab:
    """One installation with five datasets and a genuine archive of them; the archive's
    members as written; a damaged baseline of the store (two files lost, one altered)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.site = headless_site(root, key_in_variable=True)
        self.site.put(sample_datasets())
        self.archive = self.site.backup()
        self.archive_bytes = self.archive.read_bytes()
        self.ring = self.site.ring()
        self.members = {info.name: data for info, data in read_members(self.archive)}
        self.originals = self.site.files()
        # Where each dataset lives (its name derives from the site's naming key).
        self.rel_of = {str(d): self.site.file_of(d).relative_to(self.site.data_dir).as_posix()
                       for d in sample_datasets()}
        self.lost = (self.rel_of["IBM daily"], self.rel_of["BRK.B weekly"])
        self.altered = self.rel_of["MSFT daily"]
        self.ibm_member = "data/" + self.rel_of["IBM daily"]
        self.outside = root / "outside"
        self.outside.mkdir()

    def damage(self) -> None:
        """The store as a failed disk left it: the same before every example."""
        data = self.site.data_dir
        for rel, token in self.originals.items():
            (data / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            (data / rel).write_bytes(token)
            os.chmod(data / rel, 0o600)
        for rel in self.lost:
            (data / rel).unlink()
        altered = bytearray(self.originals[self.altered])
        altered[60] ^= 0x01
        (data / self.altered).write_bytes(bytes(altered))
        for path in data.rglob(".tmp-*"):
            path.unlink()

    def outside_snapshot(self) -> dict:
        site = self.site.cwd
        return snapshot(self.root, exclude=(site / "data", site / "state",
                                            site / "secure_downloader.log", self.root / "probe"))

    def recover_problem(self, archive: Path) -> tuple[str, str] | None:
        """Recover from `archive` onto the damaged store: our errors only; whatever it
        restores is byte-identical to what was backed up; nothing outside the store."""
        self.damage()
        before = self.outside_snapshot()
        try:
            report = self.site.app().recover(from_backup=archive)
        except OHLCVError:
            report = None
        except Exception as exc:  # noqa: BLE001
            return f"recover raised {crash_kind(exc)}", str(exc)[:120]
        if self.outside_snapshot() != before:
            return "recover changed something outside the store", archive.name
        current = self.site.files()
        for name in (report.restored if report else []):  # restored datasets, by name
            rel = self.rel_of.get(name, name)
            if current.get(rel) != self.originals.get(rel):
                return "recover restored bytes that differ from the backup", rel
        for rel, token in current.items():
            if token == self.originals.get(rel) or rel == self.altered:
                continue
            try:
                validate_bars(decode_table(self.ring.decrypt(token))[0])
            except Exception:  # noqa: BLE001
                return "recover left a file that does not decrypt", rel
        return None

    def verify_problem(self, archive: Path) -> tuple[str, str] | None:
        """Verify: our errors only; a sound verdict only for members equal to the backup."""
        try:
            report = verify_backup(archive, self.ring, None)
        except OHLCVError:
            return None
        except Exception as exc:  # noqa: BLE001
            return f"verify_backup raised {crash_kind(exc)}", str(exc)[:120]
        if report.sound:  # read again with tarfile alone: what a sound archive holds
            members = {info.name: data for info, data in read_members(archive)}
            if members != self.members:
                return "verify called an altered archive sound", archive.name
        elif not all(isinstance(p, str) and p for p in report.problems):
            return "verify reported an empty problem", repr(report.problems)
        return None


@pytest.fixture
def lab(tmp_path) -> ArchiveLab:
    return ArchiveLab(tmp_path)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for op in ops:
        size = max(len(out), 1)
        if op[0] == "flip" and out:
            out[op[1] % size] ^= op[2]
        elif op[0] == "truncate":
            del out[op[1] % size:]
        elif op[0] == "insert":
            out[op[1] % size:op[1] % size] = op[2]
        elif op[0] == "delete":
            del out[op[1] % size:op[1] % size + op[2]]
        elif op[0] == "append":
            out += op[1]
        elif op[0] == "zero_block":
            start = (op[1] % size) // 512 * 512
            out[start:start + 512] = bytes(len(out[start:start + 512]))
    return bytes(out)


byte_ops = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**7)),
    st.tuples(st.just("insert"), st.integers(0, 10**7), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("delete"), st.integers(0, 10**7), st.integers(1, 1024)),
    st.tuples(st.just("append"), st.binary(max_size=1024)),
    st.tuples(st.just("zero_block"), st.integers(0, 10**7)),
), min_size=1, max_size=3)


def test_mutated_archive_bytes_are_refused_or_harmless(lab, figures):
    """Random byte-level damage (flips, truncation, insertion, deletion, zeroed blocks,
    trailing junk): verify and recover raise nothing outside our errors, never call an
    altered member sound, restore only genuine bytes, write nothing outside the store."""
    path = lab.root / "probe" / "mutated.tar"
    path.parent.mkdir()

    def check(ops: list[tuple]) -> tuple[str, str] | None:
        path.write_bytes(mutate(lab.archive_bytes, ops))
        return lab.verify_problem(path) or lab.recover_problem(path)

    run_property(byte_ops, check, figures, "hostile/archive-bytes", budget=ARCHIVE_EXAMPLES,
                 examples=[[("truncate", 700)], [("truncate", len(lab.archive_bytes) - 2048)]])


def hostile_names(outside: Path) -> list[str]:
    return ["../evil.fernet", "data/../../evil.fernet", f"{outside}/abs.fernet",
            "data/daily/../../../evil.fernet", "data/daily/EVIL.fernet", "data/daily/.tmp-x.fernet",
            "state/canary.fernet/../../evil", "data\\daily\\X.fernet", "data/daily/\uff29BM.fernet",
            "data/intraday_5min/../../../../evil.fernet", "manifest.fernet/../evil", "data/daily/",
            "./data/daily/IBM.fernet", "data//daily/IBM.fernet", "data/daily/IBM.fernet\x00x"]


@st.composite
def member_ops(draw, names: list[str], count: int) -> list[tuple]:
    op = st.one_of(
        st.tuples(st.just("drop"), st.integers(0, count - 1)),
        st.tuples(st.just("dup"), st.integers(0, count - 1)),
        st.tuples(st.just("rename"), st.integers(0, count - 1), st.sampled_from(names)),
        st.tuples(st.just("swap"), st.integers(0, count - 1), st.integers(0, count - 1)),
        st.tuples(st.just("symlink"), st.integers(0, count - 1), st.sampled_from(["/etc/passwd", "../../outside/x", "IBM.fernet"])),
        st.tuples(st.just("hardlink"), st.integers(0, count - 1)),
        st.tuples(st.just("add"), st.sampled_from(names), st.binary(max_size=64)),
        st.tuples(st.just("reverse")),
        st.tuples(st.just("device"), st.integers(0, count - 1)),
    )
    return draw(st.lists(op, min_size=1, max_size=3))


def apply_member_ops(members: list, ops: list[tuple]) -> list:
    members = [(info, data) for info, data in members]
    for op in ops:
        n = len(members)
        if op[0] == "reverse":
            members.reverse()
            continue
        if op[0] == "add":
            members.append(file_member(op[1], op[2]))
            continue
        if not n:
            continue
        i = op[1] % n
        info, data = members[i]
        if op[0] == "drop":
            members.pop(i)
        elif op[0] == "dup":
            members.append((info, (data or b"") + b"x"))
        elif op[0] == "rename":
            members[i] = file_member(op[2], data or b"")
        elif op[0] == "swap":
            j = op[2] % n
            members[i] = file_member(info.name, members[j][1] or b"")
        elif op[0] == "symlink":
            members[i] = link_member(info.name, op[2])
        elif op[0] == "hardlink":
            members[i] = link_member(info.name, members[(i + 1) % n][0].name, hard=True)
        elif op[0] == "device":
            device = tarfile.TarInfo(info.name)
            device.type = tarfile.CHRTYPE
            device.devmajor, device.devminor = 1, 3
            members[i] = (device, None)
    return members


def test_mutated_archive_members_are_refused_or_harmless(lab, figures):
    """Member-level tampering: dropped, duplicated, renamed (traversal, absolute, lookalike
    names), swapped contents, links, devices, extra members. Same properties as above."""
    genuine = read_members(lab.archive)
    path = lab.root / "probe" / "members.tar"
    path.parent.mkdir()
    names = hostile_names(lab.outside)

    def check(ops: list[tuple]) -> tuple[str, str] | None:
        write_members(path, apply_member_ops(genuine, ops))
        problem = lab.verify_problem(path) or lab.recover_problem(path)
        return (problem[0], f"{ops!r}: {problem[1]}") if problem else None

    run_property(member_ops(names, len(genuine)), check, figures, "hostile/archive-members",
                 budget=ARCHIVE_EXAMPLES)
    assert not list(lab.outside.iterdir()), "something was written to the outside directory"


def test_manifest_of_the_wrong_shape_is_refused_not_a_crash(lab, figures):
    """BackupArchive reads "an archive we did not necessarily write". A manifest sealed
    under the right key but of another shape (another format version, a bug, a tool that
    re-sealed it) must give a named problem, not a TypeError/KeyError."""
    genuine = read_members(lab.archive)
    path = lab.root / "probe" / "manifest.tar"
    path.parent.mkdir()
    entry = st.dictionaries(st.sampled_from(["path", "size", "sha256", "rows", "key"]), json_any,
                            max_size=5)
    manifests = json_any | st.fixed_dictionaries(
        {"format": json_any, "datasets": json_any | st.lists(entry, max_size=3)},
        optional={"canary": json_any})

    def check(manifest: Any) -> tuple[str, str] | None:
        sealed = lab.ring.encrypt(json.dumps(manifest).encode())
        write_members(path, [(i, d) if i.name != "manifest.fernet" else file_member(i.name, sealed)
                             for i, d in genuine])
        problem = lab.verify_problem(path) or lab.recover_problem(path)
        return (problem[0], f"{json.dumps(manifest)[:80]}: {problem[1]}") if problem else None

    run_property(manifests, check, figures, "hostile/archive-manifest-shape",
                 budget=ARCHIVE_EXAMPLES,
                 examples=[[], {"datasets": [1]}, {"datasets": [{"path": "daily/IBM.fernet"}]},
                           {"canary": 5}])


# -- crafted archives, through the real command line --------------------------------------

def _sparse_oversized(path: Path, genuine: list, name: str) -> Path:
    """An archive whose member `name` claims MAX_MEMBER_BYTES + 1 bytes (a sparse file: no
    disk or time spent), followed by the genuine members minus `name`."""
    info = tarfile.TarInfo(name)
    info.size = MAX_MEMBER_BYTES + 1
    header = info.tobuf(tarfile.PAX_FORMAT)
    rest = io.BytesIO()
    with tarfile.open(fileobj=rest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in genuine:
            if member.name != name:
                tar.addfile(member, io.BytesIO(data))
    with open(path, "wb") as handle:
        handle.write(header)
        handle.seek(len(header) + (info.size + 511) // 512 * 512)
        handle.write(rest.getvalue())
    return path


def crafted_archives(lab: ArchiveLab, where: Path) -> dict[str, tuple[Path, str]]:
    """name -> (archive, text its refusal must contain)."""
    genuine = read_members(lab.archive)
    ibm = lab.ibm_member
    payload = lab.members[ibm]
    absolute = f"{lab.outside}/abs.fernet"
    made: dict[str, tuple[Path, str]] = {}

    def put(name: str, members: list, needle: str) -> None:
        made[name] = (write_members(where / f"{name}.tar", members), needle)

    put("traversal", genuine + [file_member("data/../../evil.fernet", payload)], "data/../../evil.fernet")
    put("absolute", genuine + [file_member(absolute, payload)], absolute)
    put("deep-traversal", genuine + [file_member("data/daily/../../../evil.fernet", payload)],
        "data/daily/../../../evil.fernet")
    put("symlink", [link_member(ibm, "../../outside/link-target") if i.name == ibm else (i, d)
                    for i, d in genuine], ibm)
    put("hardlink", [link_member(ibm, "/etc/passwd", hard=True) if i.name == ibm else (i, d)
                     for i, d in genuine], ibm)
    put("duplicate", genuine + [file_member(ibm, payload + b"x")], ibm)
    made["oversized"] = (_sparse_oversized(where / "oversized.tar", genuine, ibm), ibm)
    whole = lab.archive_bytes
    (where / "truncated.tar").write_bytes(whole[: len(whole) // 2])
    made["truncated"] = (where / "truncated.tar", "")
    (where / "not-a-tar.tar").write_bytes(os.urandom(4096))
    made["not-a-tar"] = (where / "not-a-tar.tar", "unreadable")
    return made


def test_crafted_archives_are_refused_named_and_contained(tmp_path, figures):
    """Traversal and absolute names, symlinks and hard links, a duplicate, a 1 GiB+ member,
    truncation, random bytes. verify-backup: exit 5 naming the member; recover: nothing
    outside the store, the hostile member named, genuine datasets restored byte for byte."""
    import shutil

    lab = ArchiveLab(tmp_path)
    where = tmp_path / "probe"
    where.mkdir()
    archives = crafted_archives(lab, where)
    broken: dict[str, Any] = {}
    for name, (archive, _) in archives.items():  # in this process, through the library
        problem = lab.verify_problem(archive) or lab.recover_problem(archive)
        if problem or verify_backup(archive, lab.ring, None).sound:
            broken[f"library {name}"] = problem or "verify called it sound"
    site = lab.site
    verifies = run_batch([{"argv": ["--verify-backup", str(a), "--all"]} for a, _ in archives.values()],
                         site.cwd, site.env())
    for (name, (_, needle)), result in zip(archives.items(), verifies, strict=True):
        if result["code"] != 5 or needle not in result["stdout"] + result["stderr"]:
            broken[f"verify {name}"] = (result["code"], result["stdout"].strip()[-200:])
    lab.damage()  # each recover gets its own copy of the damaged installation
    copies = {name: shutil.copytree(site.cwd, tmp_path / "copies" / name, symlinks=True)
              for name in archives}
    stores = [site.cwd, *copies.values()]
    excluded = tuple(p for c in stores for p in (c / "data", c / "state", c / "secure_downloader.log"))
    before = snapshot(tmp_path, exclude=excluded + (where,))
    recovers = run_batch([{"argv": ["--recover", "--from-backup", str(archive)], "cwd": str(copies[name])}
                          for name, (archive, _) in archives.items()], site.cwd, site.env())
    after = snapshot(tmp_path, exclude=excluded + (where,))
    intact = set(lab.originals) - set(lab.lost) - {lab.altered}
    for (name, (_, needle)), result in zip(archives.items(), recovers, strict=True):
        text = result["stdout"] + result["stderr"]
        current = {p.relative_to(copies[name] / "data").as_posix(): p.read_bytes()
                   for p in dataset_files(copies[name] / "data")}
        genuine = {rel for rel, token in current.items() if token == lab.originals.get(rel)}
        expected = intact | ({lab.ibm_member.removeprefix("data/")} - {needle.removeprefix("data/")})
        if name in ("truncated", "not-a-tar"):
            expected = intact
        if (result["code"] not in (0, 5) or (needle and needle not in text)
                or not expected <= genuine or "Traceback" in text):
            broken[f"recover {name}"] = (result["code"], sorted(expected - genuine), text.strip()[-200:])
    if after != before:
        broken["outside the stores"] = sorted(set(after.items()) ^ set(before.items()))[:6]
    tried = 3 * len(archives)
    figures.record("hostile/crafted-archives", tried=tried, held=tried - len(broken),
                   notes=f"archives: {sorted(archives)}")
    assert not list(lab.outside.iterdir()), "something was written to the outside directory"
    if broken:
        pytest.fail(f"crafted archives not refused and contained: {broken}", pytrace=False)
