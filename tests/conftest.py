"""Shared test setup. Tests marked ``slow`` run only with LORAKIT_SLOW=1 (nox -s slow)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LORAKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with LORAKIT_SLOW=1 (nox -s slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
