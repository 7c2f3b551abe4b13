import os

import pytest

# --- Private Secret Service (real D-Bus + gnome-keyring) ---------------------
# `secret_service` starts one private, unlocked gnome-keyring on its own D-Bus
# session bus for the whole test session; apply `secret_service.env` (e.g. with
# monkeypatch.setenv) to reach it. See tests/secret_service.py.
from tests.secret_service import PrivateSecretService, secret_service_available


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory):
    ok, reason = secret_service_available()
    if not ok:
        message = f"real Secret Service unavailable: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with PrivateSecretService(tmp_path_factory.mktemp("secret-service")) as service:
        yield service


# --- end of Secret Service fixtures -------------------------------------------


def pytest_addoption(parser):
    # The reliability campaign's switch (tests/campaign); OHLCV_CAMPAIGN=long does the same.
    parser.addoption("--campaign", choices=("quick", "long"), default=None,
                     help="reliability campaign mode (same as OHLCV_CAMPAIGN=long)")
