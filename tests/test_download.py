"""The download pipeline end to end against the local Alpha Vantage emulator: rate limits
(per second, per day across runs, the server's own quota, several keys), incremental
updates (nothing new, one new day, new symbol, --full, a long gap, revisions, splits in
adjusted data, the week in progress) and the free key's compact fallback.

Set-up runs in-process (a fresh SecureOHLCVDownloader per run, as a new process builds);
scenarios that span several runs use the real command line in subprocesses. The downloader
decides from the real clock and the NYSE calendar which session is the newest
(session_day()); the emulator's as_of is set relative to it, and Workspace.backdate makes a stored dataset look checked the
evening its last bar came out, as a nightly run leaves it.
"""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace

import pytest

from secure_ohlcv_downloader import DatasetId
from tests.download_fixtures import (  # noqa: F401  (emulator, emulators are fixtures)
    FREE_KEY,
    Workspace,
    emulator,
    emulators,
    expected_daily,
    sent,
    session_day,
    start_emulator,
    weekdays_before,
)

DAILY_IBM = DatasetId("IBM", "daily")
ADJUSTED_IBM = DatasetId("IBM", "daily", adjusted=True)
WEEKLY_IBM = DatasetId("IBM", "weekly")
FREE = {"ALPHA_VANTAGE_API_KEY": FREE_KEY, "OHLCV_RATE_LIMIT_PER_MINUTE": None}


def sizes(entries) -> list[str | None]:
    return [e["outputsize"] for e in entries]


def symbols(entries) -> list[str | None]:
    return [e["symbol"] for e in entries]


# -- rate limits ---------------------------------------------------------------------------

def test_premium_run_of_many_symbols_stays_within_the_plan(tmp_path, emulators):
    # 300/min is 5 a second: the per-second window binds within this run.
    av = emulators(premium_keys={"PLAN-300-KEY": 300})
    ws = Workspace(tmp_path, av, ALPHA_VANTAGE_API_KEY="PLAN-300-KEY",
                   OHLCV_RATE_LIMIT_PER_MINUTE="300").init()

    report = ws.download([f"S{i:02d}" for i in range(10)])

    assert report.exit_code == 0
    assert av.request_count == 10
    assert av.violations == 0


def test_free_key_at_one_request_a_second_is_never_throttled(tmp_path, emulators):
    av = emulators(free_per_second=1, free_full_daily=True)
    ws = Workspace(tmp_path, av, **FREE).init()

    report = ws.download(["AAA", "BBB", "CCC", "DDD"])

    assert report.exit_code == 0
    assert av.request_count == 4
    assert av.violations == 0


def test_several_api_keys_share_the_load(tmp_path, emulators):
    av = emulators(premium_keys={"FIRST-KEY": 6000, "SECOND-KEY": 6000})
    ws = Workspace(tmp_path, av, ALPHA_VANTAGE_API_KEY="FIRST-KEY,SECOND-KEY").init()

    ws.download(["AAA", "BBB", "CCC", "DDD"])

    assert {e["key_fingerprint"] for e in av.requests} == \
        {av.key_fingerprint("FIRST-KEY"), av.key_fingerprint("SECOND-KEY")}


# Three runs of the command line sharing one day's budget of 3 requests (one worker, so
# the order is the order given): run 1 spends it, run 2 finds it spent, run 3 has 10.
BUDGET_SYMBOLS = ["AAA", "BBB", "CCC", "DDD", "EEE"]


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory):
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("budget"), av, OHLCV_RATE_LIMIT_PER_DAY="3",
                       OHLCV_MAX_WORKERS="1").init()
        run1 = ws.cli("download", *BUDGET_SYMBOLS)
        log1 = list(av.requests)
        status1 = ws.cli("status", "--json")
        run2 = ws.cli("download", *BUDGET_SYMBOLS)
        log2 = av.requests[len(log1):]
        run3 = ws.cli("download", "FFF", *BUDGET_SYMBOLS, OHLCV_RATE_LIMIT_PER_DAY="10")
        log3 = av.requests[len(log1) + len(log2):]
        yield SimpleNamespace(av=av, run1=run1, log1=log1, status1=status1, run2=run2,
                              log2=log2, run3=run3, log3=log3)
    finally:
        av.stop()


def test_run_stops_at_the_daily_budget_with_exit_4(budget_runs):
    assert budget_runs.run1.returncode == 4, budget_runs.run1.stderr
    assert symbols(budget_runs.log1) == ["AAA", "BBB", "CCC"]


def test_run_stopped_by_the_budget_lists_the_symbols_left_to_do(budget_runs):
    assert "still to do (the next run starts with these): DDD, EEE" in budget_runs.run1.stderr


def test_status_shows_the_requests_used_today(budget_runs):
    assert budget_runs.status1.returncode == 0, budget_runs.status1.stderr
    [quota] = json.loads(budget_runs.status1.stdout)["quota"]

    assert (quota["used"], quota["limit"], quota["left"]) == (3, 3, 0)


def test_next_run_with_the_budget_spent_makes_no_request_and_exits_4(budget_runs):
    assert budget_runs.run2.returncode == 4, budget_runs.run2.stderr
    assert budget_runs.log2 == []


def test_next_run_with_the_budget_spent_lists_only_what_is_left_to_do(budget_runs):
    # AAA, BBB and CCC are up to date: they are not "still to do".
    assert "still to do (the next run starts with these): DDD, EEE\n" in budget_runs.run2.stderr


def test_run_with_a_new_budget_does_the_pending_symbols_first(budget_runs):
    assert budget_runs.run3.returncode == 0, budget_runs.run3.stderr
    assert symbols(budget_runs.log3) == ["DDD", "EEE", "FFF"]


def test_runs_sharing_a_budget_never_break_the_server_limits(budget_runs):
    assert budget_runs.av.violations == 0


# The server's own daily quota (2 a day for free keys), the client's budget left at the
# free default of 25: the server's Information message is what stops the run.

@pytest.fixture(scope="module")
def server_quota_runs(tmp_path_factory):
    av = start_emulator(free_per_day=2, free_full_daily=True)
    try:
        ws = Workspace(tmp_path_factory.mktemp("server-quota"), av, OHLCV_MAX_WORKERS="1", **FREE).init()
        run1 = ws.cli("download", "AAA", "BBB", "CCC")
        log1 = list(av.requests)
        run2 = ws.cli("download", "DDD", "AAA", "BBB", "CCC",
                      ALPHA_VANTAGE_API_KEY=f"{FREE_KEY},SECOND-FREE-KEY")
        log2 = av.requests[len(log1):]
        yield SimpleNamespace(av=av, run1=run1, log1=log1, run2=run2, log2=log2)
    finally:
        av.stop()


def test_server_daily_quota_message_stops_the_run_with_exit_4(server_quota_runs):
    run1 = server_quota_runs.run1

    assert run1.returncode == 4, run1.stderr
    assert "still to do (the next run starts with these): CCC" in run1.stderr
    # The third request is the one the server refused with its daily-quota message.
    assert [e["violation"] for e in server_quota_runs.log1] == [None, None, "per_day"]


def test_key_the_server_called_spent_sends_nothing_in_the_next_run(server_quota_runs):
    av = server_quota_runs.av

    assert server_quota_runs.log2
    assert {e["key_fingerprint"] for e in server_quota_runs.log2} == \
        {av.key_fingerprint("SECOND-FREE-KEY")}


def test_next_run_resumes_with_the_symbol_the_quota_left_undone(server_quota_runs):
    assert server_quota_runs.run2.returncode == 0, server_quota_runs.run2.stderr
    assert symbols(server_quota_runs.log2) == ["CCC", "DDD"]


# -- incremental updates -------------------------------------------------------------------

def test_second_run_with_nothing_new_makes_no_request(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    ws.download(["IBM"])
    before = emulator.request_count

    report = ws.download(["IBM"])

    assert emulator.request_count == before
    assert [r.outcome for r in report.results] == ["current"]


def stored_up_to_yesterday(ws: Workspace, dataset: DatasetId = DAILY_IBM, **options) -> int:
    """Download `dataset` with the emulator one session behind, as last night's run did;
    then serve today's session. Returns the stored row count."""
    av = ws.av
    av.as_of = weekdays_before(session_day(), 1)
    ws.download([dataset.symbol], interval=dataset.interval, adjusted=dataset.adjusted, **options)
    ws.backdate(dataset)
    av.as_of = session_day()
    return len(ws.stored(dataset)[0])


def test_one_new_session_is_one_compact_request_adding_one_bar(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    rows = stored_up_to_yesterday(ws)
    before = emulator.request_count

    report = ws.download(["IBM"])

    assert sizes(emulator.requests[before:]) == ["compact"]
    frame = ws.stored(DAILY_IBM)[0]
    assert len(frame) == rows + 1
    assert frame["timestamp"].iloc[-1].date() == session_day()
    assert report.results[0].added == 1


def test_incremental_update_equals_the_served_history(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    stored_up_to_yesterday(ws)

    ws.download(["IBM"])

    frame = ws.stored(DAILY_IBM)[0]
    expected = expected_daily(emulator, "IBM")
    assert frame["timestamp"].tolist() == expected["timestamp"].tolist()
    assert frame["close"].tolist() == expected["close"].tolist()


def test_new_symbol_fetches_the_full_history(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()

    ws.download(["IBM"])

    assert sizes(emulator.requests) == ["full"]
    assert len(ws.stored(DAILY_IBM)[0]) == len(emulator.daily_bars("IBM"))


def test_full_option_forces_a_full_request_for_a_current_dataset(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    ws.download(["IBM"])
    before = emulator.request_count

    ws.download(["IBM"], full=True)

    assert sizes(emulator.requests[before:]) == ["full"]


def test_dataset_200_sessions_behind_fetches_the_full_history(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    emulator.as_of = weekdays_before(session_day(), 200)
    ws.download(["IBM"])
    ws.backdate(DAILY_IBM)
    emulator.as_of = session_day()
    before = emulator.request_count

    ws.download(["IBM"])

    assert sizes(emulator.requests[before:]) == ["full"]
    assert len(ws.stored(DAILY_IBM)[0]) == len(emulator.daily_bars("IBM"))


def test_revised_bar_replaces_the_stored_one_without_duplicating_it(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    rows = stored_up_to_yesterday(ws)
    day = weekdays_before(session_day(), 5)  # inside the compact window
    bar = next(b for b in emulator.daily_bars("IBM") if b["date"] == day)
    emulator.revise("IBM", day, close=bar["open"], volume=bar["volume"] + 777)

    ws.download(["IBM"])

    frame = ws.stored(DAILY_IBM)[0]
    revised = frame[frame["timestamp"].dt.date == day]
    assert len(revised) == 1
    assert (revised["close"].item(), revised["volume"].item()) == (bar["open"], bar["volume"] + 777)
    assert len(frame) == rows + 1 and frame["timestamp"].is_unique


def test_split_in_the_new_bars_refetches_the_full_adjusted_history(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    stored_up_to_yesterday(ws, ADJUSTED_IBM)
    emulator.add_split("IBM", session_day(), 2.0)
    before = emulator.request_count

    ws.download(["IBM"], adjusted=True)

    assert sizes(emulator.requests[before:]) == ["compact", "full"]


def test_split_in_the_new_bars_rewrites_the_stored_adjusted_closes(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    stored_up_to_yesterday(ws, ADJUSTED_IBM)
    old = ws.stored(ADJUSTED_IBM)[0]
    emulator.add_split("IBM", session_day(), 2.0)

    ws.download(["IBM"], adjusted=True)

    new = ws.stored(ADJUSTED_IBM)[0]
    assert new["adjusted_close"].iloc[0] == pytest.approx(old["adjusted_close"].iloc[0] / 2, rel=1e-3)
    assert new["adjusted_close"].tolist() == \
        expected_daily(emulator, "IBM", adjusted=True)["adjusted_close"].tolist()


def test_bar_of_the_week_in_progress_is_replaced_not_duplicated(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator).init()
    base = session_day() - timedelta(days=14)
    tuesday = base - timedelta(days=(base.weekday() - 1) % 7)
    emulator.as_of = tuesday
    ws.download(["IBM"], interval="weekly")
    ws.backdate(WEEKLY_IBM)
    rows = len(ws.stored(WEEKLY_IBM)[0])
    emulator.as_of = tuesday + timedelta(days=1)

    ws.download(["IBM"], interval="weekly")

    frame = ws.stored(WEEKLY_IBM)[0]
    assert len(frame) == rows
    assert frame["timestamp"].iloc[-1].date() == tuesday + timedelta(days=1)
    assert frame["timestamp"].dt.to_period("W").is_unique
    assert frame["close"].iloc[-1] == emulator.weekly_bars("IBM")[-1]["close"]


# -- free key: full history refused, compact once per run ----------------------------------

@pytest.fixture(scope="module")
def free_key_run(tmp_path_factory):
    """Two new symbols on a free key, one worker (so the second starts after the first)."""
    av = start_emulator()
    try:
        ws = Workspace(tmp_path_factory.mktemp("free"), av, OHLCV_MAX_WORKERS="1", **FREE).init()
        run = ws.cli("download", "AAA", "BBB")
        status = ws.cli("status", "--json")
        yield SimpleNamespace(av=av, ws=ws, run=run, status=status, log=list(av.requests))
    finally:
        av.stop()


def test_free_key_refused_full_history_falls_back_to_compact(free_key_run):
    assert free_key_run.run.returncode == 0, free_key_run.run.stderr
    aaa = sent(free_key_run.av, symbol="AAA")
    assert [(e["outputsize"], e["outcome"]) for e in aaa] == [("full", "premium"), ("compact", "data")]


def test_free_key_second_new_symbol_goes_straight_to_compact(free_key_run):
    assert sizes(sent(free_key_run.av, symbol="BBB")) == ["compact"]


def test_free_key_fallback_is_warned_about_once_in_the_log(free_key_run):
    log = free_key_run.ws.log_text()

    assert log.count("outputsize=full is a premium feature for this key") == 1


def test_free_key_datasets_are_marked_partial_history_in_status(free_key_run):
    assert free_key_run.status.returncode == 0, free_key_run.status.stderr
    datasets = json.loads(free_key_run.status.stdout)["datasets"]

    assert {d["dataset"]: d["partial_history"] for d in datasets} == \
        {"AAA daily": True, "BBB daily": True}


def test_free_key_with_parallel_workers_asks_for_full_history_once(emulators, tmp_path):
    av = emulators()
    ws = Workspace(tmp_path, av, **FREE).init()  # the default 4 workers

    report = ws.download(["AAA", "BBB"])

    assert report.exit_code == 0
    assert sizes(av.requests).count("full") == 1
