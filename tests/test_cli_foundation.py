"""The command line's foundation: help, both entry points, both command forms, usage
errors, secrets kept out of the log, and no prompt when nobody is at the terminal.

Every run is a real subprocess with an environment built from scratch and stdin closed.
"""

from __future__ import annotations

import re

import pytest
from keyring.backends import fail

from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    CLI,
    MODULE,
    handed_over_keys,
    headless_env,
    init_in_process,
    keyring_backend,
    new_key,
    new_key_ring,
    run_cli,
    secret_service_env,
)


def _log(cwd) -> str:
    path = cwd / "secure_downloader.log"
    return path.read_text() if path.exists() else ""


# -- help ----------------------------------------------------------------------------------

def test_help_lists_init_and_check_keys_with_examples_and_exit_codes(tmp_path):
    result = run_cli(["--help"], tmp_path, headless_env(tmp_path), script=MODULE)

    assert result.returncode == 0
    out = result.stdout
    assert "python secure_ohlcv_downloader.py --init" in out
    assert "python secure_ohlcv_downloader.py --check-keys" in out
    assert re.search(r"^\s+init\s", out, re.MULTILINE)
    assert re.search(r"^\s+check-keys\s", out, re.MULTILINE)
    for code in ("0 ok", "1 some work failed", "2 usage or input error",
                 "3 configuration or key problem", "5 integrity failure"):
        assert code in out


def test_both_entry_points_print_the_same_help_under_their_own_name(tmp_path):
    env = headless_env(tmp_path)

    via_cli = run_cli(["--help"], tmp_path, env, script=CLI)
    via_module = run_cli(["--help"], tmp_path, env, script=MODULE)

    assert (via_module.returncode, via_module.stdout, via_module.stderr) == \
        (via_cli.returncode, via_cli.stdout.replace(CLI.name, MODULE.name), via_cli.stderr)


# -- entry points and command forms ------------------------------------------------------

@pytest.mark.parametrize("script, command", [(MODULE, "--init"), (CLI, "--init"), (CLI, "init")],
                         ids=["module --init", "cli --init", "cli init"])
def test_init_works_through_either_entry_point_in_either_form(tmp_path, script, command):
    result = run_cli([command], tmp_path, headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=new_key()),
                     script=script)

    assert result.returncode == 0, result.stderr
    assert "Encrypted canary written" in result.stdout
    assert (tmp_path / "state" / "canary.fernet").is_file()


@pytest.mark.parametrize("command", ["--check-keys", "check-keys"])
def test_check_keys_works_in_either_form(tmp_path, command):
    key = new_key_ring()
    init_in_process(tmp_path, fail.Keyring(), OHLCV_ENCRYPTION_KEY=key)

    result = run_cli([command], tmp_path, headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=key))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Result: sound" in result.stdout


# -- usage errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["frobnicate"], ["init", "--frobnicate"]])
def test_unknown_command_or_option_exits_2(tmp_path, argv):
    result = run_cli(argv, tmp_path, headless_env(tmp_path))

    assert result.returncode == 2
    assert "frobnicate" in result.stderr


@pytest.mark.parametrize("argv", [["--init", "--check-keys"], ["init", "check-keys"]])
def test_two_commands_at_once_exit_2_and_do_nothing(tmp_path, argv):
    result = run_cli(argv, tmp_path, headless_env(tmp_path))

    assert result.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_command_prints_usage_and_exits_2(tmp_path):
    result = run_cli([], tmp_path, headless_env(tmp_path))

    assert result.returncode == 2
    assert "usage:" in result.stderr


# -- secrets and the log -------------------------------------------------------------------

def _fragments(value: str) -> list[str]:
    """Each key of a key list (the naming key too) and pieces long enough to identify it."""
    keys = [item.removeprefix("naming:") for item in value.split(",")]
    return [f for key in keys for f in (key, key.rstrip("="), key[:16], key[-17:-1])]


def test_debug_log_never_holds_a_key_given_in_the_variable(tmp_path):
    key = new_key_ring()
    env = headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=key, OHLCV_LOG_LEVEL="DEBUG")

    runs = [run_cli(["--init"], tmp_path, env), run_cli(["--check-keys"], tmp_path, env)]

    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    log = _log(tmp_path)
    assert "command check-keys finished" in log
    seen = log + "".join(r.stdout + r.stderr for r in runs)
    assert [f for f in _fragments(key) if f in seen] == []


def test_generated_key_is_handed_over_once_and_never_logged(tmp_path):
    env = headless_env(tmp_path, OHLCV_LOG_LEVEL="DEBUG")

    init = run_cli(["--init"], tmp_path, env)

    assert init.returncode == 0, init.stderr
    key = ",".join(handed_over_keys(tmp_path))  # no terminal: handed over in a 0600 file
    assert [f for f in _fragments(key) if f in init.stdout + init.stderr] == []
    check = run_cli(["--check-keys"], tmp_path, dict(env, OHLCV_ENCRYPTION_KEY=key))
    assert check.returncode == 0, check.stdout + check.stderr
    seen = _log(tmp_path) + check.stdout + check.stderr
    assert [f for f in _fragments(key) if f in seen] == []


def test_debug_log_never_holds_a_key_from_the_secret_service(tmp_path, secret_service,
                                                              keyring_backend):
    env = secret_service_env(secret_service, tmp_path, OHLCV_LOG_LEVEL="DEBUG")

    init = run_cli(["--init"], tmp_path, env)
    check = run_cli(["--check-keys"], tmp_path, env)

    assert (init.returncode, check.returncode) == (0, 0), init.stderr + check.stdout
    key = ",".join(handed_over_keys(tmp_path))
    seen = _log(tmp_path) + init.stderr + check.stdout + check.stderr
    assert [f for f in _fragments(key) if f in seen] == []


# -- no terminal -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [(["--init"], 0), (["--check-keys"], 3), ([], 2)],
                         ids=["init", "check-keys", "no command"])
def test_no_command_prompts_or_hangs_without_a_terminal(tmp_path, argv, expected):
    # run_cli closes stdin and gives up after 30 s: a prompt would read EOF or hang.
    result = run_cli(argv, tmp_path, headless_env(tmp_path))

    assert result.returncode == expected, result.stderr
    assert "EOF" not in result.stderr and "internal error" not in result.stderr
