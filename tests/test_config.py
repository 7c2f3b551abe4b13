"""Settings: defaults, where values come from, and every way a value can be wrong.

A bad value stops the run with a ConfigError (exit 3 on the command line) that names the
variable and never echoes a secret.
"""

from __future__ import annotations

import base64
import re

import pytest

import config
from config import ConfigError, Secret
from tests.foundation_fixtures import REPO, headless_env, new_key, run_cli, settings_for

API_KEY = "DEMOKEY1234567"


# -- defaults and sources ----------------------------------------------------------------

def test_defaults_when_nothing_is_set(tmp_path):
    s = settings_for(tmp_path)

    assert s.api_keys == ()
    assert s.encryption_keys == ()
    assert s.base_url == "https://www.alphavantage.co/query"
    assert s.data_dir == (tmp_path / "data").resolve()
    assert s.backup_dir == (tmp_path / "backups").resolve()
    assert s.state_dir == (tmp_path / "state").resolve()
    assert s.log_file == (tmp_path / "secure_downloader.log").resolve()
    assert s.log_level == "INFO"
    assert (s.connect_timeout, s.request_timeout) == (10.0, 30.0)
    assert s.max_retries == 5
    assert (s.backoff_seconds, s.datatype) == (2.0, "csv")
    assert (s.rate_limit_per_second, s.rate_limit_per_minute, s.rate_limit_per_day) == (1.0, 0, 25)
    assert s.max_workers == 4
    assert (s.retention_days, s.backup_keep) == (0, 7)
    assert (s.max_memory_mb, s.min_free_disk_mb) == (1024, 100)
    assert s.metrics_file is None
    assert s.lock_timeout == 60
    assert (s.dir_mode, s.file_mode) == (0o700, 0o600)
    assert s.warnings == ()


def test_dotenv_values_are_used_when_the_environment_is_silent(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OHLCV_MAX_WORKERS=2\nOHLCV_LOG_LEVEL=DEBUG\n")
    env_file.chmod(0o600)

    s = settings_for(tmp_path)

    assert (s.max_workers, s.log_level) == (2, "DEBUG")


def test_a_real_environment_variable_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OHLCV_LOG_LEVEL=DEBUG\nOHLCV_DATA_DIR=from-dotenv\n")
    env_file.chmod(0o600)

    s = settings_for(tmp_path, OHLCV_LOG_LEVEL="ERROR", OHLCV_DATA_DIR="from-environment")

    assert s.log_level == "ERROR"
    assert s.data_dir == (tmp_path / "from-environment").resolve()


def test_premium_per_minute_implies_per_second_and_no_daily_cap(tmp_path):
    s = settings_for(tmp_path, OHLCV_RATE_LIMIT_PER_MINUTE="75")

    assert s.rate_limit_per_minute == 75
    assert s.rate_limit_per_second == pytest.approx(75 / 60)
    assert s.rate_limit_per_day == 0  # 0 = unlimited


def test_explicit_per_second_and_per_day_override_the_premium_defaults(tmp_path):
    s = settings_for(tmp_path, OHLCV_RATE_LIMIT_PER_MINUTE="75",
                     OHLCV_RATE_LIMIT_PER_SECOND="0.5", OHLCV_RATE_LIMIT_PER_DAY="5000")

    assert (s.rate_limit_per_second, s.rate_limit_per_day) == (0.5, 5000)


def test_comma_separated_keys_are_read_primary_first(tmp_path):
    primary, older = new_key(), new_key()

    s = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=f"{primary}, {older}")

    assert [k.reveal() for k in s.encryption_keys] == [primary, older]


def test_a_naming_key_item_is_read_last_as_written(tmp_path):
    primary, older, naming = new_key(), new_key(), new_key()

    s = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=f"{primary}, {older}, naming:{naming}")

    assert [k.reveal() for k in s.encryption_keys] == [primary, older, f"naming:{naming}"]
    assert naming in Secret.known()  # the bare key is redacted wherever it shows


@pytest.mark.parametrize("value, problem", [
    ("{key},naming:{bad}", "item 2 of OHLCV_ENCRYPTION_KEY decodes to 31 bytes"),
    ("{key},naming:{naming},naming:{other}", "holds 2 naming keys"),
    ("naming:{naming},{key}", "must be the last item"),
    ("naming:{naming}", "holds a naming key but no Fernet key"),
])
def test_a_wrong_naming_key_item_is_a_config_error_never_showing_it(tmp_path, value, problem):
    keys = {"key": new_key(), "naming": new_key(), "other": new_key(),
            "bad": _b64(b"\x5a" * 31)}

    with pytest.raises(ConfigError) as caught:
        settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=value.format(**keys))

    assert problem in str(caught.value)
    assert not [name for name, key in keys.items() if key in str(caught.value)]


def test_world_readable_dotenv_gives_a_chmod_warning(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OHLCV_LOG_LEVEL=INFO\n")
    env_file.chmod(0o644)

    s = settings_for(tmp_path)

    assert len(s.warnings) == 1
    assert "0644" in s.warnings[0] and "chmod 600" in s.warnings[0]


def test_private_dotenv_gives_no_warning(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OHLCV_LOG_LEVEL=INFO\n")
    env_file.chmod(0o600)

    assert settings_for(tmp_path).warnings == ()


def test_unknown_ohlcv_variable_in_dotenv_is_warned_about_as_a_typo(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OHLCV_DATADIR=data\n")
    env_file.chmod(0o600)

    (warning,) = settings_for(tmp_path).warnings

    assert "OHLCV_DATADIR" in warning and "typo" in warning


# -- bad values --------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


_VALID_KEY = _b64(bytes(range(32)))

# (variable, bad value, the part of it that is secret or None)
BAD_VALUES = [
    ("OHLCV_CONNECT_TIMEOUT", "ten", None),
    ("OHLCV_CONNECT_TIMEOUT", "-1", None),
    ("OHLCV_CONNECT_TIMEOUT", "0", None),
    ("OHLCV_REQUEST_TIMEOUT", "30s", None),
    ("OHLCV_REQUEST_TIMEOUT", "nan", None),
    ("OHLCV_REQUEST_TIMEOUT", "inf", None),
    ("OHLCV_MAX_RETRIES", "-1", None),
    ("OHLCV_MAX_RETRIES", "three", None),
    ("OHLCV_BACKOFF_SECONDS", "-2", None),
    ("OHLCV_BACKOFF_SECONDS", "soon", None),
    ("OHLCV_DATATYPE", "xml", None),
    ("OHLCV_MAX_WORKERS", "0", None),
    ("OHLCV_RATE_LIMIT_PER_SECOND", "-0.5", None),
    ("OHLCV_RATE_LIMIT_PER_MINUTE", "-5", None),
    ("OHLCV_RATE_LIMIT_PER_DAY", "-1", None),
    ("OHLCV_RETENTION_DAYS", "-30", None),
    ("OHLCV_BACKUP_KEEP", "0", None),
    ("OHLCV_MAX_MEMORY_MB", "-1024", None),
    ("OHLCV_MIN_FREE_DISK_MB", "-1", None),
    ("OHLCV_LOCK_TIMEOUT", "-1", None),
    ("OHLCV_LOG_LEVEL", "VERBOSE", None),
    ("OHLCV_LOG_LEVEL", "", None),
    ("OHLCV_DIR_MODE", "0777", None),
    ("OHLCV_DIR_MODE", "0755", None),
    ("OHLCV_DIR_MODE", "0600", None),
    ("OHLCV_DIR_MODE", "abc", None),
    ("OHLCV_DIR_MODE", "1700", None),
    ("OHLCV_FILE_MODE", "0777", None),
    ("OHLCV_FILE_MODE", "0644", None),
    ("OHLCV_FILE_MODE", "0400", None),
    ("OHLCV_FILE_MODE", "abc", None),
    ("OHLCV_DATA_DIR", "", None),
    ("ALPHA_VANTAGE_BASE_URL", "ftp://example.com/query", None),
    ("ALPHA_VANTAGE_BASE_URL", "not a url", None),
    ("ALPHA_VANTAGE_BASE_URL", "https://user:Hunter2Password@example.com/query", "Hunter2Password"),
    ("ALPHA_VANTAGE_BASE_URL", "https://example.com/query?apikey=QUERYKEY9876", "QUERYKEY9876"),
    # A URL that is wrong twice (no usable scheme AND credentials) must not echo them either.
    ("ALPHA_VANTAGE_BASE_URL", "ftp://user:Hunter2Password@example.com/query", "Hunter2Password"),
    ("ALPHA_VANTAGE_BASE_URL", "www.example.com/query?apikey=QUERYKEY9876", "QUERYKEY9876"),
    ("OHLCV_ENCRYPTION_KEY", "c2hvcnRrZXk=", "c2hvcnRrZXk="),
    ("OHLCV_ENCRYPTION_KEY", "Not*Base64*At*All*Not*Base64*At*All*Not*Bas", "Not*Base64*At*All"),
    ("OHLCV_ENCRYPTION_KEY", _b64(b"\x07" * 31), _b64(b"\x07" * 31)),
    ("OHLCV_ENCRYPTION_KEY", _b64(b"\x07" * 33), _b64(b"\x07" * 33)),
    # A good key with a character from outside the base64 alphabet inserted.
    ("OHLCV_ENCRYPTION_KEY", _VALID_KEY[:20] + "*" + _VALID_KEY[20:], _VALID_KEY[:20] + "*"),
    ("OHLCV_ENCRYPTION_KEY", f"{_VALID_KEY},{_b64(b'x' * 31)}", _b64(b"x" * 31)),
    ("ALPHA_VANTAGE_API_KEY", "SECRET API KEY", "SECRET API KEY"),
    ("ALPHA_VANTAGE_API_KEY", "SECRETKEY\t123", "SECRETKEY"),
    ("ALPHA_VANTAGE_API_KEY", f"{API_KEY},", API_KEY),
]


def _bad_value_id(case) -> str:
    name, value, _ = case
    return f"{name}={value[:24]!r}"


@pytest.mark.parametrize("case", BAD_VALUES, ids=[_bad_value_id(c) for c in BAD_VALUES])
def test_a_bad_value_is_a_config_error_naming_the_variable(tmp_path, case):
    name, value, _ = case

    with pytest.raises(ConfigError) as caught:
        settings_for(tmp_path, **{name: value})

    assert name in str(caught.value)


SECRET_CASES = [c for c in BAD_VALUES if c[2] is not None]


@pytest.mark.parametrize("case", SECRET_CASES, ids=[_bad_value_id(c) for c in SECRET_CASES])
def test_a_config_error_never_contains_the_secret_value(tmp_path, case):
    name, value, secret = case

    with pytest.raises(ConfigError) as caught:
        settings_for(tmp_path, **{name: value})

    shown = f"{caught.value} {caught.value!r} {caught.value.args!r}"
    assert secret not in shown
    if name == "OHLCV_ENCRYPTION_KEY":
        assert value not in shown and _VALID_KEY not in shown


def test_a_bad_value_in_dotenv_is_reported_like_one_in_the_environment(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OHLCV_MAX_WORKERS=lots\n")
    env_file.chmod(0o600)

    with pytest.raises(ConfigError, match="OHLCV_MAX_WORKERS"):
        settings_for(tmp_path)


# -- Secret --------------------------------------------------------------------------------

def test_secret_never_shows_its_value():
    value = "VerySecretValue42"
    secret = Secret(value)

    renderings = [repr(secret), str(secret), f"{secret}", f"{secret!r}",
                  "%s" % secret,  # noqa: UP031 (%-formatting is one of the renderings)
                  format(secret, ""), repr((secret,)), repr({"k": secret})]

    assert all(value not in text for text in renderings)
    assert secret.reveal() == value


def test_settings_repr_shows_no_secret(tmp_path):
    key = new_key()

    s = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=key, ALPHA_VANTAGE_API_KEY=API_KEY)

    assert key not in repr(s) and API_KEY not in repr(s)
    assert key not in str(s) and API_KEY not in str(s)


# -- through the command line -------------------------------------------------------------

def test_cli_malformed_encryption_key_exits_3_without_echoing_it(tmp_path):
    malformed = _b64(b"\x5a" * 31)  # 31 bytes: one short of a Fernet key

    result = run_cli(["--check-keys"], tmp_path,
                     headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=malformed))

    assert result.returncode == 3
    assert "OHLCV_ENCRYPTION_KEY" in result.stderr
    assert malformed not in result.stdout + result.stderr
    log = tmp_path / "secure_downloader.log"
    assert not log.exists() or malformed not in log.read_text()


def test_cli_never_echoes_credentials_of_a_bad_base_url(tmp_path):
    url = "ftp://operator:Hunter2Password@example.com/query"

    result = run_cli(["--check-keys"], tmp_path, headless_env(tmp_path, ALPHA_VANTAGE_BASE_URL=url))

    assert result.returncode == 3
    assert "ALPHA_VANTAGE_BASE_URL" in result.stderr
    assert "Hunter2Password" not in result.stdout + result.stderr


# -- documentation -----------------------------------------------------------------------

VARIABLE_NAMES = [v.name for v in config.VARIABLES]


def test_every_variable_has_a_line_in_env_example():
    path = REPO / ".env.example"
    assert path.is_file(), ".env.example is missing: it must list every variable of config.VARIABLES"
    text = path.read_text()

    missing = [n for n in VARIABLE_NAMES
               if not re.search(rf"^[ \t]*#?[ \t]*{n}=", text, re.MULTILINE)]

    assert missing == []


def test_every_variable_is_named_in_the_readme():
    path = REPO / "README.md"
    assert path.is_file(), "README.md is missing: its variable table must name every variable"
    text = path.read_text()

    missing = [n for n in VARIABLE_NAMES if not re.search(rf"\b{n}\b", text)]

    assert missing == []
