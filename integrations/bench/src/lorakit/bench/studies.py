"""Measurements behind design decisions in docs/benchmarks.md (not shipped paths).

    python -m lorakit.bench.studies fused-linear
    python -m lorakit.bench.studies mlp-batching
    python -m lorakit.bench.studies dora-saved-output
    python -m lorakit.bench.studies lowrank-layouts
    python -m lorakit.bench.studies lora-overhead
    python -m lorakit.bench.studies dora-memory      (lorakit.bench.dora_memory)

``lowrank-layouts``: the rank-R products of one adapted layer's backward at the
default model's shapes (1,024 tokens, R = 8), CPU time: autograd's forms
(``gy B``, ``gyᵀ h``, ``(gy B)ᵀ x``) against the shipped ones (``Bᵀ gyᵀ``, ``hᵀ gy``,
an R × tokens result), next to the frozen base's own input-gradient GEMM.

``lora-overhead``: where a lorakit LoRA step's time above the no-adapter floor goes,
on the default bench model (CPU time, medians of alternating runs): the floor, LoRA's
forward + backward, AdamW's step, and ``factors()`` of all 28 layers.

``fused-linear``: one 688 × 256 projection at 1,024 tokens, forward + backward, CPU
time: PEFT's LoRA arithmetic (``base(x) + B(A x)·s``), the unfused lorakit form
(``base(x) + B'(A x)`` with the scale folded into ``B'``) and the shipped one
(``B'(A x)`` accumulated into the base GEMM's output with ``addmm_``).

``mlp-batching``: OP-LoRA's per-layer MLPs evaluated one by one (as lorakit does)
against the same MLPs batched with ``torch.bmm`` over the layers of equal shape, on
the default bench model's 28 projections: forward + backward CPU time.

``dora-saved-output``: DoRA's magnitude gradient needs the pre-scale output
``y = W̄x + B'A'x`` of every adapted layer (``dL/dm_i ∝ Σ_t go_ti·y_ti``), one
tokens × out tensor per layer that LoRA does not keep. The shipped form
(``AdaptedLayer.dora_saves = "output"``) keeps the output ``z = g ⊙ y + b``
instead, which the next op often keeps anyway, and rebuilds ``y = (z − b) / g`` in
backward (rows with ``g_i = 0`` recomputed exactly). This measures the peak memory
of both forms on the default model, next to PEFT's LoRA.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

# (out, in) of q, k, v, o, gate, up, down in the default bench model
SHAPES = [(256, 256)] * 4 + [(688, 256)] * 2 + [(256, 688)]


def fused_linear(tokens: int = 1024, out: int = 688, inp: int = 256, rank: int = 8, repeats: int = 30) -> dict:
    from lorakit.core.functional import linear_lowrank

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, inp, generator=g, requires_grad=True)
    W = torch.randn(out, inp, generator=g) / inp**0.5
    A = torch.randn(rank, inp, generator=g, requires_grad=True)
    B = torch.randn(out, rank, generator=g, requires_grad=True)
    d = torch.ones(rank)
    grad = torch.randn(tokens, out, generator=g)
    forms = {
        "PEFT form": lambda: F.linear(x, W) + F.linear(F.linear(x, A), B) * 1.0,
        "unfused, scale in B'": lambda: F.linear(x, W) + F.linear(F.linear(x, A), B * (1.0 * d)),
        "fused (shipped)": lambda: linear_lowrank(x, W, None, B * (1.0 * d), A),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):  # alternating
        for name, form in forms.items():
            start = time.process_time()
            for _ in range(5):
                form().backward(grad)
            times[name].append((time.process_time() - start) / 5 * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def mlp_batching(layers: int = 4, rank: int = 8, width: int = 32, embed: int = 128, repeats: int = 15) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sizes = [rank * (o + i) for o, i in SHAPES] * layers

    def mlp(P: int, *batch: int) -> dict:
        t = {"z": torch.randn(*batch, embed, generator=g), "W1": torch.randn(*batch, width, embed, generator=g) / 12,
             "b1": torch.zeros(*batch, width), "W2": torch.randn(*batch, P, width, generator=g) / 6,
             "b2": torch.zeros(*batch, P)}
        for v in t.values():
            v.requires_grad_(True)
        t["F0"] = torch.randn(*batch, P, generator=g)
        return t

    single = [mlp(P) for P in sizes]
    groups = {P: sizes.count(P) for P in dict.fromkeys(sizes)}
    batched = [mlp(P, G) for P, G in groups.items()]

    def per_layer():
        total = 0
        for t in single:
            h = torch.relu(F.linear(t["z"], t["W1"], t["b1"]))
            total = total + (F.linear(h, t["W2"]) + t["b2"] + t["F0"]).sum()
        total.backward()

    def with_bmm():
        total = 0
        for t in batched:
            h = torch.relu(torch.bmm(t["W1"], t["z"][..., None])[..., 0] + t["b1"])
            total = total + (torch.bmm(t["W2"], h[..., None])[..., 0] + t["b2"] + t["F0"]).sum()
        total.backward()

    times: dict[str, list[float]] = {"per-layer": [], "batched (bmm)": []}
    for _ in range(repeats):  # alternating
        for name, fn in (("per-layer", per_layer), ("batched (bmm)", with_bmm)):
            start = time.process_time()
            fn()
            times[name].append((time.process_time() - start) * 1e3)
    return {"mlps": len(sizes), "groups": len(groups),
            **{name: statistics.median(v) for name, v in times.items()}}


def dora_saved_output() -> dict:
    from lorakit.core import adapted_layers

    from .measure import step_peak_bytes
    from .methods import Method, adapt, build_base, resident_bytes

    torch.set_num_threads(1)
    base = build_base(256, 4, 688, 1000, 128, seed=0, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(1))

    def peak(method: Method, dora_saves: str = "output") -> float:
        model = adapt(method, base, rank=8, seed=0)
        for layer in adapted_layers(model).values():
            layer.dora_saves = dora_saves
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        step()
        return (step_peak_bytes(step, "cpu") + resident_bytes(model, opt)) / 2**20

    out = {"PEFT LoRA": peak(Method("peft", "lora")), "lorakit dora (output kept)": peak(Method("lorakit", "dora"))}
    out["lorakit dora, y kept"] = peak(Method("lorakit", "dora"), dora_saves="pre-scale")
    return out


def _medians(fns: dict, repeats: int, inner: int = 1) -> dict:
    """Median CPU milliseconds of each function, run in alternation."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(inner):
                fn()
            times[name].append((time.process_time() - start) / inner * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _layout_times(x, W, A, B, gy, gx, repeats: int) -> dict:
    h = x @ A.T

    def autograd_forms():
        gyB = gy @ B
        return gx.clone().addmm_(gyB, A), gy.T @ h, gyB.T @ x

    def shipped_forms():
        gyB_t = B.T @ gy.T
        return gx.clone().addmm_(gyB_t.T.contiguous(), A), (h.T @ gy).T, gyB_t @ x

    return _medians({"base gy W": lambda: gy @ W, "autograd": autograd_forms, "shipped": shipped_forms},
                    repeats, inner=3)


def lowrank_layouts(tokens: int = 1024, rank: int = 8, repeats: int = 20) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = {}
    for o, i in dict.fromkeys(SHAPES):
        tensors = [torch.randn(*shape, generator=g) for shape in
                   ((tokens, i), (o, i), (rank, i), (o, rank), (tokens, o), (tokens, i))]
        for name, ms in _layout_times(*tensors, repeats).items():
            out[f"{o}x{i} {name}"] = ms
    return out


def lora_overhead(repeats: int = 8) -> dict:
    from lorakit.core import adapted_layers

    from .methods import FLOOR, Method, adapt, build_base

    torch.set_num_threads(1)
    base = build_base(256, 4, 688, 1000, 128, seed=0, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(1))
    floor, lora = adapt(FLOOR, base, rank=8, seed=0), adapt(Method("lorakit", "lora"), base, rank=8, seed=0)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    layers = list(adapted_layers(lora).values())

    def floor_step():
        embeds = floor.get_input_embeddings()(ids).detach().requires_grad_()
        floor(inputs_embeds=embeds, labels=ids).loss.backward()

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        lora(input_ids=ids, labels=ids).loss.backward()

    def step():
        forward_backward()
        opt.step()

    fns = {"floor (forward + backward)": floor_step, "lora forward + backward": forward_backward,
           "lora step": step, "AdamW step": opt.step, "factors() x 28": lambda: [la.factors() for la in layers]}
    for fn in fns.values():
        fn()
    return _medians(fns, repeats)


if __name__ == "__main__":
    from .dora_memory import dora_memory, table

    studies = {"fused-linear": fused_linear, "mlp-batching": mlp_batching, "dora-saved-output": dora_saved_output,
               "lowrank-layouts": lowrank_layouts, "lora-overhead": lora_overhead, "dora-memory": dora_memory,
               "dora-memory-nf4": lambda: dora_memory(quantize="nf4")}
    if len(sys.argv) != 2 or sys.argv[1] not in studies:
        sys.exit(f"usage: python -m lorakit.bench.studies {{{','.join(studies)}}}")
    if sys.argv[1].startswith("dora-memory"):  # a table: per form and per projection
        sys.exit(print(table(studies[sys.argv[1]]())))
    for key, value in studies[sys.argv[1]]().items():
        print(f"{key:28s} {value:.1f}" if isinstance(value, float) else f"{key:28s} {value}")
