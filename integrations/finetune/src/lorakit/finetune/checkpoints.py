"""Periodic checkpoints of a fine-tuning run, each complete or absent.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding lorakit's native
checkpoint of the backbone's adapter (``adapter_config.json`` +
``adapter_model.safetensors`` + the optimizer state, as ``lorakit.core.save`` writes it), the
head (``head.safetensors``) and the trainer state (``trainer_state.json`` and the
RNG in ``trainer_rng.safetensors``). It is written under a hidden temporary name and
put in place as one unit by ``lorakit.core.atomic.publish`` (the scheme of
``lorakit.core.atomic``); only then are older checkpoints deleted. An interrupt
(Ctrl-C, SIGKILL) at any moment leaves the last complete checkpoint valid under its
``step-*`` name, and no partial folder is ever named ``step-*``.

Publishing step N and deleting this run's step N-1 is one step for Ctrl-C: a SIGINT
that arrives in between is held until both are done (:func:`sigint_deferred`), so a
Ctrl-C leaves exactly one checkpoint of the run, the latest. (A SIGKILL there can
leave both, each complete; the next save or a successful end deletes the older.)

A run deletes or replaces only checkpoints it wrote itself (``run_id`` in
``trainer_state.json``) until it has finished: a failing run never touches the
checkpoints of a finished run in the same folder. Only at the end of a successful run
does :func:`keep_only` drop every other checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit.core import atomic
from lorakit.core import checkpoint as ckpt
from lorakit.core.validation import read_json

from .errors import FinetuneError

STEP_DIR = re.compile(r"step-(\d{6,})")


_fsync_tree = atomic.fsync_tree  # a name of this module, so that tests can interrupt here


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(model, optimizer, root: Path, step: int, state: dict, *, replace: bool = False) -> Path | None:
    """Write ``root/step-NNNNNN`` as one unit and delete this run's older checkpoints.

    Another run's checkpoint under that name is left alone and None returned, unless
    ``replace`` (for a run that has finished).
    """
    final = checkpoint_path(root, step)
    root.mkdir(parents=True, exist_ok=True)
    atomic.recover_all(root)  # finish or clear what a killed save left
    if final.exists() and not replace and not written_by(final, state["run_id"]):
        return None
    tmp = atomic.staging_folder(final)
    try:
        ckpt.write_files(model.backbone, tmp, optimizer)
        save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()},
                  str(tmp / "head.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "trainer_rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        _fsync_tree(tmp)
        with sigint_deferred():  # publish + prune: a Ctrl-C never lands between the two
            atomic.publish(tmp, final)
            for old in _checkpoints(root):  # only now is it safe to drop this run's previous ones
                if old != final and written_by(old, state["run_id"]):
                    atomic.discard(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    return final


@contextlib.contextmanager
def sigint_deferred():
    """Hold a SIGINT (Ctrl-C) that arrives inside the block; deliver it, to the handler
    that was in place, once the block is done.

    A no-op outside the main thread, where Python cannot set signal handlers (SIGINT
    is delivered to the main thread there anyway), and when the handler in place is
    not Python's (``signal.getsignal`` gives None)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt here under the default handler


def keep_only(root: Path, final: Path) -> None:
    """After a successful run: drop every checkpoint but ``final``, of any run."""
    for old in _checkpoints(root):
        if old != final:
            atomic.discard(old)


def written_by(path: Path | None, run_id: str) -> bool:
    try:
        return path is not None and read_json(path / "trainer_state.json").get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        return False


def _checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []


def latest_checkpoint(root: Path) -> Path | None:
    if root.is_dir():
        atomic.recover_all(root)  # a save killed mid-swap: its checkpoint back under its name
    return max(_checkpoints(root), key=lambda p: int(p.name[5:]), default=None)


_COMPOSITION = ("recipe", "generator", "normalizer", "init", "magnitude", "rank")


def _check_same_adapter(model, path: Path) -> None:
    """A checkpoint of another recipe, primitive or rank: one error naming them."""
    from lorakit.core import adapter_config
    from lorakit.core.plugins import format_spec

    saved = ckpt.read_config(path)["adapter"]
    current = json.loads(json.dumps(adapter_config(model.backbone)))
    diff = [k for k in _COMPOSITION if saved.get(k) != current.get(k)]
    if diff:
        def show(adapter):
            return ", ".join(f"{k} {format_spec(v) if isinstance(v := adapter.get(k), dict) else v}" for k in diff)
        raise FinetuneError(f"--resume {path}: the checkpoint was trained with {show(saved)}, this run has "
                            f"{show(current)}; resume with the checkpoint's --recipe, parts and --rank")


def load_checkpoint(model, optimizer, path: Path) -> dict:
    """Restore adapter, head, optimizer and RNG; return the trainer state."""
    if (path / "checkpoints").is_dir():  # a run folder: take its latest checkpoint
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FinetuneError(f"{path} has no checkpoint (checkpoints/step-*) to resume from")
        path = found
    atomic.recover(path)
    try:
        state = read_json(path / "trainer_state.json", FinetuneError)  # untrusted: read strictly
    except FileNotFoundError:
        raise FinetuneError(f"{path} is not a finetune checkpoint (no trainer_state.json)") from None
    _check_same_adapter(model, path)  # before load, whose optimizer check would speak of group sizes
    ckpt.load(model.backbone, path, optimizer=optimizer)  # checks recipe and shapes first
    try:
        model.head.load_state_dict(load_file(str(path / "head.safetensors")))
        torch.set_rng_state(load_file(str(path / "trainer_rng.safetensors"))["torch"])
    except Exception as exc:  # missing, corrupt or another head size
        raise FinetuneError(f"{path}: cannot restore the head or RNG ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return state
