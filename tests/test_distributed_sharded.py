"""FSDP2 over a torchao-NF4 base, and sharded checkpoints that lose nothing (docs/distributed.md).

gloo ranks on CPU (tests/distributed/worker_sharded.py) against one process here:

- ``fully_shard`` over a base whose linears hold ``NF4Tensor`` weights trains every recipe
  as one process does on the whole batch (≤ 1e-5 fp32), and never changes a byte of the
  NF4 shards; 2 ranks in CI, 4 marked slow;
- ``save_sharded``/``load_sharded`` (torch.distributed.checkpoint, atomic as a whole):
  every rank fills its local shards (adapter and AdamW state) with values of its own,
  saves, a zeroed model loads them: every element comes back, the next step is the same;
  the checkpoint loads into one process (2 → 1) and one process's into 2 ranks (1 → 2);
- a rank killed (SIGKILL) mid-save leaves the previous checkpoint loadable (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("torchao")

import lorakit.core as lk  # noqa: E402
from lorakit.core import atomic  # noqa: E402
from lorakit.core.distributed import adapter_state_dict, load_sharded, save_sharded  # noqa: E402

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import nf4  # noqa: E402
import worker_sharded  # noqa: E402

RECIPES = sorted(lk.registry.load().recipes)
# the primitives' plugins and the torchao kinds (not the other integrations: seconds of imports per rank)
PLUGINS = ",".join(sorted(name for name, info in lk.registry.plugins.items() if name in ("core", "torchao") or any(
    entry.split(" ", 1)[0] in ("generator", "normalizer", "initializer", "magnitude", "recipe")
    for entry in info.registered)))
TOL = {"rtol": 1e-5, "atol": 1e-6}
TIMEOUT = 300


def _launch(world: int, tmp: Path, args: list[str], expect_failure: bool = False) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONUNBUFFERED": "1", "LORAKIT_LOAD_PLUGINS": PLUGINS, "WORLD_SIZE": str(world),
           "LORAKIT_STORE": str(tmp / f"store-{args[0]}-{world}")}
    procs = [subprocess.Popen([sys.executable, str(HERE / "worker_sharded.py"), str(tmp), *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    if expect_failure:
        return procs
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs):
        pytest.fail("\n".join(f"--- rank {i} (exit {p.returncode}) ---\n{o[-5000:]}"
                              for i, (p, o) in enumerate(zip(procs, outputs))))
    return procs


def _parity(tmp: Path, world: int, recipes: list[str]) -> None:
    _launch(world, tmp, ["parity", *recipes])
    for recipe in recipes:
        name = f"parity-{recipe}"
        for r in range(world):
            if (error := tmp / f"{name}-rank{r}.error").exists():
                pytest.fail(f"{name} failed on rank {r}:\n{error.read_text()}")
        states = [load_file(str(tmp / f"{name}-rank{r}.safetensors")) for r in range(world)]
        metas = [json.loads((tmp / f"{name}-rank{r}.json").read_text()) for r in range(world)]
        assert metas[0]["weight"] == ["DTensor", "NF4Tensor", [nf4.WIDTH // world, nf4.WIDTH]]  # really sharded
        assert all(m["base_unchanged"] and m["base_bytes"] for m in metas), f"{name}: an NF4 shard changed"
        assert all(m["losses"] == metas[0]["losses"] for m in metas)
        assert all(torch.equal(s[k], states[0][k]) for s in states for k in states[0])
        model = nf4.build(recipe)
        losses = common.train(model, nf4.data())
        torch.testing.assert_close(torch.tensor(metas[0]["losses"]), torch.tensor(losses), **TOL)
        expected = {**adapter_state_dict(model), **worker_sharded.evaluate(model)}
        assert set(states[0]) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(states[0][key], value, **TOL,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
        start = adapter_state_dict(nf4.build(recipe))
        moved = [float((expected[k] - start[k]).abs().max()) for k, p in model.named_parameters() if p.requires_grad]
        assert min(moved) > 0 and max(moved) > 100 * TOL["atol"], moved


def test_fsdp2_over_an_nf4_base_matches_one_process(tmp_path):
    """Every recipe, 2 ranks: one world, ~15 s."""
    _parity(tmp_path, 2, RECIPES)


@pytest.mark.slow
def test_fsdp2_over_an_nf4_base_on_4_ranks(tmp_path):
    _parity(tmp_path, 4, RECIPES)


def _filled_single(recipe: str):
    """One process's model and AdamW state with values of its own, as the workers fill theirs."""
    model = nf4.build(recipe)
    opt = worker_sharded.optimizer(model)
    worker_sharded.step(model, opt, 0, 1)
    worker_sharded.fill_rank_specific(model, opt, 0)
    return model, opt


def _ckpt_run(tmp: Path, recipe: str) -> dict[str, torch.Tensor]:
    """One process's checkpoint (for 1 → 2), then the 2-rank ckpt run; returns the former's values."""
    model, opt = _filled_single(recipe)
    save_sharded(model, tmp / "single", opt)  # no process group: one process writes it all
    single_expected = worker_sharded.gathered(model, opt)
    _launch(2, tmp, ["ckpt", recipe])
    return single_expected


@pytest.fixture(scope="module")
def dora_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt-dora")
    return tmp, _ckpt_run(tmp, "dora")


@pytest.mark.parametrize("recipe", ["dora", pytest.param("op-lora", marks=pytest.mark.slow)])
def test_sharded_checkpoint_restores_every_element_at_any_world_size(tmp_path, recipe, request):
    if recipe == "dora":  # shared with the 2 → 4 and merge tests
        tmp_path, single_expected = request.getfixturevalue("dora_ckpt")
    else:
        single_expected = _ckpt_run(tmp_path, recipe)
    expected = load_file(str(tmp_path / "expected.safetensors"))
    assert any(k.startswith("opt.") for k in expected) and len(expected) > 10
    # each rank's own values are in the file (not one rank's copy): rank r's rows hold 1 + r + ...
    trainable = [n for n, p in nf4.build(recipe).named_parameters() if p.requires_grad and p.shape[0] > 1]
    assert trainable
    for name in trainable:
        half = (expected[name].shape[0] + 1) // 2
        assert 1 <= float(expected[name][:half].min()) and float(expected[name][:half].max()) < 2, name
        assert 2 <= float(expected[name][half:].min()) < 3, name
    for r in range(2):
        restored = load_file(str(tmp_path / f"restored-rank{r}.safetensors"))
        assert restored.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(restored[key], value), f"rank {r}: {key} not restored"
        from_single = load_file(str(tmp_path / f"from-single-rank{r}.safetensors"))
        for key, value in single_expected.items():  # 1 → 2
            assert torch.equal(from_single[key], value), f"1 -> 2, rank {r}: {key}"
    next_step, next_loaded = (load_file(str(tmp_path / f)) for f in ("next-step.safetensors",
                                                                      "next-step-loaded.safetensors"))
    assert all(torch.equal(next_step[k], next_loaded[k]) for k in next_step)
    # 2 → 1: the two ranks' checkpoint into one process's zeroed model
    plain = worker_sharded.zeroed(recipe)
    plain_opt = worker_sharded.optimizer(plain)
    load_sharded(plain, tmp_path / "sharded", plain_opt)
    for key, value in worker_sharded.gathered(plain, plain_opt).items():
        assert torch.equal(value, expected[key]), f"2 -> 1: {key}"


def test_sharded_checkpoint_resumes_at_4_ranks(dora_ckpt):
    """2 → 4: four ranks read the two ranks' checkpoint; each holds a quarter, every element is back."""
    tmp, _ = dora_ckpt
    _launch(4, tmp, ["load", "dora"])
    expected = load_file(str(tmp / "expected.safetensors"))
    for r in range(4):
        resized = load_file(str(tmp / f"resized-world4-rank{r}.safetensors"))
        assert resized.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(resized[key], value), f"2 -> 4, rank {r}: {key} not restored"
        meta = json.loads((tmp / f"resized-world4-rank{r}.json").read_text())
        assert meta["local_rows"] * 4 == meta["rows"], meta  # really sharded 4 ways


def test_sharded_merge_on_an_nf4_base_is_bit_identical(dora_ckpt):
    """The merge rank 0 wrote from the 2-rank FSDP2 model (gathered into a plain NF4 replica)
    equals, bit for bit, one process merging the same adapter values on the same NF4 base."""
    tmp, _ = dora_ckpt
    expected = load_file(str(tmp / "expected.safetensors"))
    model = nf4.build("dora")
    adapter = {k: v for k, v in expected.items() if not k.startswith("opt.")}
    assert set(adapter) == set(adapter_state_dict(model))
    model.load_state_dict(adapter, strict=False)
    single = lk.merge_and_unload(model).state_dict()
    merged = load_file(str(tmp / "merged.safetensors"))
    assert merged.keys() == single.keys()
    for key, value in single.items():
        assert torch.equal(merged[key], value), f"{key}: the sharded merge differs"
    assert merged["blocks.0.q.weight"].dtype == torch.float32  # dequantized, W̄ + ΔW


def test_save_full_from_fsdp2_writes_whole_tensors_and_save_refuses_shards(dora_ckpt):
    """What ``LorakitCallback`` calls on a sharded model: every rank gathers, rank 0 writes
    ``lorakit.core.save``'s files, whole; ``lorakit.core.save`` on one rank refuses its DTensor shards."""
    tmp, _ = dora_ckpt
    expected = load_file(str(tmp / "expected.safetensors"))
    saved = load_file(str(tmp / "full" / "adapter_model.safetensors"))
    assert saved.keys() == {k for k in expected if not k.startswith("opt.")}
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    loaded = lk.load(nf4.base_model(), tmp / "full")
    assert all(torch.equal(v, expected[k]) for k, v in adapter_state_dict(loaded).items())
    for r in range(2):
        assert "an FSDP2 DTensor shard, not the whole tensor" in (tmp / f"plain-save-rank{r}.txt").read_text()
        assert not (tmp / f"plain-rank{r}").exists()


def test_sharded_checkpoint_bad_input_is_one_clear_error(tmp_path):
    model, opt = _filled_single("lora")
    save_sharded(model, tmp_path / "ckpt")  # without the optimizer
    other = lk.Adapter.from_recipe("dora", rank=4, seed=7).apply(nf4.base_model(), targets=nf4.TARGETS)
    before = adapter_state_dict(other)
    with pytest.raises(lk.AdapterError, match="differs from the model's in .*magnitude"):
        load_sharded(other, tmp_path / "ckpt")
    narrower = lk.Adapter.from_recipe("lora", rank=4, seed=7).apply(nf4.base_model(), targets=["q"])
    with pytest.raises(lk.AdapterError, match="adapter tensors missing .*unexpected"):
        load_sharded(narrower, tmp_path / "ckpt")
    with pytest.raises(lk.AdapterError, match="holds no optimizer state"):
        load_sharded(nf4.build("lora"), tmp_path / "ckpt", worker_sharded.optimizer(nf4.build("lora")))
    with pytest.raises(lk.AdapterError, match="not a lorakit sharded checkpoint"):
        lk.save(model, tmp_path / "plain")
        load_sharded(nf4.build("lora"), tmp_path / "plain")
    after = adapter_state_dict(other)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed the model"


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    procs = _launch(2, tmp_path, ["kill", "dora"], expect_failure=True)
    deadline = time.time() + TIMEOUT
    while procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert procs[1].returncode == -9, procs[1].communicate()[0][-3000:]
    try:
        procs[0].wait(timeout=30)  # gloo sees the peer gone; else it would wait in the collective
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait()
    for p in procs:
        p.communicate()
    first = load_file(str(tmp_path / "kill-first.safetensors"))
    model = nf4.build("dora")
    opt = worker_sharded.optimizer(model)
    load_sharded(model, tmp_path / "kill", opt)
    for key, value in worker_sharded.gathered(model, opt).items():
        assert torch.equal(value, first[key]), f"{key}: not the first save"
    assert procs[0].returncode != 0  # its save failed with the peer gone (it removes its staging folder)
    atomic.recover(tmp_path / "kill")  # a dead writer's staging folder, if any, goes
    assert not [e for e in tmp_path.iterdir() if e.name.startswith(".kill.")]
