"""Operating the downloader for years: the log (rotation, modes, levels, rate-limit events,
redaction), the metrics file, `status` as a health check, `estimate`, and the memory and
disk limits. Real components only: the local Alpha Vantage emulator over a real socket and
the command line as a real subprocess (stdin closed, environment built from scratch).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from secure_ohlcv_downloader import (
    DEFAULT_BYTES_PER_BAR,
    DatasetId,
    ResourceMonitor,
    market_today,
)
from tests.download_fixtures import session_day, start_emulator, weekdays_before
from tests.foundation_fixtures import headless_env, run_python, settings_for
from tests.operations_fixtures import (
    LOG_NAME,
    Metrics,
    OpsWorkspace,
    dataset_lines,
    describe,
    listed_metrics,
    log_lines,
    secret_hits,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# == the log ====================================================================================

ROTATION_SYMBOLS = ["IBM", "MSFT", "AAPL", "GOOG", "AMZN", "META"]


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """A download of six symbols, one at a time, 0.3 s each; once the first dataset line
    is in the log, the log is renamed to .log.1 as logrotate does without copytruncate
    (and without `create`: the tool must make the new file itself)."""
    av = start_emulator(latency=0.3)
    proc = None
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("logrotate"), av, OHLCV_MAX_WORKERS="1").init()
        proc = ws.start("download", *ROTATION_SYMBOLS, umask=0o022)
        deadline = time.monotonic() + 25
        while not (ws.log_path.exists() and "IBM daily: updated" in ws.log_path.read_text()):
            assert proc.poll() is None, "the download ended before its first dataset line"
            assert time.monotonic() < deadline, "no dataset line in the log after 25 s"
            time.sleep(0.02)
        rotated_path = ws.cwd / (LOG_NAME + ".1")
        ws.log_path.rename(rotated_path)
        running_at_rename = proc.poll() is None
        stdout, stderr = proc.communicate(timeout=60)
        yield SimpleNamespace(ws=ws, code=proc.returncode, stdout=stdout, stderr=stderr,
                              running_at_rename=running_at_rename,
                              old=rotated_path.read_text(),
                              new=ws.log_path.read_text() if ws.log_path.exists() else "",
                              new_path=ws.log_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        av.stop()


def test_log_renamed_mid_run_gets_the_runs_later_lines_in_a_new_file(rotated):
    assert rotated.code == 0, rotated.stderr
    assert rotated.running_at_rename
    assert "command download started" in rotated.old
    assert "command download finished with exit code 0" in rotated.new
    assert dataset_lines(rotated.new), "no dataset line was written after the rename"


def test_log_renamed_mid_run_loses_no_dataset_line(rotated):
    lines = dataset_lines(rotated.old) + dataset_lines(rotated.new)

    symbols = sorted(line.split(" ", 1)[0] for line in lines)
    assert symbols == sorted(ROTATION_SYMBOLS)
    assert all(": updated " in line for line in lines)


def test_log_file_the_tool_recreates_after_a_rename_is_0600(rotated):
    assert rotated.new_path.exists()
    assert oct(mode_of(rotated.new_path)) == oct(0o600)


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """A DEBUG-level download under umask 000 whose first IBM request is throttled."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("debug"), av, OHLCV_LOG_LEVEL="DEBUG").init()
        av.inject("throttle_burst", times=1, symbol="IBM")
        run = ws.run("download", "IBM", "MSFT", umask=0)
        assert run.returncode == 0, describe(run)
        assert av.faults_applied["throttle_burst"] == 1
        yield SimpleNamespace(ws=ws, run=run, log=ws.log_path.read_text())
    finally:
        av.stop()


@pytest.fixture(scope="module")
def info_run(tmp_path_factory):
    """The same day's work at the default level (INFO), with a retry after an HTTP 503."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("info"), av).init()
        av.inject("http_503", times=1, symbol="IBM")
        run = ws.run("download", "IBM", "MSFT")
        assert run.returncode == 0, describe(run)
        yield SimpleNamespace(ws=ws, run=run, log=ws.log_path.read_text())
    finally:
        av.stop()


def test_log_file_is_0600_under_umask_000(debug_run):
    assert oct(mode_of(debug_run.ws.log_path)) == oct(0o600)


def test_debug_log_times_every_request(debug_run):
    timing = [line for line in log_lines(debug_run.log, "DEBUG")
              if re.search(r" (IBM|MSFT) TIME_SERIES_DAILY: HTTP \d{3}, \d+ bytes in [\d.]+ s "
                           r"via key av-[0-9a-f]{8}$", line)]

    assert {re.search(r" (IBM|MSFT) TIME", line)[1] for line in timing} == {"IBM", "MSFT"}


def test_debug_log_shows_the_rate_limiter_at_work(debug_run):
    limiter = [line for line in log_lines(debug_run.log, "DEBUG") if "rate limit" in line]

    assert any(f"key {debug_run.ws.key_fingerprint} sends" in line for line in limiter)


def test_info_log_has_no_debug_lines(info_run):
    assert dataset_lines(info_run.log), "the INFO log should still hold the dataset lines"
    assert log_lines(info_run.log, "DEBUG") == []
    assert " DEBUG " not in info_run.log


def test_throttling_is_logged_as_a_warning_with_the_key_fingerprint_and_limiter_state(debug_run):
    warnings = [line for line in log_lines(debug_run.log, "WARNING")
                if "rate limit" in line and "throttled" in line]

    assert len(warnings) == 1, debug_run.log
    assert debug_run.ws.key_fingerprint in warnings[0]
    assert re.search(r"limiter: \d+/\S+ today", warnings[0]), warnings[0]


@pytest.fixture(scope="module")
def quota_events(tmp_path_factory):
    """The two other rate-limit events, at the default level: the server says the day's
    quota is spent; our own daily budget (OHLCV_RATE_LIMIT_PER_DAY=1) is reached."""
    av = start_emulator()
    try:
        server = OpsWorkspace(tmp_path_factory.mktemp("server-quota"), av).init()
        av.inject("throttle_daily", times=1)
        server_run = server.run("download", "IBM")
        budget = OpsWorkspace(tmp_path_factory.mktemp("own-budget"), av,
                              OHLCV_RATE_LIMIT_PER_DAY="1").init()
        budget_run = budget.run("download", "IBM", "MSFT")
        assert (server_run.returncode, budget_run.returncode) == (4, 4), describe(server_run)
        yield {"server": (server, server.log_path.read_text()),
               "budget": (budget, budget.log_path.read_text())}
    finally:
        av.stop()


def test_server_quota_message_is_logged_with_the_key_fingerprint_and_limiter_state(quota_events):
    ws, log = quota_events["server"]
    warnings = [line for line in log_lines(log, "WARNING")
                if "rate limit" in line and "daily quota" in line]

    assert len(warnings) == 1, log
    assert ws.key_fingerprint in warnings[0]
    assert re.search(r"limiter: \d+/\S+ today", warnings[0]), warnings[0]


def test_own_daily_budget_reached_is_logged_with_the_key_fingerprint(quota_events):
    ws, log = quota_events["budget"]
    warnings = [line for line in log_lines(log, "WARNING")
                if "rate limit" in line and "daily budget of 1" in line]

    assert len(warnings) == 1, log
    assert ws.key_fingerprint in warnings[0]


def test_rate_limit_lines_never_hold_the_api_key(debug_run):
    lines = [line for line in log_lines(debug_run.log) if "rate limit" in line]

    assert lines
    assert [line for line in lines if debug_run.ws.api_key in line] == []


# == nothing secret anywhere =====================================================================

SECRET_API_KEY = "OPSAPIKEY-7Q2W9E4R1T6Y3U8I5O0P"


@pytest.fixture(scope="module")
def secret_scan(tmp_path_factory):
    """Every command an operator runs, at DEBUG, with a distinctive API key, retries after
    faults, and --metrics-file: the log, the output, the metrics and the files to scan."""
    av = start_emulator(premium_keys={SECRET_API_KEY: 6000}, accept_unknown_keys=False)
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("secrets"), av, OHLCV_LOG_LEVEL="DEBUG",
                          ALPHA_VANTAGE_API_KEY=SECRET_API_KEY)
        metrics = ws.cwd / "ohlcv.prom"
        av.inject("http_503", times=1, symbol="IBM")
        av.inject("truncated", times=1, symbol="MSFT")
        av.inject("throttle_burst", times=1, symbol="MSFT")
        commands = {
            "init": ["--init"],
            "download": ["download", "IBM", "MSFT"],
            "status": ["status", "--json"],
            "export": ["export", "IBM", "--format", "json", "-o", "ibm.json"],
            "export to stdout": ["export", "IBM", "--start", "2024-01-01"],
            "backup": ["backup"],
            "verify-backup": ["--verify-backup", "--all"],
            "check-keys": ["--check-keys"],
            "estimate": ["estimate", "--symbols", "500"],
        }
        runs, metric_texts = {}, {}
        for name, args in commands.items():
            runs[name] = ws.run(*args, "--metrics-file", str(metrics))
            metric_texts[name] = metrics.read_text() if metrics.exists() else ""
        yield SimpleNamespace(ws=ws, av=av, runs=runs, metrics=metric_texts,
                              secrets={"API key": SECRET_API_KEY,
                                       "Fernet key": ws.variables["OHLCV_ENCRYPTION_KEY"]})
    finally:
        av.stop()


def test_secret_scenario_ran_every_command_and_retried(secret_scan):
    failed = {name: describe(run) for name, run in secret_scan.runs.items() if run.returncode}

    assert failed == {}
    assert Metrics(secret_scan.metrics["download"]).value("ohlcv_retries_total") >= 2


def test_debug_log_holds_urllib3_request_lines_with_the_key_redacted(secret_scan):
    log = secret_scan.ws.log_path.read_text()

    assert re.search(r"urllib3\.connectionpool .*\"GET /query\?.*apikey=\[REDACTED\]", log)


def _scanned(scan, where: str) -> dict[str, str | bytes]:
    if where == "log":
        return {"log": scan.ws.log_path.read_text()}
    if where == "command output":
        return {f"{name} {stream}": getattr(run, stream) for name, run in scan.runs.items()
                for stream in ("stdout", "stderr")}
    if where == "metrics":
        return {f"metrics after {name}": text for name, text in scan.metrics.items()}
    if where == "status json":
        return {"status": json.dumps(json.loads(scan.runs["status"].stdout))}
    if where == "exported file":
        return {"ibm.json": (scan.ws.cwd / "ibm.json").read_text()}
    return {str(p): p.read_bytes() for p in scan.ws.cwd.rglob("*") if p.is_file()}


@pytest.mark.parametrize("secret", ["API key", "Fernet key"])
@pytest.mark.parametrize("where", ["log", "command output", "metrics", "status json",
                                   "exported file", "every file in the working directory"])
def test_no_secret_nor_a_16_character_piece_of_it_appears(secret_scan, secret, where):
    texts = _scanned(secret_scan, where)

    assert any(texts.values()), f"nothing to scan in {where}"
    assert secret_hits(texts, {secret: secret_scan.secrets[secret]}) == []


# == memory ======================================================================================

@pytest.fixture(scope="module")
def memory_stop(tmp_path_factory):
    """IBM and MSFT stored with the normal limit; then --full of both plus a new AAPL with
    OHLCV_MAX_MEMORY_MB=1, far below the RSS of any Python process."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("memory"), av).init()
        assert ws.download(["IBM", "MSFT"]).exit_code == 0
        before, requests_before = ws.data_files(), av.request_count
        run = ws.run("download", "IBM", "MSFT", "AAPL", "--full", OHLCV_MAX_MEMORY_MB="1")
        status = ws.run("status", "--json")
        assert status.returncode == 0, describe(status)
        yield SimpleNamespace(ws=ws, run=run, before=before, after=ws.data_files(),
                              requests=av.request_count - requests_before,
                              status=json.loads(status.stdout), log=ws.log_path.read_text())
    finally:
        av.stop()


def test_memory_limit_reached_exits_1(memory_stop):
    assert memory_stop.run.returncode == 1, describe(memory_stop.run)


def test_memory_limit_output_says_the_rest_was_not_reached_and_why(memory_stop):
    lines = dict(line.split(": ", 1) for line in memory_stop.run.stdout.splitlines())

    assert sorted(lines) == ["AAPL daily", "IBM daily", "MSFT daily"]
    assert all(text.startswith("not reached") and "OHLCV_MAX_MEMORY_MB" in text
               for text in lines.values()), lines
    assert "quota" not in memory_stop.run.stdout  # the quota was not the reason
    assert "3 not reached" in memory_stop.run.stderr


def test_memory_limit_stops_before_any_request(memory_stop):
    assert memory_stop.requests == 0


def test_memory_limit_leaves_stored_datasets_byte_for_byte(memory_stop):
    assert memory_stop.after == memory_stop.before
    rows = memory_stop.ws.stored_rows()  # every file still decrypts
    assert sorted(rows) == ["IBM daily", "MSFT daily"] and all(rows.values())


def test_memory_limit_leaves_the_datasets_pending_in_status(memory_stop):
    assert memory_stop.status["pending"] == ["AAPL daily", "IBM daily", "MSFT daily"]
    assert memory_stop.status["runs"]["download"]["exit_code"] == 1


def test_memory_limit_is_logged_as_an_error(memory_stop):
    errors = [line for line in log_lines(memory_stop.log, "ERROR")
              if re.search(r"memory: rss [\d.]+ MB reached OHLCV_MAX_MEMORY_MB=1\b", line)]

    assert errors, memory_stop.log


@pytest.fixture
def monitor(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="secure_ohlcv")
    return ResourceMonitor(settings_for(tmp_path))


def memory_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("memory:")]


def test_memory_monitor_warns_once_over_80_percent_of_the_limit(monitor, caplog):
    monitor.limit = int(monitor.rss() / 0.9)  # RSS at about 90% of the limit

    assert monitor.memory_ok() and monitor.memory_ok()
    warnings = memory_records(caplog)
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "80%" in warnings[0].getMessage()


def test_memory_monitor_under_80_percent_says_nothing(monitor, caplog):
    monitor.limit = monitor.rss() * 2

    assert monitor.memory_ok()
    assert memory_records(caplog) == []


def test_memory_monitor_at_the_limit_says_stop(monitor, caplog):
    monitor.limit = monitor.rss() // 2

    assert monitor.memory_ok() is False
    assert [r.levelno for r in memory_records(caplog)] == [logging.ERROR]


# == disk ========================================================================================

@pytest.fixture(scope="module")
def disk_floor(tmp_path_factory):
    """IBM stored; then IBM --full and a new AAPL with OHLCV_MIN_FREE_DISK_MB 1000 MB
    above the free space of this file system."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("disk"), av).init()
        assert ws.download(["IBM"]).exit_code == 0
        before = ws.data_files()
        floor = shutil.disk_usage(ws.cwd).free // 2**20 + 1000
        run = ws.run("download", "IBM", "AAPL", "--full", OHLCV_MIN_FREE_DISK_MB=str(floor))
        yield SimpleNamespace(ws=ws, run=run, before=before, after=ws.data_files())
    finally:
        av.stop()


def test_disk_below_the_floor_exits_1_naming_the_variable(disk_floor):
    assert disk_floor.run.returncode == 1, describe(disk_floor.run)
    assert "OHLCV_MIN_FREE_DISK_MB" in disk_floor.run.stderr


def test_disk_below_the_floor_leaves_stored_data_untouched(disk_floor):
    ibm = disk_floor.ws.daily_file("IBM").relative_to(disk_floor.ws.cwd / "data").as_posix()
    assert disk_floor.after[ibm] == disk_floor.before[ibm]
    assert disk_floor.ws.stored_rows()["IBM daily"] > 0


def test_disk_below_the_floor_creates_no_file(disk_floor):
    assert sorted(disk_floor.after) == sorted(disk_floor.before)


# == metrics =====================================================================================

METRICS_SYMBOLS = ["IBM", "MSFT", "AAPL"]
RETRYABLE_FAULTS = {"http_503": "IBM", "throttle_burst": "MSFT"}


@pytest.fixture(scope="module")
def metrics_runs(tmp_path_factory):
    """download (two retryable faults) -> backup -> --verify-backup, each with
    --metrics-file, under umask 000, with a daily cap so the quota is counted."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("metrics"), av,
                          OHLCV_RATE_LIMIT_PER_DAY="500").init()
        path = ws.cwd / "textfile" / "ohlcv.prom"
        path.parent.mkdir()
        for kind, symbol in RETRYABLE_FAULTS.items():
            av.inject(kind, times=1, symbol=symbol)
        texts, runs = {}, {}
        started = time.time()
        for name, args in (("download", ["download", *METRICS_SYMBOLS]), ("backup", ["backup"]),
                           ("verify", ["--verify-backup", "--all"])):
            runs[name] = ws.run(*args, "--metrics-file", str(path), umask=0)
            assert runs[name].returncode == 0, describe(runs[name])
            texts[name] = path.read_text()
            if name == "download":
                finished = time.time()
        yield SimpleNamespace(ws=ws, av=av, path=path, started=started, finished=finished,
                              download=Metrics(texts["download"]), backup=Metrics(texts["backup"]),
                              verify=Metrics(texts["verify"]))
    finally:
        av.stop()


def test_metrics_count_the_datasets_updated(metrics_runs):
    m = metrics_runs.download

    assert m.value("ohlcv_datasets_total", result="updated") == len(METRICS_SYMBOLS)
    assert m.value("ohlcv_datasets_total", result="failed") == 0


def test_metrics_count_the_data_answers_the_server_sent(metrics_runs):
    served = metrics_runs.av.outcomes["data"]

    assert served == len(METRICS_SYMBOLS)
    assert metrics_runs.download.value("ohlcv_requests_total", outcome="data") == served


def test_metrics_count_one_retry_per_injected_retryable_fault(metrics_runs):
    assert metrics_runs.download.value("ohlcv_retries_total") == len(RETRYABLE_FAULTS)
    assert metrics_runs.download.value("ohlcv_throttled_total") == 1


def test_metrics_quota_used_equals_the_requests_sent(metrics_runs):
    m, fp = metrics_runs.download, metrics_runs.ws.key_fingerprint
    sent = metrics_runs.av.request_count

    assert sent == len(METRICS_SYMBOLS) + len(RETRYABLE_FAULTS)
    assert m.value("ohlcv_quota_used", key=fp) == sent
    assert m.value("ohlcv_quota_left", key=fp) == 500 - sent


def test_metrics_record_the_downloads_exit_code_and_success_time(metrics_runs):
    m = metrics_runs.download

    assert m.value("ohlcv_last_exit_code", command="download") == 0
    success = m.value("ohlcv_last_success_timestamp_seconds", command="download")
    assert metrics_runs.started <= success <= metrics_runs.finished


def test_metrics_after_backup_keep_the_downloads_last_success(metrics_runs):
    download_success = metrics_runs.download.value("ohlcv_last_success_timestamp_seconds",
                                                   command="download")
    m = metrics_runs.backup

    assert m.value("ohlcv_last_success_timestamp_seconds", command="download") == download_success
    assert m.value("ohlcv_last_exit_code", command="download") == 0
    assert m.value("ohlcv_backup_datasets") == len(METRICS_SYMBOLS)


def test_metrics_after_verify_show_a_sound_archive(metrics_runs):
    m = metrics_runs.verify

    assert m.value("ohlcv_verify_problems") == 0
    assert m.value("ohlcv_verify_members_checked") > 0
    assert m.value("ohlcv_verify_datasets_decrypted") == len(METRICS_SYMBOLS)


def test_metrics_labelled_by_command_keep_each_commands_last_value(metrics_runs):
    # deploy/metrics.txt: "Series labelled by `command` keep the last value per command."
    m = metrics_runs.verify
    by_command = {name for name, labels in listed_metrics().items() if labels == ("command",)}

    missing = sorted(f"{name}{{command=\"download\"}}" for name in by_command
                     if m.get(name, command="download") is None)
    assert missing == []


def test_metrics_file_has_the_default_mode_0644_under_umask_000(metrics_runs):
    assert oct(mode_of(metrics_runs.path)) == oct(0o644)


def test_every_metric_written_is_in_the_deploy_list_with_its_labels(metrics_runs):
    listed = listed_metrics()
    written = {(s.name, tuple(sorted(k for k, _ in s.labels)))
               for m in (metrics_runs.download, metrics_runs.backup, metrics_runs.verify)
               for s in m.samples}

    assert len(written) > 15
    assert sorted(w for w in written if listed.get(w[0]) != w[1]) == []


@pytest.fixture(scope="module")
def metrics_override(tmp_path_factory):
    """estimate with OHLCV_METRICS_FILE=env.prom, OHLCV_METRICS_FILE_MODE=0640 and
    --metrics-file cli.prom, under umask 000."""
    cwd = tmp_path_factory.mktemp("metrics-override")
    av = start_emulator()
    try:
        ws = OpsWorkspace(cwd, av, OHLCV_METRICS_FILE="env.prom", OHLCV_METRICS_FILE_MODE="0640")
        run = ws.run("estimate", "--symbols", "10", "--metrics-file", "cli.prom", umask=0)
        assert run.returncode == 0, describe(run)
        yield cwd
    finally:
        av.stop()


def test_metrics_file_option_overrides_the_variable(metrics_override):
    assert (metrics_override / "cli.prom").is_file()
    assert not (metrics_override / "env.prom").exists()
    assert Metrics.read(metrics_override / "cli.prom").value("ohlcv_last_exit_code",
                                                             command="estimate") == 0


def test_metrics_file_has_the_configured_mode_under_umask_000(metrics_override):
    assert oct(mode_of(metrics_override / "cli.prom")) == oct(0o640)


# == status ======================================================================================

@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("healthy"), av,
                          OHLCV_RATE_LIMIT_PER_DAY="100").init()
        started = time.time()
        download = ws.run("download", "IBM")
        finished = time.time()
        assert download.returncode == 0, describe(download)
        status = ws.run("status", "--json")
        assert status.returncode == 0, describe(status)
        yield SimpleNamespace(ws=ws, av=av, started=started, finished=finished,
                              status=json.loads(status.stdout))
    finally:
        av.stop()


def test_status_reports_the_last_download_run(healthy):
    run = healthy.status["runs"]["download"]

    assert run["exit_code"] == 0
    assert healthy.started <= run["last_run"] <= healthy.finished
    assert run["last_success"] == run["last_run"]


def test_status_reports_a_fresh_dataset_as_not_stale_with_its_age(healthy):
    [entry] = healthy.status["datasets"]
    last_bar = healthy.av.daily_bars("IBM")[-1]["date"]

    assert entry["dataset"] == "IBM daily"
    assert entry["stale"] is False
    assert entry["age_days"] == (market_today() - last_bar).days


def test_status_reports_the_quota_left_today(healthy):
    [quota] = healthy.status["quota"]

    assert quota["key"] == healthy.ws.key_fingerprint
    assert quota["used"] == healthy.av.request_count == 1
    assert quota["limit"] == 100 and quota["left"] == 99


@pytest.fixture(scope="module")
def behind(tmp_path_factory):
    """The server's newest bar is three weekdays older than session_day(), and the
    dataset was last checked the evening its newest bar came out (as a nightly run that
    then stopped running would have left it)."""
    av = start_emulator(as_of=weekdays_before(session_day(), 3))
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("stale"), av).init()
        assert ws.download(["IBM"]).exit_code == 0
        ws.backdate(DatasetId("IBM"))
        status = ws.run("status", "--json")
        text = ws.run("status")
        assert status.returncode == 0 and text.returncode == 0, describe(status)
        yield SimpleNamespace(status=json.loads(status.stdout), text=text.stdout, av=av)
    finally:
        av.stop()


def test_status_reports_a_dataset_behind_the_latest_session_as_stale(behind):
    [entry] = behind.status["datasets"]

    assert entry["last_bar"].startswith(behind.av.as_of.isoformat())
    assert entry["stale"] is True
    assert entry["age_days"] >= 3


def test_status_text_marks_the_stale_dataset(behind):
    [line] = [line for line in behind.text.splitlines() if line.startswith("IBM daily")]

    assert "STALE" in line


# == estimate ====================================================================================

def estimate_figures(stdout: str) -> dict[str, str]:
    """The indented `name: value` lines of estimate's output."""
    lines = re.finditer(r"^\s+([a-z ]+):\s+(.*)$", stdout, re.MULTILINE)
    return {m[1].strip(): m[2].strip() for m in lines}


@pytest.fixture(scope="module")
def estimates(tmp_path_factory):
    """`estimate --symbols 500 --years 20` before --init with a free key's 25 requests a
    day, then after IBM and MSFT daily bars are stored, with the premium plan's limits."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("estimate"), av)
        args = ("estimate", "--symbols", "500", "--years", "20")
        empty = ws.run(*args, OHLCV_RATE_LIMIT_PER_DAY="25")
        ws.init()
        assert ws.download(["IBM", "MSFT"]).exit_code == 0
        measured = ws.run(*args)
        for run in (empty, measured):
            assert run.returncode == 0, describe(run)
        yield SimpleNamespace(ws=ws, empty=empty.stdout, measured=measured.stdout)
    finally:
        av.stop()


def bytes_per_bar(stdout: str) -> tuple[float, str]:
    match = re.search(r"bytes per bar:\s+([\d.]+) \((.*)\)$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match[1]), match[2]


def test_estimate_on_an_empty_store_uses_the_documented_default_and_says_so(estimates):
    value, source = bytes_per_bar(estimates.empty)

    assert value == DEFAULT_BYTES_PER_BAR["daily"]
    assert "default" in source and "empty" in source


def test_estimate_measures_bytes_per_bar_in_the_store(estimates):
    value, source = bytes_per_bar(estimates.measured)
    files = [estimates.ws.daily_file(s) for s in ("IBM", "MSFT")]
    rows = estimates.ws.stored_rows()
    real = sum(f.stat().st_size for f in files) / sum(rows.values())

    assert source == "measured in this store"
    assert len(files) == 2
    assert value == pytest.approx(real, rel=0.2)


def test_estimate_prints_the_guides_1_to_5_kb_planning_figure(estimates):
    assert re.search(r"per ticker per day: .*1-5 KB", estimates.measured), estimates.measured


def test_estimate_daily_backfill_is_one_request_per_symbol(estimates):
    assert estimate_figures(estimates.measured)["full backfill"].startswith("500 requests,")


def test_estimate_backfill_under_a_25_a_day_cap_takes_days(estimates):
    backfill = estimate_figures(estimates.empty)["full backfill"]
    match = re.fullmatch(r"500 requests, ([\d.,]+) days.*", backfill)

    assert match, backfill
    assert 19 <= float(match[1]) <= 20  # 500 requests at 25 a day: the 20th day's batch


PEAK_OF_A_CHILD = """
import subprocess, sys
ballast = bytearray(400 * 2**20)  # 400 MiB touched by the parent, then a child is started
ballast[::4096] = b"x" * len(ballast[::4096])
child = ("from secure_ohlcv_downloader import ResourceMonitor; from config import load_settings;"
         "print(ResourceMonitor(load_settings()).peak())")
sys.exit(subprocess.run([sys.executable, "-c", child]).returncode)
"""


def test_peak_memory_is_the_run_s_own_not_its_parent_s(tmp_path):
    """A run started by a large parent (a notebook, a scheduler) reports its own peak: Linux
    carries ru_maxrss over exec, so it used to report the parent's 400 MiB."""
    result = run_python(PEAK_OF_A_CHILD, tmp_path, headless_env(tmp_path))

    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 300 * 2**20
