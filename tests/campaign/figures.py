"""Campaign mode, budgets and figures (plain helpers, importable anywhere).

Mode switch, in order of precedence:
  1. ``pytest --campaign long`` (registered by tests/campaign/conftest.py when
     pytest loads it at startup, e.g. ``pytest tests/campaign``);
  2. the environment variable ``OHLCV_CAMPAIGN=long`` (works for every
     invocation, including a plain ``pytest`` over ``tests``).
Default: ``quick``.

Figures: when ``OHLCV_CAMPAIGN_FIGURES`` names a file, every
``Figures.record(area, tried=N, held=N, notes="")`` appends one JSON line to
it, so a long run can feed docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import threading
import time

MODES = ("quick", "long")
ENV_MODE = "OHLCV_CAMPAIGN"
ENV_FIGURES = "OHLCV_CAMPAIGN_FIGURES"

# Set by the conftest when ``--campaign`` was given on the command line.
_option_mode: str | None = None


def set_option_mode(mode: str | None) -> None:
    global _option_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"--campaign must be one of {MODES}, not {mode!r}")
    _option_mode = mode


def campaign_mode() -> str:
    """``"quick"`` (default) or ``"long"``."""
    if _option_mode is not None:
        return _option_mode
    value = os.environ.get(ENV_MODE, "").strip().lower()
    if not value:
        return "quick"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE} must be one of {MODES}, not {value!r}")
    return value


def is_long() -> bool:
    return campaign_mode() == "long"


def campaign_budget(quick_n, long_n):
    """Pick the quick-mode or the long-mode value of a budget."""
    return long_n if is_long() else quick_n


_lock = threading.Lock()


class Figures:
    """Collects what campaign tests tried; appends JSON lines when asked to."""

    def __init__(self, path: str | None = None, test: str = ""):
        self.path = path if path is not None else os.environ.get(ENV_FIGURES) or None
        self.test = test
        self.records: list[dict] = []

    def record(self, area: str, tried: int, held: int, notes: str = "", **extra) -> dict:
        entry = {
            "area": str(area),
            "tried": int(tried),
            "held": int(held),
            "notes": str(notes),
            "mode": campaign_mode(),
            "test": self.test,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        entry.update(extra)
        self.records.append(entry)
        if self.path:
            line = json.dumps(entry, sort_keys=True, default=str)
            with _lock:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
        return entry
