"""The conformance kit (docs/design.md, "The primitive contract") over every registered
combination of primitives.

CI draws a few shapes/dtypes per combination; ``LORAKIT_SLOW=1`` (nox -s slow) runs
the same properties with many more examples.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings

from lorakit.conformance import cases, check_combination, combinations

EXAMPLES = 40 if os.environ.get("LORAKIT_SLOW") == "1" else 5
DEVICE = os.environ.get("LORAKIT_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh runs the kit on cuda


@pytest.mark.parametrize("combo", combinations(), ids=str)
@given(case=cases())
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance(combo, case):
    check_combination(combo, case, DEVICE)
