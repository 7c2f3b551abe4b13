"""The day's quota spent exactly, and requests that never reached the server.

* A free key (25 a day) with the default 4 workers: every one of its 25 requests reaches
  the server; a reservation counted while another worker ran the budget out is sent, not
  dropped (it was counted, so dropping it left requests of the day unused).
* A request that never reached the server (connection refused, a name that does not
  resolve) is not counted against the day; one that may have reached it (read timeout)
  is. A name that does not resolve is tried twice at most; the failure names the cause
  and the offline demo; a person at a terminal sees each retry wait, cron does not.

Everything is real: the emulator over a real socket, a port that refuses connections (a
socket bound but not listening), the reserved `.invalid` name (RFC 2606: never resolves,
no network needed), the command line in a subprocess, a pseudo-terminal for stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from secure_ohlcv_downloader import DailyQuota, QuotaExhausted, api_key_fingerprint
from tests.download_fixtures import (  # noqa: F401  (emulator is a fixture)
    FREE_KEY,
    PREMIUM_KEY,
    Workspace,
    emulator,
    start_emulator,
)
from tests.foundation_fixtures import CLI, SUBPROCESS_TIMEOUT
from tests.test_client import ServerAnswersDuringTheWait, limiter_settings, simulated_limiter

OFFLINE_DEMO = "./scripts/offline-demo.sh"
UNRESOLVABLE = "https://nonexistent.invalid/query"


# -- a free key's day, spent exactly ---------------------------------------------------------

# 5 a second (the emulator's free plan set to the same) keeps the run to seconds; the
# daily budget is the free default of 25 on both sides, and OHLCV_MAX_WORKERS the default 4.
FREE_DAY = {"ALPHA_VANTAGE_API_KEY": FREE_KEY, "OHLCV_RATE_LIMIT_PER_MINUTE": None,
            "OHLCV_RATE_LIMIT_PER_SECOND": "5"}
THIRTY = [f"S{i:02d}" for i in range(30)]


@pytest.fixture(scope="module")
def free_day(tmp_path_factory):
    av = start_emulator(free_per_second=5, free_per_day=25, free_full_daily=True)
    try:
        ws = Workspace(tmp_path_factory.mktemp("free-day"), av, **FREE_DAY).init()
        (ws.cwd / "symbols.txt").write_text("\n".join(THIRTY) + "\n")
        run = ws.cli("download", "--symbols-file", "symbols.txt")
        yield SimpleNamespace(av=av, ws=ws, run=run, status=ws.cli("status", "--json"),
                              status_text=ws.cli("status"))
    finally:
        av.stop()


def test_free_key_with_four_workers_sends_all_25_requests_of_its_day(free_day):
    assert free_day.run.returncode == 4, free_day.run.stderr
    assert free_day.av.request_count == 25
    assert free_day.av.violations == 0


def test_free_key_with_four_workers_brings_25_datasets_up_to_date(free_day):
    lines = free_day.run.stdout.splitlines()

    assert sum(": updated, " in line for line in lines) == 25, free_day.run.stdout
    assert "0 failed, 5 not reached; 25 requests" in free_day.run.stderr


def test_status_counts_exactly_the_requests_the_server_counted(free_day):
    [quota] = json.loads(free_day.status.stdout)["quota"]

    assert (quota["used"], quota["limit"], quota["left"]) == (25, 25, 0)
    assert quota["used"] == free_day.av.used_today(FREE_KEY)
    assert "25 of 25 used" in free_day.status_text.stdout


# -- the limiter, on the simulated clock of tests/test_client.py -----------------------------

def test_a_reservation_counted_before_the_budget_ran_out_is_still_sent(tmp_path):
    """While a request waits for its slot, another worker finds the day's budget spent:
    the waiting one was counted within the budget and is sent."""
    clock = ServerAnswersDuringTheWait(None)
    limiter = clock.limiter = simulated_limiter(tmp_path, clock, OHLCV_RATE_LIMIT_PER_DAY="2")
    key = limiter.acquire()
    refused: list[type] = []

    def another_worker(lim):
        with pytest.raises(QuotaExhausted) as caught:
            lim.acquire()
        refused.append(caught.type)
    clock.answer = another_worker

    assert limiter.acquire() is key
    assert refused == [QuotaExhausted]
    quota = DailyQuota(limiter_settings(tmp_path), key.fingerprint)
    assert quota.read()["used"] == 2


def test_a_reservation_of_a_key_the_server_called_spent_is_given_back(tmp_path):
    second_key = "SECONDPREMIUMKEY"
    clock = ServerAnswersDuringTheWait(None)
    limiter = clock.limiter = simulated_limiter(tmp_path, clock, (PREMIUM_KEY, second_key))
    first = limiter.acquire()
    limiter.acquire()  # the other key, free at once
    clock.answer = lambda lim: lim.exhausted(first)

    assert limiter.acquire().fingerprint != first.fingerprint

    settings = limiter_settings(tmp_path, (PREMIUM_KEY, second_key))
    assert DailyQuota(settings, first.fingerprint).read()["used"] == 1  # the one it sent
    assert DailyQuota(settings, api_key_fingerprint(second_key)).read()["used"] == 2


# -- requests that never reached the server ----------------------------------------------------

@pytest.fixture
def refusing_url():
    """A local port that refuses connections: bound, never listening, held for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/query"


def used_today(ws: Workspace) -> int:
    settings = ws.settings()
    key = settings.api_keys[0].reveal()
    return DailyQuota(settings, api_key_fingerprint(key)).read()["used"]


def test_connection_refused_is_not_counted_and_names_the_cause(emulator, tmp_path, refusing_url):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_BASE_URL=refusing_url,
                   OHLCV_MAX_RETRIES="2").init()

    [result] = ws.download(["IBM"]).results

    assert result.outcome == "failed"
    assert "gave up after 3 attempts" in result.error
    assert "could not connect to 127.0.0.1:" in result.error
    assert "Connection refused" in result.error
    assert OFFLINE_DEMO in result.error
    assert used_today(ws) == 0


def test_unresolvable_name_is_tried_twice_at_most_and_not_counted(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_BASE_URL=UNRESOLVABLE,
                   OHLCV_MAX_RETRIES="5").init()

    report = ws.download(["IBM"])

    [result] = report.results
    assert result.outcome == "failed"
    assert "could not resolve nonexistent.invalid" in result.error
    assert OFFLINE_DEMO in result.error
    assert report.stats.requests["no_connection"] <= 2
    assert report.stats.requests["network_error"] == 0
    assert ws.log_text().count("IBM TIME_SERIES_DAILY: retry ") <= 1
    assert "IBM TIME_SERIES_DAILY: retry 2/" not in ws.log_text()
    assert used_today(ws) == 0


def test_after_a_name_failed_to_resolve_later_datasets_try_once(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_BASE_URL=UNRESOLVABLE,
                   OHLCV_MAX_WORKERS="1").init()

    report = ws.download(["IBM", "MSFT", "AAPL"])

    assert [r.outcome for r in report.results] == ["failed"] * 3
    assert report.stats.requests["no_connection"] == 2 + 1 + 1
    assert used_today(ws) == 0


def test_a_request_that_may_have_reached_the_server_is_counted(emulator, tmp_path):
    # The server read the request and stalled: a read timeout, counted as sent.
    ws = Workspace(tmp_path, emulator, OHLCV_MAX_RETRIES="1",
                   OHLCV_REQUEST_TIMEOUT="0.3").init()
    emulator.inject("stall", times=2, symbol="IBM", seconds=1.0)

    [result] = ws.download(["IBM"]).results

    assert result.outcome == "failed"
    assert "network error" in result.error
    assert OFFLINE_DEMO not in result.error
    assert used_today(ws) == 2 == emulator.request_count


# -- what the operator sees --------------------------------------------------------------------

def run_with_terminal_stderr(ws: Workspace, *args: str) -> tuple[int, str, str]:
    """The command line with stderr on a pseudo-terminal (as a person runs it): exit
    code, stdout, and what the terminal showed."""
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, str(CLI), *args], cwd=ws.cwd, env=ws.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=follower, text=True)
        os.close(follower)
        shown = bytearray()
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            shown += chunk
        stdout = proc.stdout.read() if proc.stdout else ""
        code = proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        os.close(leader)
    return code, stdout, shown.decode(errors="replace")


def test_a_terminal_is_shown_each_retry_wait_naming_the_cause(emulator, tmp_path, refusing_url):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_BASE_URL=refusing_url,
                   OHLCV_MAX_RETRIES="2").init()

    code, stdout, terminal = run_with_terminal_stderr(ws, "download", "IBM")

    assert code == 1
    assert "(Connection refused); retry 1 of 2 in " in terminal
    assert "(Connection refused); retry 2 of 2 in " in terminal
    assert OFFLINE_DEMO in stdout


def test_a_terminal_is_told_a_name_that_does_not_resolve_is_retried_once(emulator, tmp_path):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_BASE_URL=UNRESOLVABLE,
                   OHLCV_MAX_RETRIES="5").init()

    code, stdout, terminal = run_with_terminal_stderr(ws, "download", "IBM")

    assert code == 1
    assert "IBM: could not resolve nonexistent.invalid: " in terminal
    assert "; retry 1 of 1 in " in terminal
    assert "retry 2" not in terminal
    assert "gave up after 2 attempts: could not resolve nonexistent.invalid" in stdout
    assert OFFLINE_DEMO in stdout


def test_cron_output_has_no_retry_notes_only_the_outcome(emulator, tmp_path, refusing_url):
    ws = Workspace(tmp_path, emulator, ALPHA_VANTAGE_BASE_URL=refusing_url,
                   OHLCV_MAX_RETRIES="2").init()

    run = ws.cli("download", "IBM")

    assert run.returncode == 1
    assert "retry" not in run.stdout + run.stderr
    assert "IBM daily: FAILED: gave up after 3 attempts: could not connect" in run.stdout
    assert OFFLINE_DEMO in run.stdout
    assert "; 0 requests (and 3 attempts without a connection), 2 retries" in run.stderr
