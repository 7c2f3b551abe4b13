"""Measurements that need a fresh process (peak RSS is a per-process high-water mark).

    python -m bench.child load-many   < job.json   # pd.concat of N loads
    python -m bench.child load-many-api < job.json # SecureOHLCVDownloader.load_many
    python -m bench.child read-plain  < job.json   # the same with pd.read_parquet
    python -m bench.child download    < job.json   # download N symbols through the emulator

The job (JSON on stdin) carries the run directory, the environment mapping and the symbols;
the answer is one JSON object on stdout. RSS figures are bytes: `baseline_rss` is the
resident size just before the measured work, `maxrss_*` the kernel's ru_maxrss.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import make_app, maxrss_bytes, rss_bytes, vmhwm_bytes


def _peak_of(warm_up: Callable[[], Any], build: Callable[[], Any]) -> dict[str, Any]:
    """Memory and time of `build()` (which returns one DataFrame), measured from a baseline
    taken after `warm_up()` (lazy imports, Arrow's pools) and a collection."""
    warm_up()
    gc.collect()
    baseline, before = rss_bytes(), maxrss_bytes()
    started = time.perf_counter()
    frame = build()
    seconds = time.perf_counter() - started
    return {"baseline_rss": baseline, "maxrss_before": before, "maxrss_after": maxrss_bytes(),
            "vmhwm": vmhwm_bytes(), "rss_after": rss_bytes(),
            "frame_bytes": int(frame.memory_usage(deep=True).sum()), "rows": len(frame),
            "seconds": seconds}


def load_many(job: dict[str, Any]) -> dict[str, Any]:
    """pd.concat of one load() per symbol, as a user would write it by hand."""
    import pandas as pd

    app, symbols = make_app(Path(job["root"]), job["env"]), job["symbols"]
    return _peak_of(lambda: app.load(symbols[0]),
                    lambda: pd.concat([app.load(symbol) for symbol in symbols]))


def load_many_api(job: dict[str, Any]) -> dict[str, Any]:
    """The product's own one-frame loader, SecureOHLCVDownloader.load_many."""
    app, symbols = make_app(Path(job["root"]), job["env"]), job["symbols"]
    return _peak_of(lambda: app.load_many(symbols[:1]), lambda: app.load_many(symbols))


def read_plain(job: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    paths = job["paths"]
    return _peak_of(lambda: pd.read_parquet(paths[0]),
                    lambda: pd.concat([pd.read_parquet(path) for path in paths]))


def download(job: dict[str, Any]) -> dict[str, Any]:
    from collections import Counter

    app = make_app(Path(job["root"]), job["env"])
    app.key_ring()
    gc.collect()
    baseline, before = rss_bytes(), maxrss_bytes()
    started = time.perf_counter()
    report = app.download(job["symbols"], interval="daily")
    seconds = time.perf_counter() - started
    return {"baseline_rss": baseline, "maxrss_before": before, "maxrss_after": maxrss_bytes(),
            "vmhwm": vmhwm_bytes(), "rss_after": rss_bytes(), "seconds": seconds,
            "outcomes": dict(Counter(r.outcome for r in report.results)),
            "modes": dict(Counter(r.mode for r in report.results)),
            "errors": [r.error for r in report.failed][:3]}


TASKS = {"load-many": load_many, "load-many-api": load_many_api, "read-plain": read_plain,
         "download": download}


def main() -> int:
    task = TASKS[sys.argv[1]]
    job = json.load(sys.stdin)
    json.dump(task(job), sys.stdout)
    sys.stdout.write("\n")
    return 0


# Linux keeps a process's ru_maxrss across execve, and a child started by vfork/fork (as
# subprocess does) starts from the parent's high-water mark: a fresh interpreter launched
# straight from this 500 MB process reports ru_maxrss = 500 MB before doing anything. A
# small intermediate process that itself starts the child gives it a clean count.
_TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def run_child(task: str, job: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run one task in a fresh interpreter (started through a small intermediate process so
    its ru_maxrss is its own) and return its answer."""
    import subprocess

    from bench.common import REPO

    done = subprocess.run([sys.executable, "-c", _TRAMPOLINE, sys.executable, "-m", "bench.child",
                           task], cwd=REPO, input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bench.child {task} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
