"""Before and after each fix a benchmark drove: the product as it was at the commit before
the fix, measured again in this session by this benchmark code against this emulator.

FIXES lists each fix: the commit(s) that made it, the scenario and the checks it moved,
and what the profile or diagnosis showed. `measure_before` exports the product's modules
(secure_ohlcv_downloader.py, config.py, secure_ohlcv_cli.py) at each fix's parent commit
with `git archive`, and runs the scenarios that commit is needed for in a child
`python -m bench.run SCENARIO... --json FILE --before-run` whose BENCH_PRODUCT_DIR points
at them (bench/common.py imports them ahead of this checkout's). `render` turns the figures
into the section of RESULTS.md; "now" is the current run's figure of the same check.

A fix measured within the current run (load_many against a hand-made pd.concat of loads,
same product, same run) names the row that serves as its "before" instead of a commit.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import PRODUCT_MODULES, REPO, ScenarioResult, git, log


@dataclass(frozen=True)
class Fix:
    commits: tuple[str, ...]  # the commit(s) that made the fix, oldest first
    scenario: str
    checks: tuple[str, ...]  # names of the checks it moved
    what: str  # what the profile or diagnosis showed, and the change
    before_row: str = ""  # measured in this run instead of at a commit (see docstring)


FIXES: tuple[Fix, ...] = (
    Fix(("84c9dde", "eddb949"), "quota", ("limit violations (emulator), all runs",
                                         "wall time / quota lower bound (10 s)"),
        "Diagnosis: the send time was recorded before the day's count was fsynced, so a slow "
        "write let the next request follow too closely (a violation in 2 of 4 complete runs). "
        "The count is now persisted while waiting, and the slot reserved after it."),
    Fix(("739d54c",), "symbol", ("ours / alpha_vantage",),
        "Profile: half of the per-symbol time in str columns and pd.to_numeric. parse_payload "
        "now reads CSV straight into float64 columns with pandas' C parser; the column-by-"
        "column path only runs to name what is wrong."),
    Fix(("96f2be1",), "symbol", ("ours / alpha_vantage",),
        "Repeated runs at 0.96-1.02x; profile: pandas overhead (list indexing, one __setitem__ "
        "per column, Python date objects for the stored date column). Frames are built from "
        "NumPy columns at once, bars validated as arrays, dates cast to datetime64[D]."),
    Fix(("739d54c",), "read", ("load / read_parquet",),
        "Profile: decode_table converted column by column in pandas. The storage encodings "
        "are now undone in Arrow and converted once, on one thread."),
    Fix(("135b82a",), "read", ("2,000 datasets into one DataFrame: (peak RSS - baseline) / "
                                "DataFrame size",),
        "pd.concat of 2,000 loads holds every part and the copy at once. load_many reads each "
        "file's row count first, allocates the columns once and decodes each dataset into its "
        "slice.",
        before_row="ours, 2,000 loads + pd.concat: (peak RSS - baseline) / DataFrame size"),
    Fix(("96017d9",), "memory", ("peak RSS, 200 symbols", "peak RSS, 2,000 symbols"),
        "Diagnosis runs: Arrow's default (mimalloc) pool kept about 70 MB per run of 8 "
        "workers. Arrow now uses the system memory pool."),
    Fix(("739d54c",), "rotate", ("rotation / plain rewrite",),
        "Profile: every file decrypted twice (to rotate, then to verify). One pass over the "
        "keys per file; verification by an HMAC check under the new key alone."),
    Fix(("178a2cf",), "rotate", ("rotation / plain rewrite",),
        "Profile: half the time in base64 decoding, once per key tried, primary first although "
        "most files are under the old key. The old key is tried first; a file this run wrote "
        "is verified by the SHA-256 of the token read back."),
    Fix(("5270bec", "9d0085a"), "rotate", ("rotation / plain rewrite",),
        "Profile: most of the rotation waiting in fsync with the GIL idle. Four threads "
        "re-encrypt the files, then read them back; the canary is still rotated last."),
    Fix(("6bf0fd3", "38580b1", "6b51a37"), "startup",
        ("--help / python -c pass", "status of 2,000 datasets"),
        "-X importtime: pandas and pyarrow (~0.6 s, ~100 MB) imported by every command. "
        "Heavy modules are imported on first use; status and estimate read each dataset's "
        "Parquet footer instead of decoding the table."),
    Fix(("ea2db76",), "holiday", ("requests on a holiday (every run)",),
        "Currency was weekday arithmetic on New York time, holidays learned from the API: "
        "one request per dataset on every holiday. It is now the newest session published by "
        "the symbol's exchange calendar (exchange_calendars)."),
    Fix(("a73bb4e", "9363a5c", "31fc8b2", "91006ad"), "gaps", ("gaps over 2,000 histories",),
        "Profile: a fresh process imported pandas twice over (Arrow's to_numpy, and "
        "exchange_calendars to build NYSE from 1998: ~0.45 s); two set look-ups per history; "
        "base64 decoding holds the GIL, so two threads were no faster than one. Dates come "
        "from Arrow's buffers, calendars from a validated copy in the state directory, a "
        "whole history is one comparison, and the files are split between two forked "
        "workers."),
)


@functools.cache
def parent(commit: str) -> str | None:
    """The short id of `commit`'s parent, or None when this clone does not have it."""
    return git("rev-parse", "--short", f"{commit}^") or None


def export_product(commit: str, target: Path) -> Path:
    """The product's modules as they were at `commit`, written under `target`."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit, *PRODUCT_MODULES],
                             cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def measure_before(root: Path, runs: int) -> dict[str, Any]:
    """{parent commit: {"results": {scenario: {check name: measured}}, "error": str}} for
    every parent commit the fixes need, each measured in one child run."""
    needed: dict[str, set[str]] = {}
    missing: list[str] = []
    for fix in FIXES:
        if fix.before_row:
            continue
        base = parent(fix.commits[0])
        if base is None:
            missing.append(fix.commits[0])
            continue
        needed.setdefault(base, set()).add(fix.scenario)
    measured: dict[str, Any] = {c: {"error": "commit not in this clone (shallow?)"}
                                for c in missing}
    for base, scenarios in needed.items():
        order = [s for s in ("quota", "symbol", "read", "storage", "memory", "incremental",
                             "rotate", "startup", "holiday", "gaps") if s in scenarios]
        log(f"== before/after: the product at {base}: {', '.join(order)}")
        try:  # a failed before-run costs its rows, never the current run's figures
            measured[base] = _run_before(base, order, root, runs)
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            measured[base] = {"error": f"not measured: {type(exc).__name__}: {exc}"[:200]}
            log(f"before/after at {base} failed: {exc!r}")
    return measured


def _run_before(base: str, scenarios: list[str], root: Path, runs: int) -> dict[str, Any]:
    product = export_product(base, root / f"product-{base}")
    out = root / f"before-{base}.json"
    env = {**os.environ, "BENCH_PRODUCT_DIR": str(product), "BENCH_PRODUCT_COMMIT": base}
    done = subprocess.run([sys.executable, "-m", "bench.run", *scenarios, "--runs", str(runs),
                           "--before-run", "--json", str(out), "--workdir", str(root)],
                          cwd=REPO, env=env, timeout=3600)
    if not out.exists():
        return {"error": f"not measured: the run exited with {done.returncode}, no figures"}
    data = json.loads(out.read_text())
    return {"results": {r["key"]: {c["name"]: c["measured"] for c in r["checks"]}
                        for r in data["results"]},
            "errors": data["failures"]}


def results_json(results: list[ScenarioResult], failures: dict[str, str]) -> str:
    return json.dumps({
        "results": [{"key": r.key,
                     "checks": [{"name": c.name, "measured": c.measured, "target": c.target,
                                 "met": c.met} for c in r.checks],
                     "rows": [{"label": row.label, "summary": row.summary} for row in r.rows]}
                    for r in results],
        "failures": {k: v.strip().splitlines()[-1] for k, v in failures.items()}}, indent=1)


def render(results: list[ScenarioResult], before: dict[str, Any]) -> list[str]:
    """The before/after section of RESULTS.md."""
    now = {r.key: r for r in results}
    out = ["## Fixes the benchmarks drove: before and after", "",
           "Each fix that a missed target led to, with the figure before it and now. \"Before\" "
           "is the product as it was at the commit before the fix (its three modules exported "
           "from git), measured by this same benchmark code against this emulator in this same "
           "session, with the same repetitions; \"now\" is this run's figure. Fixes to one "
           "scenario are listed in the order they were made, each \"before\" taken just "
           "before it.", "",
           "| fix | what the profile showed, and the change | check | before | now | target |",
           "| --- | --- | --- | --- | --- | --- |"]
    for fix in FIXES:
        current = now.get(fix.scenario)
        for name in fix.checks:
            check = next((c for c in current.checks if c.name == name), None) if current else None
            now_text = check.measured if check else "not measured"
            target = check.target if check else ""
            if fix.before_row:
                row = next((r for r in current.rows if r.label == fix.before_row), None) \
                    if current else None
                before_text = (f"{row.summary.split(' (')[0]} (same run: "
                               f"`pd.concat([load(s) ...])`)" if row else "not measured")
            else:
                base = parent(fix.commits[0])
                entry = before.get(base or fix.commits[0], {})
                figure = entry.get("results", {}).get(fix.scenario, {}).get(name)
                reason = entry.get("error") or entry.get("errors", {}).get(fix.scenario) \
                    or "not measured"
                before_text = f"{figure} (at {base})" if figure is not None else reason
            first = name == fix.checks[0]
            out.append(f"| {', '.join(fix.commits) if first else ''} | "
                       f"{fix.what if first else '(the same fix)'} | {name} | {before_text} | "
                       f"{now_text} | {target} |")
    out.append("")
    return out
