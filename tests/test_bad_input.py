"""Every bad input of docs/bad-inputs.md: a clear lorakit error, and the model unchanged.

Each row of ``CASES`` is one row of the table in docs/bad-inputs.md (checked below).
"""

import json
import os
import re
import time
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
    # hostile or odd input; tests/test_hostile_input.py covers the variants
    ("bad-regex", "targets that are not a valid regex", lambda m, t: Adapter().apply(m, targets="(0|2"),
     AdapterError, r"targets '\(0\|2' is not a valid regex"),
    ("catastrophic-regex", "a rank_pattern that backtracks catastrophically",
     lambda m, t: Adapter(rank_pattern={"(.*)*y": 2}), AdapterError, re.escape("adapter.rank_pattern['(.*)*y']")),
    ("bad-seed", "seed negative, a bool, a float, a string or above 2**63 - 1", lambda m, t: Adapter(seed=-1),
     AdapterError, "adapter.seed=-1: must be an integer >= 0"),
    ("alpha-nan", "a NaN or infinite alpha", lambda m, t: Adapter(normalizer={
        "name": "scale", "args": {"alpha": float("nan")}}), AdapterError, "Scale.alpha=nan: must be a finite number"),
    ("mlp-huge-width", "a generator width of 2**31 (terabytes)", lambda m, t: Adapter(generator={
        "name": "mlp", "args": {"width": 2**31}}), AdapterError, r"MLP\(width=2147483648\): width must be"),
    ("export-nonfinite", "exporting a non-finite adapter", lambda m, t: export_factors(_nan_slots(
        Adapter(rank=2).apply(m, targets=["0"]))), AdapterError, "export refused: 0.slots.A has non-finite values"),
    ("ckpt-catastrophic-regex", "config whose rank_pattern backtracks catastrophically", lambda m, t: load(
        m, edit_config(saved(t), lambda c: c["adapter"].update(rank_pattern={"(.*)*y": 1}))), CheckpointError,
     re.escape("adapter.rank_pattern['(.*)*y']")),
    ("ckpt-nan", "config with a NaN or Infinity literal", lambda m, t: load(m, _literal(
        saved(t), "normalizer", "alpha", "NaN")), CheckpointError, "adapter.normalizer.args.alpha is NaN"),
    ("ckpt-huge-int", "config with a 5000-digit integer", lambda m, t: load(m, _literal(
        saved(t), "init", "a", "9" * 5000)), CheckpointError, "adapter.init.args.a is an integer of 5000 digits"),
    ("ckpt-huge-width", "config asking for an MLP of width 2**31", lambda m, t: load(m, edit_config(
        saved(t), lambda c: c["adapter"].update(generator={"name": "mlp", "args": {"width": 2**31}}))),
     CheckpointError, r"cannot build the saved adapter: MLP\(width=2147483648\)"),
    ("ckpt-fifo", "a FIFO named adapter_config.json", lambda m, t: load(m, _fifo(saved(t))), CheckpointError,
     "adapter_config.json is not a regular file"),
    ("ckpt-symlink-loop", "adapter_config.json is a symlink loop", lambda m, t: load(m, _loop(saved(t))),
     CheckpointError, "adapter_config.json cannot be read"),
    ("ckpt-folder-for-file", "a folder where adapter_config.json belongs", lambda m, t: load(m, _folder(saved(t))),
     CheckpointError, "adapter_config.json is a folder"),
    ("ckpt-path-is-file", "a checkpoint path that is a file", lambda m, t: load(m, _file(t)), CheckpointError,
     "is not a folder; give the checkpoint folder"),
    ("ckpt-nan-tensor", "safetensors holding NaN or inf", lambda m, t: load(m, _nan_tensor(saved(t))),
     CheckpointError, "adapter_model.safetensors: 0.slots.A has non-finite values"),
    ("ckpt-module-shape", "config whose modules[*].shape is not the model's", lambda m, t: load(m, edit_config(
        saved(t), lambda c: c["modules"]["0"].update(shape=[8, 7]))), CheckpointError,
     re.escape("modules['0'] has shape [8, 7] in the checkpoint but [8, 6] in the model")),
    ("ckpt-module-rank", "config whose modules[*].rank is not the adapter's", lambda m, t: load(m, edit_config(
        saved(t), lambda c: c["modules"]["2"].update(rank=3))), CheckpointError,
     re.escape("modules['2'].rank is 3 in the checkpoint but 2 in the model")),
    ("all-linear-none", "targets='all-linear' on a model with no linear layer",
     lambda m, t: Adapter(rank=1).apply(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), targets="all-linear"),
     AdapterError, "targets='all-linear': Sequential has no linear layer outside its output head"),
    ("quantized-plugin-not-loaded", "a bitsandbytes layer with lorakit-bitsandbytes installed but left out by "
     "LORAKIT_LOAD_PLUGINS", lambda m, t: _plugin_left_out(), AdapterError,
     "lorakit-bitsandbytes is installed but its plugin 'bitsandbytes' is not loaded"),
    ("ldu-rank-deficient", "LoLDU at a rank above the weight's numerical rank",
     lambda m, t: Adapter.from_recipe("loldu", rank=2).apply(_rank_one(), targets=["0"]), AdapterError,
     r"module '0'.*numerical rank 1 < rank 2.*use rank <= 1"),
]


def _rank_one():
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 9.0)))
    return nn.Sequential(layer)


def _plugin_left_out():
    """What ``LORAKIT_LOAD_PLUGINS=core,generators`` gives: the plugin's layer kinds absent."""
    pytest.importorskip("bitsandbytes")
    from lorakit.bitsandbytes import quantize
    from lorakit.core.plugins import registry

    layers, plugins, env = dict(registry.load().layers), dict(registry.plugins), os.environ.get("LORAKIT_LOAD_PLUGINS")
    try:
        registry.layers = {t: k for t, k in layers.items() if not getattr(k, "quantized", False)}
        registry.plugins.pop("bitsandbytes", None)
        os.environ["LORAKIT_LOAD_PLUGINS"] = "core,generators"
        Adapter(rank=1).apply(quantize(nn.Sequential(nn.Linear(8, 8)), "nf4", skip=()), targets=["0"])
    finally:
        registry.layers, registry.plugins = layers, plugins
        os.environ.pop("LORAKIT_LOAD_PLUGINS") if env is None else os.environ.update(LORAKIT_LOAD_PLUGINS=env)


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


def _nan_tensor(path):
    from safetensors.torch import load_file

    tensors = load_file(path / "adapter_model.safetensors")
    tensors["0.slots.A"][0, 0] = float("inf")
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def test_a_rank_pattern_matching_no_saved_module_warns(tmp_path):
    m = Adapter(rank=2, rank_pattern={"2": 3}).apply(model(), targets=["0", "2"])
    save(m, tmp_path)
    edit_config(tmp_path, lambda c: c["adapter"]["rank_pattern"].update({"q_proj": 4}))
    with pytest.warns(UserWarning, match=re.escape("adapter.rank_pattern['q_proj'] matches no saved module")):
        loaded = load(model(), tmp_path)
    assert adapted_layers(loaded)["2"].rank == 3 and adapted_layers(loaded)["0"].rank == 2


def _nan_slots(m):
    with torch.no_grad():
        adapted_layers(m)["0"].slots.A.fill_(float("nan"))
    return m


def _literal(path, section, arg, literal):
    """Set ``adapter.<section>.args.<arg>`` to a raw JSON literal json.dumps would not write."""
    edit_config(path, lambda c: c["adapter"][section]["args"].update({arg: "__LITERAL__"}))
    config = path / "adapter_config.json"
    config.write_text(config.read_text().replace('"__LITERAL__"', literal))
    return path


def _replace(path, make):
    config = path / "adapter_config.json"
    config.unlink()
    make(config)
    return path


def _fifo(path):
    return _replace(path, os.mkfifo)


def _loop(path):
    return _replace(path, lambda config: config.symlink_to(config))


def _folder(path):
    return _replace(path, lambda config: config.mkdir())


def _file(tmp):
    (tmp / "ckpt").write_text("{}")
    return tmp / "ckpt"


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
    # NaN/inf and integers past 2**64: json.dumps writes them, load must refuse them by name
    st.none() | st.booleans() | st.integers() | st.integers(-10**40, 10**40) | st.floats() | st.text(max_size=10),
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


HOSTILE_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-" + "9" * 5000, "[" * 60 + "]" * 60,
                    '{"a": 1, "a": 2}', '"' + "x" * 10_000 + '"']
REGEX_TOKENS = [".", "*", "+", "?", "(", ")", "|", "a", r"\d", "{2,}", "[", "]", r"\1"]


@given(config=configs(), literal=st.sampled_from(HOSTILE_LITERALS), where=st.integers(0, 10**6),
       pattern=st.lists(st.sampled_from(REGEX_TOKENS), max_size=12).map("".join))
@settings(max_examples=60, deadline=None)
def test_fuzzed_hostile_text_gives_only_documented_errors(config, literal, where, pattern, tmp_path_factory):
    """Raw JSON json.dumps would not write (NaN literals, 5000-digit integers, deep nesting,
    duplicate keys) at a random value of the config, and random regexes as rank_pattern
    keys: load raises only AdapterError subclasses, in bounded time."""
    path = tmp_path_factory.mktemp("hostile")
    save(Adapter(rank=2).apply(model(), targets=["0"]), path)
    if isinstance(config, dict) and isinstance(config.get("adapter"), dict):
        config["adapter"]["rank_pattern"] = {pattern: 1}
    text = json.dumps(config)
    values = [m.start() for m in re.finditer(r"(?<=: )[-0-9ntf\"\[{]", text)] or [0]
    at = values[where % len(values)]  # replace the value starting there with the literal
    end = json.JSONDecoder().raw_decode(text, at)[1] if text[at:at + 1] not in ("", ",", "}") else at
    (path / "adapter_config.json").write_text(text[:at] + literal + text[end:])
    fresh = model()
    start = time.perf_counter()
    try:
        load(fresh, path)
    except AdapterError:
        assert not adapted_layers(fresh)
    assert time.perf_counter() - start < 5
