"""Periodic checkpoints of a fine-tuning run, each complete or absent.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding lorakit's native
checkpoint of the backbone's adapter (``adapter_config.json`` +
``adapter_model.safetensors`` + the optimizer state, by ``lorakit.core.save``), the
head (``head.safetensors``) and the trainer state (``trainer_state.json`` and the
RNG in ``trainer_rng.safetensors``). It is written under a hidden temporary name and
renamed into place (atomic on POSIX); only then are older checkpoints renamed away
to hidden names and deleted. An interrupt (Ctrl-C, SIGKILL) at any moment leaves the
last complete checkpoint valid under its ``step-*`` name, and no partial folder is
ever named ``step-*``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lorakit.core as core

from .errors import FinetuneError

STEP_DIR = re.compile(r"step-(\d{6,})")


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(model, optimizer, root: Path, step: int, state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    core.save(model.backbone, tmp, optimizer=optimizer)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()},
              str(tmp / "head.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "trainer_rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in root.iterdir():  # only now is it safe to drop the previous checkpoints:
        if old != final and STEP_DIR.fullmatch(old.name):  # hide each one first (atomic rename)
            os.rename(old, root / f".old-{old.name}.{os.getpid()}")
    for old in root.iterdir():  # then delete hidden leftovers, ours or of an interrupted run
        if old.name.startswith((".old-step-", ".step-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def written_by(path: Path | None, run_id: str) -> bool:
    try:
        return path is not None and json.loads((path / "trainer_state.json").read_text()).get("run_id") == run_id
    except (OSError, ValueError):
        return False


def latest_checkpoint(root: Path) -> Path | None:
    steps = [p for p in root.glob("step-*") if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def load_checkpoint(model, optimizer, path: Path) -> dict:
    """Restore adapter, head, optimizer and RNG; return the trainer state."""
    if (path / "checkpoints").is_dir():  # a run folder: take its latest checkpoint
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FinetuneError(f"{path} has no checkpoint (checkpoints/step-*) to resume from")
        path = found
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        raise FinetuneError(f"{path} is not a finetune checkpoint (no trainer_state.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{path / 'trainer_state.json'} is corrupt ({exc})") from None
    core.load(model.backbone, path, optimizer=optimizer)  # checks recipe and shapes first
    try:
        model.head.load_state_dict(load_file(str(path / "head.safetensors")))
        torch.set_rng_state(load_file(str(path / "trainer_rng.safetensors"))["torch"])
    except Exception as exc:  # missing, corrupt or another head size
        raise FinetuneError(f"{path}: cannot restore the head or RNG ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return state
