"""The Adapter's fields are declared once (``lorakit.core.schema``): the constructor's checks,
``config()``/``from_config()``, checkpoint validation and the CLI flags all come from them."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, AdapterError, CheckpointError, load, save, schema
from lorakit.core.schema import REQUIRED, AdapterField, adapter_field
from lorakit.core.validation import check_probability


def test_every_field_is_declared_with_its_contract():
    declared = schema.fields_of(Adapter)
    assert list(declared) == [f.name for f in dataclasses.fields(Adapter)]
    assert list(Adapter().config()) == list(declared)
    # what a checkpoint of the first format holds, and what was added later with its default
    assert {n for n, s in declared.items() if s.file_default is REQUIRED} == {
        "generator", "normalizer", "init", "magnitude", "rank", "rank_pattern", "seed", "dtype", "recipe"}
    assert set(schema.cli_fields(Adapter)) == {"rank", "seed", "dropout"}


def test_config_round_trips_through_json():
    adapter = Adapter(generator="mlp", normalizer="delora", init="ldu", magnitude="dora", rank=4,
                      rank_pattern={"q": 2}, seed=7, dtype=torch.float64, recipe=None, dropout=0.1,
                      exclude=["k"], layers=range(3), bias="all", modules_to_save=["head"])
    config = json.loads(json.dumps(adapter.config()))
    assert config["layers"] == [0, 1, 2] and config["dtype"] == "float64"
    assert Adapter.from_config(config).config() == config
    # the model's description carries more keys (where it applies): not fields, left out
    assert Adapter.from_config({**config, "targets": ["q"]}).config() == config


@pytest.mark.parametrize("field,value,message", [
    ("rank", 0, r"adapter.rank must be an integer >= 1"),
    ("rank_pattern", {"q": 0}, r"adapter.rank_pattern\['q'\] must be an integer >= 1"),
    ("seed", -1, r"adapter.seed=-1: must be an integer >= 0"),
    ("dropout", 1.5, r"adapter.dropout=1.5: must be in \[0, 1\)"),
    ("bias", "some", r"adapter.bias='some': must be one of"),
    ("layers", "3", r"adapter.layers='3': give block indices"),
    ("recipe", 3, r"adapter.recipe must be a string or null"),
])
def test_the_constructor_and_a_checkpoint_refuse_a_field_with_one_message(tmp_path, field, value, message):
    with pytest.raises(AdapterError, match=message):
        Adapter(**{field: value})
    model = Adapter(rank=2).apply(nn.Sequential(nn.Linear(4, 4)), targets=["0"])
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["adapter"][field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load(nn.Sequential(nn.Linear(4, 4)), tmp_path)


@dataclasses.dataclass
class WithAlpha(Adapter):
    """What adding a field takes: one declaration (check, file default, flag, help)."""

    alpha_share: float = adapter_field(AdapterField(check_probability, file_default=0.25, flag="--alpha-share",
                                                    type=float, help="a test field"), default=0.25)


def test_adding_a_field_is_one_declaration():
    adapter = WithAlpha(alpha_share=0.5)
    assert adapter.config()["alpha_share"] == 0.5
    assert WithAlpha.from_config(adapter.config()).alpha_share == 0.5
    with pytest.raises(AdapterError, match="adapter.alpha_share=2: must be in"):
        WithAlpha(alpha_share=2)
    file = {k: v for k, v in adapter.config().items() if k != "alpha_share"}  # an older file
    assert schema.file_problem(WithAlpha, file) is None
    assert "alpha_share" in schema.file_problem(WithAlpha, {**file, "alpha_share": 3})
    assert "got" in schema.file_problem(WithAlpha, {**file, "unknown": 1})
    parser = argparse.ArgumentParser()
    schema.add_cli_arguments(parser, WithAlpha)
    args = parser.parse_args(["--alpha-share", "0.125", "--rank", "4"])
    assert (args.alpha_share, args.rank, args.seed, args.dropout) == (0.125, 4, 0, 0.0)


# -- the adapter's record: immutable, shared by the layers, with integrations' extensions ---------------
def test_the_record_is_immutable_and_extensions_are_namespaced(tmp_path):
    import copy

    from lorakit.core import adapted_layers, adapter_config, extension, freeze_generators, set_extension

    model = Adapter(generator="mlp", rank=2).apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                                                   targets=["0", "1"])
    config = adapter_config(model)
    config["rank"] = 99  # a copy: changing it changes nothing
    config["generator"]["name"] = "nope"
    assert adapter_config(model)["rank"] == 2 and adapter_config(model)["generator"]["name"] == "mlp"
    with pytest.raises(TypeError):
        adapted_layers(model)["0"].adapter_config["rank"] = 3  # the record itself is read-only
    set_extension(model, "my-integration", {"note": [1, 2]})
    set_extension(model, "other", 1)
    assert extension(model, "my-integration") == {"note": [1, 2]} and extension(model, "absent") is None
    assert adapter_config(model)["extensions"] == {"my-integration": {"note": [1, 2]}, "other": 1}
    records = {id(layer.adapter_config) for layer in adapted_layers(model).values()}
    assert len(records) == 1  # replaced as a whole, on every layer
    freeze_generators(model)
    assert adapter_config(model)["generator"]["name"] == "direct" and extension(model, "other") == 1
    clone = copy.deepcopy(model)
    assert adapter_config(clone) == adapter_config(model)
    set_extension(model, "other", None)
    assert "other" not in adapter_config(model)["extensions"] and extension(clone, "other") == 1
    save(model, tmp_path)  # core carries extensions but never interprets or saves them
    assert "extensions" not in json.loads((tmp_path / "adapter_config.json").read_text())["adapter"]
    with pytest.raises(AdapterError, match="namespace"):
        set_extension(model, "", 1)


def test_finetune_sets_every_adapter_field_that_has_a_flag():
    """``lorakit finetune``'s adapter flags are the declared ones; its run config carries each."""
    from lorakit.finetune.cli import configure_finetune
    from lorakit.finetune.train import FinetuneConfig

    parser = argparse.ArgumentParser()
    configure_finetune(parser)
    options = {o for a in parser._actions for o in a.option_strings}
    for name, spec in schema.cli_fields(Adapter).items():
        assert spec.flag in options and name in FinetuneConfig.__dataclass_fields__, name
