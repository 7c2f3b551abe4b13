"""Shared helpers and fixtures of the download-pipeline tests (client, downloader, CLI).

Import what a test module uses explicitly (pytest finds fixtures imported into a module):

    from tests.download_fixtures import Workspace, emulator, start_emulator, ...

Everything runs against the local Alpha Vantage emulator (tests/alphavantage_emulator.py), a
real HTTP server on 127.0.0.1: the client is never patched. The emulator is started with
`skip_holidays=False`, so every weekday is a trading day and the downloader's idea of the
newest published US session (the New York Stock Exchange's calendar and the real clock:
`session_day()`) always has a bar.

A `Workspace` is one operator's working directory: its environment is built from scratch
(PATH, HOME, the fail keyring backend, a generated OHLCV_ENCRYPTION_KEY, the emulator's URL,
fast retries), and it runs the downloader either in-process (fast set-up) or as the real
command line in a subprocess.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from keyring.backends import fail

from config import Settings, load_settings
from secure_ohlcv_downloader import (
    MARKET_TZ,
    AlphaVantageClient,
    DatasetId,
    DownloadReport,
    KeyringKeyStore,
    RateLimiter,
    RunStats,
    SecureOHLCVDownloader,
    dataset_files,
    expected_session,
    utc_now,
)
from tests.alphavantage_emulator import AlphaVantageEmulator
from tests.foundation_fixtures import headless_env, new_key_ring, run_cli, run_python

PREMIUM_KEY = "PREMIUM-TEST-KEY"
PREMIUM_PER_MINUTE = 6000          # 100 requests a second: plenty for a fast test
FREE_KEY = "FREEKEY"               # the emulator's free key (2026 rules: 1/s, 25/day)
HISTORY_START = date(2019, 1, 2)   # a shorter history than the emulator's default: faster


# -- dates ---------------------------------------------------------------------------------

def session_day() -> date:
    """The newest session whose US bar the downloader expects now (real clock)."""
    return expected_session(DatasetId("IBM"), utc_now())[0]


def weekdays_before(day: date, count: int) -> date:
    """The weekday `count` weekdays before `day` (every weekday trades in the emulator)."""
    for _ in range(count):
        day -= timedelta(days=1)
        while day.weekday() >= 5:
            day -= timedelta(days=1)
    return day


# -- the emulator ----------------------------------------------------------------------------

def start_emulator(**options: Any) -> AlphaVantageEmulator:
    """A running emulator with one premium key (6000/min) serving data up to session_day()."""
    settings: dict[str, Any] = dict(premium_keys={PREMIUM_KEY: PREMIUM_PER_MINUTE},
                                    skip_holidays=False, history_start=HISTORY_START,
                                    as_of=session_day())
    settings.update(options)
    return AlphaVantageEmulator(**settings).start()


@pytest.fixture
def emulator() -> Iterator[AlphaVantageEmulator]:
    av = start_emulator()
    try:
        yield av
    finally:
        av.stop()


@pytest.fixture
def emulators() -> Iterator[Any]:
    """A factory of emulators with other settings (start_emulator's options); all are
    stopped at the end of the test."""
    started: list[AlphaVantageEmulator] = []

    def start(**options: Any) -> AlphaVantageEmulator:
        started.append(start_emulator(**options))
        return started[-1]

    try:
        yield start
    finally:
        for av in started:
            av.stop()


def sent(av: AlphaVantageEmulator, **match: Any) -> list[dict[str, Any]]:
    """The emulator's request log entries whose fields equal `match` (e.g. symbol="IBM")."""
    return [entry for entry in av.requests
            if all(entry.get(name) == value for name, value in match.items())]


# -- the client on its own -------------------------------------------------------------------

def client_settings(cwd: Path, av: AlphaVantageEmulator, **variables: str) -> Settings:
    """Settings for a client talking to `av` with the premium key; `variables` override."""
    environ = {"ALPHA_VANTAGE_API_KEY": PREMIUM_KEY, "ALPHA_VANTAGE_BASE_URL": av.base_url,
               "OHLCV_RATE_LIMIT_PER_MINUTE": str(PREMIUM_PER_MINUTE),
               "OHLCV_BACKOFF_SECONDS": "0.01"}
    environ.update(variables)
    return load_settings(environ=environ, cwd=cwd)


def make_client(settings: Settings) -> tuple[AlphaVantageClient, RateLimiter, RunStats]:
    """A real client (real rate limiter, real session) for the API keys of `settings`."""
    limiter = RateLimiter(settings, [k.reveal() for k in settings.api_keys] or ["demo"])
    stats = RunStats()
    return AlphaVantageClient(settings, limiter, stats), limiter, stats


# -- a working directory ---------------------------------------------------------------------

class Workspace:
    """One operator's directory: settings from a from-scratch environment, the data, the log.

    `variables` override the defaults; a value of None removes the variable (e.g.
    ALPHA_VANTAGE_API_KEY=None for the demo key, OHLCV_RATE_LIMIT_PER_MINUTE=None for a
    free key)."""

    def __init__(self, cwd: Path, av: AlphaVantageEmulator, **variables: str | None) -> None:
        self.cwd = cwd
        self.av = av
        self.variables: dict[str, str | None] = {
            "OHLCV_ENCRYPTION_KEY": new_key_ring(),  # a primary key and the naming key
            "ALPHA_VANTAGE_API_KEY": PREMIUM_KEY,
            "ALPHA_VANTAGE_BASE_URL": av.origin + "/query",
            "OHLCV_RATE_LIMIT_PER_MINUTE": str(PREMIUM_PER_MINUTE),
            "OHLCV_BACKOFF_SECONDS": "0.01",
        }
        self.variables.update(variables)

    def env(self, **overrides: str | None) -> dict[str, str]:
        merged = dict(self.variables, **overrides)
        return headless_env(self.cwd, **{k: v for k, v in merged.items() if v is not None})

    def settings(self, **overrides: str | None) -> Settings:
        return load_settings(environ=self.env(**overrides), cwd=self.cwd)

    def app(self, **overrides: str | None) -> SecureOHLCVDownloader:
        return SecureOHLCVDownloader(self.settings(**overrides), KeyringKeyStore(fail.Keyring()))

    def init(self) -> Workspace:
        """`--init`, in-process: private directories and the canary for the env key."""
        self.app().init()
        return self

    def download(self, symbols: list[str], overrides: dict[str, str | None] | None = None,
                 **options: Any) -> DownloadReport:
        """One in-process run (a fresh app, as a new process would build)."""
        return self.app(**(overrides or {})).download(symbols, **options)

    def cli(self, *args: str, **overrides: str | None) -> subprocess.CompletedProcess:
        """The real command line in a subprocess, stdin closed."""
        return run_cli(list(args), self.cwd, self.env(**overrides))

    def python(self, code: str, **overrides: str | None) -> subprocess.CompletedProcess:
        return run_python(code, self.cwd, self.env(**overrides))

    # -- the store, read and arranged through the product's own API -----------------------

    def stored(self, dataset: DatasetId) -> tuple[pd.DataFrame, dict[str, Any]]:
        return self.app().store().read(dataset)

    def backdate(self, dataset: DatasetId) -> None:
        """Make the stored dataset look as if its last check ran the evening its newest bar
        was published (20:00 New York), as a nightly run would have left it.

        The downloader decides currency from the real clock and the exchange's calendar;
        checked_at matters only for a symbol no calendar knows (a check made after
        the expected close that found no newer bar means a holiday, so a dataset checked
        "now" is current whatever the emulator serves) and for intraday months."""
        store = self.app().store()
        frame, meta = store.read(dataset)
        last = frame["timestamp"].iloc[-1].date()
        evening = datetime.combine(last, time(20, 0), MARKET_TZ).astimezone(UTC)
        kept = {k: meta[k] for k in ("partial_history", "function", "stale_after") if k in meta}
        with store.lock():
            store.write(dataset, frame, dict(kept, checked_at=evening.isoformat()))

    def log_text(self) -> str:
        path = self.cwd / "secure_downloader.log"
        return path.read_text() if path.exists() else ""

    def dataset_files(self) -> list[Path]:
        return dataset_files(self.cwd / "data")


def expected_daily(av: AlphaVantageEmulator, symbol: str, adjusted: bool = False) -> pd.DataFrame:
    """The daily bars the emulator serves for `symbol`, as the downloader's typed table."""
    bars = pd.DataFrame(av.daily_bars(symbol))
    frame = pd.DataFrame({"timestamp": pd.to_datetime(bars["date"])})
    for column in ("open", "high", "low", "close"):
        frame[column] = bars[column].astype("float64")
    frame["volume"] = bars["volume"].astype("int64")
    if adjusted:
        for column in ("adjusted_close", "dividend_amount", "split_coefficient"):
            frame[column] = bars[column].astype("float64")
    return frame


def run_at(ws: Workspace, clock: datetime, symbols: list[str], **options: Any):
    """One download of the library in `ws` with the run's clock at `clock`: its report."""
    app = ws.app()
    app.ctx.clock = lambda: clock.astimezone(UTC)
    return app.download(symbols, **options)
