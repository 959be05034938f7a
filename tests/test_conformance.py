"""DESIGN §7 properties over every registered combination of primitives."""

import pytest
from hypothesis import HealthCheck, given, settings

from lorakit.core.conformance import cases, check_combination, combinations


@pytest.mark.parametrize("combo", combinations(), ids=str)
@given(case=cases())
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance(combo, case):
    check_combination(combo, case)
