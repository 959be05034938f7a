"""``lorakit bench``: the command end to end on a tiny model, and its measuring parts."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.bench.measure import _running_peak, step_peak_bytes
from lorakit.bench.methods import FLOOR, Method, adapt, build_base, resident_bytes
from lorakit.core.cli import main

TINY = ["--hidden", "64", "--layers", "1", "--intermediate", "96", "--vocab", "64", "--batch", "2",
        "--seq", "8", "--steps", "1", "--repeats", "2", "--no-progress"]


def test_bench_end_to_end(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", *TINY, "--json", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert list(methods) == ["lorakit lora", "lorakit dora", "lorakit op-lora", "lorakit delora",
                             "lorakit loldu", "lorakit pissa", "PEFT LoRA", "PEFT DoRA", "PEFT DeLoRA",
                             "no adapter (floor)"]
    for label, m in methods.items():
        assert abs(m["init_loss_minus_base"]) < 1e-5, f"{label} is not the base model at init"
        assert m["median_ms"] > 0 and m["median_cpu_ms"] > 0 and len(m["round_medians_ms"]) == 2
        assert m["peak_mem_mb"] > 0
    # same model, same targets: the parameter counts of equivalent methods agree
    params = {label: m["trainable_params"] for label, m in methods.items()}
    # r · Σ(in + out) over q, k, v, o (64 x 64) and gate, up, down (64 <-> 96)
    assert params["lorakit lora"] == params["PEFT LoRA"] == 8 * (4 * (64 + 64) + 3 * (64 + 96))
    assert params["lorakit dora"] == params["PEFT DoRA"]
    assert params["lorakit delora"] == params["PEFT DeLoRA"]
    assert params["no adapter (floor)"] == 0
    ratios = result["ratios"]
    assert ratios["time: lorakit dora / PEFT DoRA"]["target"] == 0.67
    assert ratios["memory: lorakit dora / PEFT LoRA"]["target"] == 1.05
    for r in ratios.values():
        assert r["value"] > 0 and r["met"] in (None, True, False)
    assert png.stat().st_size > 10_000


def test_json_without_path_goes_to_stdout(capsys):
    assert main(["bench", *TINY, "--recipes", "lora", "--peft", "lora", "--no-floor", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result["methods"]) == {"lorakit lora", "PEFT LoRA"}
    assert "time: lorakit lora / PEFT LoRA" in result["ratios"]
    assert "lorakit lora" in captured.err  # the tables went to stderr
    # load and merge: alternating rounds, wall and CPU time, a ratio per round
    lk = result["methods"]["lorakit lora"]
    assert len(lk["round_load_cpu_ms"]) == len(lk["round_merge_ms"]) == 5 and lk["merge_cpu_ms"] > 0
    for name in ("load: lorakit lora / PEFT LoRA", "merge_and_unload: lorakit lora / PEFT LoRA"):
        r = result["ratios"][name]
        assert r["cpu_value"] > 0 and r["value_round_min_max"][0] <= r["value_round_min_max"][1]
        assert r["cpu_value_round_min_max"][0] <= r["cpu_value"] * 1.000001


def test_bench_compiled_has_no_graph_break(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY, "--compile", "--backend", "aot_eager", "--recipes", "lora", "--peft", "", "--no-floor"]
    assert main(["bench", *args, "--json", str(out)]) == 0
    m = json.loads(out.read_text())["methods"]["lorakit lora"]
    assert m["graph_breaks"] == 0 and abs(m["init_loss_minus_base"]) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--peft", "lokr"], "unknown PEFT method"),
    (["--recipes", "nope"], "unknown recipe"),
    (["--hidden", "100"], "multiple of 64"),
    (["--device", "tpu"], "use cpu or cuda"),
    (["--steps", "0"], "must be >= 1"),
    (["--sweep", "hidden=100"], "use NAME=V1,V2"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert main(["bench", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_unavailable_is_a_clear_error(capsys):
    assert main(["bench", *TINY, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cpu_peak_sees_a_temporary():
    """A step that allocates 8 MB twice (one freed before the other) peaks at 8 MB."""
    def step():
        a = torch.ones(2**21)  # 8 MiB
        del a
        b = torch.ones(2**21)
        return b.sum()

    peak = step_peak_bytes(step, "cpu")
    assert 2**23 <= peak < 2**23 + 2**16


def test_running_peak():
    assert _running_peak([(3, -5), (1, 10), (2, 4), (4, 7)]) == 16
    assert _running_peak([]) == 0


def test_methods_share_the_base_weights():
    base = build_base(64, 1, 96, 64, 8, seed=0, dtype=torch.float32, device="cpu")
    lk = adapt(Method("lorakit", "dora"), base, rank=4, seed=0)
    pf = adapt(Method("peft", "lora"), base, rank=4, seed=0)
    floor = adapt(FLOOR, base, rank=4, seed=0)
    w = base.model.layers[0].self_attn.q_proj.weight
    assert lk.model.layers[0].self_attn.q_proj.base.weight is w
    assert pf.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight is w
    assert floor.model.layers[0].self_attn.q_proj.weight is w
    opt = torch.optim.AdamW([p for p in lk.parameters() if p.requires_grad])
    n_base = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    assert resident_bytes(lk, opt) > n_base  # base (once) + adapter
    assert resident_bytes(floor, None) == n_base


def test_sweep_writes_one_table_and_one_plot(tmp_path):
    """Two sizes, LoRA against PEFT and the floor: every ratio per size, load and merge times."""
    md, png, out = tmp_path / "sweep.md", tmp_path / "sweep.png", tmp_path / "sweep.json"
    args = [*TINY, "--recipes", "lora", "--peft", "lora", "--sweep", "hidden=64,128"]
    assert main(["bench", *args, "--markdown", str(md), "--plot", str(png), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["value"] for r in result["runs"]] == [64, 128]
    small, large = (r["result"]["config"] for r in result["runs"])
    assert large["intermediate"] == 352 and large["layers"] == 2 and small["layers"] == 4  # 1 layer at hidden 256
    table = md.read_text()
    for name in ("time: lorakit lora / PEFT LoRA", "time: lorakit lora / floor", "load: lorakit lora / PEFT LoRA",
                 "merge_and_unload: lorakit lora / PEFT LoRA"):
        assert f"| {name} |" in table
    assert all(r["result"]["methods"]["PEFT LoRA"]["load_ms"] > 0 for r in result["runs"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_moe_bench_end_to_end(tmp_path):
    """--model moe: floor, lorakit and PEFT LoRA on a tiny Qwen3-MoE's fused experts per expert count."""
    out, md = tmp_path / "moe.json", tmp_path / "moe.md"
    assert main(["bench", "--model", "moe", "--experts", "4,8", *TINY, "--json", str(out),
                 "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["experts"] == [4, 8] and list(result["results"]) == ["4", "8"]
    for r in result["results"].values():
        assert all(r[name]["ms"] > 0 and r[name]["peak_mib"] > 0 for name in ("floor", "lorakit lora", "peft lora"))
        assert r["ratios"]["peak lorakit / peft"] > 0
    assert "| 8 | lorakit / PEFT |" in md.read_text()


@pytest.mark.parametrize("args, message", [
    (["--plot", "x.png"], "--model moe: --plot not supported"),
    (["--compile"], "--model moe: --compile not supported"),
    (["--experts", "1"], "--experts '1': give expert counts >= 2"),
    (["--experts", "a,b"], "--experts 'a,b': give expert counts >= 2"),
    (["--steps", "0"], "must be >= 1"),
])
def test_moe_bench_bad_input_is_one_clear_line(args, message, capsys):
    assert main(["bench", "--model", "moe", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dora_memory_study_attributes_saved_tensors():
    """``lorakit.bench.dora_memory``: what each projection's node keeps for backward;
    ``dora_saves="recompute"`` keeps DoRA's q_proj near LoRA's size, ``"output"`` does not."""
    from lorakit.bench.dora_memory import saved_by_projection
    from lorakit.core import adapted_layers

    base = build_base(64, 1, 96, 64, 8, seed=0, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1))  # z: 256 tokens x 64
    own = {}
    for label, method, saves in (("lora", "lora", "output"), ("output", "dora", "output"),
                                 ("recompute", "dora", "recompute")):
        model = adapt(Method("lorakit", method), base, rank=4, seed=0)
        for layer in adapted_layers(model).values():
            layer.dora_saves = saves
        saved = saved_by_projection(model, lambda model=model: model(input_ids=ids, labels=ids).loss.backward())
        own[label] = saved["q_proj"]["own"]
        assert "(rest)" in saved and all(set(v) == {"own", "shared"} for v in saved.values())
    # recompute keeps only small extras (g: one value per output row); output keeps z (tokens x out)
    assert own["recompute"] - own["lora"] < 0.1 * (own["output"] - own["lora"]), own


@pytest.mark.slow
def test_gpu_check_dry_run_passes_the_bench_checks(tmp_path):
    """scripts/gpu_check.sh --dry-run (any machine): lists its steps, the quantized fused path
    and the MoE bench among them, and every bench command line passes the bench's own checks."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("bench ", "bench-moe", "bench-nf4", "quantized-fused", "compile-tests", "conformance", "autocast"):
        assert step in done.stdout
    assert "every bench command line passes" in done.stdout and "refused" not in done.stdout
