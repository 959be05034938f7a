"""The command line: every bad argument is one ``lorakit: error:`` line and exit code 2,
found before the command's work starts; and ``--help`` that helps.

Each case of ``BAD`` is a row of the "Command line" table in docs/bad-inputs.md.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from test_finetune import _args, tiny  # noqa: F401 (tiny: a fixture, used by name)

from lorakit.core.cli import main

DOC = Path(__file__).parents[1] / "docs" / "bad-inputs.md"
NOT_A_FOLDER = "/proc/version/out"  # a file's "subfolder": no one can create it, root included


@pytest.fixture
def no_work(monkeypatch):
    """Each command's work fails loudly: a bad argument must be refused before it."""
    import lorakit.bench.cli
    import lorakit.finetune.train
    import lorakit.studies.mf

    def work(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    monkeypatch.setattr(lorakit.finetune.train, "load_data", work)
    monkeypatch.setattr(lorakit.bench.cli, "run_bench", work)
    monkeypatch.setattr(lorakit.studies.mf, "study", work)


def one_error_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), err
    assert needle in lines[0], err
    return lines[0]


# (command line, what the error says); "{tmp}" is a fresh temporary folder
BAD = [
    ("finetune --threads 0", "--threads 0: the number of threads must be >= 1"),
    ("compare --threads -1", "--threads -1: the number of threads must be >= 1"),
    ("bench --threads -1", "--threads -1: the number of threads must be >= 0"),
    ("finetune --seed -1", "--seed -1: a seed must be an integer in [0, 9223372036854775807]"),
    ("finetune --split-seed 9223372036854775808", "--split-seed 9223372036854775808: a seed must be an integer"),
    ("bench --seed -5", "--seed -5: a seed must be an integer"),
    ("mf --seed 99999999999999999999", "--seed 99999999999999999999: a seed must be an integer"),
    ("finetune --device cuda:7", "--device cuda:7: "),
    ("finetune --device tpu", "--device 'tpu': not a device; use auto, cpu or cuda (cuda:N for GPU N)"),
    ("bench --device meta", "--device meta: not supported; use cpu or cuda (cuda:N for GPU N)"),
    (f"finetune --out {NOT_A_FOLDER}", f"output folder {NOT_A_FOLDER} is not writable"),
    (f"compare --out {NOT_A_FOLDER}", f"output folder {NOT_A_FOLDER} is not writable"),
    (f"bench --json {NOT_A_FOLDER}/r.json", f"--json {NOT_A_FOLDER}/r.json: cannot write there"),
    ("bench --markdown {tmp}", "is a folder; give a file name"),
    (f"mf --plot {NOT_A_FOLDER}/p.png", f"--plot {NOT_A_FOLDER}/p.png: cannot write there"),
    ("finetune --resume {tmp}/missing", "/missing: no such folder"),
    ("finetune --weight-decay nan", "--weight-decay nan: must be a finite number >= 0"),
    ("finetune --lambda-lr nan", "--lambda-lr nan: must be a positive number (omit it to use --lr)"),
    ("finetune --lambda-lr-ratio 0", "--lambda-lr-ratio 0.0: must be a positive number (omit it to use --lr)"),
    ("finetune --lambda-lr-ratio 2 --lambda-lr 1e-3", "--lambda-lr and --lambda-lr-ratio both given: pass one"),
    ("finetune --eval-every -1", "--eval-every -1: must be >= 0 (0: evaluate only at the end)"),
    ("sweep --recipes lora@x", "sweep entry 'lora@x': after @ give distinct positive learning rates separated by /"),
    ("bench --compile --backend nosuch", "--backend 'nosuch': not a torch.compile backend; use one of"),
    ("new-plugin my-init --dir /proc/version", "--dir /proc/version: is not a folder"),
    (f"new-plugin my-init --dir {NOT_A_FOLDER}", f"--dir {NOT_A_FOLDER}: cannot create a folder there"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[b[0].split(" {")[0] for b in BAD])
def test_bad_argument_is_one_error_line_exit_2_before_the_work(argv, needle, tmp_path, capsys, no_work):
    if "cuda:7" in argv:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    args = [a.format(tmp=tmp_path) for a in argv.split()]
    if args[0] in ("finetune", "compare") and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(args) == 2
    one_error_line(capsys, needle.format(tmp=tmp_path))


def test_missing_output_folders_are_created_before_the_work(tmp_path, no_work):
    target = tmp_path / "new" / "deeper" / "result.json"
    with pytest.raises(AssertionError, match="the work started"):  # the checks passed
        main(["bench", "--json", str(target), "--no-progress"])
    assert target.parent.is_dir()


def test_every_cli_case_is_in_the_docs_table():
    text = DOC.read_text()
    section = text[text.index("## Command line"):]
    rows = dict(re.findall(r"^\| `lorakit ([^`]+)` \| (.*) \|$", section, flags=re.M))
    assert set(rows) == {argv.replace("{tmp}", "DIR") for argv, _ in BAD}
    for argv, needle in BAD:
        assert needle.format(tmp="DIR") in rows[argv.replace("{tmp}", "DIR")]


# -- damaged --resume state ------------------------------------------------------------

@pytest.fixture(scope="module")
def run_with_checkpoint(tiny, tmp_path_factory):  # noqa: F811 (test_finetune's tiny BERT fixture)
    """A 2-step finetune of a tiny BERT whose final checkpoint the cases below damage."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(_args(tiny, out, steps=2)) == 0
    return tiny, out, _args


def _damage(folder: Path, how: str) -> None:
    ckpt = next((folder / "checkpoints").glob("step-*"))
    state = ckpt / "trainer_state.json"
    if how == "state-not-json":
        state.write_text("{not json")
    elif how == "state-no-step":
        state.write_text(json.dumps({"losses": []}))
    elif how == "state-a-list":
        state.write_text("[2]")
    elif how == "state-missing":
        state.unlink()
    elif how == "weights-truncated":
        weights = ckpt / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "config-garbage":
        (ckpt / "adapter_config.json").write_text('{"format": 7}')
    elif how == "head-missing":
        (ckpt / "head.safetensors").unlink()
    elif how == "no-checkpoints":
        shutil.rmtree(ckpt)


@pytest.mark.parametrize("how", ["state-not-json", "state-no-step", "state-a-list", "state-missing",
                                 "weights-truncated", "config-garbage", "head-missing", "no-checkpoints"])
def test_damaged_resume_state_is_one_error_line_exit_2(how, run_with_checkpoint, tmp_path, capsys):
    tiny_data, run, args = run_with_checkpoint
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    _damage(damaged, how)
    capsys.readouterr()
    assert main(args(tiny_data, damaged, "--resume", str(damaged), steps=4)) == 2
    one_error_line(capsys, "")


def test_resume_prints_no_scheduler_order_warning(run_with_checkpoint, tmp_path):
    tiny_data, run, args = run_with_checkpoint
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args(tiny_data, resumed, "--resume", str(resumed), steps=3)) == 0
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]


# -- help ------------------------------------------------------------------------------

def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_whole_sentences_without_rest_markup(capsys):
    text = help_text(capsys)
    assert "``" not in text and "Composable low-rank adapters" in text
    assert "lorakit COMMAND --help" in text


@pytest.mark.parametrize("command, shown", [
    ("finetune", ["--steps STEPS         default: 100", "--rank RANK           default: 8", "(default: auto)"]),
    ("compare", ["--steps STEPS         default: 100", "output folder (default runs/compare)"]),
    ("bench", ["(default: 2)", "default: 0"]),
    ("mf", ["(default: sgd)", "default: 1000"]),
])
def test_subcommand_help_shows_defaults(command, shown, capsys):
    text = re.sub(r"\s+", " ", help_text(capsys, command))
    for fragment in shown:
        assert re.sub(r"\s+", " ", fragment) in text


def test_demo_help_describes_it_and_its_columns(capsys):
    text = help_text(capsys, "demo")
    assert "small MLP" in text
    for column in ("trainable", "|init-base|", "loss after 5 steps", "|merged-unmerged|"):
        assert f"  {column}" in text


def test_mf_help_cites_a_file_in_the_repository(capsys):
    text = help_text(capsys, "mf")
    cited = re.findall(r"(docs/\S+\.md)", text)
    assert cited and all((DOC.parents[1] / c).is_file() for c in cited)
    assert "op-lora.txt" not in text + help_text(capsys)


def test_unknown_option_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--stepz", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lorakit finetune") and "unrecognized arguments: --stepz 3" in err


# -- output ----------------------------------------------------------------------------

TINY_BENCH = ["--hidden", "64", "--layers", "1", "--intermediate", "96", "--vocab", "64", "--batch", "2",
              "--seq", "8", "--steps", "1", "--repeats", "1", "--no-progress", "--no-floor"]


def test_bench_shows_measurements_only_and_says_where_it_wrote(tmp_path, capsys):
    md = tmp_path / "tables" / "bench.md"  # a missing folder is created
    with warnings.catch_warnings():
        # peft's own deprecated call must not reach the user through lorakit bench
        warnings.filterwarnings("error", message=".*is_gradient_checkpointing", category=FutureWarning)
        assert main(["bench", *TINY_BENCH, "--recipes", "lora", "--peft", "lora", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "ratios" in out and f"wrote {md}" in out
    for text in (out, md.read_text()):
        assert "target" not in text and "met" not in text.split()  # the project's goals, not the user's


def test_bench_without_peft_prints_no_empty_ratio_table(capsys):
    assert main(["bench", *TINY_BENCH, "--recipes", "lora", "--peft", ""]) == 0
    out = capsys.readouterr().out
    assert "lorakit lora" in out and "ratio" not in out


def test_demo_prints_a_legend_of_its_columns(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "|init-base|" in out.split("columns:")[1] and "|merged-unmerged|" in out.split("columns:")[1]


def test_one_seed_range_for_the_api_and_the_cli():
    """The CLI accepts every seed ``Adapter(seed=)`` accepts, and the largest one trains (the
    per-epoch shuffle derives its seed from it without overflowing torch's generator)."""
    import torch

    from lorakit.core import Adapter
    from lorakit.core.cli import SEED_MAX, check_seed
    from lorakit.core.validation import MAX_SEED
    from lorakit.finetune.train import Batches

    assert SEED_MAX == MAX_SEED
    check_seed(MAX_SEED)
    Adapter(seed=MAX_SEED)
    batches = Batches({"input_ids": [[1, 2]] * 4}, torch.zeros(4), 2, MAX_SEED, 0)
    assert sorted(batches._perm(3)) == [0, 1, 2, 3]
