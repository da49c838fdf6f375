"""pytest settings for wmtp: the `slow` mark, and a clean environment for every test."""
import os
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (a real mlflow server, long runs); run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("WMTP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
