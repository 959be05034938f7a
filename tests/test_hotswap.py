"""Hot-swap under torch.compile (lorakit.core.hotswap, docs/integrations/serving.md): a model applied
with ``Adapter(max_rank=64)`` and compiled once takes adapters of ranks 4 ... 64, native checkpoints
and PEFT folders, with zero recompiles (``torch._dynamo.config.error_on_recompile``; one graph counted)
and outputs equal to a fresh eager model holding the new adapter (<= 1e-5). Refusals change nothing.

CI compiles with ``aot_eager`` (AOTAutograd traced, no code generation); the inductor run is slow.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

from lorakit.core import Adapter, AdapterError, adapted_layers, hotswap, load, save
from lorakit.core.checkpoint import adapter_state

RANKS = (4, 8, 16, 32, 64)
RECIPES = {"lora": {}, "lora-alpha16": {"normalizer": {"name": "scale", "args": {"alpha": 16}}},
           "rslora": {}, "dora": {}, "pissa": {}, "loldu": {}}


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.Tanh(), nn.Linear(128, 96))


def adapter(recipe: str, **kw) -> Adapter:
    return Adapter.from_recipe(recipe.split("-")[0], **RECIPES[recipe], **kw)


def trained(recipe: str, rank: int, seed: int) -> nn.Module:
    """An adapter moved away from its init (every trainable value perturbed, as training does)."""
    model = adapter(recipe, rank=rank, seed=seed).apply(base(), targets=["0", "2"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


class Counting:
    def __init__(self, name: str):
        self.backend, self.graphs = lookup_backend(name), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def fresh(path) -> nn.Module:
    """The reference: a fresh eager model with the adapter loaded from ``path``."""
    return load(base(), path).eval()


def swap_all(served: nn.Module, sources: list, backend: str, x: torch.Tensor) -> list[float]:
    """Compile ``served`` once, hot-swap every source in; return max |compiled − fresh eager|."""
    dynamo.reset()
    counting = Counting(backend)
    compiled = torch.compile(served, backend=counting, fullgraph=True)
    errors = []
    with torch.no_grad():
        compiled(x)
        with dynamo.config.patch(error_on_recompile=True):
            for path in sources:
                hotswap(served, path)
                errors.append((compiled(x) - fresh(path)(x)).abs().max().item())
    assert counting.graphs == 1, f"{counting.graphs} graphs: hot-swap recompiled"
    return errors


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_native_ranks_4_to_64_no_recompile(recipe, tmp_path):
    sources = []
    for rank in RANKS:
        save(trained(recipe, rank, seed=rank), tmp_path / f"r{rank}")
        sources.append(tmp_path / f"r{rank}")
    served = adapter(recipe, rank=8, max_rank=64).apply(base(), targets=["0", "2"]).eval()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(served(x), base()(x))  # zero-padded: identity at init stays exact
    errors = swap_all(served, sources, "aot_eager", x)
    assert max(errors) <= 1e-5, dict(zip(RANKS, errors))


@pytest.mark.slow
def test_inductor_no_recompile(tmp_path):
    for rank in RANKS:
        save(trained("dora", rank, seed=rank), tmp_path / f"r{rank}")
    served = adapter("dora", rank=8, max_rank=64).apply(base(), targets=["0", "2"]).eval()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    errors = swap_all(served, [tmp_path / f"r{r}" for r in RANKS], "inductor", x)
    assert max(errors) <= 1e-5, errors


def test_padded_model_saves_loads_and_exports(tmp_path):
    """A max_rank model's checkpoint is its padded form; it reloads only into a max_rank model;
    training a padded layer leaves the padding at zero (no gradient reaches it)."""
    model = trained("lora", 4, seed=3)
    save(model, tmp_path / "r4")
    served = adapter("lora", rank=4, max_rank=16).apply(base(), targets=["0", "2"])
    hotswap(served, tmp_path / "r4")
    x = torch.randn(3, 96)
    served(x).square().sum().backward()
    layer = adapted_layers(served)["0"]
    assert layer.slots.A.grad[4:].abs().max() == 0 and layer.slots.B.grad[:, 4:].abs().max() == 0
    save(served, tmp_path / "padded")
    again = load(base(), tmp_path / "padded")
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match=r"rank is 16 in the checkpoint but 4 in the model"):
        load(adapter("lora", rank=4).apply(base(), targets=["0", "2"]), tmp_path / "padded")
    # the PEFT export drops the zero padding (exact rank) and loads in PEFT with the same outputs
    from peft import PeftModel

    from lorakit.transformers import export_peft

    export_peft(served, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base(), tmp_path / "peft")(x), model(x),
                                   rtol=0, atol=1e-6)


def test_peft_folder_source_matches_peft(tmp_path):
    """PEFT LoRA and DoRA folders of ranks 4 and 32 (alpha != r, rsLoRA) swap into one compiled model;
    outputs equal PeftModel.from_pretrained's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    for dora in (False, True):
        folders, refs = [], []
        for rank, alpha, rs in ((4, 16, False), (32, 8, True)):
            torch.manual_seed(rank)
            peft_model = get_peft_model(base(), LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rs, use_dora=dora,
                                                           target_modules=["0", "2"], init_lora_weights=False))
            peft_model.save_pretrained(tmp_path / f"peft{dora}{rank}")
            folders.append(tmp_path / f"peft{dora}{rank}")
            with torch.no_grad():
                refs.append(PeftModel.from_pretrained(base(), folders[-1]).eval()(x))
        served = adapter("dora" if dora else "lora", rank=8, max_rank=64).apply(base(), targets=["0", "2"]).eval()
        dynamo.reset()
        counting = Counting("aot_eager")
        compiled = torch.compile(served, backend=counting, fullgraph=True)
        with torch.no_grad():
            compiled(x)
            with dynamo.config.patch(error_on_recompile=True):
                for folder, ref in zip(folders, refs):
                    hotswap(served, folder)
                    assert (compiled(x) - ref).abs().max() <= 1e-5
        assert counting.graphs == 1


def _unchanged(model: nn.Module):
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    return lambda: all(torch.equal(before[k], v) for k, v in adapter_state(model).items())


def test_refusals_change_nothing(tmp_path):
    save(trained("dora", 4, seed=1), tmp_path / "dora")
    save(trained("lora", 32, seed=1), tmp_path / "r32")
    save(Adapter(rank=4).apply(base(), targets=["0"]), tmp_path / "one")
    served = adapter("lora", rank=8, max_rank=16).apply(base(), targets=["0", "2"])
    same = _unchanged(served)
    for source, message in ((tmp_path / "dora", r"differs from the model's in \['magnitude'\]"),
                            (tmp_path / "r32", "rank 32 in the source, above the model's max_rank 16"),
                            (tmp_path / "one", "targets differ"),
                            (tmp_path / "nothing", "not a lorakit checkpoint nor a PEFT")):
        with pytest.raises(AdapterError, match=message):
            hotswap(served, source)
        assert same()
    # a NaN tensor is refused by the checkpoint reader, naming it
    bad = trained("lora", 4, seed=2)
    with torch.no_grad():
        adapted_layers(bad)["2"].slots.B[0, 0] = float("nan")
    save(bad, tmp_path / "nan")
    with pytest.raises(AdapterError, match="non-finite"):
        hotswap(served, tmp_path / "nan")
    assert same()
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "modules_to_save":
                                                                        ["2"], "r": 4}))
    with pytest.raises(AdapterError, match="modules_to_save"):
        hotswap(served, tmp_path / "peft")
    with pytest.raises(AdapterError, match="recipes differ"):
        from peft import LoraConfig, get_peft_model

        get_peft_model(base(), LoraConfig(r=4, target_modules=["0", "2"])).save_pretrained(tmp_path / "peft4")
        hotswap(adapter("pissa", rank=4, max_rank=8).apply(base(), targets=["0", "2"]), tmp_path / "peft4")
    assert same()


@pytest.mark.parametrize("recipe, why", [("delora", "not lorakit's scale normalizer"),
                                         ("op-lora", "generator makes its slots")])
def test_max_rank_refused_for_unpaddable_compositions(recipe, why):
    model = base()
    with pytest.raises(AdapterError, match=f"max_rank: module '0' cannot be padded for hot-swap: its .*{why}"):
        Adapter.from_recipe(recipe, rank=4, max_rank=8).apply(model, targets=["0", "2"])
    assert not adapted_layers(model)
    with pytest.raises(AdapterError, match=r"max_rank=200: module '0' \(128x96\)"):
        Adapter(rank=4, max_rank=200).apply(base(), targets=["0", "2"])
    with pytest.raises(AdapterError, match="adapter.max_rank must be an integer >= 1"):
        Adapter(max_rank=0)


def test_diffusers_unet(tmp_path):
    """pipe.unet: native checkpoints of ranks 4 and 16 swapped into a UNet compiled once."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    def unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8).eval()

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    for rank in (4, 16):
        model = Adapter(rank=rank, seed=rank).apply(unet(), targets=targets)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        save(model, tmp_path / f"r{rank}")
    g = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 6, 32, generator=g)}
    served = Adapter(rank=8, max_rank=16).apply(unet(), targets=targets)
    dynamo.reset()
    counting = Counting("aot_eager")
    compiled = torch.compile(served, backend=counting, fullgraph=True)
    with torch.no_grad():
        compiled(**inputs)
        with dynamo.config.patch(error_on_recompile=True):
            for rank in (4, 16):
                hotswap(served, tmp_path / f"r{rank}")
                ref = load(unet(), tmp_path / f"r{rank}")(**inputs).sample
                assert (compiled(**inputs).sample - ref).abs().max() <= 1e-5
    assert counting.graphs == 1
