"""Command line of the Secure OHLCV Downloader: parse, call the module, map errors to exits.

Map of this file:
    out             -- data lines to stdout; a reader that goes away (`| head`) ends them quietly
    COMMANDS        -- every command: its handler, one-line help and an example
    normalise_argv  -- the operations guide's flag form (`--init`) becomes a subcommand
    build_parser    -- argparse, one subparser per command
    cmd_*           -- one small function per command: call the library, print the result
    main            -- settings, logging, dispatch, and the one place errors become exit codes

Data goes to stdout, messages to stderr. The program name in help, usage errors and examples
is the script actually run (this file or secure_ohlcv_downloader.py: the same command line). Exit codes come from the error classes
(secure_ohlcv_downloader.EXIT_CODES); the library records each run and writes the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import select
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from config import ConfigError, load_settings
from secure_ohlcv_downloader import (
    DATES_SHOWN,
    EXIT_CODES,
    GUIDE_BYTES_PER_TICKER_DAY,
    INTERVALS,
    DatasetGaps,
    DatasetResult,
    IntegrityError,
    NewKey,
    OHLCVError,
    SecureOHLCVDownloader,
    UsageError,
    atomic_write,
    configure_logging,
    dates_text,
    exit_code_of,
    outside_text,
    redact,
    status_exit_code,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("secure_ohlcv.cli")
PROG = "secure_ohlcv_cli.py"  # when the script run is not known (main() called in-process)
# A dataset's result line: our words, with any outside text already quoted safely; the
# download output passes each through outside_text once more, capped here.
RESULT_LINE_LIMIT = 1000


def prog() -> str:
    """The script actually run, as the operator typed it to run: its file name."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.endswith(".py") else PROG


class Output:
    """stdout for data. A reader may stop reading (`status | head -1`): the rest of the
    output then goes nowhere, quietly, and the command finishes its work and keeps its
    own exit code; a reader leaving is not a failure of the work."""

    gone = False

    @classmethod
    def guard(cls, write: Callable[[], object]) -> None:
        if cls.gone:
            return
        try:
            write()
        except BrokenPipeError:
            cls.reader_gone()

    @classmethod
    def reader_gone(cls) -> None:
        """Point stdout at /dev/null, so what is still buffered (and the interpreter's
        final flush) goes nowhere instead of raising again."""
        cls.gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
        log.info("stdout closed by its reader; the rest of the output is dropped")

    @classmethod
    def flush(cls) -> None:
        cls.guard(sys.stdout.flush)

    @staticmethod
    def stdout_broken() -> bool:
        """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
        try:
            poller = select.poll()
            poller.register(sys.stdout.fileno(), select.POLLOUT)
            return any(events & select.POLLERR for _, events in poller.poll(0))
        except (OSError, ValueError, AttributeError):
            return False


def out(text: str = "", flush: bool = False) -> None:
    """One line of data on stdout."""
    Output.guard(lambda: print(text, flush=flush))


def say(message: str) -> None:
    """A message for the operator: stderr, secrets removed."""
    with contextlib.suppress(BrokenPipeError):  # stderr closed too: nothing to tell
        print(redact(message), file=sys.stderr)


def note(message: str) -> None:
    """A note of the library's (a lock wait, a metrics file not written): log and stderr."""
    log.warning("%s", message)
    say(f"note: {message}")


# -- commands ------------------------------------------------------------------------------

def show_new_key(new: NewKey) -> None:
    """On a terminal: the only time a key is ever shown in full."""
    out(f"\nNEW ENCRYPTION KEY RING, primary key {new.fingerprint} (shown once, never again;"
        " this is OHLCV_ENCRYPTION_KEY's value, primary key first, naming key last):\n")
    out(f"    {new.value}\n")
    out("Store it offline now (password manager or paper in a safe): without it the data "
        "and every backup are unreadable if this machine or its keyring is lost.\n",
        flush=True)


def tell_new_key_file(new: NewKey | None) -> None:
    """Off a terminal the new key went to a file: say where, and that it must move."""
    if new is not None and new.file is not None:
        out(f"New {new.made} written to {new.file} (the whole key ring, mode 0600), not shown here: "
            f"move it offline now (password manager or safe), then delete it (shred -u "
            f"{new.file}). --check-keys warns until it is gone.")


def cmd_init(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.init()
    for directory in report.created_dirs:
        out(f"created {directory}")
    if report.already_initialised:
        out(f"Already initialised; nothing changed. Key ring from {report.key_source}, "
            f"fingerprints {', '.join(report.fingerprints)}.")
        return 0
    out(f"Key ring from {report.key_source}; primary key fingerprint {report.fingerprints[0]}"
        + (f", naming key fingerprint {report.naming_fingerprint}." if report.naming_fingerprint
           else "."))
    if report.stored_in:
        out(f"Stored in: {', '.join(report.stored_in)}.")
    tell_new_key_file(report.new_key)
    out("Encrypted canary written; check with: "
        f"python {prog()} --check-keys")
    return 0


def cmd_check_keys(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.check_keys()
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        out(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<{width}}  {check.detail}")
    for warning in report.warnings:
        if warning not in app.warnings:
            say(f"warning: {warning}")
    out("Result: " + ("sound" if report.sound else "NOT sound: fix the FAIL lines above"))
    return report.exit_code


def read_symbols(args: argparse.Namespace) -> list[str]:
    """Symbols from the command line and --symbols-file (one or more a line, # comments)."""
    symbols = list(args.symbols)
    if args.symbols_file:
        try:
            text = open(args.symbols_file, encoding="utf-8").read()
        except OSError as exc:
            raise UsageError(f"cannot read --symbols-file {args.symbols_file}: {exc.strerror}.") from None
        for line in text.splitlines():
            symbols += [s for s in line.split("#", 1)[0].replace(",", " ").split()]
    if not symbols:
        raise UsageError("give at least one SYMBOL or --symbols-file FILE.")
    return symbols


def cmd_download(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    symbols = read_symbols(args)
    bar = None
    if sys.stderr.isatty():  # a progress bar for people; cron gets the result lines only
        from tqdm import tqdm
        bar = tqdm(total=len(symbols), unit="symbol", file=sys.stderr, leave=False)
        # Retry waits are shown to a person (above the bar), never in cron's output.
        app.ctx.progress = lambda message: bar.write(f"note: {redact(message)}", file=sys.stderr)

    counted: set[str] = set()  # the bar counts symbols; an intraday one may have two lines

    def show(result: DatasetResult) -> None:
        line = outside_text(result.line(), RESULT_LINE_LIMIT)  # one line, no secret
        if bar is not None:
            if result.dataset.symbol not in counted:
                counted.add(result.dataset.symbol)
                bar.update(1)
            Output.guard(lambda: bar.write(line, file=sys.stdout))
        else:
            out(line, flush=True)

    try:
        report = app.download(symbols, args.interval, args.adjusted, args.full, args.month, show,
                              args.repair_gaps)
    finally:
        if bar is not None:
            bar.close()
    counts = Counter("unchanged" if r.outcome == "updated" and not r.changed else r.outcome
                     for r in report.results)
    unconnected = report.stats.requests["no_connection"]  # never reached the server
    requests_made = sum(report.stats.requests.values()) - unconnected
    say(f"done: {counts['updated']} updated, "
        + (f"{counts['unchanged']} unchanged, " if counts["unchanged"] else "")
        + f"{counts['current']} current, "
        + (f"{counts['nothing_yet']} nothing yet, " if counts["nothing_yet"] else "")
        + f"{counts['failed']} failed, {counts['pending']} not reached; {requests_made} requests"
        + (f" (and {unconnected} attempts without a connection)" if unconnected else "")
        + f", {report.stats.retries} retries, {report.stats.bytes_downloaded} bytes")
    repairs = [r.repair for r in report.results if r.repair and r.repair.fetched]
    if args.repair_gaps:
        say(f"repair: {sum(len(r.filled) for r in repairs)} gap(s) filled, "
            f"{sum(len(r.removed) for r in repairs)} removed, "
            f"{sum(len(r.vendor) for r in repairs)} the vendor's (recorded) in "
            f"{len(repairs)} history(ies) fetched whole")
    if report.failed:
        say("failed: " + ", ".join(r.dataset.symbol for r in report.failed))
    if report.pending:
        reason = ("the daily API quota is spent" if report.quota_exhausted else
                  f"memory reached OHLCV_MAX_MEMORY_MB={app.settings.max_memory_mb}")
        say(f"{reason}; still to do (the next run starts with these): "
            + ", ".join(r.dataset.symbol for r in report.pending))
    return report.exit_code


def cmd_export(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    with app.command("export"):
        frame = app.load(args.symbol, args.interval, args.adjusted, args.start,
                         args.end).reset_index()
        data = render_export(frame, args.format)
        if args.output != "-":
            write_private_file(Path(args.output), data, app.settings.file_mode)
            say(f"wrote {len(frame)} rows to {args.output} (mode {app.settings.file_mode:04o}). "
                "This copy is NOT encrypted: keep it as private as the licence requires.")
    if args.output == "-":  # the export is done; its reader may take all of it or not
        Output.guard(lambda: (sys.stdout.buffer.write(data), sys.stdout.flush()))
    return 0


def render_export(frame: pd.DataFrame, fmt: str) -> bytes:
    """Decrypted bars as CSV (oldest first), JSON records or Parquet bytes."""
    if fmt == "parquet":
        sink = io.BytesIO()
        frame.to_parquet(sink, index=False)
        return sink.getvalue()
    stamps = frame["timestamp"]
    text = stamps.dt.strftime("%Y-%m-%d") if stamps.dt.tz is None else \
        stamps.map(lambda t: t.isoformat(sep=" "))
    frame = frame.assign(timestamp=text)
    if fmt == "json":
        return frame.to_json(orient="records", indent=1).encode() + b"\n"
    return frame.to_csv(index=False, lineterminator="\n").encode()


def write_private_file(path: Path, data: bytes, file_mode: int) -> None:
    """An export file: created with the configured mode, replaced atomically."""
    if path.is_dir():
        raise UsageError(f"-o {path} is a directory; give a file name.")
    if not path.parent.exists():
        raise UsageError(f"-o {path}: directory {path.parent} does not exist.")
    atomic_write(path, data, file_mode)


def cmd_status(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    status = app.status()
    if args.json:
        out(json.dumps(status, indent=2))
    else:
        rows = status["datasets"]
        if not rows:
            out("no datasets stored yet")
        for row in rows:
            if "error" in row:
                out(f"{row['dataset']:<28} UNREADABLE: {row['error']}")
            else:
                notes = ("  STALE" if row["stale"] else "") + (
                    "  partial history" if row["partial_history"] else "")
                gaps = "-" if row["gaps"] is None else row["gaps"]
                out(f"{row['dataset']:<28} {row['rows']:>7} rows  {row['first_bar']} .. "
                    f"{row['last_bar']} ({row['age_days']} d old)  updated "
                    f"{row['updated_at']}  key {row['key']}  gaps {gaps}{notes}")
        for command, run in sorted(status["runs"].items()):
            when = datetime.fromtimestamp(run["last_run"], UTC).isoformat(timespec="seconds")
            ok = run.get("last_success")
            out(f"last {command}: {when}, exit {run['exit_code']}" + (
                "" if run["exit_code"] == 0 else ", last success " + (
                    datetime.fromtimestamp(ok, UTC).isoformat(timespec="seconds")
                    if ok else "never")))
        for quota in status["quota"]:
            limit = quota["limit"] or "unlimited"
            left = "" if quota["left"] is None else f", {quota['left']} left"
            out(f"quota {quota['key']}: {quota['used']} of {limit} used on {quota['day']}{left}")
        if status["pending"]:
            out("pending from the last run: " + ", ".join(status["pending"]))
    return status_exit_code(status)


def cmd_gaps(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.gaps(args.symbols, args.interval, args.fail_on_gaps)
    if args.json:
        out(json.dumps({"datasets": [d.as_json() for d in report.datasets],
                        "gaps": report.gaps, "datasets_with_gaps": report.with_gaps}, indent=2))
    else:
        for entry in report.datasets:
            out(f"{entry.dataset}: {_gap_line(entry)}")
    unchecked = sum(1 for d in report.datasets if not d.error and not d.gaps.checked)
    say(f"gaps: {report.gaps} in {report.with_gaps} of {len(report.datasets)} dataset(s)"
        + (f"; {unchecked} not checked (no exchange calendar)" if unchecked else "")
        + ("" if not report.gaps else ". Fix: `download --repair-gaps SYMBOL` fetches each "
           "history with a gap whole, once; a gap that stays after it is the vendor's own, "
           "recorded and not fetched again"))
    return report.exit_code


def _gap_line(entry: DatasetGaps) -> str:
    gaps = entry.gaps
    if entry.error:
        return f"UNREADABLE: {entry.error}"
    if not gaps.checked:
        return f"not checked: {gaps.unchecked}"
    periods = entry.dataset.interval in ("weekly", "monthly")
    found = "; ".join(f"{len(dates)} {what}: {_dates(dates)}" for what, dates in (
        ("period(s) with no bar on their last session" if periods else "missing session(s)",
         gaps.missing),
        ("bar(s) on a day the exchange was closed", gaps.closed)) if dates)
    return (found or f"no gaps in {entry.bars} bars") + (
        f" ({gaps.unchecked})" if gaps.unchecked else "") + (
        f"; the vendor's own, found by a repair: {_dates(entry.vendor)}" if entry.vendor else "")


def _dates(dates: tuple[date, ...]) -> str:
    return dates_text(dates) + (" (--json lists all)" if len(dates) > DATES_SHOWN else "")


def cmd_estimate(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    e = app.estimate(args.symbols, args.interval, args.years)
    source = "measured in this store" if e.measured else "default figure: the store is empty"
    mb = 2**20
    out(f"{e.symbols} symbols, {e.interval} bars, {e.years:g} years")
    out(f"  bytes per bar:     {e.bytes_per_bar:.1f} ({source})")
    out(f"  per ticker per day: {e.bytes_per_ticker_day:,.0f} bytes (a common planning "
        f"allowance is {GUIDE_BYTES_PER_TICKER_DAY[0] // 1000}-"
        f"{GUIDE_BYTES_PER_TICKER_DAY[1] // 1000} KB per symbol and trading day)")
    out(f"  storage:           {e.storage_bytes / mb:,.1f} MB")
    out(f"  backups:           {e.backup_bytes / mb:,.1f} MB ({app.settings.backup_keep} archives "
        f"kept); plan for at least {(e.storage_bytes + e.backup_bytes) / mb:,.1f} MB in all")
    out(f"  full backfill:     {e.backfill_requests:,} requests, {_duration(e.backfill_seconds)}")
    out(f"  daily refresh:     {e.refresh_requests:,} requests, {_duration(e.refresh_seconds)}")
    keys = max(1, len(app.settings.api_keys))
    out(f"  at {app.settings.rate_limit_per_second:g}/s, "
        f"{app.settings.rate_limit_per_minute or 'no'} per minute, "
        f"{app.settings.rate_limit_per_day or 'no'} per day per key ({keys} key"
        f"{'s' if keys > 1 else ''})")
    if not e.refresh_fits_a_day:
        out(f"  CANNOT KEEP UP: the daily refresh needs {e.refresh_requests:,} requests a day "
            f"but the API keys allow {e.daily_quota:,} a day, so the data falls further "
            "behind every day. Fix: more API keys (ALPHA_VANTAGE_API_KEY takes several, "
            "comma-separated), a premium plan (set OHLCV_RATE_LIMIT_PER_MINUTE to its "
            f"limit), or at most {e.daily_quota:,} symbols.")
    return 0


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:,.1f} days (the daily quota spreads it over several days)"
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} hours"
    return f"{seconds / 60:,.1f} minutes" if seconds >= 60 else f"{seconds:,.1f} seconds"


def cmd_rotate_key(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.rotate_key()
    tell_new_key_file(report.new_key)
    if report.awaiting_env_update:
        out(f"New primary key {report.new_fingerprint} generated; old key "
            f"{report.old_fingerprint} kept as retired. Your keys come from "
            "OHLCV_ENCRYPTION_KEY set outside this directory, so nothing was re-encrypted yet.")
        out("Set OHLCV_ENCRYPTION_KEY where it is defined (service environment file, "
            "credential store) to the new value above (or in the file named), then run "
            f"`python {prog()} --rotate-key` again to re-encrypt every dataset.")
        return 0
    out(f"Rotated {report.rotated} dataset(s) ({report.already_done} already under the new "
        f"key) in {report.seconds:.1f} s: key {report.old_fingerprint} -> "
        f"{report.new_fingerprint}. Every file opens under the new key alone.")
    out("The old key stays in the ring, retired, so older backups stay readable.")
    if report.stored_in:
        out(f"The new key ring is stored in: {', '.join(report.stored_in)}.")
    if report.variable_disagrees:
        out("OHLCV_ENCRYPTION_KEY is also set outside this directory: set it to the new "
            "value (new key first), or every run will stop because keyring and variable "
            "disagree.")
    return 0


def cmd_migrate_store(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.migrate_store()
    if report.naming is not None:
        tell_new_key_file(report.naming.new_key)
    if report.awaiting_env_update:
        assert report.naming is not None
        out(f"New naming key {report.naming.fingerprint} generated. Your keys come from "
            "OHLCV_ENCRYPTION_KEY set outside this directory, so no file was renamed yet.")
        out("Set OHLCV_ENCRYPTION_KEY where it is defined (service environment file, "
            "credential store) to the new value above (or in the file named; it ends with "
            f"naming:...), then run `python {prog()} --migrate-store` again.")
        return 0
    for problem in report.unreadable:
        say(f"left in place, unreadable: {problem}")
    # An unreadable file is an integrity failure to act on (--recover --from-backup), even
    # when everything else moved: cron and scripts must see it.
    code = IntegrityError.exit_code if report.unreadable else 0
    if report.already_migrated:
        out(f"Already migrated: every dataset file has its opaque name (naming key "
            f"{report.naming_fingerprint}); nothing changed.")
        return code
    for dataset in report.moved:
        out(f"moved {dataset}")
    for dataset in report.renamed:
        out(f"renamed {dataset} (its file was named under another naming key, or by hand)")
    for dataset in report.duplicates_dropped:
        out(f"dropped the old copy of {dataset} (identical to the one at its opaque name)")
    out(f"Migrated {len(report.moved)} dataset(s) to opaque file names, renamed "
        f"{len(report.renamed)} from another naming key "
        f"({report.already_opaque} already there) in {report.seconds:.1f} s, naming key "
        f"{report.naming_fingerprint}; removed {len(report.removed_dirs)} old "
        "directory(ies); catalogue written. No file name shows a symbol any more.")
    if report.naming is not None:
        if report.naming.stored_in:
            out(f"The key ring, with its new naming key, is stored in: "
                f"{', '.join(report.naming.stored_in)}.")
        if report.naming.variable_disagrees:
            out("OHLCV_ENCRYPTION_KEY is also set outside this directory: set it to the new "
                "value (it ends with naming:...), or every run will stop because keyring "
                "and variable disagree.")
    return code


def cmd_remove_key(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.remove_key(args.fingerprint, args.yes)
    for name in report.needed_by:
        out(f"needs {args.fingerprint} (or could not be read): {name}")
    for place in report.unchecked:
        out(f"NOT CHECKED (a backup --dest destination): {place}")
    out(f"{len(report.needed_by)} backup(s) above would become unreadable without the key.")
    if report.unchecked:
        out("Nothing removed: every destination must be checked first. Fix: mount or "
            "restore access to the destinations above, then run again.")
    elif report.removed:
        out(f"Removed retired key {args.fingerprint} from the key ring.")
    elif not args.yes:
        out("Nothing removed; run again with --yes to remove the key.")
    if report.edit:
        out(f"OHLCV_ENCRYPTION_KEY is set outside this directory: {report.edit}")
    return report.exit_code


def cmd_backup(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.backup(Path(args.dest) if args.dest else None)
    out(f"wrote {report.path} ({report.datasets} datasets, {report.bytes} bytes)")
    for path in report.pruned:
        out(f"pruned {path}")
    return 0


def cmd_verify_backup(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    sample = None if args.all else args.sample
    report = app.verify_backup(Path(args.archive) if args.archive else None, sample)
    out(f"{outside_text(report.archive.name)}: {report.members_checked} members checked, "
        f"{report.datasets_decrypted} datasets decrypted, {len(report.problems)} problem(s)")
    for problem in report.problems:
        out(f"  PROBLEM {problem}")
    return report.exit_code


def cmd_recover(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    prompt = None
    if sys.stdin.isatty():
        import getpass
        prompt = lambda: getpass.getpass(  # noqa: E731
            "Encryption key ring (primary first, comma-separated, naming:<key> last): ")
    report = app.recover(Path(args.from_backup) if args.from_backup else None,
                         Path(args.key_file) if args.key_file else None, prompt)
    out(f"keys from {report.key_source}, proven by: " + "; ".join(
        f"{fp} opens {what}" for fp, what in report.proven.items()))
    tell_new_key_file(report.new_key)
    if report.stored_in:
        out(f"key ring stored in: {', '.join(report.stored_in)} (no key dropped)")
    if report.variable_disagrees:
        say("warning: OHLCV_ENCRYPTION_KEY set outside this directory differs from the key "
            "ring now stored; set it to " + ("the value just handed over (it holds the new "
            "naming key)" if report.new_key else "the ring from your offline copy")
            + ", or unset it.")
    for warning in report.warnings:
        say(f"warning: {warning}")
    out(f"{report.checked} dataset(s) checked in the store, {len(report.restored)} restored "
        f"from the backup, {len(report.failed)} could not be recovered")
    for rel in report.restored:
        out(f"  restored {rel}")
    for problem in report.failed:
        out(f"  NOT RECOVERED {problem}")
    return report.exit_code


def cmd_cleanup(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.cleanup(args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    for dataset, rows in report.trimmed:
        out(f"{verb} {rows} row(s) older than the retention window from {dataset}")
    for path in report.removed_files:  # a dataset file that goes whole: one line
        dataset, rows = report.removed_rows.get(path, ("", 0))
        out(f"{verb} {path}" + (f" ({dataset}: all {rows} row(s) older than the retention "
                                "window)" if dataset else ""))
    for path in report.pruned_backups + report.temp_files:
        out(f"{verb} {path}")
    out(f"{'would free' if report.dry_run else 'freed'} {human_bytes(report.bytes_freed)}"
        + (" (dry run: nothing changed)" if report.dry_run else ""))
    return 0


def human_bytes(size: float) -> str:
    """A size as `ls -h` gives it, in binary units: 512 bytes, 4.0 KiB, 1.8 MiB, 2.3 GiB."""
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


Handler = Callable[[SecureOHLCVDownloader, argparse.Namespace], int]
# name: handler, one-line help, example ({prog}: the script run)
COMMANDS: dict[str, tuple[Handler, str, str]] = {
    "init": (cmd_init, "create the private directories and the first encryption key",
             "python {prog} --init"),
    "check-keys": (cmd_check_keys, "prove the key store works: backend, sources, canary, round trip",
                   "python {prog} --check-keys"),
    "download": (cmd_download, "fetch what is missing for each symbol, within the rate limits",
                 "python {prog} download IBM MSFT --interval daily"),
    "export": (cmd_export, "write the decrypted bars of one symbol as CSV, JSON or Parquet",
               "python {prog} export IBM --start 2024-01-01 -o ibm.csv"),
    "status": (cmd_status, "list stored datasets and today's API quota use",
               "python {prog} status --json"),
    "gaps": (cmd_gaps, "sessions missing and bars on closed days, by exchange calendar",
             "python {prog} gaps --fail-on-gaps"),
    "estimate": (cmd_estimate, "storage, requests and time for a universe of symbols",
                 "python {prog} estimate --symbols 500 --years 20"),
    "rotate-key": (cmd_rotate_key, "new primary key; re-encrypt every dataset (resumable)",
                   "python {prog} --rotate-key"),
    "migrate-store": (cmd_migrate_store, "once, after upgrading: rename the earlier layout's "
                      "files (names showing symbols) to opaque names (resumable)",
                      "python {prog} --migrate-store"),
    "remove-key": (cmd_remove_key, "remove a retired key after listing the backups that need it",
                   "python {prog} remove-key 0123456789ab --yes"),
    "backup": (cmd_backup, "write one encrypted archive of the store; keep the newest OHLCV_BACKUP_KEEP",
               "python {prog} backup --dest /mnt/offsite"),
    "verify-backup": (cmd_verify_backup, "check an archive against its manifest and decrypt a sample",
                      "python {prog} --verify-backup --all"),
    "recover": (cmd_recover, "re-link keys on a new machine, check every dataset, restore from a backup",
                "python {prog} --recover --from-backup backups/ohlcv-backup-....tar"),
    "cleanup": (cmd_cleanup, "apply the retention window, prune archives, remove crashed temp files",
                "python {prog} --cleanup --dry-run"),
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def add_interval_option(parser: argparse.ArgumentParser) -> None:
    choices: tuple[str, ...] = INTERVALS
    parser.add_argument("--interval", default="daily", choices=choices, metavar="INTERVAL",
                        help=f"bar size: {', '.join(choices)} (default: %(default)s)")


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    add_interval_option(parser)
    parser.add_argument("--adjusted", action="store_true",
                        help="split- and dividend-adjusted series (daily, weekly, monthly; "
                             "default: unadjusted)")


def add_command_options(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "download":
        parser.add_argument("symbols", nargs="*", metavar="SYMBOL",
                            help="ticker symbols, e.g. IBM MSFT BRK.B")
        parser.add_argument("--symbols-file", metavar="FILE",
                            help="symbols, one or more a line; '#' starts a comment "
                                 "(default: none)")
        add_dataset_options(parser)
        parser.add_argument("--full", action="store_true",
                            help="fetch the whole history again (default: only what is missing)")
        parser.add_argument("--repair-gaps", action="store_true",
                            help="fetch the whole history of each stored dataset with a gap "
                                 "(see `gaps`); record what the vendor lacks (default: off)")
        parser.add_argument("--month", metavar="YYYY-MM",
                            help="intraday only: this month, up to the current one in New York "
                                 "(default: the trailing month)")
    elif name == "export":
        parser.add_argument("symbol", metavar="SYMBOL", help="ticker symbol, e.g. IBM")
        add_dataset_options(parser)
        parser.add_argument("--format", default="csv", choices=("csv", "parquet", "json"),
                            help="csv, parquet or json (default: %(default)s)")
        parser.add_argument("--start", metavar="DATE",
                            help="first day, YYYY-MM-DD (default: the oldest bar)")
        parser.add_argument("--end", metavar="DATE",
                            help="last day, YYYY-MM-DD, not before --start (default: the "
                                 "newest bar)")
        parser.add_argument("-o", "--output", default="-", metavar="PATH",
                            help="file to write, or - for stdout (default)")
    elif name == "status":
        parser.add_argument("--json", action="store_true",
                            help="machine-readable output (default: one line per dataset)")
    elif name == "gaps":
        parser.add_argument("symbols", nargs="*", metavar="SYMBOL",
                            help="ticker symbols to check (default: every stored dataset)")
        parser.add_argument("--interval", choices=INTERVALS, metavar="INTERVAL",
                            help=f"bar size: {', '.join(INTERVALS)} (default: every one)")
        parser.add_argument("--json", action="store_true",
                            help="machine-readable output (default: one line per dataset)")
        parser.add_argument("--fail-on-gaps", action="store_true",
                            help="exit 1 when a gap is found, for cron (default: exit 0)")
    elif name == "estimate":
        parser.add_argument("--symbols", type=positive_int, required=True, metavar="N",
                            help="how many symbols to plan for (required)")
        add_interval_option(parser)
        parser.add_argument("--years", type=float, default=20.0, metavar="Y",
                            help="years of history to keep (default: %(default)g)")
    elif name == "remove-key":
        parser.add_argument("fingerprint", metavar="FINGERPRINT",
                            help="the retired key's fingerprint, as --check-keys lists it")
        parser.add_argument("--yes", action="store_true",
                            help="really remove it (default: only list what needs it)")
    elif name == "backup":
        parser.add_argument("--dest", metavar="DIR", help="directory (default OHLCV_BACKUP_DIR)")
    elif name == "verify-backup":
        parser.add_argument("archive", nargs="?", metavar="ARCHIVE",
                            help="the archive to check (default: the newest in OHLCV_BACKUP_DIR)")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--sample", type=positive_int, default=5, metavar="N",
                           help="decrypt N random datasets (default 5)")
        group.add_argument("--all", action="store_true",
                           help="decrypt every dataset (default: a sample, see --sample)")
    elif name == "recover":
        parser.add_argument("--from-backup", metavar="ARCHIVE",
                            help="restore missing or broken datasets from this archive "
                                 "(default: check only)")
        parser.add_argument("--key-file", metavar="FILE",
                            help="file holding the key(s) (default: the key store, or a "
                                 "prompt on a terminal)")
    elif name == "cleanup":
        parser.add_argument("--dry-run", action="store_true",
                            help="show what would go; change nothing (default: clean up)")


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """`--init` anywhere on the line means the `init` command, as in the operations guide."""
    argv = list(argv)
    flags = [a for a in argv if a.startswith("--") and a[2:] in COMMANDS]
    if len(flags) > 1:
        raise UsageError(f"one command at a time, got {' and '.join(flags)}.")
    if flags and not any(a in COMMANDS for a in argv):
        argv.remove(flags[0])
        argv.insert(0, flags[0][2:])
    return argv


def build_parser(program: str | None = None) -> argparse.ArgumentParser:
    """The command line of `program` (default: the script run). The commands are listed
    once, in the epilog with an example each; argparse's own list is left out."""
    program = program or prog()
    examples = {name: example.format(prog=program) for name, (_, _, example) in COMMANDS.items()}
    epilog = "commands (the --flag form works too):\n" + "\n".join(
        f"  {name:<14} {help_}\n  {'':<14} e.g. {examples[name]}"
        for name, (_, help_, _) in COMMANDS.items())
    codes = "\n".join(f"  {code} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog=program, description="Download OHLCV bars from Alpha Vantage and keep them encrypted.",
        epilog=epilog + "\n\nexit codes:\n" + codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # --key must never be taken for --key-file
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="one of the commands listed below")
    for name, (_, help_, _) in COMMANDS.items():
        command = sub.add_parser(name, description=f"{help_}. Example: {examples[name]}",
                                 allow_abbrev=False)
        command.add_argument("--metrics-file", metavar="FILE",
                             help="write Prometheus metrics here (default: "
                                  "OHLCV_METRICS_FILE, if set)")
        add_command_options(name, command)
    return parser




def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; its exit code. A reader of stdout that leaves early (`| head`)
    ends the output quietly and changes neither the exit code nor the run's record."""
    code = run(argv)
    Output.flush()  # what is still buffered, now rather than at the interpreter's exit
    return code


def run(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(normalise_argv(argv))
    except UsageError as exc:
        say(f"error: {exc}")
        return 2
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    app: SecureOHLCVDownloader | None = None
    if not logging.getLogger().handlers:  # no stderr echo of log lines before the log is set up
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        settings = load_settings()
        if args.metrics_file:  # absolute, never resolved: a link there is replaced
            settings = replace(settings, metrics_file=Path(os.path.abspath(args.metrics_file)))
        configure_logging(settings)
        for warning in settings.warnings:
            log.warning("%s", warning)
            say(f"warning: {warning}")
        app = SecureOHLCVDownloader(settings)
        app.ctx.notify = note
        if sys.stdout.isatty():  # a person is there to see a new key; else it goes to a file
            app.show_key = show_new_key
        code = COMMANDS[args.command][0](app, args)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        say(f"configuration error: {exc}")
        code = exc.exit_code
    except OHLCVError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        say(f"error: {exc}")
        code = exc.exit_code
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and Output.stdout_broken():
            Output.reader_gone()  # stdout written outside out(): the reader left, quietly
            return 0
        log.error("I/O error: %s", exc)
        say(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            + " (the file being written keeps its previous version)")
        code = exit_code_of(exc)
    except KeyboardInterrupt as exc:
        say("interrupted")
        code = exit_code_of(exc)
    except Exception as exc:  # the last boundary: a traceback goes to the (redacted) log only
        log.exception("internal error")
        say("internal error: see the log file for the traceback; please report it.")
        code = exit_code_of(exc)
    if app is not None:  # what the run found worth a warning, whether it failed or not
        for warning in app.warnings[len(app.settings.warnings):]:
            say(f"warning: {warning}")
    return code


if __name__ == "__main__":
    sys.exit(main())
