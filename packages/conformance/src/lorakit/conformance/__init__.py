"""lorakit's conformance kit, for the tests of lorakit and of every plugin (``pip install
lorakit-conformance``): the properties of docs/design.md, "The primitive contract", checked
for any combination of registered primitives over hypothesis-drawn cases. See :mod:`.kit`."""

from .kit import (
    AUTOCAST_DTYPES,
    AUTOCAST_RTOL,
    EXPERT_LAYERS,
    GRAD_RTOL,
    PRECISION_RTOL,
    QUANTIZED_CASE,
    TOLERANCE,
    Case,
    Combo,
    assert_close,
    build_model,
    cases,
    check_autocast,
    check_combination,
    check_precision,
    check_quantized_base,
    check_slot_contract,
    combinations,
    perturb,
    train_aggressively,
)

__all__ = [
    "AUTOCAST_DTYPES",
    "AUTOCAST_RTOL",
    "Case",
    "Combo",
    "EXPERT_LAYERS",
    "GRAD_RTOL",
    "PRECISION_RTOL",
    "QUANTIZED_CASE",
    "TOLERANCE",
    "assert_close",
    "build_model",
    "cases",
    "check_autocast",
    "check_combination",
    "check_precision",
    "check_quantized_base",
    "check_slot_contract",
    "combinations",
    "perturb",
    "train_aggressively",
]
