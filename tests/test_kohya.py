"""kohya / A1111 / ComfyUI export: every recipe on a tiny SD UNet
and its CLIP text encoder, written by ``export_kohya`` and read by diffusers' own
kohya reader (``pipeline.load_lora_weights(file)``); outputs equal lorakit's to 1e-5."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from test_diffusers import RECIPES, TOL, one_thread, run, sd_components, sd_pipeline, tiny_unet, train, unet_inputs  # noqa: F401

from lorakit.core import Adapter, AdapterError, adapted_layers, registry
from lorakit.core.peft_format import lora_tensors
from lorakit.diffusers import KOHYA_NAME, export_kohya, targets

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def sd_parts():
    return sd_components()


def text_inputs():
    return {"input_ids": torch.randint(0, 514, (2, 7), generator=torch.Generator().manual_seed(3))}


def adapt_text_encoder(encoder, recipe):
    Adapter.from_recipe(recipe, rank=2).apply(encoder, targets=TEXT_TARGETS)
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p, generator=None))
    return encoder.eval()


@pytest.mark.parametrize("recipe", RECIPES)
def test_kohya_file_loads_in_diffusers(tmp_path, sd_parts, recipe):
    torch.manual_seed(0)
    base = tiny_unet()
    unet = copy.deepcopy(base)
    conv = recipe in ("lora", "dora")  # the LoCon set too, for a recipe with and one without a magnitude
    Adapter.from_recipe(recipe, rank=4).apply(unet, targets=targets(unet, conv=conv))
    inputs = unet_inputs()
    train(unet, inputs)
    encoder = adapt_text_encoder(copy.deepcopy(sd_parts["text_encoder"]), recipe)
    expected_unet, expected_text = run(unet, inputs), run(encoder, text_inputs())
    assert (expected_unet - run(base, inputs)).abs().max() > 10 * TOL  # the adapter moved the output

    file = export_kohya(unet, tmp_path / "my_lora.safetensors", text_encoder=encoder)
    assert file == tmp_path / "my_lora.safetensors"
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        errors = json.loads(f.metadata()["lorakit_rel_errors"])
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(alphas) == len(adapted_layers(unet)) + len(adapted_layers(encoder))
    assert max(errors.values()) < 1e-5

    pipe = sd_pipeline(copy.deepcopy(base), {**sd_parts, "text_encoder": copy.deepcopy(sd_parts["text_encoder"])})
    pipe.load_lora_weights(str(file))
    assert (run(pipe.unet, inputs) - expected_unet).abs().max() <= TOL
    assert (run(pipe.text_encoder, text_inputs()) - expected_text).abs().max() <= TOL


def test_kohya_max_rank_and_folder(tmp_path, sd_parts):
    unet = tiny_unet()
    Adapter.from_recipe("delora", rank=4).apply(unet)
    train(unet, unet_inputs())
    with pytest.warns(UserWarning, match="relative error"):
        file = export_kohya(unet, tmp_path, max_rank=1)
    assert file == tmp_path / KOHYA_NAME
    with safe_open(str(file), "pt") as f:
        downs = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_down.weight")]
        assert all(float(f.get_tensor(k)) == 1.0 for k in f.keys() if k.endswith(".alpha"))
    assert all(d.shape[0] == 1 for d in downs)
    pipe = sd_pipeline(tiny_unet(), sd_parts)
    pipe.load_lora_weights(str(file))  # still a valid file


def test_kohya_bad_input(tmp_path):
    unet = tiny_unet()
    with pytest.raises(AdapterError, match="no lorakit adapter"):
        export_kohya(unet, tmp_path / "a.safetensors")
    Adapter.from_recipe("dora", rank=2).apply(unet)
    with pytest.raises(AdapterError, match="folded"):
        export_kohya(unet, tmp_path / "a.safetensors", fold_magnitude=False)
    with pytest.raises(AdapterError, match="kohya format holds"):
        export_kohya(torch.nn.Linear(2, 2), tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="nothing to export"):
        export_kohya(None, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    assert registry.load().exporters["kohya"] is export_kohya


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_command_from_a_unet_checkpoint(tmp_path, sd_parts, fmt):
    """``lorakit export --format kohya|diffusers`` from a native checkpoint of a DoRA UNet."""
    from lorakit.core import checkpoint
    from lorakit.core.cli import main

    base = tiny_unet()
    base.save_pretrained(tmp_path / "base")
    unet = copy.deepcopy(base)
    Adapter.from_recipe("dora", rank=2).apply(unet)
    inputs = unet_inputs()
    train(unet, inputs)
    checkpoint.save(unet, tmp_path / "ckpt")
    out = tmp_path / ("k.safetensors" if fmt == "kohya" else "d")
    assert main(["export", str(tmp_path / "ckpt"), "--format", fmt, "--base", str(tmp_path / "base"),
                 "--out", str(out), "--fold-magnitude"]) == 0
    pipe = sd_pipeline(copy.deepcopy(base), sd_parts)
    pipe.load_lora_weights(str(out))
    assert (run(pipe.unet, inputs) - run(unet, inputs)).abs().max() <= TOL


# -- the diffusers exporter's max_rank / fold_magnitude (item 1-2 for diffusers) ---------
@pytest.mark.parametrize("recipe", RECIPES)
def test_diffusers_export_capped_and_folded(tmp_path, recipe):
    """``export_diffusers(max_rank=64, fold_magnitude=True)``: above every module's
    rank the cap is exact, DoRA is written as plain LoRA, and diffusers' loader gives
    lorakit's output; ``max_rank=1`` gives rank-1 modules with the errors reported."""
    from lorakit.diffusers import WEIGHT_NAME, export_diffusers

    base = tiny_unet()
    unet = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=4).apply(unet)
    inputs = unet_inputs()
    train(unet, inputs)
    report = export_diffusers(unet, tmp_path / "a", prefix="unet", max_rank=64, fold_magnitude=True)
    assert not report.use_dora and report.max_rel_error < 1e-5
    loaded = copy.deepcopy(base)
    loaded.load_lora_adapter(tmp_path / "a", prefix="unet", weight_name=WEIGHT_NAME)
    assert (run(loaded, inputs) - run(unet, inputs)).abs().max() <= TOL
    with pytest.warns(UserWarning, match="relative error"):
        capped = export_diffusers(unet, tmp_path / "b", prefix="unet", max_rank=1, fold_magnitude=True)
    assert capped.rank == 1 and not capped.rank_pattern and capped.max_rel_error > 0
    with safe_open(str(capped.path), "pt") as f:
        assert json.loads(f.metadata()["lorakit_rel_errors"]) == pytest.approx(capped.rel_error)


def test_diffusers_export_auto_rank_pattern_loads(tmp_path):
    from lorakit.diffusers import WEIGHT_NAME, export_diffusers

    base = tiny_unet()
    unet = copy.deepcopy(base)
    Adapter.from_recipe("delora", rank=4).apply(unet)
    train(unet, unet_inputs(), steps=4)
    with pytest.warns(UserWarning, match="relative error"):
        report = export_diffusers(unet, tmp_path, prefix="unet", max_rank="auto", energy=0.9)
    assert report.rank_pattern, "modules of different ranks expected"
    loaded = copy.deepcopy(base)
    loaded.load_lora_adapter(tmp_path, prefix="unet", weight_name=WEIGHT_NAME)
    ranks = {n: next(iter(m.r.values())) for n, m in loaded.named_modules() if hasattr(m, "lora_A") and m.r}
    assert ranks == {n: report.rank_pattern.get(n, report.rank) for n in adapted_layers(unet)}


# -- mixed ranks: one rank per component, read identically by every client ----------------
def mixed_unet(cross_dim: int):
    """The tiny UNet with cross-attention from ``cross_dim`` channels: attn2.to_k/to_v are
    32 × ``cross_dim``, so a folded DoRA exports ranks ``cross_dim`` and 32."""
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, norm_num_groups=8, attention_head_dim=8).eval()


def kohya_rule(base, file):
    """``base`` with the file merged as kohya-ss' networks/lora.py and ComfyUI's
    comfy/weight_adapter/lora.py do: ``W + alpha / lora_down.shape[0] · up @ down``
    per module (fp64, then the base's dtype)."""
    model = copy.deepcopy(base)
    modules = {f"lora_unet_{n.replace('.', '_')}": m for n, m in model.named_modules()}
    with safe_open(str(file), "pt") as f, torch.no_grad():
        for key in (k for k in f.keys() if k.endswith(".lora_down.weight")):
            name = key.split(".")[0]
            down, up = f.get_tensor(key).double(), f.get_tensor(f"{name}.lora_up.weight").double()
            scale = float(f.get_tensor(f"{name}.alpha")) / down.shape[0]
            weight = modules[name].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight.copy_((weight.double() + scale * delta).to(weight.dtype))
    return model


MIXED = [("dora", {}), ("op-dora", {}), ("loldu", {}), ("pissa", {"max_rank": "auto"}),
         ("dora", {"max_rank": "auto"}), ("lora", {"max_rank": "auto"})]


@given(case=st.sampled_from(MIXED), cross_dim=st.sampled_from([16, 24]), conv=st.booleans(),
       energy=st.floats(0.6, 0.99))
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_kohya_mixed_ranks_read_exactly(tmp_path_factory, sd_parts, case, cross_dim, conv, energy):
    """Recipes whose modules export at different ranks (folded DoRA: ``cross_dim`` and 32;
    LoLDU: ~2r; ``max_rank="auto"``: the energy's ranks): diffusers' ``load_lora_weights``
    gives the output the kohya/ComfyUI rule gives, which is lorakit's when nothing is
    truncated, to 1e-5 relative."""
    recipe, options = case
    tmp_path = tmp_path_factory.mktemp("mixed")
    base = mixed_unet(cross_dim)
    unet = copy.deepcopy(base)
    chosen = ["to_q", "to_k", "to_v", "to_out.0"] + (["conv1", "conv2"] if conv else [])
    Adapter.from_recipe(recipe, rank=4).apply(unet, targets=chosen)
    g = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 6, cross_dim, generator=g)}
    train(unet, inputs, lr=1e-2)
    file = tmp_path / "mixed.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_rank="auto" reports its truncation
        export_kohya(unet, file, energy=energy, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = lora_tensors(unet, fold_magnitude=True, energy=energy, **options)[1]
    k = max(ranks.values())
    with safe_open(str(file), "pt") as f:  # one rank, alpha = rank: scale 1 for every client
        assert {f.get_tensor(n).shape[0] for n in f.keys() if n.endswith(".lora_down.weight")} == {k}
        assert {float(f.get_tensor(n)) for n in f.keys() if n.endswith(".alpha")} == {float(k)}
        errors = json.loads(f.metadata()["lorakit_rel_errors"])
    lorakit_out = run(unet, inputs)
    reference = run(kohya_rule(base, file), inputs)
    if max(errors.values()) < 1e-6:  # exact export: the rule gives lorakit's output
        assert (reference - lorakit_out).abs().max() <= 1e-5 * lorakit_out.abs().max()
    pipe = sd_pipeline(copy.deepcopy(base), sd_parts)
    pipe.load_lora_weights(str(file))
    loaded = run(pipe.unet, inputs)
    assert (loaded - reference).abs().max() <= 1e-5 * reference.abs().max()
