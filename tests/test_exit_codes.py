"""Exit codes come from one table: every error class carries its code, EXIT_CODES gives
their meanings, and the README's table and `--help` show exactly those. Also: running the
module as a script loads it once (no import circle with the CLI)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from config import ConfigError
from secure_ohlcv_downloader import EXIT_CODES, OHLCVError, exit_code_of
from tests.foundation_fixtures import CLI, MODULE, REPO, headless_env, run_cli


def error_classes() -> set[type[OHLCVError]]:
    found: set[type[OHLCVError]] = set()
    todo: list[type[OHLCVError]] = [OHLCVError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return found


def readme_exit_codes() -> dict[int, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(code): meaning.strip()
            for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE)}


def test_every_error_class_has_a_code_of_the_table():
    assert {cls.exit_code for cls in error_classes()} <= EXIT_CODES.keys()


def test_every_failure_code_of_the_table_is_some_error_class_or_the_interrupt():
    assert EXIT_CODES.keys() - {0, 130} == {cls.exit_code for cls in error_classes()}


def test_config_error_is_of_the_family_with_code_3():
    assert issubclass(ConfigError, OHLCVError)
    assert exit_code_of(ConfigError("bad")) == 3


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), (RuntimeError("x"), 1),
                                         (OSError(28, "No space left"), 1)])
def test_errors_outside_the_family_map_to_the_documented_codes(error, code):
    assert exit_code_of(error) == code


def test_the_readme_table_is_the_table():
    assert readme_exit_codes() == EXIT_CODES


def test_help_lists_every_code_with_its_meaning(tmp_path):
    result = run_cli(["--help"], tmp_path, headless_env(tmp_path))

    assert result.returncode == 0
    for code, meaning in EXIT_CODES.items():
        assert re.search(rf"^  {code} +{re.escape(meaning)}$", result.stdout, re.MULTILINE), code


def _imports_of_the_module(script) -> int:
    """How often `secure_ohlcv_downloader` is imported when `script --help` runs."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=headless_env(REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    return len(re.findall(r"\|\s+secure_ohlcv_downloader$", result.stderr, re.MULTILINE))


def test_running_the_module_as_a_script_does_not_load_it_a_second_time():
    assert _imports_of_the_module(MODULE) == 0  # it runs as __main__ and is reused


def test_the_cli_imports_the_module_once():  # the control: the count above can be non-zero
    assert _imports_of_the_module(CLI) == 1
