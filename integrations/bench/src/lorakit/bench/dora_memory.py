"""What DoRA keeps for backward, per tensor, and what each ``dora_saves`` form costs.

    python -m lorakit.bench.studies dora-memory          # dora-memory-nf4: on a bitsandbytes nf4 base

On the default bench model (hidden 256, 4 layers, 8 × 128 tokens, r = 8, CPU, one
thread), for PEFT LoRA, lorakit LoRA and lorakit DoRA with every layer's
``dora_saves`` (``"output"``, the default; ``"pre-scale"``; ``"recompute"``; and
``"recompute"`` only on the projections whose output no following op keeps —
``q, k, v, o, down``; SDPA copies ``v`` — with ``"output"`` on the rest, and the
same without ``v``):

- **saved per projection**: every tensor autograd keeps (``saved_tensors_hooks``),
  attributed to the projection whose forward saved it (module hooks), counted once per
  storage; *own* = kept by that projection's node only, *shared* = also kept by
  another op (SiLU's input, attention's values, the next layer's input);
- **peak**: the bench's step peak (``measure.step_peak_bytes`` + resident bytes);
- **CPU ms per step**: medians of alternating rounds (``studies._medians``).
"""

from __future__ import annotations

import torch
from torch import nn

from .methods import TARGETS, Method, adapt, build_base, resident_bytes

#: projections whose output no following op keeps (SDPA copies v), without and with v
NOT_KEPT = (("q_proj", "k_proj", "o_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
FORMS = {  # label -> (method, dora_saves per projection or None)
    "PEFT LoRA": (Method("peft", "lora"), None),
    "lorakit lora": (Method("lorakit", "lora"), None),
    "lorakit dora output": (Method("lorakit", "dora"), dict.fromkeys(TARGETS, "output")),
    "lorakit dora pre-scale": (Method("lorakit", "dora"), dict.fromkeys(TARGETS, "pre-scale")),
    "lorakit dora recompute": (Method("lorakit", "dora"), dict.fromkeys(TARGETS, "recompute")),
    **{f"lorakit dora recompute {','.join(p.removesuffix('_proj') for p in chosen)}": (Method("lorakit", "dora"), {
        **dict.fromkeys(TARGETS, "output"), **dict.fromkeys(chosen, "recompute")}) for chosen in NOT_KEPT},
}


def _projections(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost module named after each target (PEFT's LoRA wrapper, lorakit's AdaptedLayer)."""
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}


def saved_by_projection(model: nn.Module, step) -> dict[str, dict[str, float]]:
    """MiB kept for backward per target name (summed over layers): ``own`` and ``shared``,
    plus ``other`` (tensors no projection saved) under the key ``"(rest)"``."""
    owner: list[str | None] = [None]
    saved: dict[int, tuple[int, set]] = {}  # storage -> (bytes, who saved it)

    def pack(t):
        s = t.untyped_storage()
        saved.setdefault(s.data_ptr(), (s.nbytes(), set()))[1].add(owner[0] or "(rest)")
        return t

    handles = []
    for name, module in _projections(model).items():
        short = name.rsplit(".", 1)[-1]
        handles.append(module.register_forward_pre_hook(lambda *_, s=short: owner.__setitem__(0, s)))
        handles.append(module.register_forward_hook(lambda *_: owner.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, float]] = {}
    for nbytes, who in saved.values():
        for w in who:
            row = out.setdefault(w, {"own": 0.0, "shared": 0.0})
            row["own" if len(who) == 1 else "shared"] += nbytes / 2**20 / len(who)  # a shared one split
    return out


def dora_memory(repeats: int = 5, quantize: str | None = None) -> dict:
    """``quantize`` (``"nf4"``, ``"fp4"``, ``"int8"``): every form on the same bitsandbytes base
    (QLoRA / QDoRA; ``lm_head`` stays float), as ``lorakit bench --quantize``."""
    from lorakit.core import adapted_layers

    from .measure import step_peak_bytes
    from .studies import _medians

    torch.set_num_threads(1)
    base = build_base(256, 4, 688, 1000, 128, seed=0, dtype=torch.float32, device="cpu")
    if quantize:
        from lorakit.bitsandbytes import quantize as quantize_base

        quantize_base(base, quantize, compute_dtype=torch.float32).requires_grad_(False)
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(1))
    steps, result = {}, {}
    for label, (method, saves) in FORMS.items():
        model = adapt(method, base, rank=8, seed=0)
        for name, layer in adapted_layers(model).items():
            if saves is not None:
                layer.dora_saves = saves[name.rsplit(".", 1)[-1]]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        step()
        peak = (step_peak_bytes(step, "cpu") + resident_bytes(model, opt)) / 2**20
        result[label] = {"peak MiB": peak, "saved MiB": saved_by_projection(model, step)}
        steps[label] = step
    for label, ms in _medians(steps, repeats).items():
        result[label]["CPU ms/step"] = ms
    return result


def table(result: dict) -> str:
    """Markdown: one row per form; per projection the MiB kept by its node only."""
    names = [t.removesuffix("_proj") for t in TARGETS]
    lines = ["| form | peak MiB | CPU ms/step | " + " | ".join(f"{n} own" for n in names) + " | shared (all) |",
             "|---|---:|---:|" + "---:|" * (len(names) + 1)]
    for label, r in result.items():
        saved = r["saved MiB"]
        own = [saved.get(t, {}).get("own", 0.0) for t in TARGETS]
        shared = sum(v["shared"] for k, v in saved.items() if k != "(rest)")
        lines.append(f"| {label} | {r['peak MiB']:.1f} | {r['CPU ms/step']:.1f} | "
                     + " | ".join(f"{x:.1f}" for x in own) + f" | {shared:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(dora_memory()))
