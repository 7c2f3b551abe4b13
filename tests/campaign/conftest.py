"""Campaign-only options and fixtures.

Switch: ``OHLCV_CAMPAIGN=long`` (always works) or ``--campaign long`` (works
when pytest loads this conftest at startup, i.e. when ``tests/campaign`` or a
file in it is named on the command line). Default mode: ``quick``.

Fixtures:
  campaign_mode    -> "quick" | "long"
  campaign_budget  -> callable ``campaign_budget(quick_n, long_n)``
  figures          -> object with ``.record(area, tried=N, held=N, notes="")``;
                      appends JSON lines to $OHLCV_CAMPAIGN_FIGURES when set.
The same helpers are plain functions in ``tests.campaign.figures``.
"""

from __future__ import annotations

import pytest

from tests.campaign import figures as _figures
from tests.download_fixtures import start_emulator


def pytest_addoption(parser):
    try:
        parser.addoption(
            "--campaign",
            action="store",
            default=None,
            choices=_figures.MODES,
            help="reliability campaign mode: quick (default) or long; "
            "same as OHLCV_CAMPAIGN=long",
        )
    except ValueError:
        # Already registered (e.g. by tests/conftest.py).
        pass


def _option_value(config):
    try:
        return config.getoption("campaign", default=None)
    except (ValueError, AttributeError):
        return None


def pytest_configure(config):
    _figures.set_option_mode(_option_value(config))


def pytest_report_header(config):
    return f"ohlcv campaign mode: {_figures.campaign_mode()}"


@pytest.fixture(scope="session")
def campaign_mode(pytestconfig) -> str:
    value = _option_value(pytestconfig)
    if value is not None:
        _figures.set_option_mode(value)
    return _figures.campaign_mode()


@pytest.fixture(scope="session")
def campaign_budget(campaign_mode):
    return _figures.campaign_budget


@pytest.fixture
def figures(request, campaign_mode):
    return _figures.Figures(test=request.node.nodeid)


@pytest.fixture(scope="module")
def emulator():
    """One emulator per campaign module (its tests share it; each uses its own symbols)."""
    av = start_emulator()
    try:
        yield av
    finally:
        av.stop()
