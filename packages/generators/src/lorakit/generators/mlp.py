"""``MLP``: OP-LoRA's over-parameterized generator (Teterwak et al., *OP-LoRA: The Blessing
of Dimensionality*, arXiv:2412.10362, §4, supp. §2.1).

One small MLP and one learned embedding ``z ∈ R^embed_dim`` per adapted layer
generate the trainable factor slots (``A``, ``B``; DoRA's magnitude ``m`` too, which
makes OP-DoRA, OP-LoRA §5)::

    h    = ReLU(W1 z + b1)                      W1: width × embed_dim
    flat = W2 h + b2_eff                        W2: P × width,  P = Σ numel(slot)
    (A, B, m) = split(flat)

Paper init (supp. §2.1): ``W1, W2`` Kaiming-uniform, the rows of ``W2`` producing
``B`` (and ``m``) zero, biases zero. So that any initializer composes (docs/design.md,
"The slot model"), the effective output bias is ``b2_eff = b2 + (F0 − W2 h(z0))`` with the
learned ``b2`` zero-initialized as in the paper and ``F0`` the initializer's values:
at step 0 the output is ``F0``. The constant is kept as two frozen buffers and
applied as ``((W2 h − W2 h(z0)) + b2) + F0`` — the first difference is exactly 0 at
step 0 in floating point, so the output equals ``F0`` bit for bit (on the device the
layer was built on). Gradients of the MLP are those of the paper's MLP (a constant
bias offset changes none of them).

**Where it starts** (``start``). ``"init"`` (default) is the rule above. ``"mlp"`` is
the authors' code: the factors start from the MLP's own output, ``A0 = W2_A h(z0)``
(no offset), with the ``B`` head zero (``B0 = 0``); other generated slots (a
magnitude) keep the initializer's value as offset, since DoRA's ``m`` must start at
``‖W̄_i‖``. This breaks the generator rule "outputs = the initializer's values at step
0" on purpose, but not identity at init of the *layer*: ``B0 = 0`` makes the initial
update ``B0'A0'`` zero under every built-in normalizer, and core residualizes any
non-zero initial update anyway (``ΔW(θ) − ΔW(θ0)``, docs/design.md
"Residualization"). The initializer's ``A0`` (and ``B0``: PiSSA's, LDU's) is ignored.

**A stable OP-LoRA** (``gain``). With ``K = J Jᵀ`` the Gram matrix of the MLP's
Jacobian (outputs × its parameters), SGD on the MLP moves the generated factors by
``−lr·K·∇``, where free factors move by ``−lr·∇``: ``K``'s eigenvalues are the
per-direction step multipliers. At init, in closed form (ReLU mask ``D``,
``C = (1 + ‖z‖²) I + W1 W1ᵀ`` from ``b1``, ``W1`` and ``z``)::

    K = (1 + α²‖h‖²) I + α² W2 D C D W2ᵀ          (b2, W2; then b1, W1, z)

with ``α`` a constant scale on the head, ``flat = α W2 h + b2``. The paper's MLP
(``α = 1``) has ``λ_max(K) ≈ 16`` in the ~width directions ``W2`` spans, so plain SGD
diverges from a ~16× smaller learning rate than free factors (docs/papers/op-lora-mf.md).
``gain=g`` sets ``α² = (g − 1) / (‖h(z0)‖² + λ_max(C^½ D W2ᵀ W2 D C^½))`` so that
``λ_max(K) = g`` at init: the over-parameterization still accelerates in the MLP's
directions (by up to ``g``), but the stability limit drops by at most ``g``, not ~16.
``None`` (default) keeps the paper's unscaled head. The scale is a frozen buffer
(``head_scale``), so save/load restores it exactly.

Trainable parameters: ``embed_dim + width·(embed_dim + 1) + (width + 1)·P``,
about ``width × (numel A + numel B)`` (OP-LoRA §4). Slots the MLP does not
generate (frozen ones, a normalizer's ``lambda_``/``sigma``) stay plain tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import AdapterError, Generator, ParameterSlots, Role, SlotsModule
from lorakit.core.lora import kaiming_uniform

#: roles of the slots the MLP generates when they are trainable (scalars such as λ stay plain)
GENERATED_ROLES = (Role.A, Role.B, Role.D, Role.MAGNITUDE)
#: bound on width and embed_dim (the paper uses 32 and 128); 2**31 would allocate terabytes
MAX_WIDTH = 2**16
#: bound on one layer's W2 (generated slot values x width): 8 GiB in fp32
MAX_W2_ELEMENTS = 2**31
#: roles whose W2 rows start at zero (B: LoRA's "no change at init"; a magnitude: OP-DoRA's Δm)
ZERO_ROW_ROLES = (Role.B, Role.MAGNITUDE)
#: where the generated factors start: the initializer's values, or the MLP's own output
STARTS = ("init", "mlp")
#: roles that start from the MLP's own output under start="mlp" (B's head is zero, so B0 = 0)
OWN_START_ROLES = (Role.A, Role.B)


def jacobian_gram_max(W1: Tensor, b1: Tensor, W2: Tensor, z: Tensor) -> tuple[float, float]:
    """``(‖h‖², λ_max(C^½ D W2ᵀ W2 D C^½))`` at the current parameters: the two parts of
    ``λ_max(J Jᵀ) = 1 + α²(‖h‖² + μ)`` (module docstring), from a width × width
    eigenproblem instead of the P × P Gram matrix."""
    W1, b1, W2, z = (t.detach() for t in (W1, b1, W2, z))
    pre = F.linear(z, W1, b1)
    h = torch.relu(pre)
    mask = (pre > 0).to(W2.dtype)
    C = (1 + z.square().sum()) * torch.eye(W1.shape[0], dtype=W1.dtype, device=W1.device) + W1 @ W1.T
    evals, evecs = torch.linalg.eigh(C.double())
    C_half = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    G = W2.double() * mask.double()  # W2 D
    inner = C_half @ (G.T @ G) @ C_half
    return float(h.double().square().sum()), float(torch.linalg.eigvalsh(inner)[-1])


@dataclass
class MLP(Generator):
    """OP-LoRA generator: ``width`` hidden units, embedding ``z ∈ R^embed_dim``.

    ``z_std`` is the std of the initial embedding, ``z0 ~ N(0, z_std²)``. The default
    0.01 is the authors' and the value that reproduces the matrix-factorization study
    (OP-LoRA §4.1; docs/papers/op-lora-mf.md): with ``z_std=1`` the pre-activations
    are large, the MLP's effective step in the ~width directions it spans is huge and
    OP-MF stalls at 1.09–1.25× the SVD error at every SGD learning rate where it
    converges.
    """

    width: int = 32
    embed_dim: int = 128
    z_std: float = 0.01
    start: str = "init"  # "mlp": the authors' code, A0 = W2·h(z0) and B0 = 0
    gain: float | None = None  # λ_max(J Jᵀ) at init; None: the paper's unscaled head (≈ 16)

    name = "mlp"

    def __post_init__(self):
        for field in ("width", "embed_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WIDTH:
                raise AdapterError(
                    f"MLP({field}={value!r}): {field} must be an integer in [1, {MAX_WIDTH}] "
                    "(OP-LoRA uses width=32, embed_dim=128)"
                )
        z = self.z_std
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z < 0:
            raise AdapterError(f"MLP(z_std={self.z_std!r}): z_std must be a finite number >= 0")
        if self.start not in STARTS:
            raise AdapterError(f"MLP(start={self.start!r}): use one of {STARTS}")
        g = self.gain
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                              or g <= 1):
            raise AdapterError(f"MLP(gain={self.gain!r}): gain must be a finite number > 1 (the b2 path alone "
                               "gives 1), or null for the paper's unscaled head")

    def build(self, slots, rng):
        # W2 is (numel of the generated slots) x width: refuse before allocating, not with an OOM
        generated = sum(s.value.numel() for s in slots.values() if s.role in GENERATED_ROLES and s.trainable)
        if generated * self.width > MAX_W2_ELEMENTS:
            raise AdapterError(
                f"MLP(width={self.width}): the layer's generator would hold {generated * self.width:.3g} "
                f"weights (over {MAX_W2_ELEMENTS:.3g}); lower the width or the rank")
        return MLPSlots(slots, self.width, self.embed_dim, float(self.z_std), rng, self.start,
                        None if self.gain is None else float(self.gain))

    def build_for_load(self, slots, rng):
        """The same module with zero weights and no draws (no Kaiming init of ``W2``, the
        ~``width ×`` slot-sized matrix, no eigenproblem for ``gain``): a checkpoint load
        overwrites every tensor of it (all are parameters or persistent buffers)."""
        return MLPSlots(slots, self.width, self.embed_dim, float(self.z_std), rng, self.start,
                        None if self.gain is None else float(self.gain), placeholder=True)


class MLPSlots(SlotsModule):
    """The per-layer MLP. ``forward()`` evaluates it once and returns every slot."""

    def __init__(self, slots, width: int, embed_dim: int, z_std: float, rng: torch.Generator,
                 start: str = "init", gain: float | None = None, placeholder: bool = False):
        """``placeholder``: zeros for ``z``, ``W1``, ``W2`` and a unit head scale, nothing drawn
        (:meth:`MLP.build_for_load`); the output is then the slots' values, as at init."""
        super().__init__(slots)
        gen = [n for n, s in slots.items() if s.role in GENERATED_ROLES and s.trainable]
        self.generated = tuple(gen)
        self.shapes = tuple(tuple(slots[n].value.shape) for n in gen)
        self.sizes = tuple(slots[n].value.numel() for n in gen)
        self.rest = ParameterSlots({n: s for n, s in slots.items() if n not in gen})

        F0 = torch.cat([slots[n].value.detach().reshape(-1) for n in gen])
        dtype, P = F0.dtype, F0.numel()
        if placeholder:
            z, W1, W2 = (torch.zeros(shape, dtype=dtype, device=F0.device)
                         for shape in ((embed_dim,), (width, embed_dim), (P, width)))
        else:
            z = torch.randn(embed_dim, generator=rng, dtype=torch.float64).mul_(z_std).to(dtype)
            W1 = kaiming_uniform((width, embed_dim), math.sqrt(5), rng, dtype)  # nn.Linear's
            W2 = kaiming_uniform((P, width), math.sqrt(5), rng, dtype)
        self.z = nn.Parameter(z)
        self.W1 = nn.Parameter(W1)
        self.b1 = nn.Parameter(torch.zeros(width, dtype=dtype))
        offset = 0
        for n, size in zip(gen, self.sizes):
            if slots[n].role in ZERO_ROW_ROLES:
                W2[offset:offset + size] = 0
            offset += size
        self.W2 = nn.Parameter(W2)
        self.b2 = nn.Parameter(torch.zeros(P, dtype=dtype))
        alpha = None  # the paper's head: no buffer, so its checkpoints are unchanged
        if gain is not None and placeholder:
            alpha = torch.ones((), dtype=dtype, device=F0.device)
        elif gain is not None:  # α: λ_max(J Jᵀ) = gain at init (module docstring)
            h_sq, mu = jacobian_gram_max(self.W1, self.b1, W2, self.z)
            alpha = torch.tensor(math.sqrt((gain - 1) / (h_sq + mu)) if h_sq + mu > 0 else 1.0, dtype=dtype)
        self.register_buffer("head_scale", alpha)
        own = torch.zeros(P, dtype=torch.bool)  # start="mlp": these outputs get no offset
        offset = 0
        for n, size in zip(gen, self.sizes):
            own[offset:offset + size] = start == "mlp" and slots[n].role in OWN_START_ROLES
            offset += size
        self.register_buffer("init_values", torch.where(own, torch.zeros_like(F0), F0))  # F0 (0 where own)
        with torch.no_grad():
            # W2 h(z0), same op as forward; 0 where the MLP's own output is the start
            self.register_buffer("init_output", torch.where(own, torch.zeros_like(F0), self._head()))

    def _head(self) -> Tensor:
        out = F.linear(torch.relu(F.linear(self.z, self.W1, self.b1)), self.W2)
        return out if self.head_scale is None else out * self.head_scale

    def forward(self) -> dict[str, Tensor]:
        flat = ((self._head() - self.init_output) + self.b2) + self.init_values
        out = self.rest()
        for name, part, shape in zip(self.generated, flat.split(self.sizes), self.shapes):
            out[name] = part.view(shape)
        return out

    def extra_repr(self) -> str:
        return f"generates={','.join(self.generated)}, width={self.W1.shape[0]}, embed_dim={self.z.numel()}"
