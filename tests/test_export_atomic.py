"""A PEFT export folder is replaced as a whole (``export_peft``, ``lorakit export --format peft``).

As in tests/test_transactions.py, the SIGKILL checks run in one subprocess
(``python tests/test_export_atomic.py kill DIR``) that forks a tiny exporter per kill:
killed right before and right after each rename of an export (a patched
``os.rename`` / ``os.replace``) and at random moments of a run of exports. Every export writes a
different adapter and records its number in ``base_model_name_or_path``, so a folder
holding one export's weights and another's config is caught. After each kill the
next writer's recovery (``atomic.recover``, which ``export_peft`` runs first) leaves
the old or a new export, and PEFT loads it with that export's weights.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.core import Adapter
from lorakit.core.atomic import recover

FOREIGN = "README.md"  # a file beside the adapter (PEFT writes one): it must survive


def small():
    return Adapter(rank=2).apply(nn.Sequential(nn.Linear(4, 4)), targets=["0"])


@torch.no_grad()
def fill(model, value: float) -> None:
    gen = torch.Generator().manual_seed(int(value))
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen))


def export(model, folder: Path, value: float) -> None:
    from lorakit.transformers import export_peft

    fill(model, value)
    export_peft(model, folder, base_model_name_or_path=f"export-{value:g}")


def exported_value(folder: Path, expected: dict) -> float:
    """The export ``folder`` holds; fails on a torn one (weights of one, config of another)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    value = float(config["base_model_name_or_path"].removeprefix("export-"))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors.keys() == expected[value].keys(), "weights and config of two exports"
    assert all(torch.equal(tensors[k], expected[value][k]) for k in tensors), "weights and config of two exports"
    assert (folder / FOREIGN).read_text() == "keep me", "a file beside the adapter was lost"
    client = PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), str(folder))  # the real client loads it
    assert client.peft_config["default"].base_model_name_or_path == f"export-{value:g}"
    return value


def _fork_exporter(model, folder, values, kill_at=None) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        if kill_at is not None:
            calls = [0]

            def killing(real):
                def rename(src, dst):
                    calls[0] += 1
                    if calls[0] == kill_at[0] and kill_at[1] == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    real(src, dst)
                    if calls[0] == kill_at[0] and kill_at[1] == "after":
                        os.kill(os.getpid(), signal.SIGKILL)
                return rename

            os.rename, os.replace = killing(os.rename), killing(os.replace)  # a file-by-file writer replaces
        for value in values:
            export(model, folder, value)
    finally:
        os._exit(0)


def kill_server(root: str, n_random: int, seed: int) -> dict:
    from lorakit.transformers import peft_export

    torch.set_num_threads(1)  # before any op: no thread pool exists when we fork
    rng = random.Random(seed)
    model, folder = small(), Path(root) / "peft"
    expected: dict[float, dict] = {}

    def expect(values):
        for v in values:
            fill(model, v)
            expected[v] = peft_export(model).tensors

    expect([1.0])
    export(model, folder, 1.0)
    (folder / FOREIGN).write_text("keep me")
    real, renames = (os.rename, os.replace), []
    os.rename, os.replace = ((lambda src, dst, f=f: (renames.append(dst), f(src, dst))[1]) for f in real)
    t0 = time.perf_counter()
    export(model, folder, 1.0)
    export_s = time.perf_counter() - t0
    os.rename, os.replace = real
    report = {"renames_per_export": len(renames), "export_ms": 1000 * export_s, "kills": 0, "outcomes": []}
    value, next_value = 1.0, 2.0

    def check(pid, written):
        nonlocal value
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the exporter was not killed"
        recover(folder)  # what the next writer (export_peft, lorakit export, lorakit recover) does first
        got = exported_value(folder, expected)
        assert got == value or got in written, f"{got} is neither the old {value} nor a new export {written}"
        report["kills"] += 1
        report["outcomes"].append("old" if got == value else "new")
        value = got

    for k in range(1, len(renames) + 1):  # around every rename of one export
        for when in ("before", "after"):
            expect([next_value])
            check(_fork_exporter(model, folder, [next_value], (k, when)), {next_value})
            next_value += 1
    for _ in range(n_random):  # at random moments of a run of exports
        values = [next_value + i for i in range(30)]
        expect(values)
        pid = _fork_exporter(model, folder, values)
        time.sleep(rng.uniform(0, 3 * export_s))
        os.kill(pid, signal.SIGKILL)
        check(pid, set(values))
        next_value += 30
    report["left"] = sorted(p.name for p in folder.parent.iterdir())
    return report


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-kills")
    proc = subprocess.run([sys.executable, __file__, "kill", str(root), "8", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_during_a_peft_export_leaves_the_old_or_the_new_folder(kills):
    assert kills["renames_per_export"] >= 3  # partial -> new, dst -> old, new -> dst, old -> trash
    assert kills["kills"] >= 14 and {"old", "new"} <= set(kills["outcomes"])
    assert kills["left"] == ["peft"]  # recovery leaves no hidden leftovers


def test_a_peft_export_onto_a_file_is_refused(tmp_path):
    from lorakit.core import AdapterError
    from lorakit.transformers import export_peft

    (tmp_path / "f").write_text("mine")
    with pytest.raises(AdapterError, match="is a file, not a folder"):
        export_peft(small(), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


if __name__ == "__main__" and sys.argv[1:2] == ["kill"]:
    print(json.dumps(kill_server(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
