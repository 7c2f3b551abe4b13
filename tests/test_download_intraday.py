"""Intraday downloads across a month boundary, and how intraday bars are shown.

A trailing intraday download (no --month) fetches the last 30 days and stores every month
they touch: each month written has its own result line, with its own rows and added
count. Before the month's first session has opened, the month has nothing yet: not a
failure, nothing stored for it; the next run asks again once that session's bars are
published (by the exchange's calendar), and not before when the month before is final. `status` shows intraday bars
as `export` does, with their UTC offset.

Runs in-process with the run's clock set (RunContext.clock) over the local emulator, whose
`as_of` is the last day it has bars for; `status` and `export` run as the real command
line. The dates are in the past, so the emulator's own "no bar that has not started yet"
(the machine's clock) never cuts them.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import secure_ohlcv_cli
from secure_ohlcv_downloader import MARKET_TZ, DatasetId, RunRecord, bar_time_text
from tests.download_fixtures import Workspace, sent, start_emulator

# Wednesday 4 December 2024, 20:30 in New York: the trailing 30 days reach back into
# November (5 Nov .. 4 Dec; every weekday trades in the emulator, 64 bars of 15 minutes
# a day from 04:00 to 20:00).
EVENING = datetime(2024, 12, 4, 20, 30, tzinfo=MARKET_TZ)
# Monday 2 December 2024, 08:00 in New York: the first trading day of December, before
# the emulator has any of its bars (it serves up to Friday 29 November); the trailing 30
# days then reach back to 31 October.
BEFORE_THE_OPEN = datetime(2024, 12, 2, 8, 0, tzinfo=MARKET_TZ)
BARS_A_DAY = 64
NOVEMBER = DatasetId("IBM", "15min", month="2024-11")
DECEMBER = DatasetId("IBM", "15min", month="2024-12")


def download_at(ws: Workspace, clock: datetime, symbols: list[str]) -> tuple[object, list]:
    """One run of the library at `clock`: its report and the results as handed on."""
    app = ws.app()
    app.ctx.clock = lambda: clock.astimezone(UTC)
    handed: list = []
    report = app.download(symbols, interval="15min", on_result=handed.append)
    return report, handed


def last_samples(ws: Workspace) -> dict:
    """The run record's figures of the last download, by metric and label."""
    samples = RunRecord(ws.settings()).read()["download"]["samples"]
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples}


@pytest.fixture(scope="module")
def across_months(tmp_path_factory):
    av = start_emulator(as_of="2024-12-04")
    try:
        ws = Workspace(tmp_path_factory.mktemp("across"), av).init()
        report, handed = download_at(ws, EVENING, ["IBM", "MSFT"])
        yield SimpleNamespace(av=av, ws=ws, report=report, handed=handed)
    finally:
        av.stop()


def test_each_month_written_has_its_own_line_in_month_order_within_symbol_order(across_months):
    lines = [r.line() for r in across_months.handed]

    assert [line.split(":", 1)[0] for line in lines] == [
        "IBM intraday_15min 2024-11", "IBM intraday_15min 2024-12",
        "MSFT intraday_15min 2024-11", "MSFT intraday_15min 2024-12"]
    assert across_months.report.results == across_months.handed
    assert across_months.report.exit_code == 0


def test_each_month_line_counts_that_months_rows_and_additions(across_months):
    ws = across_months.ws
    november_rows = 19 * BARS_A_DAY  # 5 .. 29 November
    december_rows = 3 * BARS_A_DAY   # 2 .. 4 December
    first = {r.dataset: r for r in across_months.handed if r.dataset.symbol == "IBM"}

    assert len(ws.stored(NOVEMBER)[0]) == november_rows
    assert len(ws.stored(DECEMBER)[0]) == december_rows
    assert first[NOVEMBER].line().startswith(
        f"IBM intraday_15min 2024-11: updated, {november_rows} rows (+{november_rows}), "
        "last bar 2024-11-29 [full, ")
    assert first[DECEMBER].line().startswith(
        f"IBM intraday_15min 2024-12: updated, {december_rows} rows (+{december_rows}), "
        "last bar 2024-12-04 [full, ")


def test_one_request_per_symbol_fetches_both_months(across_months):
    assert len(sent(across_months.av, symbol="IBM")) == 1
    assert len(sent(across_months.av, symbol="MSFT")) == 1


def test_run_record_counts_one_dataset_per_month_written(across_months):
    figures = last_samples(across_months.ws)
    rows = sum(len(across_months.ws.stored(d)[0]) for d in (NOVEMBER, DECEMBER))

    assert figures[("ohlcv_datasets_total", (("result", "updated"),))] == 4
    assert figures[("ohlcv_datasets_total", (("result", "failed"),))] == 0
    assert figures[("ohlcv_rows_written_total", ())] == 2 * rows


def test_a_month_already_stored_counts_only_its_new_bars(tmp_path):
    av = start_emulator(as_of="2024-12-03")
    try:
        ws = Workspace(tmp_path, av).init()
        download_at(ws, datetime(2024, 12, 3, 20, 30, tzinfo=MARKET_TZ), ["IBM"])
        av.as_of = "2024-12-04"
        report, handed = download_at(ws, EVENING, ["IBM"])
    finally:
        av.stop()

    by_month = {r.dataset.month: r for r in handed}
    assert report.exit_code == 0
    assert [r.dataset.month for r in handed] == ["2024-11", "2024-12"]
    # 4 November left the trailing window; the 5th .. 29th came back, none of them new.
    assert (by_month["2024-11"].rows, by_month["2024-11"].added) == (20 * BARS_A_DAY, 0)
    assert (by_month["2024-12"].rows, by_month["2024-12"].added) == (3 * BARS_A_DAY, BARS_A_DAY)


# -- the first trading day of a month, before its first session ------------------------------

@pytest.fixture(scope="module")
def before_open(tmp_path_factory):
    av = start_emulator(as_of="2024-11-29")
    try:
        ws = Workspace(tmp_path_factory.mktemp("before-open"), av).init()
        first, first_lines = download_at(ws, BEFORE_THE_OPEN, ["IBM"])
        first_figures = last_samples(ws)
        december_after_first = ws.app().store().path(DECEMBER).exists()
        again, again_lines = download_at(ws, BEFORE_THE_OPEN, ["IBM"])
        requests_before_open = len(sent(av, symbol="IBM"))
        av.as_of = "2024-12-02"
        opened, _ = download_at(ws, datetime(2024, 12, 2, 20, 30, tzinfo=MARKET_TZ), ["IBM"])
        yield SimpleNamespace(av=av, ws=ws, first=first, first_lines=first_lines,
                              first_figures=first_figures, again=again, again_lines=again_lines,
                              december_after_first=december_after_first,
                              requests_before_open=requests_before_open, opened=opened)
    finally:
        av.stop()


def test_the_month_not_yet_open_is_nothing_yet_not_a_failure(before_open):
    lines = [r.line() for r in before_open.first_lines]

    assert before_open.first.exit_code == 0, lines
    assert not before_open.first.failed
    assert lines[0].startswith(f"IBM intraday_15min 2024-10: updated, {BARS_A_DAY} rows ")
    assert lines[1].startswith(f"IBM intraday_15min 2024-11: updated, {21 * BARS_A_DAY} rows ")
    assert lines[2].startswith("IBM intraday_15min 2024-12: nothing yet")
    assert len(lines) == 3
    assert "FAILED" not in " ".join(lines)


def test_nothing_is_stored_for_the_month_not_yet_open(before_open):
    assert not before_open.december_after_first
    assert len(before_open.ws.stored(NOVEMBER)[0]) > 0


def test_nothing_yet_is_not_counted_as_a_failure(before_open):
    figures = before_open.first_figures

    assert figures[("ohlcv_datasets_total", (("result", "failed"),))] == 0
    assert figures[("ohlcv_datasets_total", (("result", "updated"),))] == 2


def test_the_next_run_asks_for_the_month_again_once_its_first_session_is_published(before_open):
    # The first run found November final: the second, still before December's first
    # session is published, has nothing to ask for.
    assert before_open.requests_before_open == 1
    assert before_open.again.exit_code == 0
    assert before_open.again_lines[-1].line().startswith("IBM intraday_15min 2024-12: nothing yet")
    december = {r.dataset.month: r for r in before_open.opened.results}["2024-12"]
    assert december.outcome == "updated" and december.added == BARS_A_DAY


def test_download_summary_counts_nothing_yet_apart(tmp_path, capsys):
    av = start_emulator(as_of="2024-11-29")
    try:
        app = Workspace(tmp_path, av).init().app()
        app.ctx.clock = lambda: BEFORE_THE_OPEN.astimezone(UTC)
        args = secure_ohlcv_cli.build_parser().parse_args(["download", "IBM", "--interval", "15min"])
        code = secure_ohlcv_cli.cmd_download(app, args)
    finally:
        av.stop()

    captured = capsys.readouterr()
    assert code == 0
    assert "IBM intraday_15min 2024-12: nothing yet" in captured.out
    assert "2 updated, 0 current, 1 nothing yet, 0 failed" in captured.err


# -- status shows intraday bars as export does ------------------------------------------------

def test_status_shows_intraday_bars_with_their_utc_offset_as_export_does(across_months):
    ws = across_months.ws
    export = ws.cli("export", "IBM", "--interval", "15min")
    text = ws.cli("status")
    as_json = ws.cli("status", "--json")

    assert export.returncode == 0, export.stderr
    stamps = pd.read_csv(io.StringIO(export.stdout))["timestamp"]
    november = stamps[stamps.str.startswith("2024-11")]
    first, last = november.iloc[0], november.iloc[-1]
    assert (first, last) == ("2024-11-05 04:00:00-05:00", "2024-11-29 19:45:00-05:00")
    entry = next(d for d in json.loads(as_json.stdout)["datasets"]
                 if d["dataset"] == str(NOVEMBER))
    assert (entry["first_bar"], entry["last_bar"]) == (first, last)
    [line] = [line for line in text.stdout.splitlines() if line.startswith(str(NOVEMBER))]
    assert f"{first} .. {last} " in line


def test_bar_time_text_gives_the_export_form_from_a_parquet_statistic_too():
    """status may read first and last bar from the Parquet statistics, which come in UTC
    (intraday) or as dates (daily): the same text as from the stored frame."""
    stamps = pd.Series(pd.to_datetime(["2024-11-05 04:00", "2024-11-29 19:45"])
                       .tz_localize(MARKET_TZ))
    sink = io.BytesIO()
    pq.write_table(pa.table({"timestamp": pa.array(stamps)}), sink)
    statistics = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata \
        .row_group(0).column(0).statistics

    assert bar_time_text(statistics.min, True) == bar_time_text(stamps.iloc[0], True) \
        == "2024-11-05 04:00:00-05:00"
    assert bar_time_text(statistics.max, True) == "2024-11-29 19:45:00-05:00"
    assert bar_time_text(date(2024, 1, 2), False) == bar_time_text(
        pd.Timestamp("2024-01-02"), False) == "2024-01-02"
