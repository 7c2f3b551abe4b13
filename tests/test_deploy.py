"""The deployment files under deploy/, checked as the tools that read them would.

- deploy/metrics.txt is the one list of metric names (name type labels meaning); the alert
  rules and the Grafana dashboard may use no other, and the tool's own metrics writer
  writes exactly these.
- Prometheus alert rules: YAML groups -> rules, each complete; `promtool check rules`
  where it is installed.
- Grafana dashboard: JSON panels whose PromQL uses listed metrics only; every data source
  reference is the import input DS_PROMETHEUS, so Grafana's import asks for it.
- systemd units: parsed with repeated keys kept (two ExecStart= lines), hardening present,
  timers wired to services that exist; `systemd-analyze verify` where it is installed.
- crontab: five valid time fields and a command that cd's, runs the tool with the venv's
  python, names a command the CLI's --help lists, and never wraps it in flock; every job
  run through /bin/sh against the emulator stamps each line it adds to cron.log.
- logrotate: no copytruncate (the tool reopens its log), new files 0600; the real
  logrotate (-d, then -f twice while a download writes) on a copy that differs only in
  the log directory and the account.
- The log, metrics and working-directory paths agree across cron, systemd and logrotate.
"""

from __future__ import annotations

import functools
import grp
import gzip
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import yaml

from tests.download_fixtures import start_emulator
from tests.operations_fixtures import OpsWorkspace, dataset_lines, describe

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
METRICS_LIST = DEPLOY / "metrics.txt"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "secure-ohlcv-dashboard.json"
SYSTEMD = DEPLOY / "systemd"
CRONTAB = DEPLOY / "crontab.example"
LOGROTATE = DEPLOY / "logrotate" / "secure-ohlcv"
CLI = REPO / "secure_ohlcv_cli.py"
TOOL_SCRIPTS = ("secure_ohlcv_downloader.py", "secure_ohlcv_cli.py")

METRIC_REF = re.compile(r"(?<![A-Za-z0-9_:])((?:ohlcv|node_textfile)_[a-z0-9_]+)")
METRIC_TYPES = {"gauge", "counter", "histogram", "summary", "untyped"}
REQUIRED_UNITS = ("secure-ohlcv-download.service", "secure-ohlcv-download.timer",
                  "secure-ohlcv-backup.service", "secure-ohlcv-backup.timer")
REQUIRED_ALERTS = {"OhlcvNoRecentSuccess", "OhlcvDownloadFailures", "OhlcvThrottling",
                   "OhlcvQuotaNearlySpent", "OhlcvQuotaSpent", "OhlcvVerifyFailed",
                   "OhlcvTextfileStale"}
DASHBOARD_MUST_SHOW = {"ohlcv_last_success_timestamp_seconds", "ohlcv_datasets_total",
                       "ohlcv_requests_total", "ohlcv_quota_used", "ohlcv_quota_left",
                       "ohlcv_run_duration_seconds", "ohlcv_peak_rss_bytes",
                       "ohlcv_verify_problems", "ohlcv_last_exit_code"}
SERVICE_USER = "ohlcv"
DASHBOARD_INPUT = "DS_PROMETHEUS"  # the data source Grafana's import asks for


# -- readers -------------------------------------------------------------------------------

@functools.cache
def metrics_list() -> dict[str, dict[str, object]]:
    """deploy/metrics.txt: name -> {type, labels, meaning}; '#' lines are comments."""
    metrics: dict[str, dict[str, object]] = {}
    for line in METRICS_LIST.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, type_, labels, meaning = (line.split(None, 3) + ["", "", ""])[:4]
        metrics[name] = {"type": type_, "meaning": meaning,
                         "labels": [] if labels == "-" else labels.split(",")}
    return metrics


def metric_refs(text: str) -> set[str]:
    """ohlcv_* and node_textfile_* identifiers in a PromQL expression."""
    return set(METRIC_REF.findall(text))


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
            for rule in group["rules"]]


def alert_expr(name: str) -> str:
    return next(rule["expr"] for rule in alert_rules() if rule.get("alert") == name)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict]) -> list[dict]:
    """Panels, with those nested in collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found += all_panels(panel.get("panels", []))
    return found


def dashboard_queries(node: object) -> list[str]:
    """Every PromQL string in the dashboard: targets' expr, variables' query/definition."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_queries(item)
    return found


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value in order (keys may repeat).

    Comments start with '#' or ';'; a trailing backslash continues a line; `Key=` with
    nothing after it is kept as the empty string (systemd's "reset" value)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = (pending + " " + raw.strip()) if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"line {number}: not 'Key=value' inside a section: {raw!r}")
        key, value = line.split("=", 1)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()):
            raise ValueError(f"line {number}: bad key {key!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    if pending:
        raise ValueError("file ends inside a continued line")
    return sections


@functools.cache
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {path.name: parse_unit(path.read_text(encoding="utf-8"))
            for path in sorted(SYSTEMD.iterdir()) if path.suffix in (".service", ".timer")}


def services() -> dict[str, dict[str, list[str]]]:
    """Each service's [Service] section."""
    return {name: unit["Service"] for name, unit in units().items() if name.endswith(".service")}


def timers() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: unit for name, unit in units().items() if name.endswith(".timer")}


def last(section: dict[str, list[str]], key: str) -> str | None:
    values = section.get(key)
    return values[-1] if values else None


def unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    """Environment= assignments (several per line allowed, shell-like quoting)."""
    env: dict[str, str] = {}
    for value in service.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, setting = assignment.partition("=")
            env[name] = setting
    return env


def read_crontab() -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    """(variables, jobs): `NAME=value` lines and (five time fields, command) job lines."""
    variables: dict[str, str] = {}
    jobs: list[tuple[list[str], str]] = []
    for line in CRONTAB.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", stripped)
        if assignment:
            variables[assignment[1]] = assignment[2].strip().strip("\"'")
            continue
        parts = stripped.split(None, 5)
        jobs.append((parts[:5], parts[5] if len(parts) > 5 else ""))
    return variables, jobs


def shell_words(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def is_operator(word: str) -> bool:
    return bool(word) and all(c in "();<>|&" for c in word)


def uses_flock(command: str) -> bool:
    return any(PurePosixPath(word).name == "flock" for word in shell_words(command))


def tool_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(interpreter, args after the script) for each run of the tool in a shell command."""
    words = shell_words(command)
    runs = []
    for i, word in enumerate(words):
        if PurePosixPath(word).name in TOOL_SCRIPTS:
            args = []
            for arg, following in zip(words[i + 1:], words[i + 2:] + [""], strict=True):
                if is_operator(arg) or (arg.isdigit() and following[:1] in ("<", ">")):
                    break  # an operator, or the 2 of `2>&1`
                args.append(arg)
            runs.append((words[i - 1] if i else "", args))
    return runs


def cli_command(args: list[str]) -> str:
    """The command an argument list names: a subcommand or the --flag form of one."""
    assert args, "the tool is run without a command"
    first = args[0]
    return first[2:] if first.startswith("--") else first


def cron_invocations() -> list[tuple[str, list[str]]]:
    return [run for _, command in read_crontab()[1] for run in tool_invocations(command)]


def systemd_invocations() -> list[tuple[str, list[str]]]:
    return [run for service in services().values() for line in service.get("ExecStart", [])
            for run in tool_invocations(line)]


@functools.cache
def cli_help(*command: str) -> subprocess.CompletedProcess:
    """The real CLI's --help (of one command when given), as the operator would see it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OHLCV_", "ALPHA_VANTAGE_"))}
    return subprocess.run([sys.executable, str(CLI), *command, "--help"], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def logrotate_directives() -> tuple[list[str], list[list[str]]]:
    """(paths of the first block, directives in it), comments dropped."""
    text = "\n".join(line for line in LOGROTATE.read_text(encoding="utf-8").splitlines()
                     if not line.strip().startswith("#"))
    match = re.search(r"([^{}]+)\{([^{}]*)\}", text)
    assert match, "no 'paths { directives }' block"
    paths = match[1].split()
    directives = [line.split() for line in match[2].splitlines() if line.strip()]
    return paths, directives


# -- the metric list -------------------------------------------------------------------------

def test_metrics_list_is_well_formed():
    problems = []
    names = []
    for line in METRICS_LIST.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(None, 3)
        if len(fields) < 4:
            problems.append(f"needs 'name type labels meaning': {line!r}")
            continue
        name, type_, labels, _ = fields
        names.append(name)
        if not re.fullmatch(r"(ohlcv|node_textfile)_[a-z0-9_]+", name):
            problems.append(f"{name}: not an ohlcv_ or node_textfile_ metric name")
        if type_ not in METRIC_TYPES:
            problems.append(f"{name}: unknown type {type_!r}")
        if labels != "-" and not all(re.fullmatch(r"[a-z_][a-z0-9_]*", label)
                                     for label in labels.split(",")):
            problems.append(f"{name}: bad labels {labels!r}")
    duplicates = {n for n in names if names.count(n) > 1}
    assert names and not problems and not duplicates, (problems, duplicates)


def test_the_tool_writes_exactly_the_listed_metrics(tmp_path):
    # The product's own writer, given a fact of every kind, against deploy/metrics.txt:
    # same names, types and label names (node_textfile_* come from node_exporter).
    from types import SimpleNamespace

    from secure_ohlcv_downloader import METRICS, RunStats, run_samples, write_metrics

    stats = RunStats()
    stats.count("data", 2048)
    stats.count("throttled")
    stats.retried()
    now = 1_700_000_000.0
    facts = {"stats": stats, "results": [SimpleNamespace(outcome="updated", added=3)],
             "quota": [("av-1a2b3c4d", 3, 22)], "verify_members_checked": 4,
             "verify_datasets_decrypted": 2, "verify_problems": 0, "backup_datasets": 2,
             "backup_bytes": 4096, "gaps": 3, "datasets_with_gaps": 2}
    samples = run_samples("download", 1.5, 50_000_000, facts)
    runs = {"download": {"last_run": now, "exit_code": 0, "last_success": now,
                         "samples": samples}}
    path = tmp_path / "secure_ohlcv.prom"
    write_metrics(path, 0o644, runs)

    written: dict[str, tuple[str, set[str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# TYPE "):
            _, _, name, type_ = line.split()
            written[name] = (type_, set())
        elif line and not line.startswith("#"):
            sample = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s", line)
            assert sample and sample[1] in written, line
            written[sample[1]][1].update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', sample[2] or ""))
    listed = {name: (m["type"], set(m["labels"])) for name, m in metrics_list().items()
              if name.startswith("ohlcv_")}
    assert written == listed
    assert set(METRICS) == set(listed)


# -- Prometheus alert rules ------------------------------------------------------------------

def test_alerts_file_is_yaml_groups_of_rules():
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert isinstance(document, dict) and isinstance(document.get("groups"), list)
    assert document["groups"], "no groups"
    for group in document["groups"]:
        assert isinstance(group.get("name"), str) and group["name"], group
        assert isinstance(group.get("rules"), list) and group["rules"], group["name"]


def test_every_alert_rule_has_alert_expr_for_severity_and_summary():
    incomplete = []
    for rule in alert_rules():
        labels, annotations = rule.get("labels") or {}, rule.get("annotations") or {}
        if not (rule.get("alert") and rule.get("expr") and rule.get("for")
                and labels.get("severity") and annotations.get("summary")):
            incomplete.append(rule.get("alert") or rule)
    assert not incomplete


def test_alert_for_durations_and_severities_are_valid():
    wrong = [(rule["alert"], rule["for"], rule["labels"]["severity"]) for rule in alert_rules()
             if not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule["for"]))
             or rule["labels"]["severity"] not in ("critical", "warning", "info")]
    assert not wrong


def test_alert_names_are_unique():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), names


def test_required_alerts_are_present():
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in alert_rules()}


def test_alert_exprs_use_only_listed_metrics():
    unknown = {rule["alert"]: metric_refs(rule["expr"]) - metrics_list().keys()
               for rule in alert_rules()}
    assert all(metric_refs(rule["expr"]) for rule in alert_rules()), "an expr uses no metric"
    assert not any(unknown.values()), unknown


def test_quota_spent_alert_watches_exit_code_4_of_download():
    expr = " ".join(alert_expr("OhlcvQuotaSpent").split())
    assert re.search(r'ohlcv_last_exit_code\{command="download"\}\s*==\s*4\b', expr), expr


def test_textfile_stale_alert_matches_the_configured_metrics_file():
    expr = alert_expr("OhlcvTextfileStale")
    pattern = re.search(r'file=~"([^"]+)"', expr)
    assert pattern, expr
    for path in configured_values("OHLCV_METRICS_FILE"):
        # node_exporter labels the file by its path (newer) or base name (older).
        assert re.fullmatch(pattern[1], path) and re.fullmatch(pattern[1], Path(path).name)


# In CI (.ci/run installs the tool) a missing tool fails the test instead of skipping it.
@pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                    reason="promtool (Debian package prometheus) is not installed: it is the "
                           "only PromQL parser at hand; the structure tests above still run")
def test_promtool_accepts_the_alert_rules():
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana dashboard -----------------------------------------------------------------------

def test_dashboard_is_json_with_panels_and_queries():
    board = dashboard()
    assert isinstance(board.get("schemaVersion"), int) and board["schemaVersion"] >= 36
    panels = [p for p in all_panels(board["panels"]) if p.get("type") != "row"]
    assert panels
    for panel in panels:
        assert panel.get("type") in ("stat", "timeseries", "table", "gauge", "bargauge"), panel
        assert panel.get("targets"), panel["title"]
        assert all(target.get("expr", "").strip() for target in panel["targets"]), panel["title"]


def test_dashboard_queries_use_only_listed_metrics():
    queries = dashboard_queries(dashboard())
    unknown = {q: metric_refs(q) - metrics_list().keys() for q in queries}
    assert queries and not any(unknown.values()), {q: u for q, u in unknown.items() if u}


def test_dashboard_shows_the_operational_metrics():
    used = set().union(*(metric_refs(q) for q in dashboard_queries(dashboard())))
    assert DASHBOARD_MUST_SHOW <= used, DASHBOARD_MUST_SHOW - used


def test_dashboard_panel_ids_are_unique():
    ids = [panel["id"] for panel in all_panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids)), ids


def datasource_references(node: object) -> list[object]:
    """Every `datasource` value in the dashboard: panels', targets', variables', annotations'."""
    found: list[object] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append(value)
            found += datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            found += datasource_references(item)
    return found


def test_dashboard_import_asks_for_a_prometheus_data_source():
    # Grafana's import shows one picker per __inputs entry and writes the chosen data
    # source's uid wherever ${NAME} appears; without the entry it asks nothing.
    board = dashboard()
    assert {"name": DASHBOARD_INPUT, "type": "datasource", "pluginId": "prometheus"}.items() \
        <= next((i for i in board.get("__inputs", []) if i.get("name") == DASHBOARD_INPUT),
                {}).items(), board.get("__inputs")
    required = {(r.get("type"), r.get("id")) for r in board.get("__requires", [])}
    panel_types = {p["type"] for p in all_panels(board["panels"]) if p["type"] != "row"}
    expected = {("grafana", "grafana"), ("datasource", "prometheus")}
    expected |= {("panel", t) for t in panel_types}
    assert expected <= required, expected - required


def test_every_datasource_reference_is_the_import_input():
    board = dashboard()
    builtin = {"type": "grafana", "uid": "-- Grafana --"}  # the annotations' own source
    wanted = {"type": "prometheus", "uid": f"${{{DASHBOARD_INPUT}}}"}
    references = [r for r in datasource_references(board) if r != builtin]
    assert references and all(r == wanted for r in references), \
        [r for r in references if r != wanted]
    queried = [p for p in all_panels(board["panels"]) if p.get("targets")]
    assert all(p.get("datasource") == wanted for p in queried), \
        [p["title"] for p in queried if p.get("datasource") != wanted]
    variables = [v for v in board["templating"]["list"] if v.get("type") == "query"]
    assert all(v.get("datasource") == wanted for v in variables), variables


def test_dashboard_names_no_fixed_data_source():
    # A uid or name from the machine it was drawn on would not exist where it is imported;
    # every ${...} must be an import input (a dashboard variable is not asked for).
    text = DASHBOARD.read_text(encoding="utf-8")
    declared = {i["name"] for i in dashboard().get("__inputs", [])}
    placeholders = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", text)) - {"__all"}
    assert placeholders <= declared, placeholders - declared
    assert not [v for v in dashboard()["templating"]["list"] if v.get("type") == "datasource"]


# -- systemd units ---------------------------------------------------------------------------

def test_required_units_exist():
    assert set(REQUIRED_UNITS) <= set(units())


def test_unit_parser_keeps_repeated_keys_and_empty_values():
    parsed = parse_unit("[Service]\n# c\nExecStart=/bin/a\nExecStart=/bin/b \\\n  c\n"
                        "CapabilityBoundingSet=\n")
    assert parsed == {"Service": {"ExecStart": ["/bin/a", "/bin/b c"],
                                  "CapabilityBoundingSet": [""]}}


def test_services_run_as_the_dedicated_user():
    accounts = {name: (last(s, "User"), last(s, "Group")) for name, s in services().items()}
    assert all(account == (SERVICE_USER, SERVICE_USER) for account in accounts.values()), accounts


@pytest.mark.parametrize("key, expected", [
    ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
    ("ProtectHome", "yes"), ("UMask", "0077"), ("CapabilityBoundingSet", ""),
    ("Type", "oneshot"),
])
def test_services_set_hardening(key, expected):
    values = {name: last(s, key) for name, s in services().items()}
    assert values and all(value == expected for value in values.values()), values


def test_services_filter_system_calls_and_address_families():
    allowed = {"AF_INET", "AF_INET6", "AF_UNIX"}
    for name, service in services().items():
        assert "@system-service" in service.get("SystemCallFilter", []), name
        families = set((last(service, "RestrictAddressFamilies") or "").split())
        assert families and families <= allowed, (name, families)


def test_download_service_can_reach_the_api():
    service = services()["secure-ohlcv-download.service"]
    assert {"AF_INET", "AF_INET6"} <= set(last(service, "RestrictAddressFamilies").split())
    assert last(service, "PrivateNetwork") in (None, "no", "false")


def test_services_may_write_working_log_and_metrics_directories():
    for name, service in services().items():
        writable = {path.lstrip("-+") for value in service.get("ReadWritePaths", [])
                    for path in value.split()}
        env = unit_environment(service)
        needed = {last(service, "WorkingDirectory"), str(Path(env["OHLCV_LOG_FILE"]).parent),
                  str(Path(env["OHLCV_METRICS_FILE"]).parent)}
        assert None not in needed and needed <= writable, (name, needed - writable)


def test_services_take_secrets_from_a_root_only_file():
    for name, service in services().items():
        sources = [v.lstrip("-") for v in service.get("EnvironmentFile", [])]
        sources += [v.split(":", 1)[1] for v in service.get("LoadCredential", [])]
        assert any(src.startswith("/etc/secure-ohlcv/") for src in sources), name
        assert not any(k in unit_environment(service)
                       for k in ("ALPHA_VANTAGE_API_KEY", "OHLCV_ENCRYPTION_KEY")), name


def test_quota_exit_code_4_is_not_treated_as_success():
    for name, service in services().items():
        codes = " ".join(service.get("SuccessExitStatus", [])).split()
        assert "4" not in codes, name


def test_services_run_the_tool_with_the_venv_python_without_flock():
    for name, service in services().items():
        lines = service.get("ExecStart", [])
        assert lines, name
        for line in lines:
            assert not uses_flock(line), line
            runs = tool_invocations(line)
            assert runs and all(re.search(r"/\.?venv/bin/python3?$", python)
                                for python, _ in runs), line


def test_backup_service_backs_up_then_verifies():
    service = services()["secure-ohlcv-backup.service"]
    commands = [cli_command(args) for line in service["ExecStart"]
                for _, args in tool_invocations(line)]
    assert last(service, "Type") == "oneshot" and commands == ["backup", "verify-backup"]


def test_timers_have_a_calendar_persistent_and_random_delay():
    for name, timer in timers().items():
        section = timer.get("Timer", {})
        assert section.get("OnCalendar") and last(section, "Persistent") == "true", name
        assert last(section, "RandomizedDelaySec"), name
        assert "timers.target" in timer.get("Install", {}).get("WantedBy", []), name


def test_each_timer_starts_a_service_that_exists():
    for name, timer in timers().items():
        target = last(timer["Timer"], "Unit") or name.removesuffix(".timer") + ".service"
        assert target in services(), (name, target)


def test_every_service_has_a_timer():
    started = {last(t["Timer"], "Unit") or n.removesuffix(".timer") + ".service"
               for n, t in timers().items()}
    assert set(services()) <= started, set(services()) - started


# In CI (.ci/run installs the tool) a missing tool fails the test instead of skipping it.
@pytest.mark.skipif(shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
                    reason="systemd-analyze is not installed (Debian package systemd); the "
                           "parser-based unit tests above still run")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    for path in SYSTEMD.iterdir():
        # The venv's python does not exist here; verify checks ExecStart is executable.
        text = re.sub(r"(?m)^(ExecStart=)\S+", r"\1/bin/true", path.read_text(encoding="utf-8"))
        (tmp_path / path.name).write_text(text, encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify",
                             *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # Unknown keys and unparsable values are only warnings: any output is a finding.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


# -- crontab ---------------------------------------------------------------------------------

CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_NAMES = (None, None, None,
              {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)},
              {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})


def cron_field_ok(field: str, low: int, high: int, names: dict[str, int] | None) -> bool:
    def value(token: str) -> int | None:
        if token.isdigit():
            return int(token)
        return (names or {}).get(token.lower())

    for part in field.split(","):
        match = re.fullmatch(r"(\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/([0-9]+))?", part)
        if not match or (match[2] is not None and int(match[2]) == 0):
            return False
        if match[1] == "*":
            continue
        bounds = [value(t) for t in match[1].split("-")]
        if None in bounds or not all(low <= b <= high for b in bounds) or bounds[0] > bounds[-1]:
            return False
    return True


def test_cron_field_check_rejects_bad_fields():
    assert cron_field_ok("1-5", 0, 7, CRON_NAMES[4]) and cron_field_ok("mon-fri", 0, 7, CRON_NAMES[4])
    assert not cron_field_ok("60", 0, 59, None) and not cron_field_ok("5-1", 0, 23, None)
    assert not cron_field_ok("*/0", 0, 59, None) and not cron_field_ok("@daily", 0, 59, None)


def test_crontab_jobs_have_five_valid_time_fields_and_a_command():
    _, jobs = read_crontab()
    assert jobs
    for fields, command in jobs:
        assert len(fields) == 5 and command, (fields, command)
        assert all(cron_field_ok(f, *rng, names)
                   for f, rng, names in zip(fields, CRON_RANGES, CRON_NAMES, strict=True)), fields


def test_crontab_jobs_have_no_bare_percent_sign():
    # cron turns an unescaped % into a newline and feeds the rest to stdin.
    assert not [c for _, c in read_crontab()[1] if re.search(r"(?<!\\)%", c)]


def test_crontab_jobs_cd_into_the_working_directory_first():
    for _, command in read_crontab()[1]:
        words = shell_words(command)
        assert words[0] == "cd" and words[2] == "&&" and words[1].startswith("/"), command


def test_crontab_jobs_run_the_tool_with_the_venv_python():
    for _, command in read_crontab()[1]:
        runs = tool_invocations(command)
        assert runs, f"no {' or '.join(TOOL_SCRIPTS)} in: {command}"
        assert all(re.search(r"/\.?venv/bin/python3?$", python) for python, _ in runs), command


def test_crontab_never_wraps_the_tool_in_flock():
    assert not [c for _, c in read_crontab()[1] if uses_flock(c)]


def test_crontab_sets_the_metrics_file_for_every_job():
    variables, jobs = read_crontab()
    for _, command in jobs:
        path = variables.get("OHLCV_METRICS_FILE") or \
            next((w.split("=", 1)[1] for w in shell_words(command)
                  if w.startswith("OHLCV_METRICS_FILE=")), "")
        assert path.startswith("/") and path.endswith(".prom"), command


def test_crontab_output_is_logged_or_mailed():
    variables, jobs = read_crontab()
    unlogged = [c for _, c in jobs if ">>" not in shell_words(c)]
    assert not unlogged or variables.get("MAILTO"), unlogged


def test_crontab_verifies_the_backup_only_after_it_succeeds():
    chains = []
    for _, command in read_crontab()[1]:
        words = shell_words(command)
        runs = [cli_command(args) for _, args in tool_invocations(command)]
        if "backup" in runs:
            chains.append((runs, words))
    assert len(chains) == 1, chains
    runs, words = chains[0]
    assert runs == ["backup", "verify-backup"]
    between = words[words.index("backup"):words.index("--verify-backup")]
    assert "&&" in between and not {"||", ";", "&"} & set(between), words


def test_crontab_schedules_download_backup_and_cleanup():
    commands = {cli_command(args) for _, args in cron_invocations()}
    assert {"download", "backup", "verify-backup", "gaps", "cleanup"} <= commands, commands


def test_cron_and_systemd_commands_exist_in_the_cli():
    # Compared with the real parser's --help, so it follows the CLI as commands are added.
    shown = cli_help()
    assert shown.returncode == 0, shown.stderr
    missing = sorted({cli_command(args) for _, args in cron_invocations() + systemd_invocations()
                      if not re.search(rf"(?m)^\s+{re.escape(cli_command(args))}(\s|$)",
                                       shown.stdout)})
    assert not missing, f"commands not in `{CLI.name} --help`: {missing}"


def test_cron_and_systemd_options_exist_in_the_cli():
    for _, args in cron_invocations() + systemd_invocations():
        options = [a.split("=", 1)[0] for a in args[1:] if a.startswith("-")]
        if not options:
            continue
        shown = cli_help(cli_command(args))
        assert shown.returncode == 0, shown.stderr
        assert all(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", shown.stdout)
                   for o in options), (args, shown.stdout)


CRON_LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) ")  # ISO 8601, UTC


def as_cron_runs_it(command: str) -> str:
    r"""A job's command as cron hands it to the shell: `\%` is a literal percent sign (a
    bare one would end the command; another test keeps them out)."""
    return command.replace("\\%", "%")


def test_cron_log_lines_carry_a_timestamp(tmp_path):
    """Every job line of the crontab, run through /bin/sh as cron runs it (its variables
    set, the installed paths mapped into tmp_path), against the emulator: each line the
    jobs append to cron.log starts with the UTC time it was written."""
    site, logs, metrics = tmp_path / "site", tmp_path / "log", tmp_path / "node-exporter"
    for directory in (site, logs, metrics):
        directory.mkdir(mode=0o700)
    (tmp_path / "symbols.txt").write_text("IBM\nMSFT\n")
    installed = {"/opt/secure-ohlcv/.venv/bin/python": sys.executable,
                 "/opt/secure-ohlcv/": f"{REPO}/", "/var/lib/secure-ohlcv": str(site),
                 "/etc/secure-ohlcv/symbols.txt": str(tmp_path / "symbols.txt"),
                 LOG_DIRECTORY: str(logs), "/var/lib/prometheus/node-exporter": str(metrics)}

    def here(text: str) -> str:
        for path, replacement in installed.items():
            text = text.replace(path, replacement)
        return text

    variables, jobs = read_crontab()
    av = start_emulator()
    try:
        ws = OpsWorkspace(site, av).init()
        env = dict(ws.env(), **{name: here(value) for name, value in variables.items()
                                if name != "MAILTO"})
        cron_log = logs / "cron.log"
        for _, command in jobs:
            before = datetime.now(UTC).replace(microsecond=0)
            appended_from = cron_log.stat().st_size if cron_log.exists() else 0
            job = subprocess.run([variables["SHELL"], "-c", here(as_cron_runs_it(command))],
                                 env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=300)
            after = datetime.now(UTC)
            # cron mails what a job prints outside its redirection: nothing, when all is well
            assert job.returncode == 0 and not job.stdout + job.stderr, describe(job)
            lines = cron_log.read_text()[appended_from:].splitlines()
            assert lines, f"nothing appended to cron.log by: {command}"
            unstamped = [line for line in lines if not CRON_LOG_STAMP.match(line)]
            assert not unstamped, unstamped
            stamps = {datetime.fromisoformat(CRON_LOG_STAMP.match(line)[1]) for line in lines}
            assert all(before <= stamp <= after for stamp in stamps), (before, stamps, after)
        assert re.search(r"(?m)^\S+ done: 2 updated", cron_log.read_text()), cron_log.read_text()
        assert (metrics / "secure_ohlcv.prom").exists()
    finally:
        av.stop()


# -- logrotate -------------------------------------------------------------------------------

def test_logrotate_does_not_copytruncate():
    _, directives = logrotate_directives()
    assert directives and not [d for d in directives if d[0] == "copytruncate"]


def test_logrotate_creates_the_new_log_0600_for_the_service_user():
    _, directives = logrotate_directives()
    assert ["create", "0600", SERVICE_USER, SERVICE_USER] in directives, directives


def test_logrotate_keeps_a_bounded_compressed_history():
    _, directives = logrotate_directives()
    rotate = [d for d in directives if d[0] == "rotate"]
    assert rotate and rotate[0][1].isdigit() and 0 < int(rotate[0][1]) <= 52
    assert ["compress"] in directives and ["missingok"] in directives


LOG_DIRECTORY = "/var/log/secure-ohlcv"  # where the shipped config rotates
# Twelve symbols at 0.3 s each: seconds of run left after each rotation, even on a slow machine.
ROTATION_SYMBOLS = ["IBM", "MSFT", "AAPL", "GOOG", "AMZN", "META", "NVDA", "TSLA", "JPM", "XOM",
                    "KO", "PEP"]


def logrotate_command() -> str:
    found = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    if found is None:
        # Not a skip: the rotation below is the only proof that the shipped config and the
        # tool's log handler agree, and CI (.ci/run) installs the tool.
        pytest.fail("logrotate is not installed. Fix: apt-get install logrotate "
                    "(.ci/run installs it in CI).", pytrace=False)
    return found


def logrotate_config_in(directory: Path) -> Path:
    """The shipped config with its two machine-specific parts replaced, nothing else: the
    log directory by `directory`, the service account by the user running the test."""
    text = LOGROTATE.read_text(encoding="utf-8")
    account = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    assert text.count(LOG_DIRECTORY + "/") == 2 and text.count(" ohlcv ohlcv\n") == 2, text
    text = text.replace(LOG_DIRECTORY + "/", f"{directory}/")
    text = text.replace(" ohlcv ohlcv\n", f" {account}\n")
    config = directory.parent / "logrotate.conf"
    config.write_text(text, encoding="utf-8")
    config.chmod(0o600)  # logrotate ignores a config others may write
    return config


def run_logrotate(config: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([logrotate_command(), *options, "-s", str(config.parent / "state"),
                           str(config)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_logrotate_debug_run_accepts_the_shipped_config(tmp_path):
    logs = tmp_path / "log"
    logs.mkdir(mode=0o700)
    (logs / "secure_downloader.log").write_text("a line\n")
    result = run_logrotate(logrotate_config_in(logs), "-d")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "error" not in output.lower(), output
    assert f"considering log {logs}/secure_downloader.log" in output, output


def log_texts(directory: Path) -> dict[str, str]:
    """Every file in the log directory, decompressed: name -> text."""
    return {p.name: (gzip.decompress(p.read_bytes()) if p.suffix == ".gz"
                     else p.read_bytes()).decode() for p in sorted(directory.iterdir())}


def wait_for_a_dataset_line(log_file: Path, proc: subprocess.Popen) -> None:
    """Until `log_file` holds a dataset line; fails if the run ends first (no clock: the
    emulator's latency keeps the run going for seconds after each dataset)."""
    while not (log_file.exists() and dataset_lines(log_file.read_text())):
        assert proc.poll() is None, (
            f"the download ended before a dataset line reached {log_file.name}: does the "
            "tool still reopen its log when logrotate moves it?\n" + proc.communicate()[1])
        time.sleep(0.02)


@pytest.fixture(scope="module")
def rotated_by_logrotate(tmp_path_factory):
    """A download of twelve symbols, 0.3 s a request, rotated twice by real `logrotate -f`
    with the shipped config while it writes: once a dataset line is in the log, and again
    once one is in the file logrotate created. Then a `status` run, a new process, in the file
    logrotate created."""
    av = start_emulator(latency=0.3)
    proc = None
    root = tmp_path_factory.mktemp("logrotate")
    logs = root / "log"
    logs.mkdir(mode=0o700)
    log_file = logs / "secure_downloader.log"
    try:
        ws = OpsWorkspace(root / "site", av, OHLCV_MAX_WORKERS="1",
                          OHLCV_LOG_FILE=str(log_file))
        ws.cwd.mkdir(mode=0o700)
        ws.init()
        config = logrotate_config_in(logs)
        proc = ws.start("download", *ROTATION_SYMBOLS, umask=0o022)
        rotations = []
        for _ in range(2):
            wait_for_a_dataset_line(log_file, proc)
            rotations.append(run_logrotate(config, "-f"))
            assert proc.poll() is None, "the download ended before logrotate did"
        stdout, stderr = proc.communicate(timeout=120)
        download = SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
        status = ws.run("status", umask=0o022)
        yield SimpleNamespace(rotations=rotations, download=download, status=status,
                              logs=logs, log_file=log_file, texts=log_texts(logs))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        av.stop()


def test_logrotate_rotates_the_log_while_the_tool_writes(rotated_by_logrotate):
    run = rotated_by_logrotate
    for result in run.rotations:
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert run.download.returncode == 0, describe(run.download)
    # delaycompress: the newest rotated file stays plain, the one before is compressed.
    names = set(run.texts)
    assert {"secure_downloader.log", "secure_downloader.log.1",
            "secure_downloader.log.2.gz"} == names, names


def test_logrotate_loses_no_line_of_the_run(rotated_by_logrotate):
    # A handler that kept writing to the moved file would have written the run's later
    # lines into .1, which the second rotation compressed and deleted.
    everything = "".join(rotated_by_logrotate.texts.values())
    symbols = sorted(line.split(" ", 1)[0] for line in dataset_lines(everything))
    assert symbols == sorted(ROTATION_SYMBOLS), symbols
    assert everything.count("command download started") == 1
    assert everything.count("command download finished with exit code 0") == 1
    assert dataset_lines(rotated_by_logrotate.texts["secure_downloader.log"]), \
        "no dataset line reached the file logrotate created"


def test_tool_accepts_the_log_file_logrotate_creates(rotated_by_logrotate):
    run = rotated_by_logrotate
    assert run.status.returncode == 0, describe(run.status)
    assert "command status finished" in run.texts["secure_downloader.log"]
    info = run.log_file.stat()
    assert info.st_uid == os.getuid() and oct(stat.S_IMODE(info.st_mode)) == oct(0o600)


def test_rotated_logs_stay_private(rotated_by_logrotate):
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode))
             for p in rotated_by_logrotate.logs.iterdir()}
    assert all(int(mode, 8) & 0o077 == 0 for mode in modes.values()), modes


# -- one set of paths ------------------------------------------------------------------------

def configured_values(variable: str) -> set[str]:
    """A variable's values in the crontab and every service."""
    found = {unit_environment(s).get(variable, "") for s in services().values()}
    found.add(read_crontab()[0].get(variable, ""))
    return found


def test_log_file_is_the_same_everywhere_and_rotated():
    logs = configured_values("OHLCV_LOG_FILE")
    paths, _ = logrotate_directives()
    assert len(logs) == 1 and logs <= set(paths), (logs, paths)


def test_metrics_file_is_the_same_everywhere():
    files = configured_values("OHLCV_METRICS_FILE")
    assert len(files) == 1 and next(iter(files)).endswith(".prom"), files


def test_cron_and_systemd_use_the_same_working_directory():
    directories = {last(s, "WorkingDirectory") for s in services().values()}
    directories |= {shell_words(c)[1] for _, c in read_crontab()[1]}
    assert len(directories) == 1, directories
