"""``lorakit export`` (issue 15, item 5): a native checkpoint written in every
registered format, for every recipe, read back by the format's own client."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from test_peft_export import RECIPES, TOL
from transformers import LlamaConfig, LlamaModel

from lorakit.core import Adapter, checkpoint, registry
from lorakit.core.cli import main


def tiny_llama_model():
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)).eval()


def saved(tmp_path, recipe):
    """(base folder, checkpoint folder, adapted model) with a perturbed adapter."""
    base = tiny_llama_model()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=2).apply(model)
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    checkpoint.save(model, tmp_path / "ckpt")
    return tmp_path / "base", tmp_path / "ckpt", base, model.eval()


def test_export_command_is_registered():
    assert {"peft", "diffusers", "kohya"} <= set(registry.load().exporters)


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_peft_from_a_checkpoint(tmp_path, capsys, recipe):
    base_dir, ckpt, base, model = saved(tmp_path, recipe)
    dora = registry.load().recipes[recipe].magnitude is not None
    argv = ["export", str(ckpt), "--format", "peft", "--base", str(base_dir), "--out", str(tmp_path / "out")]
    assert main(argv + (["--fold-magnitude"] if dora else [])) == 0
    assert "wrote" in capsys.readouterr().out
    client = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    assert client.peft_config["default"].use_dora is False
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (client(input_ids=ids).last_hidden_state - model(input_ids=ids).last_hidden_state).abs().max() <= TOL


def test_export_max_rank_from_a_checkpoint(tmp_path):
    base_dir, ckpt, base, _ = saved(tmp_path, "delora")
    assert main(["export", str(ckpt), "--format", "peft", "--base", str(base_dir), "--out", str(tmp_path / "o"),
                 "--max-rank", "1"]) == 0
    client = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "o"))
    assert client.peft_config["default"].r == 1


@pytest.mark.parametrize("extra, message", [
    (["--format", "nope"], "not a registered exporter"),
    (["--format", "peft", "--max-rank", "0"], "--max-rank"),
    (["--format", "peft", "--max-rank", "many"], "--max-rank"),
    (["--format", "peft", "--max-rank", "auto", "--energy", "2"], "--energy"),
])
def test_export_bad_arguments(tmp_path, capsys, extra, message):
    base_dir, ckpt, _, _ = saved(tmp_path, "lora")
    capsys.readouterr()  # only what the command prints
    assert main(["export", str(ckpt), "--base", str(base_dir), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error:") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_export_bad_paths(tmp_path, capsys):
    base_dir, ckpt, _, _ = saved(tmp_path, "lora")
    assert main(["export", str(tmp_path / "missing"), "--format", "peft", "--base", str(base_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "peft", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--base" in capsys.readouterr().err
