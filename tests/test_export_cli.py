"""``lorakit export``: a native checkpoint written in every
registered format, for every recipe, read back by the format's own client."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_finetune import tiny  # noqa: F401 (the tiny BERT + data fixture, by name)
from test_peft_export import RECIPES, TOL
from transformers import LlamaConfig, LlamaModel

from lorakit.core import Adapter, CheckpointError, checkpoint, registry
from lorakit.core.cli import main
from lorakit.transformers import export_peft


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


# -- the model the adapter was trained on, rebuilt from --base alone -------------------------
def tiny_causal_lm():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_model().config).eval()


def peft_folder(folder):
    """(tensors, adapter_config.json) of a PEFT folder."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    return load_file(str(folder / "adapter_model.safetensors")), config


@pytest.mark.parametrize("recipe, fold", [("lora", False), ("dora", False), ("dora", True), ("delora", False)])
def test_cli_export_of_a_causal_lm_equals_export_peft_and_loads_in_peft(tmp_path, recipe, fold):
    """A LlamaForCausalLM checkpoint: the CLI rebuilds LlamaForCausalLM from --base alone (the
    checkpoint records it), so the file equals export_peft on the training model, byte for byte,
    and PEFT on AutoModelForCausalLM gives lorakit's logits."""
    from transformers import AutoModelForCausalLM

    base = tiny_causal_lm()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=2).apply(model)
    perturb(model)
    checkpoint.save(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["architecture"] == {
        "library": "transformers", "class": "LlamaForCausalLM"}
    assert main(["export", str(tmp_path / "ckpt"), "--format", "peft", "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "cli"), *(["--fold-magnitude"] if fold else [])]) == 0
    export_peft(model.eval(), tmp_path / "direct", fold_magnitude=fold, base_model_name_or_path=str(tmp_path / "base"))
    (cli, cli_config), (direct, direct_config) = peft_folder(tmp_path / "cli"), peft_folder(tmp_path / "direct")
    assert sorted(cli) == sorted(direct) and all(k.startswith("base_model.model.model.layers.") for k in cli)
    assert all(torch.equal(cli[k], direct[k]) and cli[k].dtype == direct[k].dtype for k in cli)
    assert cli_config == direct_config and cli_config["use_dora"] == (recipe == "dora" and not fold)
    client = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       str(tmp_path / "cli")).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, plain = client(input_ids=ids).logits, model(input_ids=ids).logits, base(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 < (plain - want).abs().max()  # the adapter is served, not the base


def perturb(model):
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_checkpoint_without_architecture_says_so(tmp_path, capsys):
    """A checkpoint of an older lorakit (no architecture): today's AutoModel, and a mismatch says why."""
    base = tiny_causal_lm()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    Adapter.from_recipe("lora", rank=2).apply(model)
    checkpoint.save(model, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["architecture"]
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), "--format", "peft", "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error:")
    assert "saved from a LlamaForCausalLM by an older lorakit that records no architecture" in err[0]
    assert "LlamaModel" in err[0] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [[], {"library": "transformers"}, {"library": "os.path", "class": "x"}])
def test_bad_architecture_field_is_refused(tmp_path, value):
    model = Adapter(rank=2).apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), targets=["0"])
    checkpoint.save(model, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architecture": value}))
    with pytest.raises(CheckpointError, match="architecture must be"):
        checkpoint.read_config(tmp_path / "ckpt")


def test_unknown_architecture_class_is_named(tmp_path, capsys):
    base_dir, ckpt, _, _ = saved(tmp_path, "lora")
    config_file = ckpt / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architecture": {"library": "transformers", "class": "NoSuchModel"}}))
    assert main(["export", str(ckpt), "--format", "peft", "--base", str(base_dir), "--out", str(tmp_path / "o")]) == 2
    assert "trained on transformers.NoSuchModel, which transformers" in capsys.readouterr().err


# -- a lorakit finetune run: --base from its summary.json, the head as PEFT users add it ------
def test_finetune_run_exports_like_its_own_peft_folder(tiny, tmp_path, capsys):  # noqa: F811
    from test_finetune import _args

    run = tmp_path / "run"
    assert main(_args(tiny, run, steps=2)) == 0
    for source in (run, next((run / "checkpoints").glob("step-*"))):  # the run folder, a step folder
        out = tmp_path / f"export-{source.name}"
        assert main(["export", str(source), "--format", "peft", "--out", str(out)]) == 0  # no --base
        (cli, cli_config), (own, own_config) = peft_folder(out), peft_folder(run / "peft")
        assert sorted(cli) == sorted(own) and "base_model.model.head.weight" in cli
        assert all(torch.equal(cli[k], own[k]) for k in cli) and cli_config == own_config
    assert cli_config["modules_to_save"] == ["head"]
    (run / "summary.json").unlink()  # a run stopped before its summary: the checkpoint's trainer state says
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "no-summary")]) == 0
    capsys.readouterr()
    assert main(["export", str(run / "checkpoints" / "nope"), "--format", "peft", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "plain").mkdir()
    _, ckpt, _, _ = saved(tmp_path / "plain", "lora")  # a checkpoint of no run: --base is needed
    assert main(["export", str(ckpt), "--format", "peft", "--out", str(tmp_path / "x")]) == 2
    assert "--base: required" in capsys.readouterr().err


# -- kohya from the command line ------------------------------------------------------------
def test_kohya_cli_plain_lora_needs_no_fold_flag_and_bert_is_named(tmp_path, capsys):
    """A plain LoRA UNet exports with `--format kohya` (nothing to fold) and diffusers'
    reader gives lorakit's output; a transformers checkpoint is told what kohya holds."""
    from test_diffusers import run as run_unet
    from test_diffusers import sd_components, sd_pipeline, tiny_unet, train, unet_inputs

    base = tiny_unet()
    base.save_pretrained(tmp_path / "unet")
    unet = copy.deepcopy(base)
    Adapter.from_recipe("lora", rank=2).apply(unet)
    inputs = unet_inputs()
    train(unet, inputs)
    checkpoint.save(unet, tmp_path / "ckpt")
    out = tmp_path / "k.safetensors"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "kohya", "--base", str(tmp_path / "unet"),
                 "--out", str(out)]) == 0
    pipe = sd_pipeline(copy.deepcopy(base), sd_components())
    pipe.load_lora_weights(str(out))
    assert (run_unet(pipe.unet, inputs) - run_unet(unet, inputs)).abs().max() <= TOL
    base_dir, ckpt, _, _ = saved(tmp_path, "lora")
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "kohya", "--base", str(base_dir), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kohya format holds a Stable Diffusion UNet" in err[0] and "CLIP text encoders" in err[0]
    assert "fold_magnitude" not in err[0]


# -- --out checked before anything is loaded, creating nothing --------------------------------
@pytest.mark.parametrize("where, message", [
    ("file", "is a file, not a folder"),
    ("below-file", "which is a file"),
    ("folder-for-file", "is a folder, not a file"),
    ("unwritable", "cannot write in /sys"),
    ("checkpoint", "is the checkpoint folder"),
])
def test_export_bad_out_is_refused_before_loading(tmp_path, capsys, monkeypatch, where, message):
    from lorakit.core.cli import output_problem
    from lorakit.transformers import export_cli

    base_dir, ckpt, _, _ = saved(tmp_path, "lora")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "d.safetensors").mkdir()
    out = {"file": tmp_path / "a-file", "below-file": tmp_path / "a-file" / "sub" / "o",
           "folder-for-file": tmp_path / "d.safetensors", "unwritable": Path("/sys/lorakit-export-test"),
           "checkpoint": ckpt}[where]
    if where == "unwritable" and output_problem(out) is None:
        pytest.skip("/sys is writable here")
    monkeypatch.setattr(export_cli, "load_base", lambda *a: pytest.fail("the base was loaded before --out was checked"))
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    fmt = "kohya" if where == "folder-for-file" else "peft"
    assert main(["export", str(ckpt), "--format", fmt, "--base", str(base_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lorakit: error: --out {out}: ") and message in err[0], err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, nothing changed


# -- a refused run leaves no empty --out folder ------------------------------------------------
@pytest.mark.parametrize("extra", [["--recipe", "nosuch"], ["--data", "missing.csv"], ["--targets", "nosuch"],
                                   ["--model", "missing-model"], ["--lr", "-1"]],
                         ids=["recipe", "data", "targets", "model", "lr"])
def test_a_refused_finetune_leaves_no_out_folder(tiny, tmp_path, capsys, extra):  # noqa: F811
    from test_finetune import _args

    argv = _args(tiny, tmp_path / "a" / "run")
    for flag in extra[::2]:  # the case's value replaces the default one
        if flag in argv:
            del argv[argv.index(flag):argv.index(flag) + 2]
    capsys.readouterr()
    assert main(argv + [str(tmp_path / v) if v.startswith("missing") else v for v in extra]) == 2
    assert capsys.readouterr().err.startswith("lorakit: error:")
    assert not (tmp_path / "a").exists()


def test_resume_with_another_recipe_names_it(tiny, tmp_path, capsys):  # noqa: F811
    from test_finetune import _args

    assert main(_args(tiny, tmp_path / "run", steps=2)) == 0
    capsys.readouterr()
    assert main(_args(tiny, tmp_path / "again", "--recipe", "dora", "--resume", str(tmp_path / "run"), steps=4)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint was trained with recipe lora, magnitude None" in err[0], err
    assert "this run has recipe dora, magnitude dora" in err[0] and "parameter groups" not in err[0]


# -- PEFT's DeLoRA from the command line -----------------------------------------------------
@pytest.mark.parametrize("recipe", ["delora", "delora+init=kaiming"])
def test_export_delora_format_loads_in_peft_with_lorakits_outputs(tmp_path, capsys, recipe):
    """`--format delora`: PEFT's own DeLoRA tuner reads the file (rewritten exactly for the
    recipe's residual, as is for PEFT's own B0 = 0 form) and gives lorakit's outputs."""
    name, _, init = recipe.partition("+init=")
    if init:
        base = tiny_llama_model()
        base.save_pretrained(tmp_path / "base")
        model = copy.deepcopy(base)
        Adapter(normalizer="delora", init=init, rank=2).apply(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        checkpoint.save(model, tmp_path / "ckpt")
        base_dir, ckpt, model = tmp_path / "base", tmp_path / "ckpt", model.eval()
    else:
        base_dir, ckpt, base, model = saved(tmp_path, name)
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--format", "delora", "--base", str(base_dir), "--out", str(out)]) == 0
    assert "(delora)" in capsys.readouterr().out
    client = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert client.peft_config["default"].peft_type.value == "DELORA"
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (client(input_ids=ids).last_hidden_state - model(input_ids=ids).last_hidden_state).abs().max()
    assert diff <= TOL


@pytest.mark.parametrize("recipe, extra, message", [
    ("delora", ["--max-rank", "1"], "--format delora writes the update exactly"),
    ("delora", ["--fold-magnitude"], "--format delora writes the update exactly"),
    ("lora", [], "delora"),  # another normalizer: refused, naming the module and the way out
])
def test_export_delora_format_refusals(tmp_path, capsys, recipe, extra, message):
    base_dir, ckpt, _, _ = saved(tmp_path, recipe)
    capsys.readouterr()
    argv = ["export", str(ckpt), "--format", "delora", "--base", str(base_dir), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error:") and message in err[0], err
    assert not (tmp_path / "o").exists()
