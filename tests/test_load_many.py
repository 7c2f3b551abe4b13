"""load_many: many symbols in one DataFrame, equal to the per-symbol loads joined."""

import numpy as np
import pandas as pd
import pytest
from keyring.backends import fail

from secure_ohlcv_downloader import (
    DatasetId,
    EncryptedStore,
    IntegrityError,
    KeyringKeyStore,
    SecureOHLCVDownloader,
    UsageError,
)
from tests.foundation_fixtures import new_key_ring, settings_for


def daily_bars(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = np.round(100 + np.cumsum(rng.normal(0, 1, rows)), 4)
    return pd.DataFrame({
        "timestamp": pd.date_range("2020-01-02", periods=rows, freq="B").astype("datetime64[us]"),
        "open": close, "high": np.round(close + 1, 4), "low": np.round(close - 1, 4),
        "close": close, "volume": rng.integers(1_000, 1_000_000, rows)})


@pytest.fixture
def app(tmp_path):
    downloader = SecureOHLCVDownloader(settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=new_key_ring()),
                                       KeyringKeyStore(fail.Keyring()))
    downloader.init()
    with downloader.ctx.exclusive() as ring:
        store = EncryptedStore(downloader.settings, ring)
        for seed, (symbol, rows) in enumerate([("IBM", 30), ("MSFT", 7), ("BRK.B", 12)]):
            store.write(DatasetId(symbol), daily_bars(rows, seed), {})
    return downloader


def test_load_many_equals_the_per_symbol_loads_joined(app):
    symbols = ["MSFT", "IBM", "BRK.B"]
    expected = pd.concat([app.load(s).reset_index().assign(symbol=s) for s in symbols],
                         ignore_index=True)

    frame = app.load_many(symbols)

    assert list(frame.columns) == ["symbol", "timestamp", "open", "high", "low", "close", "volume"]
    assert list(frame["symbol"].cat.categories) == symbols
    pd.testing.assert_frame_equal(frame.drop(columns="symbol"),
                                  expected.drop(columns="symbol"))
    assert frame["symbol"].astype(str).tolist() == expected["symbol"].tolist()


def test_load_many_names_a_symbol_that_is_not_stored(app):
    with pytest.raises(UsageError, match="nothing stored for NOSUCH daily"):
        app.load_many(["IBM", "NOSUCH"])


def test_load_many_refuses_a_file_that_does_not_decrypt(app):
    path = app.store().path(DatasetId("IBM"))
    data = bytearray(path.read_bytes())
    data[60] ^= 1
    path.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match="IBM daily"):
        app.load_many(["IBM"])
