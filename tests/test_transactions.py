"""Nothing lost: save, load, merge and finetune are all-or-nothing.

The SIGKILL checks run in one subprocess (``python tests/test_transactions.py kill``)
that imports torch once and forks a tiny saver per kill, so each kill costs
milliseconds: the saver is killed right before and right after each rename of
``save`` (a patched ``os.rename``), at random moments, and while racing another
saver. After each kill the parent loads the checkpoint and checks it is one whole
save: every adapter tensor and every optimizer-state tensor holds the same value.

``RENAMES`` lists the tests behind the rows of docs/bad-inputs.md's table of
interrupted and refused writes (checked by ``test_every_class_is_in_the_docs_table``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_finetune import _args, tiny  # noqa: F401 (the tiny BERT fixture, by name)
from torch import nn

from lorakit.core import (
    Adapter,
    CheckpointError,
    MergeError,
    adapted_layers,
    load,
    merge,
    merge_and_unload,
    save,
    unload,
    unmerge,
)
from lorakit.core.atomic import readable, recover

DOC = Path(__file__).parents[1] / "docs" / "bad-inputs.md"
FOREIGN = "trainer_notes.txt"  # a file of another tool in the checkpoint folder: it must survive


def small():
    torch.manual_seed(0)
    model = Adapter(rank=2).apply(nn.Sequential(nn.Linear(4, 4)), targets=["0"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()  # the optimizer now has state (exp_avg, exp_avg_sq, step)
    return model, opt


@torch.no_grad()
def fill(model, opt, value: float) -> None:
    """One save's worth of data: every adapter parameter and optimizer-state tensor = value."""
    for p in model.parameters():
        if p.requires_grad:
            p.fill_(value)
    for state in opt.state.values():
        for t in state.values():
            t.fill_(value)


def saved_value(ckpt: Path) -> float:
    """Load ``ckpt`` with its optimizer state; the single value it holds (a torn save fails)."""
    model = Adapter(rank=2).apply(nn.Sequential(nn.Linear(4, 4)), targets=["0"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    load(model, ckpt, optimizer=opt)
    tensors = [p.detach() for p in model.parameters() if p.requires_grad]
    values = {float(t.flatten()[0]) for t in tensors}
    tensors += [t for s in opt.state.values() for t in s.values()]
    assert all(torch.all(t == t.flatten()[0]) for t in tensors) and len(values) == 1, "a mix of two saves"
    (value,) = values
    assert all(float(t.flatten()[0]) == value for t in tensors), "adapter and optimizer from different saves"
    # load only reads: after a kill mid-swap the complete copy may still be under its hidden name
    assert (readable(ckpt) / FOREIGN).read_text() == "keep me", "another tool's file was lost"
    return value


# -- the kill server (runs in its own process) ------------------------------------
def _fork_saver(model, opt, ckpt, values, kill_at=None) -> int:
    """A child that saves ``values`` one after another; with ``kill_at = (k, "before"|"after")``
    it SIGKILLs itself around its k-th rename."""
    pid = os.fork()
    if pid:
        return pid
    try:
        if kill_at is not None:
            real, calls = os.rename, [0]

            def rename(src, dst):
                calls[0] += 1
                if calls[0] == kill_at[0] and kill_at[1] == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst)
                if calls[0] == kill_at[0] and kill_at[1] == "after":
                    os.kill(os.getpid(), signal.SIGKILL)

            os.rename = rename
        for value in values:
            fill(model, opt, value)
            save(model, ckpt, optimizer=opt)
    finally:
        os._exit(0)


def _killed(pid: int) -> bool:
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def kill_server(folder: str, n_random: int, seed: int) -> dict:
    torch.set_num_threads(1)  # before any op: no thread pool exists when we fork
    rng = random.Random(seed)
    model, opt = small()
    ckpt = Path(folder) / "ckpt"
    ckpt.mkdir()
    (ckpt / FOREIGN).write_text("keep me")
    fill(model, opt, 1.0)
    save(model, ckpt, optimizer=opt)
    real, renames = os.rename, []
    os.rename = lambda src, dst: (renames.append(dst), real(src, dst))[1]
    t0 = time.perf_counter()
    save(model, ckpt, optimizer=opt)
    save_s = time.perf_counter() - t0
    os.rename = real
    report = {"renames_per_save": len(renames), "save_ms": 1000 * save_s, "kills": 0, "outcomes": []}
    value, next_value = 1.0, 2.0

    def check(pid, written):
        nonlocal value
        assert _killed(pid), "the saver was not killed"
        got = saved_value(ckpt)
        assert got == value or got in written, f"{got} is neither the old {value} nor a new save {written}"
        report["kills"] += 1
        report["outcomes"].append("old" if got == value else "new")
        value = got

    # 1. around every rename of one save, before and after
    for k in range(1, len(renames) + 1):
        for when in ("before", "after"):
            check(_fork_saver(model, opt, ckpt, [next_value], (k, when)), {next_value})
            next_value += 1
    # 2. at random moments of a run of saves
    for _ in range(n_random):
        values = [next_value + i for i in range(50)]
        pid = _fork_saver(model, opt, ckpt, values)
        time.sleep(rng.uniform(0, 3 * save_s))
        os.kill(pid, signal.SIGKILL)
        check(pid, set(values))
        next_value += 50
    # 3. two savers racing, killed together at a random moment, or left to finish
    for i in range(6):
        n = 100 if i % 2 == 0 else 5  # killed long before 100 saves; or left to finish 5
        runs = [[next_value + j for j in range(n)], [next_value + 100 + j for j in range(n)]]
        pids = [_fork_saver(model, opt, ckpt, r) for r in runs]
        if i % 2 == 0:
            time.sleep(rng.uniform(0, 10 * save_s))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            check(pids[0], set(runs[0] + runs[1]))
            assert _killed(pids[1])
            report["kills"] += 1
        else:
            for pid in pids:
                assert os.waitpid(pid, 0)[1] == 0
            value = saved_value(ckpt)
            assert value in (runs[0][-1], runs[1][-1])  # the last save of one of them
        next_value += 200
    # after recovery (the next writer's job; load only reads), only the checkpoint is left
    saved_value(ckpt)
    recover(ckpt)
    report["left"] = sorted(p.name for p in ckpt.parent.iterdir())
    return report


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kills")
    proc = subprocess.run([sys.executable, __file__, "kill", str(folder), "24", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_sigkill_at_every_rename_and_at_random_moments_leaves_old_or_new(kills):
    assert kills["renames_per_save"] >= 3  # partial -> new, dst -> old, new -> dst, old -> trash
    assert kills["kills"] >= 30
    assert {"old", "new"} <= set(kills["outcomes"])
    assert kills["left"] == ["ckpt"]


# -- save and load -------------------------------------------------------------
def test_save_keeps_other_tools_files_and_drops_stale_optimizer_state(tmp_path):
    model, opt = small()
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / FOREIGN).write_text("keep me")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "a.bin").write_bytes(b"x")
    save(model, ckpt, optimizer=opt)
    save(model, ckpt)  # without optimizer: the old optimizer files must not stay beside the new weights
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", FOREIGN, "sub"])
    assert (ckpt / "sub" / "a.bin").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def test_load_reads_a_checkpoint_left_beside_its_folder_and_writes_nothing(tmp_path):
    """A saver killed between its two renames leaves the checkpoint under a hidden name, beside
    a dead writer's partial folder: ``load`` reads the complete one and leaves every folder
    byte-identical; the next writer (``recover``, ``lorakit recover``, ``save``) puts it back."""
    model, opt = small()
    fill(model, opt, 3.0)
    ckpt = tmp_path / "ckpt"
    save(model, ckpt, optimizer=opt)
    (ckpt / FOREIGN).write_text("keep me")
    os.rename(ckpt, tmp_path / ".ckpt.old-999999999-abcd1234-0")  # a saver killed between its renames
    partial = tmp_path / ".ckpt.partial-999999999-abcd1234"  # and a dead writer's half-written folder
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"torn")
    before = _tree(tmp_path)
    assert saved_value(ckpt) == 3.0
    assert _tree(tmp_path) == before and not ckpt.exists()  # reading wrote nothing
    from lorakit.core.cli import main

    assert main(["recover", str(ckpt)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (ckpt / FOREIGN).read_text() == "keep me"
    assert saved_value(ckpt) == 3.0


def _opt_mismatch(tmp_path, damage):
    model, opt = small()
    fill(model, opt, 5.0)
    save(model, tmp_path, optimizer=opt)
    damage(tmp_path)
    target, target_opt = small()
    fill(target, target_opt, 7.0)
    return target, target_opt


def _two_groups(path):
    meta = json.loads((path / "optimizer.json").read_text())
    meta["param_groups"].append({**meta["param_groups"][0], "params": []})
    (path / "optimizer.json").write_text(json.dumps(meta))


def _wrong_shape(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "optimizer.safetensors")
    save_file({k: v.reshape(-1)[:1].repeat(3) if v.dim() else v for k, v in tensors.items()},
              path / "optimizer.safetensors")


@pytest.mark.parametrize("damage", [
    lambda p: (p / "optimizer.json").unlink(),
    lambda p: (p / "optimizer.safetensors").write_bytes(b"\0" * 9),
    _two_groups,
    _wrong_shape,
], ids=["missing", "corrupt", "other-groups", "other-shapes"])
def test_load_checks_the_optimizer_before_copying_anything(tmp_path, damage):
    model, opt = _opt_mismatch(tmp_path, damage)
    before = [p.clone() for p in model.parameters()], json.dumps(opt.state_dict(), default=str)
    with pytest.raises(CheckpointError):
        load(model, tmp_path, optimizer=opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert json.dumps(opt.state_dict(), default=str) == before[1]
    assert all(float(t.flatten()[0]) == 7.0 for s in opt.state.values() for t in s.values())


# -- merge ---------------------------------------------------------------------
def _deep(n=13, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)]).to(dtype)
    return Adapter(rank=2).apply(model, targets=[str(i) for i in range(n)])


def _nudge(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def test_merge_is_all_layers_or_none(tmp_path):
    model = _deep()
    _nudge(model)
    with torch.no_grad():
        adapted_layers(model)["12"].slots.B.fill_(float("nan"))  # the last of 13
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=r"module '12'.*non-finite"):
        merge(model)
    assert not any(layer.merged for layer in adapted_layers(model).values())
    assert all(torch.allclose(before[k], v, rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())
    with pytest.raises(MergeError):
        merge_and_unload(model)
    assert len(adapted_layers(model)) == 13


def test_merge_refuses_an_fp16_overflow():
    model = _deep(3, torch.float16)
    with torch.no_grad():
        layer = adapted_layers(model)["1"]
        layer.slots.B.fill_(300.0)
        layer.slots.A.fill_(300.0)  # W_eff ~ 1.8e5 > 65504
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=r"module '1'.*beyond torch.float16's range"):
        merge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_dora_magnitude_merges_and_unmerges_without_nan():
    torch.manual_seed(0)
    model = Adapter.from_recipe("dora", rank=2).apply(nn.Sequential(nn.Linear(8, 6)), targets=["0"])
    _nudge(model)
    layer = adapted_layers(model)["0"]
    with torch.no_grad():
        layer.slots.m[[1, 4]] = 0.0
    W = layer.base.weight.detach().clone()
    merge(model)
    assert torch.isfinite(layer.base.weight).all() and (layer.base.weight[[1, 4]] == 0).all()
    unmerge(model)
    assert torch.isfinite(layer.base.weight).all() and torch.equal(layer.base.weight[[1, 4]], W[[1, 4]])
    merge(model)
    plain = unload(model)
    assert torch.isfinite(plain[0].weight).all()


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    tiny_ = torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(tiny_))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", ["lora", "dora", "pissa"])
def test_unmerge_restores_the_base_within_the_documented_rounding(recipe, dtype):
    """docs/design.md: within 2 units in the last place of max(|W̄|, |W_eff / g|)."""
    torch.manual_seed(0)
    model = Adapter.from_recipe(recipe, rank=4).apply(nn.Sequential(nn.Linear(64, 48)).to(dtype), targets=["0"])
    _nudge(model)
    layer = adapted_layers(model)["0"]
    W = layer.base.weight.detach().clone()
    merge(model)
    g = layer._merged_with[2]
    V = layer.base.weight.double() / (1 if g is None else g.double()[:, None])
    unmerge(model)
    err = (layer.base.weight.double() - W.double()).abs()
    assert (err <= 2 * _ulp(torch.maximum(W.double().abs(), V.abs()), dtype)).all()


# -- finetune ------------------------------------------------------------------
def test_a_failing_finetune_keeps_the_finished_runs_checkpoints(tiny, tmp_path, monkeypatch):  # noqa: F811
    import lorakit.finetune.train as train
    from lorakit.core.cli import main

    out = tmp_path / "run"
    assert main(_args(tiny, out, "--save-every", "2", steps=4)) == 0
    good = out / "checkpoints" / "step-000004"
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    summary = (out / "summary.json").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(train, "_export_peft", broken)  # fails after training and its last checkpoint
    with pytest.raises(RuntimeError, match="export failed"):
        main(_args(tiny, out, "--save-every", "1", "--seed", "1", steps=4))
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files
    assert (out / "summary.json").read_bytes() == summary
    # the failed run kept its own last checkpoint (step 4 was taken), nothing hidden is left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


# -- docs ----------------------------------------------------------------------
#: the tests named by docs/bad-inputs.md's table of interrupted and refused writes
DOCUMENTED = (
    "test_sigkill_at_every_rename_and_at_random_moments_leaves_old_or_new",
    "test_save_keeps_other_tools_files_and_drops_stale_optimizer_state",
    "test_load_reads_a_checkpoint_left_beside_its_folder_and_writes_nothing",
    "test_load_checks_the_optimizer_before_copying_anything",
    "test_merge_is_all_layers_or_none",
    "test_merge_refuses_an_fp16_overflow",
    "test_zero_dora_magnitude_merges_and_unmerges_without_nan",
    "test_unmerge_restores_the_base_within_the_documented_rounding",
    "test_a_failing_finetune_keeps_the_finished_runs_checkpoints",
)


def test_every_class_is_in_the_docs_table():
    rows = re.findall(r"^\|.*\| `tests/test_transactions.py::(\w+)` \|$", DOC.read_text(), flags=re.M)
    assert sorted(rows) == sorted(DOCUMENTED)
    assert all(callable(globals()[name]) for name in DOCUMENTED)


if __name__ == "__main__" and sys.argv[1:2] == ["kill"]:
    print(json.dumps(kill_server(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
