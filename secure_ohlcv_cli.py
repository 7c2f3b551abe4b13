"""Command line of the Secure OHLCV Downloader: parse, call the module, map errors to exits.

Map of this file:
    COMMANDS        -- every command: its handler, one-line help and an example
    normalise_argv  -- the operations guide's flag form (`--init`) becomes a subcommand
    build_parser    -- argparse, one subparser per command
    cmd_*           -- one small function per command: call the library, print the result
    main            -- settings, logging, dispatch, and the one place errors become exit codes

Data goes to stdout, messages to stderr. Exit codes come from the error classes
(secure_ohlcv_downloader.EXIT_CODES); the library records each run and writes the metrics.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from config import ConfigError, load_settings
from secure_ohlcv_downloader import (
    EXIT_CODES,
    GUIDE_BYTES_PER_TICKER_DAY,
    INTERVALS,
    DatasetResult,
    NewKey,
    OHLCVError,
    SecureOHLCVDownloader,
    UsageError,
    atomic_write,
    configure_logging,
    exit_code_of,
    outside_text,
    redact,
)

log = logging.getLogger("secure_ohlcv.cli")
PROG = "secure_ohlcv_downloader.py"
# A dataset's result line: our words, with any outside text already quoted safely; the
# download output passes each through outside_text once more, capped here.
RESULT_LINE_LIMIT = 1000


def say(message: str) -> None:
    """A message for the operator: stderr, secrets removed."""
    print(redact(message), file=sys.stderr)


def note(message: str) -> None:
    """A note of the library's (a lock wait, a metrics file not written): log and stderr."""
    log.warning("%s", message)
    say(f"note: {message}")


# -- commands ------------------------------------------------------------------------------

def show_new_key(new: NewKey) -> None:
    """On a terminal: the only time a key is ever shown in full."""
    print(f"\nNEW ENCRYPTION KEY RING, primary key {new.fingerprint} (shown once, never again;"
          " this is OHLCV_ENCRYPTION_KEY's value, new key first):\n")
    print(f"    {new.value}\n")
    print("Store it offline now (password manager or paper in a safe): without it the data "
          "and every backup are unreadable if this machine or its keyring is lost.\n",
          flush=True)


def tell_new_key_file(new: NewKey | None) -> None:
    """Off a terminal the new key went to a file: say where, and that it must move."""
    if new is not None and new.file is not None:
        print(f"New key {new.fingerprint} written to {new.file} (mode 0600), not shown here: "
              f"move it offline now (password manager or safe), then delete it (shred -u "
              f"{new.file}). --check-keys warns until it is gone.")


def cmd_init(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.init()
    for directory in report.created_dirs:
        print(f"created {directory}")
    if report.already_initialised:
        print(f"Already initialised; nothing changed. Key ring from {report.key_source}, "
              f"fingerprints {', '.join(report.fingerprints)}.")
        return 0
    print(f"Key ring from {report.key_source}; primary key fingerprint {report.fingerprints[0]}.")
    if report.stored_in:
        print(f"Stored in: {', '.join(report.stored_in)}.")
    tell_new_key_file(report.new_key)
    print("Encrypted canary written; check with: "
          f"python {PROG} --check-keys")
    return 0


def cmd_check_keys(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.check_keys()
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<{width}}  {check.detail}")
    for warning in report.warnings:
        if warning not in app.warnings:
            say(f"warning: {warning}")
    print("Result: " + ("sound" if report.sound else "NOT sound: fix the FAIL lines above"))
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

    def show(result: DatasetResult) -> None:
        line = outside_text(result.line(), RESULT_LINE_LIMIT)  # one line, no secret
        if bar is not None:
            bar.update(1)
            bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    try:
        report = app.download(symbols, args.interval, args.adjusted, args.full, args.month, show)
    finally:
        if bar is not None:
            bar.close()
    counts = Counter(r.outcome for r in report.results)
    unconnected = report.stats.requests["no_connection"]  # never reached the server
    requests_made = sum(report.stats.requests.values()) - unconnected
    say(f"done: {counts['updated']} updated, {counts['current']} current, {counts['failed']} "
        f"failed, {counts['pending']} not reached; {requests_made} requests"
        + (f" (and {unconnected} attempts without a connection)" if unconnected else "")
        + f", {report.stats.retries} retries, {report.stats.bytes_downloaded} bytes")
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
        if args.output == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            write_private_file(Path(args.output), data, app.settings.file_mode)
            say(f"wrote {len(frame)} rows to {args.output} (mode {app.settings.file_mode:04o}). "
                "This copy is NOT encrypted: keep it as private as the licence requires.")
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
        print(json.dumps(status, indent=2))
    else:
        rows = status["datasets"]
        if not rows:
            print("no datasets stored yet")
        for row in rows:
            if "error" in row:
                print(f"{row['dataset']:<28} UNREADABLE: {row['error']}")
            else:
                notes = ("  STALE" if row["stale"] else "") + (
                    "  partial history" if row["partial_history"] else "")
                print(f"{row['dataset']:<28} {row['rows']:>7} rows  {row['first_bar'][:10]} .. "
                      f"{row['last_bar'][:19]} ({row['age_days']} d old)  updated "
                      f"{row['updated_at']}  key {row['key']}{notes}")
        for command, run in sorted(status["runs"].items()):
            when = datetime.fromtimestamp(run["last_run"], UTC).isoformat(timespec="seconds")
            ok = run.get("last_success")
            print(f"last {command}: {when}, exit {run['exit_code']}" + (
                "" if run["exit_code"] == 0 else ", last success " + (
                    datetime.fromtimestamp(ok, UTC).isoformat(timespec="seconds")
                    if ok else "never")))
        for quota in status["quota"]:
            limit = quota["limit"] or "unlimited"
            left = "" if quota["left"] is None else f", {quota['left']} left"
            print(f"quota {quota['key']}: {quota['used']} of {limit} used on {quota['day']}{left}")
        if status["pending"]:
            print("pending from the last run: " + ", ".join(status["pending"]))
    return 5 if any("error" in row for row in status["datasets"]) else 0


def cmd_estimate(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    e = app.estimate(args.symbols, args.interval, args.years)
    source = "measured in this store" if e.measured else "documented default (store empty)"
    mb = 2**20
    print(f"{e.symbols} symbols, {e.interval} bars, {e.years:g} years")
    print(f"  bytes per bar:     {e.bytes_per_bar:.1f} ({source})")
    print(f"  per ticker per day: {e.bytes_per_ticker_day:,.0f} bytes; the operations guide plans "
          f"for {GUIDE_BYTES_PER_TICKER_DAY[0] // 1000}-{GUIDE_BYTES_PER_TICKER_DAY[1] // 1000} KB")
    print(f"  storage:           {e.storage_bytes / mb:,.1f} MB")
    print(f"  backups:           {e.backup_bytes / mb:,.1f} MB ({app.settings.backup_keep} archives "
          f"kept); plan for at least {(e.storage_bytes + e.backup_bytes) / mb:,.1f} MB in all")
    print(f"  full backfill:     {e.backfill_requests:,} requests, {_duration(e.backfill_seconds)}")
    print(f"  daily refresh:     {e.refresh_requests:,} requests, {_duration(e.refresh_seconds)}")
    print(f"  at {app.settings.rate_limit_per_second:g}/s, "
          f"{app.settings.rate_limit_per_minute or 'no'} per minute, "
          f"{app.settings.rate_limit_per_day or 'no'} per day per key")
    return 0


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:,.1f} days (the daily quota spreads it out)"
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} hours"
    return f"{seconds / 60:,.1f} minutes" if seconds >= 60 else f"{seconds:,.1f} seconds"


def cmd_rotate_key(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.rotate_key()
    tell_new_key_file(report.new_key)
    if report.awaiting_env_update:
        print(f"New primary key {report.new_fingerprint} generated; old key "
              f"{report.old_fingerprint} kept as retired. Your keys come from "
              "OHLCV_ENCRYPTION_KEY set outside this directory, so nothing was re-encrypted yet.")
        print("Set OHLCV_ENCRYPTION_KEY where it is defined (service environment file, "
              "credential store) to the new value above (or in the file named), then run "
              f"`python {PROG} --rotate-key` again to re-encrypt every dataset.")
        return 0
    print(f"Rotated {report.rotated} dataset(s) ({report.already_done} already under the new "
          f"key) in {report.seconds:.1f} s: key {report.old_fingerprint} -> "
          f"{report.new_fingerprint}. Every file opens under the new key alone.")
    print("The old key stays in the ring, retired, so older backups stay readable.")
    if report.stored_in:
        print(f"The new key ring is stored in: {', '.join(report.stored_in)}.")
    if report.variable_disagrees:
        print("OHLCV_ENCRYPTION_KEY is also set outside this directory: set it to the new "
              "value (new key first), or every run will stop because keyring and variable "
              "disagree.")
    return 0


def cmd_remove_key(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.remove_key(args.fingerprint, args.yes)
    for name in report.needed_by:
        print(f"needs {args.fingerprint} (or could not be read): {name}")
    for place in report.unchecked:
        print(f"NOT CHECKED (a backup --dest destination): {place}")
    print(f"{len(report.needed_by)} backup(s) above would become unreadable without the key.")
    if report.unchecked:
        print("Nothing removed: every destination must be checked first. Fix: mount or "
              "restore access to the destinations above, then run again.")
    elif report.removed:
        print(f"Removed retired key {args.fingerprint} from the key ring.")
    elif not args.yes:
        print("Nothing removed; run again with --yes to remove the key.")
    if report.edit:
        print(f"OHLCV_ENCRYPTION_KEY is set outside this directory: {report.edit}")
    return report.exit_code


def cmd_backup(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.backup(Path(args.dest) if args.dest else None)
    print(f"wrote {report.path} ({report.datasets} datasets, {report.bytes} bytes)")
    for path in report.pruned:
        print(f"pruned {path}")
    return 0


def cmd_verify_backup(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    sample = None if args.all else args.sample
    report = app.verify_backup(Path(args.archive) if args.archive else None, sample)
    print(f"{outside_text(report.archive.name)}: {report.members_checked} members checked, "
          f"{report.datasets_decrypted} datasets decrypted, {len(report.problems)} problem(s)")
    for problem in report.problems:
        print(f"  PROBLEM {problem}")
    return 0 if report.sound else 5


def cmd_recover(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    prompt = None
    if sys.stdin.isatty():
        import getpass
        prompt = lambda: getpass.getpass("Encryption key (primary first; comma-separated): ")  # noqa: E731
    report = app.recover(Path(args.from_backup) if args.from_backup else None,
                         Path(args.key_file) if args.key_file else None, prompt)
    print(f"keys from {report.key_source}, proven by: " + "; ".join(
        f"{fp} opens {what}" for fp, what in report.proven.items()))
    if report.stored_in:
        print(f"key ring stored in: {', '.join(report.stored_in)} (no key dropped)")
    if report.variable_disagrees:
        say("warning: OHLCV_ENCRYPTION_KEY set outside this directory differs from the key "
            "ring now stored; set it to the ring from your offline copy, or unset it.")
    for warning in report.warnings:
        say(f"warning: {warning}")
    print(f"{report.checked} dataset(s) checked in the store, {len(report.restored)} restored "
          f"from the backup, {len(report.failed)} could not be recovered")
    for rel in report.restored:
        print(f"  restored {rel}")
    for problem in report.failed:
        print(f"  NOT RECOVERED {problem}")
    return report.exit_code


def cmd_cleanup(app: SecureOHLCVDownloader, args: argparse.Namespace) -> int:
    report = app.cleanup(args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    for dataset, rows in report.trimmed:
        print(f"{verb} {rows} row(s) older than the retention window from {dataset}")
    for path in report.removed_files + report.pruned_backups + report.temp_files:
        print(f"{verb} {path}")
    print(f"{'would free' if report.dry_run else 'freed'} {report.bytes_freed} bytes"
          + (" (dry run: nothing changed)" if report.dry_run else ""))
    return 0


Handler = Callable[[SecureOHLCVDownloader, argparse.Namespace], int]
COMMANDS: dict[str, tuple[Handler, str, str]] = {
    "init": (cmd_init, "create the private directories and the first encryption key",
             f"python {PROG} --init"),
    "check-keys": (cmd_check_keys, "prove the key store works: backend, sources, canary, round trip",
                   f"python {PROG} --check-keys"),
    "download": (cmd_download, "fetch what is missing for each symbol, within the rate limits",
                 f"python {PROG} download IBM MSFT --interval daily"),
    "export": (cmd_export, "write the decrypted bars of one symbol as CSV, JSON or Parquet",
               f"python {PROG} export IBM --start 2024-01-01 -o ibm.csv"),
    "status": (cmd_status, "list stored datasets and today's API quota use",
               f"python {PROG} status --json"),
    "estimate": (cmd_estimate, "storage, requests and time for a universe of symbols",
                 f"python {PROG} estimate --symbols 500 --years 20"),
    "rotate-key": (cmd_rotate_key, "new primary key; re-encrypt every dataset (resumable)",
                   f"python {PROG} --rotate-key"),
    "remove-key": (cmd_remove_key, "remove a retired key after listing the backups that need it",
                   f"python {PROG} remove-key 0123456789ab --yes"),
    "backup": (cmd_backup, "write one encrypted archive of the store; keep the newest OHLCV_BACKUP_KEEP",
               f"python {PROG} backup --dest /mnt/offsite"),
    "verify-backup": (cmd_verify_backup, "check an archive against its manifest and decrypt a sample",
                      f"python {PROG} --verify-backup --all"),
    "recover": (cmd_recover, "re-link keys on a new machine, check every dataset, restore from a backup",
                f"python {PROG} --recover --from-backup backups/ohlcv-backup-....tar"),
    "cleanup": (cmd_cleanup, "apply the retention window, prune archives, remove crashed temp files",
                f"python {PROG} --cleanup --dry-run"),
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", default="daily", choices=INTERVALS)
    parser.add_argument("--adjusted", action="store_true",
                        help="split- and dividend-adjusted series (daily, weekly, monthly)")


def add_command_options(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "download":
        parser.add_argument("symbols", nargs="*", metavar="SYMBOL")
        parser.add_argument("--symbols-file", metavar="FILE",
                            help="symbols, one or more a line; '#' starts a comment")
        add_dataset_options(parser)
        parser.add_argument("--full", action="store_true", help="fetch the whole history again")
        parser.add_argument("--month", metavar="YYYY-MM", help="intraday: this month")
    elif name == "export":
        parser.add_argument("symbol", metavar="SYMBOL")
        add_dataset_options(parser)
        parser.add_argument("--format", default="csv", choices=("csv", "parquet", "json"))
        parser.add_argument("--start", metavar="DATE", help="first day, YYYY-MM-DD")
        parser.add_argument("--end", metavar="DATE", help="last day, YYYY-MM-DD")
        parser.add_argument("-o", "--output", default="-", metavar="PATH",
                            help="file to write, or - for stdout (default)")
    elif name == "status":
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    elif name == "estimate":
        parser.add_argument("--symbols", type=positive_int, required=True, metavar="N")
        parser.add_argument("--interval", default="daily", choices=INTERVALS)
        parser.add_argument("--years", type=float, default=20.0, metavar="Y")
    elif name == "remove-key":
        parser.add_argument("fingerprint", metavar="FINGERPRINT")
        parser.add_argument("--yes", action="store_true", help="really remove it")
    elif name == "backup":
        parser.add_argument("--dest", metavar="DIR", help="directory (default OHLCV_BACKUP_DIR)")
    elif name == "verify-backup":
        parser.add_argument("archive", nargs="?", metavar="ARCHIVE", help="default: the newest")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--sample", type=positive_int, default=5, metavar="N",
                           help="decrypt N random datasets (default 5)")
        group.add_argument("--all", action="store_true", help="decrypt every dataset")
    elif name == "recover":
        parser.add_argument("--from-backup", metavar="ARCHIVE",
                            help="restore missing or broken datasets from this archive")
        parser.add_argument("--key-file", metavar="FILE", help="file holding the key(s)")
    elif name == "cleanup":
        parser.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")


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


def build_parser() -> argparse.ArgumentParser:
    epilog = "commands (the --flag form works too):\n" + "\n".join(
        f"  {name:<14} {help_}\n  {'':<14} e.g. {example}" for name, (_, help_, example) in COMMANDS.items())
    codes = "\n".join(f"  {code} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog=PROG, description="Download OHLCV bars from Alpha Vantage and keep them encrypted.",
        epilog=epilog + "\n\nexit codes:\n" + codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # --key must never be taken for --key-file
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_, example) in COMMANDS.items():
        command = sub.add_parser(name, help=help_, description=f"{help_}. Example: {example}",
                                 allow_abbrev=False)
        command.add_argument("--metrics-file", metavar="FILE",
                             help="write Prometheus metrics here (overrides OHLCV_METRICS_FILE)")
        add_command_options(name, command)
    return parser




def main(argv: Sequence[str] | None = None) -> int:
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
