"""The launchers people use: ``accelerate launch`` with an FSDP2 config and with DeepSpeed
ZeRO-2/3, the HF ``Trainer`` + ``LorakitCallback`` (docs/distributed.md).

Two CPU processes (gloo) run tests/distributed/worker_launchers.py: 4 AdamW steps of a
tiny Llama, a checkpoint every 2, then ``trainer.train(resume_from_checkpoint=checkpoint-2)``
on a fresh model; one plain process runs the same script with the doubled per-device batch
(the reference). Checked per launcher: the wrapper the Trainer really used; losses and the
final adapter equal to the reference (rtol 1e-5); every checkpoint's ``model.safetensors``
and lorakit's native files hold the adapter only, whole (no ``Size([0])``), equal to the
reference's, and load with ``lorakit.core.load``; the resumed run continues identically.

- ``configs/accelerate/fsdp2_cpu.yaml``: accelerate 1.16 enables FSDP only on GPU-like
  devices; on CPU processes it silently runs DDP (pinned here, so the day it shards on CPU
  this test says so);
- ``configs/accelerate/zero3_cpu.json``: every adapter parameter is partitioned (persistence
  threshold 0) and ``Size([0])`` outside the forward; ``lorakit.core.save`` on a rank
  refuses it; the callback gathers (``save_full``);
- ``configs/accelerate/zero2_cpu.json`` (slow): parameters whole, optimizer state partitioned.

DeepSpeed builds its CPU shared-memory comm op once per machine (~60 s, cached in
``~/.cache/torch_extensions``) on its first launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit.core as lk
from lorakit.core.distributed import adapter_state_dict

ROOT = Path(__file__).parent.parent
HERE = Path(__file__).parent / "distributed"
WORKER = HERE / "worker_launchers.py"
sys.path.insert(0, str(HERE))
lk.registry.load()
PLUGINS = ",".join(sorted(name for name, info in lk.registry.plugins.items() if name == "core" or any(
    entry.split(" ", 1)[0] in ("generator", "normalizer", "initializer", "magnitude", "recipe")
    for entry in info.registered)))
RECIPE = "dora"  # trained slots, a magnitude, and buffers (the row norms)
TOL = {"rtol": 1e-5, "atol": 1e-6}
TIMEOUT = 400  # DeepSpeed's first launch on a machine builds its comm op


def _env(engine: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "LORAKIT_LOAD_PLUGINS": PLUGINS,
            "LORAKIT_ENGINE": engine}


def _run(cmd: list[str], engine: str, what: str) -> None:
    proc = subprocess.run(cmd, env=_env(engine), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT)
    if proc.returncode:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(engine: str) -> list[str]:
    """accelerate's own flags for each launcher (what docs/distributed.md shows)."""
    if engine == "fsdp":
        return ["--config_file", "configs/accelerate/fsdp2_cpu.yaml"]
    return ["--use_deepspeed", "--deepspeed_config_file", f"configs/accelerate/{engine}_cpu.json",
            "--num_machines", "1", "--main_process_ip", "127.0.0.1"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The single-process reference, once for every launcher."""
    folder = tmp_path_factory.mktemp("launchers")
    _run([sys.executable, str(WORKER), str(folder), RECIPE], "single", "the single-process Trainer")
    return folder


def _launch(out: Path, engine: str) -> tuple[list[dict], list[dict]]:
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *launch_args(engine),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(WORKER), str(out), RECIPE]
    _run(cmd, engine, f"accelerate launch ({engine})")
    name = f"{engine}-trainer-{RECIPE}"
    for r in range(2):
        if (error := out / f"{name}-rank{r}.error").exists():
            pytest.fail(f"{name} failed on rank {r}:\n{error.read_text()}")
    return ([load_file(str(out / f"{name}-rank{r}.safetensors")) for r in range(2)],
            [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(2)])


def _close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {set(actual) ^ set(expected)}"
    for key, value in expected.items():
        assert actual[key].numel() == value.numel() > 0, f"{what}: {key} is {tuple(actual[key].shape)}"
        torch.testing.assert_close(actual[key], value, **TOL, msg=lambda m, key=key: f"{what} {key}: {m}")


def _check(out: Path, engine: str, states: list[dict], metas: list[dict]) -> None:
    single = load_file(str(out / f"launcher-single-{RECIPE}-rank0.safetensors"))
    single_meta = json.loads((out / f"launcher-single-{RECIPE}-rank0.json").read_text())
    assert metas[0]["losses"] == metas[1]["losses"] and len(metas[0]["losses"]) == 4
    torch.testing.assert_close(torch.tensor(metas[0]["losses"]), torch.tensor(single_meta["losses"]), **TOL)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), "the ranks' adapters differ"
    _close(states[0], single, engine)
    # resumed from checkpoint-2 on a fresh model: the same last two steps, the same adapter
    assert metas[0]["resumed_losses"] == metas[0]["losses"]
    for key, value in states[0].items():
        if not key.startswith("resumed."):
            assert torch.equal(states[0][f"resumed.{key}"], value), f"{engine}: resumed {key} differs"
    from worker_trainer import TARGETS, tiny_llama

    run, ref = out / f"{engine}-trainer-{RECIPE}", out / f"launcher-single-{RECIPE}"
    for step in (2, 4):
        for file in ("model.safetensors", "adapter_model.safetensors"):  # the Trainer's and lorakit's
            _close(load_file(str(run / f"checkpoint-{step}" / file)),
                   load_file(str(ref / f"checkpoint-{step}" / file)), f"{engine} checkpoint-{step}/{file}")
    loaded = lk.load(tiny_llama(), run / "checkpoint-4")
    expected = lk.Adapter.from_recipe(RECIPE, rank=4, seed=7).apply(tiny_llama(), targets=TARGETS)
    assert lk.adapter_config(loaded) == lk.adapter_config(expected)
    _close(adapter_state_dict(loaded), {k: v for k, v in single.items()
                                                       if not k.startswith("resumed.")}, f"{engine} load")
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_accelerate_fsdp2_config_on_cpu_runs_ddp_and_the_trainer_matches(out):
    states, metas = _launch(out, "fsdp")
    # accelerate/state.py: the FSDP branch runs only for MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON
    assert metas[0]["wrapper"] == "DistributedDataParallel", (
        f"accelerate now wraps CPU processes in {metas[0]['wrapper']}: check the sharded path and update "
        "docs/distributed.md")
    _check(out, "fsdp", states, metas)


@pytest.mark.parametrize("engine", ["zero3", pytest.param("zero2", marks=pytest.mark.slow)])
def test_deepspeed_through_accelerate_saves_real_values(out, engine):
    pytest.importorskip("deepspeed")
    states, metas = _launch(out, engine)
    assert metas[0]["wrapper"] == "DeepSpeedEngine"
    kind, shape, local, status, partition = metas[0]["sharding"]
    if engine == "zero3":  # really partitioned: the parameter is empty outside the forward
        assert shape == [0] and status == "ZeroParamStatus.NOT_AVAILABLE" and partition[0] > 0, metas[0]
        assert all("save_full" in m["plain_save"] for m in metas), metas[0]["plain_save"]
    else:
        assert shape == local == partition and metas[0]["plain_save"] is None
    _check(out, engine, states, metas)


def test_save_refuses_a_shard_and_bad_tensors(tmp_path):
    """What a ZeRO-3 rank holds outside the forward (a ``Size([0])`` parameter) is never saved
    as the adapter; ``save(tensors=)`` with other keys is one error; nothing is written."""
    from torch import nn

    model = lk.Adapter.from_recipe("lora", rank=2).apply(nn.Sequential(nn.Linear(8, 8)), targets=["0"])
    whole = adapter_state_dict(model)
    with torch.no_grad():
        model[0].slots.A.data = torch.empty(0)  # as deepspeed.zero partitions it
    with pytest.raises(lk.AdapterError, match=r"0.slots.A is empty \(a ZeRO-3 partition\?\).*save_full"):
        lk.save(model, tmp_path / "ckpt")
    with pytest.raises(lk.AdapterError, match=r"tensors: keys differ .*missing \['0.slots.B', '0.slots.d'\]"):
        lk.save(model, tmp_path / "ckpt", tensors={"0.slots.A": whole["0.slots.A"]})
    assert not list(tmp_path.iterdir())
    lk.save(model, tmp_path / "ckpt", tensors=whole)  # the gathered tensors: saved whole
    saved = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in whole.items())
