"""Benchmark data: the synthetic 6,500-bar frame and the cached store of 2,000 datasets.

The frame comes from the emulator's price model (in-process, no server) rendered as the
API's CSV and parsed by the product's own parse_payload, so its dtypes and values are exactly
what a download stores. Its bars fall on the New York Stock Exchange's real sessions (the
product's own calendar passed to the emulator), as a real store's do, so the gap report finds
nothing in it but the gaps planted on purpose (`varied`). It ends one trading day before the
product's newest expected session, so a store built from it is "one bar behind": a download
refreshes it with the compact window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import (
    API_KEY,
    bench_env,
    log,
    make_app,
    new_fernet_key,
    session_days,
    write_env_file,
)

ROWS = 6_500
HISTORY_START = "2000-01-03"   # the emulator's default: 26 years of sessions
# One history in PLANTED_EVERY has gaps planted (two sessions dropped, one bar on a holiday),
# so the gap report's listing path runs too: 20 of the 2,000 cached histories.
PLANTED_EVERY = 100
PLANTED_HOLIDAY = "2025-12-25"   # Christmas, NYSE closed


def base_frame(rows: int = ROWS) -> pd.DataFrame:
    """The newest `rows` bars of a synthetic symbol ending one bar before session_days(1)."""
    from secure_ohlcv_downloader import (
        Classified,
        DatasetId,
        Outcome,
        calendar_for,
        parse_payload,
    )
    from tests.alphavantage_emulator import FUNCTIONS, AlphaVantageEmulator, WireFormat

    end = session_days(2)[0]
    emu = AlphaVantageEmulator(as_of=end, sessions=calendar_for("IBM").is_session,
                               history_start=HISTORY_START)
    function = FUNCTIONS["TIME_SERIES_DAILY"]
    wire = emu._model.daily("SYNTH", end).wire_rows(function, None)[:rows]
    body = WireFormat.csv(function.csv_header, wire)
    frame = parse_payload(Classified(Outcome.DATA, payload=body), DatasetId("SYNTH"))
    assert len(frame) == rows, len(frame)
    return frame


def varied(frame: pd.DataFrame, i: int) -> pd.DataFrame:
    """The frame for symbol number `i`: prices shifted by i cents, volume by i (relations
    between open, high, low and close are kept; values stay 4-decimal prices). One in
    PLANTED_EVERY also misses its 100th and 101st sessions from the end and has the bar
    before Christmas 2025 repeated on Christmas Day: three gaps, as the report finds them."""
    out = frame.copy()
    for column in ("open", "high", "low", "close"):
        out[column] = np.round(out[column].to_numpy() + 0.01 * i, 4)
    out["volume"] = out["volume"] + i
    if i % PLANTED_EVERY == PLANTED_EVERY // 2:
        holiday = pd.Timestamp(PLANTED_HOLIDAY)
        on_holiday = out[out["timestamp"] < holiday].tail(1).assign(timestamp=holiday)
        out = pd.concat([out.drop(out.index[-101:-99]), on_holiday])
        out = out.sort_values("timestamp", ignore_index=True)
    return out


def evening_of(day) -> str:
    """20:00 New York on `day`, as UTC ISO text: when a nightly run would have checked a
    dataset whose newest bar is `day`. The product decides currency from the real clock: a
    check made after the expected session's close (plus grace) that found no newer bar means
    a holiday, so a dataset checked "now" counts as current whatever the emulator serves."""
    from datetime import UTC, datetime, time

    from secure_ohlcv_downloader import MARKET_TZ

    return datetime.combine(day, time(20, 0), MARKET_TZ).astimezone(UTC).isoformat()


def backdate(app, names: list[str]) -> None:
    """Rewrite each stored dataset with checked_at = the evening of its newest bar, as the
    nightly run that fetched it would have left it (through the product's own store)."""
    from secure_ohlcv_downloader import DatasetId

    store = app.store()
    with store.lock():
        for symbol in names:
            dataset = DatasetId(symbol)
            frame, meta = store.read(dataset)
            kept = {k: meta[k] for k in ("partial_history", "function", "stale_after")
                    if k in meta}
            store.write(dataset, frame,
                        dict(kept, checked_at=evening_of(frame["timestamp"].iloc[-1].date())))


def symbols(count: int, prefix: str = "D") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


@dataclass
class Store2000:
    """A run directory with `count` encrypted datasets, keys in `.env` (headless)."""

    root: Path
    key: str
    symbols: list[str]
    write_seconds: float

    def env(self, base_url: str = "http://127.0.0.1:9/query", per_minute: int = 60_000,
            workers: int = 8) -> dict[str, str]:
        # No OHLCV_ENCRYPTION_KEY in the mapping: it comes from root/.env.
        return bench_env(self.root, base_url, per_minute=per_minute, workers=workers)


def build_store(root: Path, count: int, frame: pd.DataFrame) -> Store2000:
    """Write `count` datasets straight through EncryptedStore.write (what a download writes,
    without the network), the key in root/.env."""
    import time

    from secure_ohlcv_downloader import DatasetId

    key = new_fernet_key()
    root.mkdir(parents=True, exist_ok=True)
    write_env_file(root, key)
    env = bench_env(root, "http://127.0.0.1:9/query", per_minute=60_000)
    app = make_app(root, env, init=True)
    store = app.store()
    names = symbols(count)
    meta: dict[str, Any] = {"checked_at": evening_of(frame["timestamp"].iloc[-1].date()),
                            "partial_history": False, "function": "TIME_SERIES_DAILY"}
    started = time.perf_counter()
    with store.lock():
        for i, symbol in enumerate(names):
            store.write(DatasetId(symbol), varied(frame, i), meta)
            if (i + 1) % 500 == 0:
                log(f"  wrote {i + 1}/{count} encrypted datasets")
    seconds = time.perf_counter() - started
    (root / "store.json").write_text(json.dumps({"symbols": names, "seconds": seconds}))
    return Store2000(root, key, names, seconds)


def build_plain(root: Path, count: int, frame: pd.DataFrame) -> list[Path]:
    """The same tables as unencrypted Parquet files, pandas/pyarrow defaults (snappy), as
    `load` returns them (indexed by timestamp): the physical reference for the local part."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, symbol in enumerate(symbols(count)):
        path = root / f"{symbol}.parquet"
        varied(frame, i).set_index("timestamp").to_parquet(path)
        paths.append(path)
    return paths


__all__ = ["API_KEY", "ROWS", "Store2000", "base_frame", "build_plain", "build_store",
           "symbols", "varied"]
