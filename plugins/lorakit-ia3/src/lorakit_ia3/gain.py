"""``IA3Gain``: (IA)³'s learned output scaling as a magnitude head (Liu et al., 2022,
arXiv:2205.05638, §3.3, the vectors l rescaling a layer's outputs).

    W_eff = diag(gain) · (W̄ + B A),     gain ∈ R^out,  gain0 = 1

The slot is named ``gain`` and declares :attr:`Role.MAGNITUDE` (core finds it by
role); it has no ``exported_as`` layout because PEFT's ``lora_magnitude_vector`` means
DoRA's ``m/‖V‖``, not a plain gain: exports fold it (``fold_magnitude=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.core import Magnitude, Role, Slot


@dataclass
class IA3Gain(Magnitude):
    name = "ia3"
    uses_row_norms = False  # a gain needs nothing from W̄

    def slots(self, weight, row_sq_norm):
        return {"gain": Slot(weight.new_ones(weight.shape[0]), trainable=True, role=Role.MAGNITUDE)}

    def row_scale(self, s, weight, row_sq_norm, B, A):
        return s["gain"]
