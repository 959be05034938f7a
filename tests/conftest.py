"""Shared test setup. Tests marked ``slow`` run only with LORAKIT_SLOW=1 (nox -s slow)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite is thousands of tiny tensor ops: one thread avoids the thread-pool
# overhead that dominates them (10x slower with 2 threads on a busy 2-core box).
torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LORAKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with LORAKIT_SLOW=1 (nox -s slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
