"""Crash-test writer: writes datasets under the data-directory lock, forever, until killed.

    OHLCV_DATA_DIR=... OHLCV_ENCRYPTION_KEY=... python tests/writer_child.py SEED

The key comes from the environment only (a command line is visible to every user in
`ps`). The program imports everything, prints `ready`, then waits for a line on stdin
before it touches the data directory, so a test can start it ahead of time and choose
the moment writing begins. Then it loops: pick one of a few datasets and a size, print
`writing <dataset> <version> <rows>`, write, print `wrote <dataset> <version> <rows>`.

Every frame is predictable from its version: open = version + row number, and the
metadata carries {"version", "rows"}, so a reader can tell a whole version from a torn one.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from config import load_settings  # noqa: E402
from secure_ohlcv_downloader import (  # noqa: E402
    DatasetId,
    EncryptedStore,
    KeyRing,
    ensure_private_dir,
    ring_of,
)

DATASETS = {
    "daily-IBM": DatasetId("IBM"),
    "daily_adjusted-BRK.B": DatasetId("BRK.B", "daily", adjusted=True),
    "intraday_5min-TSCO.LON-2024-01": DatasetId("TSCO.LON", "5min", month="2024-01"),
}
ROWS = (1, 50, 2_000, 30_000, 120_000)


def frame(version: int, rows: int) -> pd.DataFrame:
    opens = version + np.arange(rows, dtype="float64")
    return pd.DataFrame({
        "timestamp": pd.date_range("2024-01-02 09:30", periods=rows, freq="min", tz="UTC"),
        "open": opens,
        "high": opens + 1.0,
        "low": opens - 1.0,
        "close": opens + 0.5,
        "volume": np.arange(rows, dtype="int64"),
    })


def main() -> None:
    rng = random.Random(int(sys.argv[1]))
    settings = load_settings()
    ring = KeyRing(ring_of(settings.encryption_keys))
    store = EncryptedStore(settings, ring)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return  # the test gave up on this child
    ensure_private_dir(settings.data_dir, settings.dir_mode)
    while True:
        name = rng.choice(sorted(DATASETS))
        version, rows = rng.randrange(1, 10**9), rng.choice(ROWS)
        print(f"writing {name} {version} {rows}", flush=True)
        with store.lock():
            store.write(DATASETS[name], frame(version, rows), {"version": version, "rows": rows})
        print(f"wrote {name} {version} {rows}", flush=True)


if __name__ == "__main__":
    main()
