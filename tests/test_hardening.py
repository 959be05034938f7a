"""Crash-safe checkpoints and low-precision base models (issue: hardening)."""

import signal
import subprocess
import sys
import textwrap
import time

import torch
from torch import nn

from lorakit.core import Adapter, adapted_layers, load, merge, unmerge

SAVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from lorakit.core import Adapter, save
    torch.manual_seed(0)
    model = Adapter(rank=256).apply(nn.Sequential(nn.Linear(2048, 2048)), targets=["0"])
    params = [p for p in model.parameters() if p.requires_grad]
    step = 0
    while True:  # keep rewriting the checkpoint until killed
        step += 1
        with torch.no_grad():
            for p in params:
                p.fill_(step)
        save(model, sys.argv[1])
        print(step, flush=True)
""")


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(ckpt)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        kills = 0
        for delay in (0.05, 0.17):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            model = load(nn.Sequential(nn.Linear(2048, 2048)), ckpt)
            B = adapted_layers(model)["0"].slots.B
            assert torch.all(B == B.flatten()[0]) and B.flatten()[0] >= 1  # one whole step, not a mix
            if kills == 2:
                break
            proc = subprocess.Popen([sys.executable, "-c", SAVER, str(ckpt)], stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "1"
        assert kills == 2
    finally:
        proc.kill()
        proc.wait()


def _bf16_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)


def test_adapter_parameters_stay_fp32_on_a_bf16_model():
    model = Adapter.from_recipe("lora", rank=4).apply(_bf16_model(), targets=["0", "2"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if ".base." in n} == {torch.bfloat16}
    model = Adapter.from_recipe("lora", rank=4, dtype=torch.bfloat16).apply(_bf16_model(), targets=["0"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_bf16_merge_matches_unmerged_within_bf16_resolution():
    x = torch.randn(16, 64).to(torch.bfloat16)
    for recipe in ("lora", "dora", "pissa"):
        model = Adapter.from_recipe(recipe, rank=4).apply(_bf16_model(), targets=["0", "2"])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
            y = model(x).float()
            merge(model)
            assert model[0].base.weight.dtype == torch.bfloat16
            y_merged = model(x).float()
            unmerge(model)
        scale = y.abs().max()
        # merge is computed in fp32 and rounded once: differences stay at bf16 resolution
        assert (y_merged - y).abs().max() <= 4 * 2**-8 * scale, recipe
