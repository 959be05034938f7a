"""``--eval-every``: the held-out metric along one run (no refit per point), on the tiny
BERT of test_finetune; the sweep's per-step median/range, its plot, and per-entry rates."""
# ruff: noqa: F811  (the imported fixture ``tiny`` is a parameter of every test)

from __future__ import annotations

import json

import pytest

from lorakit.core.cli import main

pytest.importorskip("transformers")
from test_finetune import PNG, _args, tiny  # noqa: E402,F401
from test_sweep import _sweep  # noqa: E402


def test_eval_every_records_the_curve_and_leaves_training_bit_identical(tiny, tmp_path):
    # dropout draws from the RNG in train mode: an evaluation that drew or left eval mode would show
    plain, along = tmp_path / "plain", tmp_path / "along"
    assert main(_args(tiny, plain, "--dropout", "0.2", steps=7)) == 0
    assert main(_args(tiny, along, "--dropout", "0.2", "--eval-every", "3", "--save-every", "3", steps=7)) == 0
    a, b = (json.loads((p / "summary.json").read_text()) for p in (plain, along))
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"]  # bit-identical, not approximately
    assert a["curve"] == [] and [s for s, _ in b["curve"]] == [3, 6, 7]
    assert b["curve"][-1][1] == b["metric"]["value"]
    assert all(-1 <= v <= 1 for _, v in b["curve"])
    state = json.loads(next((along / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["curve"] == b["curve"]  # the final checkpoint carries it, so a resume continues it


def test_resume_continues_the_curve(tiny, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(_args(tiny, first, "--eval-every", "2", "--save-every", "4", steps=4)) == 0
    assert main(_args(tiny, second, "--eval-every", "2", "--resume", str(first), steps=6)) == 0
    curve = json.loads((second / "summary.json").read_text())["curve"]
    assert [s for s, _ in curve] == [2, 4, 6]


def test_eval_every_must_not_be_negative(tiny, tmp_path, capsys):
    assert main(_args(tiny, tmp_path / "neg", "--eval-every", "-1")) == 2
    err = capsys.readouterr().err
    assert "--eval-every -1" in err and "Traceback" not in err and not (tmp_path / "neg").exists()


def test_sweep_curve_per_entry_lrs_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / "sw"
    argv = _sweep(tiny, out, "--recipes", "lora", "delora+init=kaiming@2e-3/2e-2", "--lrs", "1e-3",
                  "--seeds", "0,1", "--eval-every", "2", steps=4)
    assert main(argv) == 0
    assert "6 runs (0 resumed" in capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert {(c["entry"]["label"], c["lr"]) for c in result["cells"]} == {
        ("lora", 1e-3), ("delora+init=kaiming", 2e-3), ("delora+init=kaiming", 2e-2)}
    assert result["cells"][0]["setup"]["eval_every"] == 2
    for row in result["rows"]:
        for r in row["per_lr"]:
            assert [s for s, _ in r["curve"]] == [2, 4]
            last = r["curve"][-1][1]
            assert last["n"] == 2 and last["median"] == pytest.approx(r["metric"]["median"])
            assert last["min"] <= last["median"] <= last["max"]
    md = (out / "sweep.md").read_text()
    assert "held-out pearson vs step" in md and "| step 2 | step 4 |" in md and "| delora+init=kaiming | 0.02 |" in md
    assert (out / "sweep-curve.png").read_bytes()[:8] == PNG
    # the per-entry rates name the same cells as --lrs would; other eval-every settings rerun
    assert main(_sweep(tiny, out, "--recipes", "delora+init=kaiming", "--lrs", "2e-2", "--seeds", "0",
                       "--eval-every", "2", steps=4)) == 0
    assert "1 runs (1 resumed" in capsys.readouterr().out
    assert main(_sweep(tiny, out, "--recipes", "lora", "--lrs", "1e-3", "--seeds", "0", steps=4)) == 0
    assert "1 runs (0 resumed" in capsys.readouterr().out


@pytest.mark.parametrize("entry", ["lora@", "lora@x", "lora@1e-3/1e-3", "lora@-1"])
def test_sweep_bad_per_entry_lrs(tiny, tmp_path, capsys, entry):
    assert main(_sweep(tiny, tmp_path / "bad", "--recipes", entry)) == 2
    err = capsys.readouterr().err
    assert "after @ give distinct positive learning rates" in err and "Traceback" not in err


def test_lambda_lr_ratio_is_lambda_lr_at_that_multiple(tiny, tmp_path):
    ratio, fixed = tmp_path / "ratio", tmp_path / "fixed"
    assert main(_args(tiny, ratio, "--recipe", "delora", "--lambda-lr-ratio", "10", steps=4)) == 0
    assert main(_args(tiny, fixed, "--recipe", "delora", "--lambda-lr", "5e-2", steps=4)) == 0  # _args: --lr 5e-3
    a, b = (json.loads((p / "summary.json").read_text()) for p in (ratio, fixed))
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"]


def test_lambda_lr_ratio_bad_input_and_setup_compatibility(tiny, tmp_path, capsys):
    from lorakit.finetune.sweep import _setup
    from lorakit.finetune.train import FinetuneConfig

    for extra, message in ((["--lambda-lr-ratio", "0"], "--lambda-lr-ratio 0.0: must be a positive number"),
                           (["--lambda-lr-ratio", "2", "--lambda-lr", "1e-3"], "both given")):
        assert main(_args(tiny, tmp_path / "bad", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    # unset, the ratio is not in a cell's setup: records written before the option stay valid
    assert "lambda_lr_ratio" not in _setup(FinetuneConfig())
    assert _setup(FinetuneConfig(lambda_lr_ratio=10.0))["lambda_lr_ratio"] == 10.0


def test_a_diverged_cell_with_eval_every_is_resumed(tiny, tmp_path, capsys):
    argv = _sweep(tiny, tmp_path / "div", "--recipes", "lora", "--lrs", "1e30", "--seeds", "0", "--eval-every", "2",
                  steps=4)
    assert main(argv) == 0
    (cell,) = json.loads((tmp_path / "div" / "sweep.json").read_text())["cells"]
    assert cell["diverged"] and cell["curve"] is None
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 runs (1 resumed" in out and "running that cell again" not in out


def test_plots_of_a_sweep_where_every_run_diverged_say_so(tmp_path):
    # nothing to draw: no empty legend (matplotlib's warning), a note on the figure instead
    import warnings

    from lorakit.finetune.plots import sweep_curve_plot, sweep_loss_plot, sweep_lr_plot

    rows = [{"label": "lora", "best_lr": 0.1, "per_lr": [{"lr": 0.1, "metric": None, "diverged": True}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in (sweep_lr_plot(rows, tmp_path / "lr.png", "pearson"),
                     sweep_loss_plot([{**rows[0], "per_lr": []}], [], tmp_path / "loss.png", "loss"),
                     sweep_curve_plot(rows, tmp_path / "curve.png", "pearson")):
            assert path.read_bytes().startswith(PNG)
