"""Distributed training on PyTorch's own engine (docs/distributed.md).

Two gloo ranks on CPU run every registered recipe under DDP, under FSDP2
(``fully_shard``) and from a meta-device construction (tests/distributed/worker.py);
this process runs the same training single-process on the whole batch and checks:

- losses and every adapter tensor (parameters and buffers) are identical on the
  two ranks and equal to the single-process run;
- under FSDP2 every trainable tensor, OP-LoRA's MLP included, is sharded;
- the checkpoint, exported factors and merged weights written from the sharded
  model equal the single-process files;
- the same through ``accelerate launch`` and, marked slow, through the HF
  ``Trainer``'s DDP path under ``torchrun``.

The ranks meet through a file store (no TCP listener); gloo binds to loopback.
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
from safetensors.torch import load_file, save_file

import lorakit.core as lk
from lorakit.core.distributed import adapter_state_dict, gather, unwrap

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))
import common  # noqa: E402

RECIPES = sorted(lk.registry.load().recipes)
# the workers load only the plugins that register primitives or recipes (not the
# integrations, whose imports of transformers/diffusers would cost seconds per rank)
PLUGINS = ",".join(sorted(name for name, info in lk.registry.plugins.items() if name == "core" or any(
    entry.split(" ", 1)[0] in ("generator", "normalizer", "initializer", "magnitude", "recipe")
    for entry in info.registered)))
SCENARIOS = ("ddp", "fsdp2", "meta")
WORLD = 2
TIMEOUT = 300
# fp32 on 3 SGD steps: the ranks reduce gradients in another order than one
# process sums them; observed differences are ~1e-7 (docs/distributed.md).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "LORAKIT_LOAD_PLUGINS": PLUGINS}
    env.update(extra)
    return env


def _check(procs: list[subprocess.Popen], what: str) -> None:
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    if any(p.returncode for p in procs):
        tail = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{o[-6000:]}"
                         for i, (p, o) in enumerate(zip(procs, outputs)))
        pytest.fail(f"{what} failed:\n{tail}")


def _spawn_ranks(script: Path, args: list[str], tmp: Path) -> None:
    """Start the two ranks directly (what torchrun would do) and wait for both."""
    store = tmp / "store"
    procs = [subprocess.Popen([sys.executable, str(script), *args], env=_env(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD), LORAKIT_STORE=str(store)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    _check(procs, f"{script.name} on {WORLD} ranks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(recipe: str, scenario: str, inputs: Path):
    """The model every scenario starts from: freshly adapted, or (meta) a saved checkpoint."""
    return lk.load(common.base_model(), inputs / recipe) if scenario == "meta" else common.build(recipe)


def _single(recipe: str, scenario: str, inputs: Path):
    """The reference: one process, the whole batch each step."""
    model = _start(recipe, scenario, inputs)
    return model, common.train(model, common.data())


def _prepare_inputs(out: Path) -> None:
    """The "pretrained" base weights and, per recipe, a trained checkpoint (meta path)."""
    inputs = out / "inputs"
    inputs.mkdir()
    save_file(common.base_model().state_dict(), str(inputs / "base.safetensors"))
    for recipe in RECIPES:  # a trained (non-initial) checkpoint per recipe for the meta path
        model = common.build(recipe)
        common.train(model, common.data(1))
        lk.save(model, inputs / recipe)


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """Launch the worker once for all recipes; return its output folder."""
    out = tmp_path_factory.mktemp("dist")
    _prepare_inputs(out)
    _spawn_ranks(HERE / "worker.py", [str(out), *RECIPES], out)
    return out


def _results(folder: Path, name: str) -> tuple[list[dict], list[dict]]:
    """Both ranks' adapter state and metadata for one case (or the error it raised)."""
    for r in range(WORLD):
        if (error := folder / f"{name}-rank{r}.error").exists():
            pytest.fail(f"{name} failed on rank {r}:\n{error.read_text()}")
    states = [load_file(str(folder / f"{name}-rank{r}.safetensors")) for r in range(WORLD)]
    metas = [json.loads((folder / f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]
    return states, metas


def _assert_close(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), f"{what}: keys differ: {set(actual) ^ set(expected)}"
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOL, msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_ranks_agree_with_single_process(world_run, recipe, scenario):
    _check_case(world_run, recipe, scenario)


def _check_case(folder: Path, recipe: str, scenario: str) -> None:
    name = f"{scenario}-{recipe}"
    states, metas = _results(folder, name)
    # identical across ranks: bit for bit (same reduced gradients, same update)
    assert metas[0]["losses"] == metas[1]["losses"]
    assert set(states[0]) == set(states[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{name}: {key} differs between ranks"
    # equal to one process over the global batch
    model, losses = _single(recipe, scenario, folder / "inputs")
    torch.testing.assert_close(torch.tensor(metas[0]["losses"]), torch.tensor(losses), **TOL)
    _assert_close(states[0], {**adapter_state_dict(model), **common.evaluate(model)}, name)
    # training moved every trainable tensor, most far beyond the tolerance (else the
    # comparison above would prove little)
    start = adapter_state_dict(_start(recipe, scenario, folder / "inputs"))
    moved = {k: float((states[0][k] - start[k]).abs().max()) for k, p in model.named_parameters()
             if p.requires_grad}
    assert all(v > 0 for v in moved.values()), f"{name}: untrained tensors {moved}"
    assert max(moved.values()) > 100 * TOL["atol"], moved


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp2_shards_every_trainable_tensor(world_run, recipe):
    meta = _results(world_run, f"fsdp2-{recipe}")[1][0]
    model = common.build(recipe)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        global_shape, local_shape, placement = meta["sharding"][name]
        assert placement == "Shard(0)", f"{name} is {placement}"
        assert local_shape[0] == (global_shape[0] + WORLD - 1) // WORLD, f"{name}: {local_shape} of {global_shape}"
    if recipe.startswith("op-"):  # OP-LoRA: the generator MLP itself is sharded
        mlp = [n for n in trainable if n.rsplit(".", 1)[-1] in ("W1", "W2", "z", "b1", "b2")]
        assert len(mlp) == 5 * 3 * 2, mlp  # 5 tensors x 3 targets x 2 blocks


@pytest.mark.parametrize("recipe", RECIPES)
def test_files_from_sharded_model_equal_single_process(world_run, recipe, tmp_path):
    _results(world_run, f"fsdp2-{recipe}")  # the case ran without error
    files = world_run / f"files-{recipe}"
    model, _ = _single(recipe, "fsdp2", world_run / "inputs")
    lk.save(model, tmp_path / "checkpoint")
    sharded_cfg = json.loads((files / "checkpoint" / "adapter_config.json").read_text())
    single_cfg = json.loads((tmp_path / "checkpoint" / "adapter_config.json").read_text())
    assert sharded_cfg == single_cfg
    _assert_close(load_file(str(files / "checkpoint" / "adapter_model.safetensors")),
                  load_file(str(tmp_path / "checkpoint" / "adapter_model.safetensors")), "checkpoint")
    # exported factors: same ranks and magnitudes, same update B·A (the factors
    # themselves come from an SVD, whose vectors turn with rounding-level input changes)
    exported = load_file(str(files / "factors.safetensors"))
    for name, e in lk.export_factors(model).items():
        assert exported[f"{name}.B"].shape == e.B.shape and exported[f"{name}.A"].shape == e.A.shape
        torch.testing.assert_close(exported[f"{name}.B"] @ exported[f"{name}.A"], e.B @ e.A, **TOL)
        assert (f"{name}.m" in exported) == (e.magnitude is not None)
        if e.magnitude is not None:
            torch.testing.assert_close(exported[f"{name}.m"], e.magnitude, **TOL)
    # the PEFT export written from the sharded run loads in PEFT as the single-process one does
    from peft import PeftModel

    from lorakit.transformers import export_peft

    export_peft(model, tmp_path / "peft")
    assert json.loads((files / "peft" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "peft" / "adapter_config.json").read_text())
    x = torch.randn(common.GLOBAL_BATCH, common.IN, generator=torch.Generator().manual_seed(11))
    clients = [PeftModel.from_pretrained(common.base_model(), str(folder)).eval() for folder in
               (files / "peft", tmp_path / "peft")]
    with torch.no_grad():
        torch.testing.assert_close(clients[0](x), clients[1](x), **TOL)
        torch.testing.assert_close(clients[0](x), model.eval()(x), **TOL)
    _assert_close(clients[0].merge_and_unload().state_dict(), clients[1].merge_and_unload().state_dict(), "peft")
    _assert_close(load_file(str(files / "merged.safetensors")), lk.merge_and_unload(model).state_dict(), "merge")


def test_gather_refuses_a_replica_with_another_adapter():
    model = common.build("lora")
    other = common.adapter("lora").apply(common.base_model(), targets=["q"])
    with pytest.raises(lk.AdapterError, match="replica"):
        gather(model, other)
    assert unwrap(model) is model


# -- accelerate launch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    """``accelerate launch`` with its torchrun-based launcher (``--multi_gpu``: on CPU,
    the ``--cpu`` launcher needs mpirun); the script's ``Accelerator(cpu=True)``
    keeps both processes on CPU/gloo."""
    out = tmp_path_factory.mktemp("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
           "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(HERE / "worker_accelerate.py"), str(out), *RECIPES]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _check([proc], "accelerate launch")
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_accelerate_launch_matches_single_process(accelerate_run, recipe):
    states, metas = _results(accelerate_run, f"accelerate-{recipe}")
    assert metas[0]["wrapper"] == "DistributedDataParallel"  # prepare() really distributed it
    assert metas[0]["losses"] == metas[1]["losses"]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{recipe}: {key} differs between ranks"
    model, losses = _single(recipe, "ddp", None)
    torch.testing.assert_close(torch.tensor(metas[0]["losses"]), torch.tensor(losses), **TOL)
    _assert_close(states[0], {**adapter_state_dict(model), **common.evaluate(model)}, f"accelerate-{recipe}")


# -- torchrun, and the HF Trainer under torchrun (slow: seconds of imports per rank) -


def _torchrun(script: Path, args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), *args]
    _check([subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)], what)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_torchrun_launch(tmp_path, scenario):
    """The same worker under ``torchrun`` (env:// rendezvous instead of a file store)."""
    _prepare_inputs(tmp_path)
    _torchrun(HERE / "worker.py", [str(tmp_path), *RECIPES], "torchrun worker.py")
    for recipe in RECIPES:
        _check_case(tmp_path, recipe, scenario)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    script = HERE / "worker_trainer.py"
    single = subprocess.Popen([sys.executable, str(script), str(out), *RECIPES], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _check([single], "Trainer, single process")
    _torchrun(script, [str(out), *RECIPES], "Trainer under torchrun")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_hf_trainer_ddp_matches_single_process(trainer_runs, recipe):
    states, metas = _results(trainer_runs, f"trainer-{recipe}")
    assert metas[0]["wrapper"] == "DistributedDataParallel"  # the Trainer's own DDP wrap
    assert metas[0]["losses"] == metas[1]["losses"]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{recipe}: {key} differs between ranks"
    single = load_file(str(trainer_runs / f"trainer-single-{recipe}-rank0.safetensors"))
    single_meta = json.loads((trainer_runs / f"trainer-single-{recipe}-rank0.json").read_text())
    assert single_meta["wrapper"] == "LlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(metas[0]["losses"]), torch.tensor(single_meta["losses"]), **TOL)
    _assert_close(states[0], single, f"trainer-{recipe}")
    least, most = single_meta["moved"]  # every trainable tensor moved, most far beyond the tolerance
    assert least > 0 and most > 100 * TOL["atol"], single_meta["moved"]
