"""lorakit.diffusers: every registered recipe on a UNet and a DiT, exported to
diffusers' LoRA format and loaded by diffusers itself (``model.load_lora_adapter``
and ``pipeline.load_lora_weights``); outputs must match the lorakit model to 1e-5.

Tiny models built from configs; no hub. Recipes registered by any installed plugin
join the matrix automatically.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from lorakit.core import Adapter, AdapterError, adapted_layers, default_targets, merge, registry, set_enabled  # noqa: E402
from lorakit.diffusers import (  # noqa: E402
    ATTENTION,
    METADATA_KEY,
    MODELS,
    RESNET_CONVS,
    WEIGHT_NAME,
    export_diffusers,
    targets,
)

RECIPES = sorted(registry.load().recipes)
TOL = 1e-5  # fp32, max abs diff
RANK = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded CI box
    oversubscribed threads make them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny components ---------------------------------------------------------------
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    ).eval()


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
    ).eval()


def tiny_vae(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=16, **kw).eval()


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: every byte (and byte + ``</w>``) a token."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    with tempfile.TemporaryDirectory() as folder:  # files: transformers 4 takes paths only
        paths = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        paths[0].write_text(json.dumps(vocab))
        paths[1].write_text("#version: 0.2\n")
        return CLIPTokenizer(*map(str, paths), model_max_length=16)


def sd_components() -> dict:
    """Every StableDiffusionPipeline component but the UNet."""
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514, hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16)).eval()
    return {"vae": tiny_vae(), "text_encoder": text, "tokenizer": tiny_clip_tokenizer(),
            "scheduler": DDIMScheduler(clip_sample=False, steps_offset=1), "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False}


@pytest.fixture(scope="module")
def sd_parts():
    return sd_components()


def sd_pipeline(unet, parts) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(unet=unet, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(transformer) -> StableDiffusion3Pipeline:
    # Text encoders are not needed to exercise load_lora_weights (prompt embeddings
    # can be passed to __call__); the VAE is SD3's layout (no quant convs).
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 6, 32, generator=g)}


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10.0, 500.0]),
            "encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
            "pooled_projections": torch.randn(2, 16, generator=g)}


# -- helpers -------------------------------------------------------------------------
def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def train(model, inputs, steps=2, lr=5e-3):
    """A few AdamW steps towards a random target, so every trainable slot moves."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the adapter has no trainable parameters"
    opt = torch.optim.AdamW(params, lr=lr)
    target = torch.randn(run(model, inputs).shape, generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(steps):
        loss = (model(**inputs, return_dict=False)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def peft_ranks(model) -> dict[str, int]:
    return {n: next(iter(m.r.values())) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def check_loaded(loaded, lorakit_model, report, inputs, expected):
    """Same modules adapted with the exported ranks, and the same output."""
    adapted = set(adapted_layers(lorakit_model))
    ranks = peft_ranks(loaded)
    assert set(ranks) == adapted
    assert ranks == {n: report.rank_pattern.get(n, report.rank) for n in adapted}
    diff = (run(loaded, inputs) - expected).abs().max().item()
    assert diff <= TOL, f"diffusers-loaded output differs from lorakit by {diff:.3g}"


def check_file(report, model, prefix):
    """Keys in PEFT's schema under the prefix; the LoraConfig under the metadata key."""
    adapted = adapted_layers(model)
    dora = any(layer.magnitude is not None for layer in adapted.values())
    expected = {f"{prefix}.{n}.lora_{ab}.weight" for n in adapted for ab in "AB"}
    if dora:
        expected |= {f"{prefix}.{n}.lora_magnitude_vector.weight" for n in adapted}
    with safe_open(report.path, "pt") as f:
        assert set(f.keys()) == expected
        meta = f.metadata()
    config = json.loads(meta[METADATA_KEY])
    assert config[f"{prefix}.r"] == config[f"{prefix}.lora_alpha"] == report.rank
    assert config[f"{prefix}.use_dora"] is dora is report.use_dora
    assert sorted(config[f"{prefix}.target_modules"]) == sorted(adapted)
    return config, meta


def roundtrip(tmp_path, base, inputs, recipe, prefix, make_pipeline, targets_=None, **adapter_kw):
    """apply → train → export → load twice (model, pipeline) → compare."""
    model = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=RANK, **adapter_kw).apply(model, targets=targets_)
    before = run(model, inputs)
    train(model, inputs)
    expected = run(model, inputs)
    # The adapter must have moved the output well beyond the tolerance, or the
    # comparison below could not tell a loaded adapter from a missing one.
    assert (expected - before).abs().max().item() > 10 * TOL
    report = export_diffusers(model, tmp_path, prefix=prefix)
    assert report.path == tmp_path / WEIGHT_NAME and report.max_rel_error < 1e-5
    check_file(report, model, prefix)

    direct = copy.deepcopy(base)
    direct.load_lora_adapter(tmp_path, prefix=prefix, weight_name=WEIGHT_NAME)
    check_loaded(direct, model, report, inputs, expected)

    pipe = make_pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path, weight_name=WEIGHT_NAME)
    check_loaded(getattr(pipe, prefix), model, report, inputs, expected)
    return model, report, pipe


# -- the interop matrix ------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_unet_roundtrip(tmp_path, sd_parts, recipe):
    roundtrip(tmp_path, tiny_unet(), unet_inputs(), recipe, "unet", lambda u: sd_pipeline(u, sd_parts))


@pytest.mark.parametrize("recipe", RECIPES)
def test_sd3_transformer_roundtrip(tmp_path, recipe):
    roundtrip(tmp_path, tiny_sd3(), sd3_inputs(), recipe, "transformer", sd3_pipeline)


# -- Conv2d targets ---------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["lora", "dora"])
def test_unet_conv2d_targets(tmp_path, sd_parts, recipe):
    unet = tiny_unet()
    chosen = targets(unet, conv=True)
    assert chosen == [*ATTENTION, *RESNET_CONVS]
    model, report, _ = roundtrip(tmp_path, unet, unet_inputs(), recipe, "unet",
                                 lambda u: sd_pipeline(u, sd_parts), targets_=chosen)
    convs = [n for n, layer in adapted_layers(model).items() if isinstance(layer.base, nn.Conv2d)]
    assert set(convs) == {n for n, m in unet.named_modules()
                          if isinstance(m, nn.Conv2d) and n.rsplit(".", 1)[-1] in RESNET_CONVS}
    assert len(convs) == 21  # conv1 + conv2 of 8 ResNets, 5 conv_shortcuts (channel changes)
    with safe_open(report.path, "pt") as f:
        name = next(n for n in convs if n.endswith("conv1"))
        k = report.rank_pattern.get(name, report.rank)
        assert f.get_tensor(f"unet.{name}.lora_A.weight").shape == (k, *model.get_submodule(name).base.weight.shape[1:])
        assert f.get_tensor(f"unet.{name}.lora_B.weight").shape[1:] == (k, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_unet_conv2d_every_recipe(tmp_path, sd_parts, recipe):
    unet = tiny_unet()
    roundtrip(tmp_path, unet, unet_inputs(), recipe, "unet", lambda u: sd_pipeline(u, sd_parts),
              targets_=targets(unet, conv=True))


# -- file format ---------------------------------------------------------------------------
def test_metadata_rank_pattern_and_alpha(tmp_path, sd_parts):
    """Ranks that differ per module go to rank_pattern (and alpha_pattern, scale 1)."""
    model, report, _ = roundtrip(tmp_path, tiny_unet(), unet_inputs(), "lora", "unet",
                                 lambda u: sd_pipeline(u, sd_parts), rank_pattern={"attn2.to_k": 2})
    config, meta = check_file(report, model, "unet")
    assert all(k.startswith("unet.") for k in config)
    assert config["unet.r"] == config["unet.lora_alpha"] == RANK
    pattern = config["unet.rank_pattern"]
    assert len(pattern) == 4 and set(pattern.values()) == {2}  # one cross-attention to_k per block
    assert all(k.startswith("^") and k.endswith(r"attn2\.to_k") for k in pattern)
    assert config["unet.alpha_pattern"] == pattern
    assert json.loads(meta["lorakit"])["recipe"] == "lora"


def test_truncated_export_reports_error(tmp_path):
    model = tiny_sd3()
    Adapter.from_recipe("lora", rank=RANK).apply(model)
    train(model, sd3_inputs())
    with pytest.warns(UserWarning, match="relative error"):
        report = export_diffusers(model, tmp_path, rank=1)
    assert report.rank == 1 and not report.rank_pattern and 0 < report.max_rel_error < 1
    loaded = tiny_sd3()
    loaded.load_lora_adapter(tmp_path, prefix="transformer", weight_name=WEIGHT_NAME)
    assert set(peft_ranks(loaded).values()) == {1}


def test_registered_exporter_and_targets(tmp_path):
    assert registry.load().exporters["diffusers"] is export_diffusers
    for cls in MODELS:
        assert registry.targets[cls] == ATTENTION
    model = tiny_sd3()
    assert default_targets(model) == ATTENTION
    Adapter.from_recipe("lora", rank=RANK).apply(model)
    train(model, sd3_inputs())
    report = registry.exporters["diffusers"](model, tmp_path)  # prefix from the class: transformer
    assert report.prefix == "transformer"
    loaded = tiny_sd3()
    loaded.load_lora_adapter(tmp_path, weight_name=WEIGHT_NAME)  # diffusers' default prefix
    assert (run(loaded, sd3_inputs()) - run(model, sd3_inputs())).abs().max().item() <= TOL


# -- the pipeline end to end -------------------------------------------------------------------
def test_pipeline_images_match(tmp_path, sd_parts):
    """Images from the pipeline with diffusers-loaded LoRA == with the lorakit UNet."""
    base = tiny_unet()
    model = copy.deepcopy(base)
    Adapter.from_recipe("dora", rank=RANK).apply(model)
    train(model, unet_inputs())
    export_diffusers(model, tmp_path, prefix="unet")
    loaded_pipe = sd_pipeline(copy.deepcopy(base), sd_parts)
    loaded_pipe.load_lora_weights(tmp_path, weight_name=WEIGHT_NAME)

    def images(pipe):
        return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    ours, theirs = images(sd_pipeline(model, sd_parts)), images(loaded_pipe)
    assert abs(ours - images(sd_pipeline(base, sd_parts))).max() > 10 * TOL
    assert abs(ours - theirs).max() <= TOL


# -- other DiT-style models ---------------------------------------------------------------------
def tiny_flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 2, 2))
    g = torch.Generator().manual_seed(1)
    return model.eval(), {"hidden_states": torch.randn(1, 16, 4, generator=g),
                          "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                          "pooled_projections": torch.randn(1, 16, generator=g), "timestep": torch.tensor([0.5]),
                          "img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.zeros(6, 3)}


def tiny_sana():
    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    g = torch.Generator().manual_seed(1)
    return model.eval(), {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
                          "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "timestep": torch.tensor([10])}


def tiny_pixart():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, num_embeds_ada_norm=1000,
        activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    g = torch.Generator().manual_seed(1)
    return model.eval(), {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
                          "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "timestep": torch.tensor([10]),
                          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def tiny_dit():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=10)
    g = torch.Generator().manual_seed(1)
    return model.eval(), {"hidden_states": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([10]),
                          "class_labels": torch.tensor([1])}


def tiny_unet2d():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    g = torch.Generator().manual_seed(1)
    return model.eval(), {"sample": torch.randn(1, 3, 8, 8, generator=g), "timestep": torch.tensor([10])}


OTHER_MODELS = {"FluxTransformer2DModel": tiny_flux, "SanaTransformer2DModel": tiny_sana,
                "PixArtTransformer2DModel": tiny_pixart, "DiTTransformer2DModel": tiny_dit,
                "UNet2DModel": tiny_unet2d}


def test_every_registered_model_is_tested():
    assert set(MODELS) == {"UNet2DConditionModel", "SD3Transformer2DModel", *OTHER_MODELS}


@pytest.mark.parametrize("name", sorted(OTHER_MODELS))
def test_other_models_default_targets_export_load(tmp_path, name):
    """Default targets hit exactly the attention projections; the export loads with
    ``load_lora_adapter`` where diffusers has a LoRA loader for the class, else with
    PEFT directly (what diffusers' loader calls) after a clear warning."""
    base, inputs = OTHER_MODELS[name]()
    model = copy.deepcopy(base)
    Adapter.from_recipe("dora", rank=RANK).apply(model)
    adapted = list(adapted_layers(model))
    assert {n for n, m in base.named_modules() if n.endswith(tuple("." + t for t in ATTENTION))} == set(adapted)
    assert {t for t in ATTENTION if any(n.endswith("." + t) for n in adapted)} >= {"to_q", "to_k", "to_v"}
    train(model, inputs)
    expected = run(model, inputs)
    loaded = copy.deepcopy(base)
    if hasattr(base, "load_lora_adapter"):
        report = export_diffusers(model, tmp_path, prefix="transformer")
        loaded.load_lora_adapter(tmp_path, prefix="transformer", weight_name=WEIGHT_NAME)
    else:
        with pytest.warns(UserWarning, match="no LoRA loader"):
            report = export_diffusers(model, tmp_path, prefix="transformer")
        with safe_open(report.path, "pt") as f:
            config = json.loads(f.metadata()[METADATA_KEY])
            state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
        config = LoraConfig(**{k.removeprefix("transformer."): v for k, v in config.items()})
        inject_adapter_in_model(config, loaded, state_dict=state)
        set_peft_model_state_dict(loaded, state)
    check_loaded(loaded, model, report, inputs, expected)


# -- bad input ---------------------------------------------------------------------------------
def test_export_without_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no lorakit adapter"):
        export_diffusers(tiny_sd3(), tmp_path)
    assert not (tmp_path / WEIGHT_NAME).exists()


@pytest.mark.parametrize("kwargs, match", [({"prefix": "un.et"}, "prefix"), ({"prefix": ""}, "prefix"),
                                           ({"rank": 0}, "rank"), ({"rank": 1.5}, "rank")])
def test_export_bad_arguments(tmp_path, kwargs, match):
    model = tiny_sd3()
    Adapter.from_recipe("lora", rank=RANK).apply(model)
    with pytest.raises(AdapterError, match=match):
        export_diffusers(model, tmp_path, **kwargs)
    assert not (tmp_path / WEIGHT_NAME).exists()


@pytest.mark.parametrize("state", ["merged", "disabled"])
def test_export_merged_or_disabled_refused(tmp_path, state):
    model = tiny_sd3()
    Adapter.from_recipe("lora", rank=RANK).apply(model)
    merge(model) if state == "merged" else set_enabled(model, False)
    with pytest.raises(AdapterError, match=state):
        export_diffusers(model, tmp_path)
    assert not (tmp_path / WEIGHT_NAME).exists()


def test_dilated_conv_refused(tmp_path):
    """PEFT's conv LoRA has no dilation: refuse rather than write a wrong file."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, dilation=2))
    Adapter.from_recipe("lora", rank=2).apply(model, targets=["0"])
    with pytest.raises(AdapterError, match=r"module '0'.*dilation"):
        export_diffusers(model, tmp_path, prefix="unet")
    assert not (tmp_path / WEIGHT_NAME).exists()


def test_conv_targets_absent(tmp_path):
    with pytest.raises(AdapterError, match=r"SD3Transformer2DModel has no ResNet convolutions.*pos_embed\.proj"):
        targets(tiny_sd3(), conv=True)


def test_unknown_targets_name_the_fix():
    model = tiny_sd3()
    with pytest.raises(AdapterError, match="match no module"):
        Adapter.from_recipe("lora", rank=RANK).apply(model, targets=["q_proj"])
    assert not adapted_layers(model)


def test_export_dtype(tmp_path):
    model = tiny_sd3()
    Adapter.from_recipe("dora", rank=RANK).apply(model)
    export_diffusers(model, tmp_path, dtype=torch.float16)
    with safe_open(tmp_path / WEIGHT_NAME, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = tiny_sd3().half()
    loaded.load_lora_adapter(tmp_path, weight_name=WEIGHT_NAME)
    assert set(peft_ranks(loaded)) == set(adapted_layers(model))
