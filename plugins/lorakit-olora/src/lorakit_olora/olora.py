"""``OLoRA``: orthonormal initialization from a QR decomposition of the weight.

Büyükakyüz, *OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models*
(2024), §3 "Method":

    W̄ = Q R                 (reduced QR, Q: out × k orthonormal columns, k = min(out, in))
    B0 = Q[:, :r]           (orthonormal columns)
    A0 = R[:r, :] / s       (s = the normalizer's initial scale, see below)
    d0 = 1

The paper (and PEFT's ``init_lora_weights="olora"``) then subtracts the initial
update from the frozen weight, ``W_res = W̄ − s·B0·A0``, so the adapted model starts
exactly at the pretrained one. lorakit core does this for every initializer whose
``B0 A0 ≠ 0`` (residualization), so this file only computes the factors.

Scale compensation: the normalizer multiplies the update by ``s`` (``alpha/r`` for
LoRA). Dividing ``A0`` by ``s`` makes ``s·B0·A0 = Q_r R_r`` — the first ``r`` QR
components of ``W̄`` whatever ``alpha`` is — while ``B0`` keeps exactly orthonormal
columns, the property OLoRA is named after. ``compensate=False`` reproduces PEFT's
factors (``A0 = R_r``, residual ``s·Q_r R_r``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.core import AdapterError, Initializer


@dataclass
class OLoRA(Initializer):
    compensate: bool = True

    name = "olora"

    def factors(self, weight, rank, scale, rng):
        # Householder QR in the adapter's dtype (fp32 or fp64); deterministic, so
        # the rng is not needed.
        Q, R = torch.linalg.qr(weight, mode="reduced")
        B0 = Q[:, :rank].contiguous()
        A0 = R[:rank, :].contiguous()
        if self.compensate:
            if scale == 0:
                raise AdapterError("olora: the normalizer's initial scale is 0, so the update "
                                   "cannot be compensated; use compensate=False or a non-zero alpha")
            A0 = A0 / scale
        return B0, weight.new_ones(rank), A0
