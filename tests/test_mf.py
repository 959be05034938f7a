"""``lorakit mf``: the OP-LoRA matrix-factorization study (OP-LoRA, arXiv:2412.10362, §4.1), reduced.

The full study (100×100, 1000 steps, three optimizers) is a command whose results
are in docs/papers/op-lora-mf.md; here a small matrix and few steps go through the
same CLI entry, and the pieces (SVD optimum, schedule, bookkeeping) are checked."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.core.cli import main
from lorakit.studies import mf


def test_reduced_study_through_the_cli(tmp_path, capsys):
    out, png = tmp_path / "mf.json", tmp_path / "img" / "mf.png"
    argv = ["mf", "--optimizer", "adam", "--size", "16", "--rank", "2", "--steps", "80", "--warmup", "5",
            "--lrs", "0.003,0.03", "--width", "8", "--embed-dim", "16", "--json", str(out), "--plot", str(png),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "SVD optimum" in printed and "OP-MF" in printed and "within 1% of the SVD error" in printed

    result = json.loads(out.read_text())
    assert result["config"] == {"optimizer": "adam", "lrs": [0.003, 0.03], "steps": 80, "warmup": 5,
                                "size": 16, "rank": 2, "width": 8, "embed_dim": 16, "z_std": 0.01,
                                "stable_gain": None, "seed": 0, "dtype": "float32", "tolerance": 0.01}
    M = mf.target_matrix(16, 16, 0)
    assert result["svd_mse"] == pytest.approx(mf.svd_optimum(M, 2), rel=1e-12)
    assert result["initial_mse"] == pytest.approx(M.square().mean().item(), rel=1e-6)  # B0 = 0
    assert [r["lr"] for r in result["runs"]] == [0.003, 0.03]
    for r in result["runs"]:
        for key in ("mf", "op_mf"):
            run = r[key]
            assert set(run) == {"final", "diverged", "losses", "trainable"}
            assert not run["diverged"] and len(run["losses"]) == 81 and run["final"] == run["losses"][-1]
            assert run["final"] >= result["svd_mse"] * (1 - 1e-4)  # nothing beats Eckart–Young
        assert r["mf"]["trainable"] == 2 * 16 * 2
        assert r["op_mf"]["trainable"] == 16 + 8 * 17 + 9 * 64
        assert r["op_mf"]["final"] < 0.5 * r["op_mf"]["losses"][0]  # OP-MF learns
        assert r["op_mf"]["losses"][40] < r["op_mf"]["losses"][5]
    for key in ("mf", "op_mf"):
        assert result["reached_svd"][key] == sum(
            r[key]["final"] <= 1.01 * result["svd_mse"] for r in result["runs"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stable_op_mf_is_recorded_per_learning_rate(tmp_path, capsys):
    """``--stable-gain G`` adds OP-MF with ``MLP(gain=G)``: per learning rate each model's
    final error and divergence, and the counts, so the stable-OP-LoRA claim can be checked."""
    out = tmp_path / "mf.json"
    argv = ["mf", "--size", "12", "--rank", "2", "--steps", "60", "--warmup", "5", "--lrs", "1,1e4",
            "--width", "8", "--embed-dim", "16", "--stable-gain", "4", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "OP-MF-stable" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["models"] == ["mf", "op_mf", "op_mf_stable"] and result["config"]["stable_gain"] == 4
    for r in result["runs"]:
        for key in result["models"]:
            assert {"final", "diverged"} <= set(r[key]) and r[key]["diverged"] == (r[key]["final"] is None)
    assert result["runs"][1]["op_mf_stable"]["diverged"]  # lr 1e4: everything diverges
    assert result["diverged"] == {k: sum(r[k]["diverged"] for r in result["runs"]) for k in result["models"]}
    assert main(argv[:-5] + ["--stable-gain", "1", "--no-progress"]) == 2  # gain must be > 1


def test_divergence_is_reported_not_raised():
    result = mf.study("sgd", [1e4], steps=30, warmup=2, size=8, rank=2, width=4, embed_dim=4, progress=False)
    run = result["runs"][0]["op_mf"]
    assert run["diverged"] and run["final"] is None and len(run["losses"]) < 31
    assert result["reached_svd"]["op_mf"] == 0
    assert "diverged" in mf.table(result)
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN/inf


def test_svd_optimum_is_eckart_young():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    s = torch.tensor([9.0, 5, 4, 2, 1, 0.5, 0.25, 0.1, 0.0], dtype=torch.float64)
    M = U[:, :9] @ torch.diag(s) @ V.T
    for r in (1, 3, 8, 9):
        assert mf.svd_optimum(M, r) == pytest.approx(float(s[r:].square().sum()) / M.numel(), rel=1e-10, abs=1e-15)
    # and the truncated SVD attains it
    Uf, S, Vh = torch.linalg.svd(M)
    X = Uf[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    assert (M - X).square().mean().item() == pytest.approx(mf.svd_optimum(M, 3), rel=1e-10)


def test_schedule_warms_up_then_decays_linearly():
    f = [mf.lr_factor(t, 100, 10) for t in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 90)
    assert all(a <= b for a, b in zip(f[:10], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_the_model_is_a_lorakit_adapter_on_a_zero_linear():
    M = mf.target_matrix(6, 6, 0)
    model = mf.build(M, 2, "direct", seed=0)
    layer = model[0]
    assert type(layer).__name__ == "AdaptedLayer" and torch.count_nonzero(layer.base.weight) == 0
    with torch.no_grad():
        layer.slots.B.copy_(torch.randn(6, 2))
    pred = model(torch.eye(6)).T
    assert torch.allclose(pred, layer.slots.B @ layer.slots.A, atol=1e-6)
    assert mf.DEFAULT_LRS.keys() == {"sgd", "momentum", "adam"}
    assert all(lr > 0 and math.isfinite(lr) for lrs in mf.DEFAULT_LRS.values() for lr in lrs)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "10", "--warmup", "10"], ["--lrs", "-1"],
                                  ["--rank", "9", "--size", "8"], ["--lrs", "nan"]])
def test_bad_options_exit_2(argv, capsys):
    assert main(["mf", "--no-progress", "--size", "8", "--rank", "2", "--steps", "5", "--warmup", "1",
                 *argv]) == 2
    assert "lorakit: error: lorakit mf:" in capsys.readouterr().err
