"""The conformance kit (docs/design.md, "The primitive contract") over every registered
combination of primitives.

CI draws a few shapes/dtypes per combination; ``LORAKIT_SLOW=1`` (nox -s slow) runs
the same properties with many more examples.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings

from lorakit.conformance import EXPERT_LAYERS, Combo, cases, check_combination, combinations
from lorakit.core.plugins import registry

EXAMPLES = 40 if os.environ.get("LORAKIT_SLOW") == "1" else 5
DEVICE = os.environ.get("LORAKIT_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh runs the kit on cuda


@pytest.mark.parametrize("combo", combinations(), ids=str)
@given(case=cases())
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance(combo, case):
    check_combination(combo, case, DEVICE)


SLOW = os.environ.get("LORAKIT_SLOW") == "1"
COMBOS = combinations()
RECIPE_COMBOS = {str(Combo(**r.composition())) for r in registry.load().recipes.values()}
# CI: every recipe and every 10th other combination; LORAKIT_SLOW=1: the whole matrix, more shapes
EXPERT_COMBOS = COMBOS if SLOW else [c for i, c in enumerate(COMBOS) if str(c) in RECIPE_COMBOS or i % 10 == 0]


@pytest.mark.parametrize("combo", EXPERT_COMBOS, ids=str)
@given(case=cases(max_dim=8, layers=EXPERT_LAYERS))
@settings(max_examples=20 if SLOW else 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance_fused_experts(combo, case):
    """The same properties on fused expert tensors (lorakit.conformance.experts: E per-expert adapters of
    an (E, out, in) and a transposed (E, in, out) tensor, each expert's term on its routed tokens)."""
    check_combination(combo, case, DEVICE)
