"""Every bad input of docs/bad-inputs.md: a clear lorakit error, and the model unchanged.

Each row of ``CASES`` is one row of the table in docs/bad-inputs.md (checked below).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from lorakit.core import (
    Adapter,
    AdapterError,
    CheckpointError,
    MergeError,
    adapted_layers,
    export_factors,
    load,
    merge,
    save,
    set_enabled,
)

DOC = Path(__file__).parents[1] / "docs" / "bad-inputs.md"


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def snapshot(m):
    return [(n, type(mod).__name__) for n, mod in m.named_modules()], {
        k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()]


def saved(tmp_path, **kw):
    m = Adapter(rank=2, **kw).apply(model(), targets=["0", "2"])
    save(m, tmp_path)
    return tmp_path


def edit_config(path, change):
    cfg = json.loads((path / "adapter_config.json").read_text())
    change(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _nan(m):
    with torch.no_grad():
        next(p for p in m.parameters() if p.requires_grad).fill_(float("nan"))
    merge(m)


def _disabled_export(m):
    set_enabled(m, False)
    export_factors(m)


def _shape(tmp):
    big = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    save(Adapter(rank=2).apply(big, targets=["0", "2"]), tmp)
    return tmp


# id, what, action(model, tmp_path), error type, message fragment
CASES = [
    ("rank-too-large", "rank > min(in, out)", lambda m, t: Adapter(rank=5).apply(m, targets=["2"]),
     AdapterError, r"module '2' \(4x8\): rank 5 exceeds"),
    ("rank-zero", "rank < 1", lambda m, t: Adapter(rank=0), AdapterError, "rank must be an integer >= 1"),
    ("rank-not-int", "rank not an integer", lambda m, t: Adapter(rank=2.5), AdapterError, "integer"),
    ("unknown-recipe", "unknown recipe", lambda m, t: Adapter.from_recipe("lorra"), AdapterError,
     "unknown recipe 'lorra'; registered recipes: .*lora"),
    ("unknown-primitive", "unknown primitive", lambda m, t: Adapter(generator="mpl"), AdapterError,
     "unknown generator 'mpl'"),
    ("bad-primitive-args", "primitive with unknown arguments", lambda m, t: Adapter(normalizer={
        "name": "scale", "args": {"alpah": 2}}), AdapterError, "normalizer 'scale': bad arguments"),
    ("unknown-target", "targets that match nothing", lambda m, t: Adapter().apply(m, targets=["q_proj"]),
     AdapterError, "match no module of Sequential"),
    ("partly-unknown-target", "a target list where one name matches nothing",
     lambda m, t: Adapter().apply(m, targets=["0", "q_proj"]), AdapterError, r"targets \['q_proj'\] match no module"),
    ("unsupported-module", "a target that is not a supported layer",
     lambda m, t: Adapter(rank=1).apply(m, targets=["1"]), AdapterError, "module '1' is a ReLU"),
    ("apply-twice", "applying an adapter twice",
     lambda m, t: Adapter(rank=1).apply(Adapter(rank=1).apply(m, targets=["0"]), targets=["2"]),
     AdapterError, "already has a lorakit adapter"),
    ("bad-dtype", "a non-floating adapter dtype", lambda m, t: Adapter(dtype=torch.int8), AdapterError,
     "floating torch dtype"),
    ("meta-device", "base weights on the meta device",
     lambda m, t: Adapter(rank=1).apply(m.to("meta"), targets=["0"]), AdapterError, "meta device"),
    ("ckpt-wrong-shape", "checkpoint made for other shapes", lambda m, t: load(m, _shape(t)), CheckpointError,
     r"0.base|has shape|cannot build"),
    ("ckpt-other-recipe", "checkpoint of another recipe into an adapted model",
     lambda m, t: load(Adapter.from_recipe("rslora", rank=2).apply(m, targets=["0", "2"]), saved(t)),
     CheckpointError, r"differs from the model's in \['normalizer', 'recipe'\]"),
    ("ckpt-missing", "checkpoint folder without config", lambda m, t: load(m, t), CheckpointError,
     "not found"),
    ("ckpt-truncated", "truncated safetensors", lambda m, t: load(m, _truncate(saved(t))), CheckpointError,
     "truncated or corrupt"),
    ("ckpt-garbage", "corrupt safetensors (random bytes)", lambda m, t: load(m, _garbage(saved(t))),
     CheckpointError, "truncated or corrupt"),
    ("ckpt-bad-json", "config that is not JSON", lambda m, t: load(m, _write(saved(t), "{oops")),
     CheckpointError, "not valid JSON"),
    ("ckpt-unregistered", "config naming an unregistered primitive", lambda m, t: load(m, edit_config(
        saved(t), lambda c: c["adapter"]["generator"].update(name="evil.module:Class"))), CheckpointError,
     "unknown generator 'evil.module:Class'"),
    ("ckpt-extra-field", "config with an extra field", lambda m, t: load(m, edit_config(
        saved(t), lambda c: c.update(exec="rm -rf /"))), CheckpointError, r"unknown fields \['exec'\]"),
    ("ckpt-malformed-field", "config with a malformed field", lambda m, t: load(m, edit_config(
        saved(t), lambda c: c["adapter"].update(rank="8"))), CheckpointError, "adapter.rank must be"),
    ("ckpt-extra-tensor", "safetensors with an unexpected tensor", lambda m, t: load(m, _extra_tensor(saved(t))),
     CheckpointError, "unexpected"),
    ("ckpt-dtype", "checkpoint dtype differs from the model's adapter dtype",
     lambda m, t: load(Adapter(rank=2).apply(m, targets=["0", "2"]), saved(t, dtype=torch.float64)),
     CheckpointError, r"differs from the model's in \['dtype'\]"),
    ("merge-nonfinite", "non-finite adapter values at merge",
     lambda m, t: _nan(Adapter(rank=2).apply(m, targets=["0"])), MergeError, "merge refused"),
    ("export-disabled", "exporting a disabled adapter",
     lambda m, t: _disabled_export(Adapter(rank=2).apply(m, targets=["0"])), AdapterError, "is disabled"),
    ("save-no-adapter", "saving a model without adapter", lambda m, t: save(m, t), AdapterError,
     "has no lorakit adapter"),
]


def _write(path, text):
    (path / "adapter_config.json").write_text(text)
    return path


def _truncate(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    return path


def _garbage(path):
    (path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 3)
    return path


def _extra_tensor(path):
    from safetensors.torch import load_file

    tensors = load_file(path / "adapter_model.safetensors")
    tensors["0.slots.payload"] = torch.zeros(3)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_leaves_model_unchanged(case, tmp_path):
    _, _, action, error, fragment = case
    m = model()
    before = snapshot(m)
    with pytest.raises(error, match=fragment):
        action(m, tmp_path)
    if m.state_dict() and next(iter(m.state_dict().values())).is_meta:
        return  # the meta case moved the model itself before calling lorakit
    after = snapshot(m)
    if not adapted_layers(m):  # cases that apply an adapter on purpose first are excluded
        assert before[0] == after[0] and before[2] == after[2]
        assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_every_case_is_in_the_docs_table():
    text = DOC.read_text()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    assert rows == {c[0] for c in CASES}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@st.composite
def configs(draw):
    """Random JSON, and mutations of a valid config, so the fuzz reaches deep checks."""
    valid = {"format": "lorakit", "format_version": 1, "adapter": {
        "generator": {"name": "direct", "args": {}}, "normalizer": {"name": "scale", "args": {}},
        "init": {"name": "kaiming", "args": {}}, "magnitude": None, "rank": 2, "rank_pattern": {},
        "seed": 0, "dtype": None, "recipe": "lora"}, "modules": {"0": {"shape": [8, 6], "rank": 2}}}
    if draw(st.booleans()):
        return draw(json_values)
    section = draw(st.sampled_from(["top", "adapter", "generator", "modules"]))
    target = {"top": valid, "adapter": valid["adapter"], "generator": valid["adapter"]["generator"],
              "modules": valid["modules"]["0"]}[section]
    target[draw(st.sampled_from(sorted(target) + ["extra"]))] = draw(json_values)
    return valid


@given(config=configs())
@settings(max_examples=150, deadline=None)
def test_fuzzed_config_gives_only_documented_errors(config, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    m = Adapter(rank=2).apply(model(), targets=["0"])
    save(m, path)
    (path / "adapter_config.json").write_text(json.dumps(config))
    fresh = model()
    try:
        load(fresh, path)
    except AdapterError:  # CheckpointError is one
        assert not adapted_layers(fresh)
