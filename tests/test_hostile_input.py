"""Hostile or odd input: a clear one-line error naming the field, never a
hang, a huge allocation, a raw exception or a blocked read. docs/bad-inputs.md has one
row per class (tests/test_bad_input.py ``CASES``); this file covers the variants."""

from __future__ import annotations

import json
import math
import os
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorakit.core import (
    Adapter,
    AdapterError,
    CheckpointError,
    adapted_layers,
    adapter_config,
    export_factors,
    load,
    save,
)
from lorakit.core import checkpoint as ckpt
from lorakit.core.validation import MAX_SEED, safe_regex


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture
def saved(tmp_path):
    save(Adapter(rank=2).apply(model(), targets=["0", "2"]), tmp_path)
    return tmp_path


def write_config(path, text):
    (path / "adapter_config.json").write_text(text)
    return path


def refuses(path, fragment, error=CheckpointError):
    """``load`` raises ``error`` matching ``fragment`` in one line; the model keeps no adapter."""
    fresh = model()
    start = time.perf_counter()
    with pytest.raises(error, match=fragment) as info:
        load(fresh, path)
    assert time.perf_counter() - start < 5 and "\n" not in str(info.value)
    assert not adapted_layers(fresh) and all(p.requires_grad for p in fresh.parameters())


# -- regexes ---------------------------------------------------------------------------------------
CATASTROPHIC = [r"(.*)*y", r"(a+)+$", r"(a|aa)*b", r"(?:layers\.\d+\.)*q", r".*.*.*.*y", ".?" * 30 + "y"]


@pytest.mark.parametrize("pattern", CATASTROPHIC, ids=range(len(CATASTROPHIC)))
def test_catastrophic_patterns_are_refused_before_matching(pattern):
    Adapter()  # loads the registry outside the timing
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=re.escape(f"adapter.rank_pattern[{pattern!r}]")):
        Adapter(rank_pattern={pattern: 2})
    with pytest.raises(AdapterError, match=r"^targets '.*': .*(exponential|quantifiers)"):
        Adapter(rank=1).apply(model(), targets=pattern)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("pattern,fragment", [
    ("(", "not a valid regex"), ("[a-", "not a valid regex"), (r"(a)\1", "backreferences"),
    ("x" * 2000, "2000 characters"), (3, "must be a string")])
def test_bad_patterns_name_the_field(pattern, fragment):
    with pytest.raises(AdapterError, match=fragment):
        Adapter(rank_pattern={pattern: 2})


def test_everyday_patterns_are_accepted():
    for pattern in [r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", r"(model\.)?layers\..*",
                    r".*proj|2", "attn2.to_k", r"down_blocks\.\d+\.attentions\.\d+\..*to_[qkv]"]:
        safe_regex(pattern, "targets")
    m = Adapter(rank=1, rank_pattern={r"\d": 2}).apply(model(), targets=r"[02]")
    assert sorted(adapted_layers(m)) == ["0", "2"] and adapted_layers(m)["2"].rank == 2


REGEX_TOKENS = [".", "*", "+", "?", "(", ")", "(?:", "|", "a", "b", r"\.", r"\d", "{2,}", "{0,9}", "[ab]", "$"]
HOSTILE_NAMES = ["a" * 256 + "!", "ab" * 128 + "!", ".".join(["a1"] * 80) + "!"]


@given(st.lists(st.sampled_from(REGEX_TOKENS), max_size=16).map("".join))
@settings(max_examples=200, deadline=None)
def test_random_regexes_never_hang(pattern):
    """Whatever the pattern, it is refused (AdapterError) or matches any name fast."""
    try:
        compiled = safe_regex(pattern, "targets")
    except AdapterError:
        return
    start = time.perf_counter()
    for name in HOSTILE_NAMES:
        compiled.fullmatch(name)
    assert time.perf_counter() - start < 0.5, pattern


def test_a_catastrophic_rank_pattern_in_a_checkpoint_is_refused(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["adapter"]["rank_pattern"] = {"(.*)*y": 1}
    refuses(write_config(saved, json.dumps(cfg)), re.escape("adapter.rank_pattern['(.*)*y']"))


# -- numbers in a checkpoint -----------------------------------------------------------------------
@pytest.mark.parametrize("literal,field,fragment", [
    ("NaN", "normalizer.args.alpha", "is NaN"), ("Infinity", "normalizer.args.alpha", "is Infinity"),
    ("-Infinity", "init.args.a", "is -Infinity"), ("1e999", "init.args.a", "is 1e999, which overflows"),
    ("9" * 5000, "seed", "is an integer of 5000 digits"), ("-" + "9" * 30, "rank", "is an integer of 30 digits")],
    ids=["nan", "inf", "-inf", "1e999", "5000-digits", "30-digits"])
def test_non_finite_and_huge_numbers_in_a_config_name_the_field(saved, literal, field, fragment):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    section, _, rest = field.partition(".")
    placeholder = "__VALUE__"
    if rest:
        cfg["adapter"][section]["args"][rest.split(".")[-1]] = placeholder
    else:
        cfg["adapter"][section] = placeholder
    text = json.dumps(cfg).replace(f'"{placeholder}"', literal)
    refuses(write_config(saved, text), re.escape(f"adapter.{field}") + f" {fragment}")


def test_duplicate_keys_and_deep_nesting_are_refused(saved):
    text = (saved / "adapter_config.json").read_text()
    refuses(write_config(saved, text.replace('"format": "lorakit",', '"format": "lorakit", "format": "lorakit",')),
            "format is given twice")
    cfg = json.loads(text)
    cfg["adapter"]["init"]["args"]["a"] = json.loads("[" * 40 + "]" * 40)
    refuses(write_config(saved, json.dumps(cfg)), "nested more than 32 levels")
    refuses(write_config(saved, "[" * 100_000 + "]" * 100_000), "not valid JSON")


def test_seed_range_is_what_save_writes_and_load_accepts(tmp_path):
    m = Adapter(rank=2, seed=MAX_SEED).apply(model(), targets=["0"])
    save(m, tmp_path)
    fresh = load(model(), tmp_path)
    assert adapter_config(fresh)["seed"] == MAX_SEED
    x = torch.randn(3, 6)
    assert torch.equal(fresh(x), m(x))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["adapter"]["seed"] = MAX_SEED + 1
    # the file and Adapter(seed=) say the same sentence: one declaration checks both
    refuses(write_config(tmp_path, json.dumps(cfg)), r"adapter.seed=9223372036854775808: must be an integer >= 0 "
                                                      r"and <= 9223372036854775807")


@pytest.mark.parametrize("seed", [-1, True, 1.0, "1", None, MAX_SEED + 1, 10**40])
def test_bad_seeds_are_adapter_errors(seed):
    with pytest.raises(AdapterError, match=r"^adapter.seed=.*: must be an integer >= 0 and <= 9223372036854775807$"):
        Adapter(seed=seed)


# -- files that are not what they should be ----------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_fifo_is_refused_without_blocking(saved, name):
    (saved / name).unlink()
    os.mkfifo(saved / name)
    refuses(saved, re.escape(f"{name} is not a regular file"))


def test_a_symlink_loop_a_folder_and_a_file_for_a_folder(saved, tmp_path_factory):
    config = saved / "adapter_config.json"
    config.unlink()
    config.mkdir()
    refuses(saved, "adapter_config.json is a folder")
    config.rmdir()
    config.symlink_to(config)  # a loop: ELOOP
    refuses(saved, "cannot be read")
    weights = saved / "adapter_model.safetensors"
    not_a_folder = tmp_path_factory.mktemp("f") / "file"
    not_a_folder.write_bytes(weights.read_bytes())
    refuses(not_a_folder, "is not a folder")


def test_an_oversized_config_is_not_read(saved, monkeypatch):
    monkeypatch.setattr(ckpt, "MAX_CONFIG_BYTES", 100)
    refuses(saved, "at most 100 are read")


# -- primitive arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,fragment", [
    ({"generator": {"name": "mlp", "args": {"width": 2**31}}}, r"MLP\(width=2147483648\): width must be"),
    ({"generator": {"name": "mlp", "args": {"embed_dim": 2**20}}}, "embed_dim must be an integer in"),
    ({"normalizer": {"name": "scale", "args": {"alpha": math.nan}}}, "Scale.alpha=nan: must be a finite number"),
    ({"normalizer": {"name": "scale", "args": {"alpha": -math.inf}}}, "Scale.alpha=-inf"),
    ({"normalizer": {"name": "scale", "args": {"rs": "yes"}}}, "Scale.rs='yes': must be true or false"),
    ({"normalizer": {"name": "delora", "args": {"eps": math.inf}}}, "eps must be a finite number"),
    ({"init": {"name": "kaiming", "args": {"a": math.nan}}}, "Kaiming.a=nan"),
    ({"init": {"name": "pissa", "args": {"svd": "lowrank", "niter": 10**9}}},
     r"niter must be an integer in \[0, 100\]"),
])
def test_primitive_arguments_are_bounded(kwargs, fragment):
    with pytest.raises(AdapterError, match=fragment):
        Adapter(**kwargs)


def test_mlp_memory_is_estimated_before_allocating():
    big = nn.Sequential(nn.Linear(4096, 4096))
    with pytest.raises(AdapterError, match=r"module '0': MLP\(width=65536\): the layer's generator would hold"):
        Adapter(rank=64, generator={"name": "mlp", "args": {"width": 2**16}}).apply(big, targets=["0"])
    assert not adapted_layers(big)


def test_from_config_rejects_odd_values():
    with pytest.raises(AdapterError, match="adapter.dtype='nn'"):
        Adapter.from_config({"dtype": "nn"})
    with pytest.raises(AdapterError, match="give a dict"):
        Adapter.from_config(["rank", 2])


# -- export ----------------------------------------------------------------------------------------
def nan_adapter():
    m = Adapter(rank=2).apply(model(), targets=["0"])
    with torch.no_grad():
        adapted_layers(m)["0"].slots.A.fill_(math.nan)
    return m


def test_export_of_a_non_finite_adapter_is_refused(tmp_path):
    with pytest.raises(AdapterError, match=r"export refused: 0\.slots\.A has non-finite values"):
        export_factors(nan_adapter())
    pytest.importorskip("peft")
    from lorakit.transformers import export_peft

    with pytest.raises(AdapterError, match="non-finite"):
        export_peft(nan_adapter(), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    m = Adapter(rank=2, init={"name": "kaiming", "args": {"zero_b": False}}).apply(model(), targets=["0"])
    with torch.no_grad():
        adapted_layers(m)["0"].slots.B.mul_(1e12)  # finite in fp32, inf once cast to fp16
    with pytest.raises(AdapterError, match="PEFT export refused: .* has non-finite values"):
        export_peft(m, tmp_path / "fp16", dtype=torch.float16)
    assert not (tmp_path / "fp16").exists()


def test_diffusers_export_of_a_non_finite_adapter_is_refused(tmp_path):
    pytest.importorskip("diffusers")
    from lorakit.diffusers import export_diffusers

    with pytest.raises(AdapterError, match="non-finite"):
        export_diffusers(nan_adapter(), tmp_path, prefix="unet")
    assert not list(tmp_path.iterdir())


def test_every_json_from_outside_is_read_strictly(tmp_path):
    """A run's trainer_state.json, a sweep's cell.json, a model folder's config.json: the
    same strict reader as checkpoints (no NaN, duplicate keys, FIFOs or huge files)."""
    from lorakit.core.validation import read_json
    from lorakit.finetune.checkpoints import load_checkpoint
    from lorakit.finetune.errors import FinetuneError

    file = tmp_path / "trainer_state.json"
    file.write_text('{"step": 1, "step": 2}')
    with pytest.raises(AdapterError, match="given twice"):
        read_json(file)
    file.write_text('{"step": NaN}')
    with pytest.raises(FinetuneError, match="trainer_state.json.*NaN"):
        read_json(file, FinetuneError)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FinetuneError, match="NaN"):
        load_checkpoint(None, None, tmp_path)
