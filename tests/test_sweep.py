"""``lorakit sweep`` end to end on the tiny BERT of test_finetune: a 2 × 2 × 2 grid
through the real command line, the outputs, resuming, divergence and bad input."""
# ruff: noqa: F811  (the imported fixture ``tiny`` is a parameter of every test)

from __future__ import annotations

import json

import pytest

from lorakit.core.cli import main

pytest.importorskip("transformers")
from test_finetune import PNG, tiny  # noqa: E402,F401  (the module-scoped tiny model + data fixture)


def _sweep(tiny, out, *extra, steps=3):
    return ["sweep", "--model", str(tiny["model"]), "--data", str(tiny["csv"]), "--text-column", "sentence",
            "--label-column", "score", "--steps", str(steps), "--batch-size", "8", "--rank", "2", "--no-progress",
            "--threads", "1", "--out", str(out), *extra]


def test_sweep_grid_outputs_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / "sw"
    argv = _sweep(tiny, out, "--recipes", "lora", "delora+init=kaiming", "--lrs", "1e-3,1e-2", "--seeds", "0,1")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["cells"]) == 8 and result["metric"] == "pearson"
    assert {c["entry"]["label"] for c in result["cells"]} == {"lora", "delora+init=kaiming"}
    for row in result["rows"]:
        assert row["best_lr"] in (1e-3, 1e-2) and row["trainable"] > 0
        for r in row["per_lr"]:
            assert r["seeds"] == 2 and r["metric"]["min"] <= r["metric"]["median"] <= r["metric"]["max"]
            assert r["auc"]["n"] == 2
    cell = result["cells"][0]
    assert cell["auc"] == pytest.approx(sum(cell["losses"]) / 3) and len(cell["losses"]) == 3
    md = (out / "sweep.md").read_text()
    assert "| lora | 0.001 |" in md and "**best**" in md and "lrs within 0.01 of best" in md
    for png in ("sweep-lr.png", "sweep-loss.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert not list(out.glob("cells/*/*/checkpoints"))  # deleted once recorded
    assert "8 runs (0 resumed" in printed

    # resumable: a finished cell is not run again; a cell whose record is gone is
    (out / "cells" / "lora" / "lr0.01-seed1" / "cell.json").unlink()
    assert main(argv) == 0
    assert "8 runs (7 resumed" in capsys.readouterr().out
    again = json.loads((out / "sweep.json").read_text())
    assert [c["metric"] for c in again["cells"]] == pytest.approx([c["metric"] for c in result["cells"]])
    # a changed setup (steps) reruns every cell
    assert main(_sweep(tiny, out, "--recipes", "lora", "--lrs", "1e-3", "--seeds", "0", steps=2)) == 0
    assert "1 runs (0 resumed" in capsys.readouterr().out


def test_sweep_records_divergence(tiny, tmp_path, capsys):
    out = tmp_path / "div"
    assert main(_sweep(tiny, out, "--recipes", "lora", "--lrs", "1e30", "--seeds", "0", steps=4)) == 0
    result = json.loads((out / "sweep.json").read_text())
    (cell,) = result["cells"]
    assert cell["diverged"] and cell["metric"] is None and "loss became" in cell["error"]
    assert "| 1/1 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--recipes", "nope"], "unknown recipe"),
    (["--recipes", "lora+generatr=mlp"], "RECIPE+PART=SPEC"),
    (["--lrs", "1e-3,x"], "comma-separated numbers"),
    (["--lrs", "-1"], "positive"),
    (["--seeds", "0,0"], "distinct seeds"),
])
def test_sweep_bad_input(tiny, tmp_path, capsys, extra, message):
    assert main(_sweep(tiny, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_learning_rates_that_format_alike_get_their_own_cells(tiny, tmp_path, capsys):
    out = tmp_path / "alike"
    assert main(_sweep(tiny, out, "--recipes", "lora", "--lrs", "1e-4,1.000001e-4", "--seeds", "0")) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [c["lr"] for c in result["cells"]] == [1e-4, 1.000001e-4]  # exact, in order
    assert sorted(p.name for p in (out / "cells" / "lora").iterdir()) == ["lr0.0001-seed0", "lr0.0001000001-seed0"]
    assert [r["lr"] for r in result["rows"][0]["per_lr"]] == [1e-4, 1.000001e-4]
    assert all(r["seeds"] == 1 for r in result["rows"][0]["per_lr"])
    md = (out / "sweep.md").read_text()
    assert "| lora | 0.0001 |" in md and "| lora | 0.0001000001 |" in md


def test_damaged_cell_records_rerun_that_cell_only_or_are_one_error(tiny, tmp_path, capsys):
    out = tmp_path / "damaged"
    argv = _sweep(tiny, out, "--recipes", "lora", "--lrs", "1e-3", "--seeds", "0,1,2")
    assert main(argv) == 0
    capsys.readouterr()
    cells = out / "cells" / "lora"
    (cells / "lr0.001-seed0" / "cell.json").write_text("[]")
    record = json.loads((cells / "lr0.001-seed1" / "cell.json").read_text())
    del record["metric"]
    (cells / "lr0.001-seed1" / "cell.json").write_text(json.dumps(record))
    kept = (cells / "lr0.001-seed2" / "cell.json").read_bytes()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 runs (1 resumed" in printed
    assert "lr0.001-seed0/cell.json holds a JSON list, not a cell record; running that cell again" in printed
    assert "lr0.001-seed1/cell.json lacks ['metric']; running that cell again" in printed
    assert (cells / "lr0.001-seed2" / "cell.json").read_bytes() == kept
    assert all(isinstance(c["metric"], float) for c in json.loads((out / "sweep.json").read_text())["cells"])

    # a folder where a record belongs: one error line before any cell runs, nothing written
    (cells / "lr0.001-seed0" / "cell.json").unlink()
    (cells / "lr0.001-seed0" / "cell.json").mkdir()
    before = (out / "sweep.json").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "lr0.001-seed0/cell.json is not a regular file; remove it (that cell is then run again)" in err
    assert (out / "sweep.json").read_bytes() == before and (cells / "lr0.001-seed2" / "cell.json").read_bytes() == kept
