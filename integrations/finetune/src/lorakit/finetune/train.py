"""``finetune(config)``: one fine-tuning run, start to finish.

load data + model → apply the adapter → AdamW with linear warm-up and decay, a
progress bar with the running loss → periodic atomic checkpoints → held-out
evaluation → native checkpoint, PEFT export, loss-curve PNG, ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import lorakit.core as core
from lorakit.core import Adapter, schema

from .checkpoints import checkpoint_path, keep_only, latest_checkpoint, load_checkpoint, save_checkpoint, written_by
from .compose import build_adapter
from .data import Dataset, load_data, split
from .errors import FinetuneError, Interrupted
from .model import HEAD, TextModel, attach_head, load_backbone

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class FinetuneConfig:
    recipe: str | None = None  # None and no primitives given: lora
    generator: str | None = None
    normalizer: str | None = None
    init: str | None = None
    magnitude: str | None = None
    model: str | None = None  # None: the embedded MiniLM-L6
    data: str | None = None  # None: the embedded VADER lexicon
    text_column: str = "text"
    label_column: str = "label"
    task: str = "auto"
    targets: list[str] | None = None  # None: the registered defaults of the model family
    rank: int = 8
    steps: int = 100
    lr: float = 2e-3
    lambda_lr: float | None = None
    lambda_lr_ratio: float | None = None  # scalar slots (DeLoRA's λ) at this many times lr; exclusive with lambda_lr
    dropout: float = 0.0  # Adapter(dropout=p): PEFT's lora_dropout on the adapter input
    weight_decay: float = 0.0
    warmup: float = 0.1
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # held-out metric of the live model every N steps (the summary's "curve"); 0: at the end only
    resume: str | None = None
    out: str = "runs/finetune"
    device: str = "auto"
    threads: int | None = None  # None: auto_threads()
    quantize: str | None = None  # nf4, fp4 or int8: a bitsandbytes-quantized frozen base (lorakit-bitsandbytes)
    progress: bool = True
    extra: dict = field(default_factory=dict)


def check_output(out: Path) -> None:
    """``out`` can be made and written, checked creating nothing: a run refused later for a
    bad argument leaves no empty --out folder (the run creates it once every check passed)."""
    from lorakit.core.cli import output_problem

    if problem := output_problem(out):
        raise FinetuneError(f"output folder {out} is not writable ({problem}); pass another --out")


def check_writable(out: Path) -> None:
    """:func:`check_output`, then the folder is created."""
    check_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FinetuneError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                            "pass another --out") from None


def _check_numbers(cfg: FinetuneConfig) -> None:
    for name in ("rank", "steps", "batch_size", "max_length"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise FinetuneError(f"--lr {cfg.lr}: must be a positive number")
    if cfg.lambda_lr is not None and not (cfg.lambda_lr > 0 and math.isfinite(cfg.lambda_lr)):
        raise FinetuneError(f"--lambda-lr {cfg.lambda_lr}: must be a positive number (omit it to use --lr)")
    if cfg.lambda_lr_ratio is not None and not (cfg.lambda_lr_ratio > 0 and math.isfinite(cfg.lambda_lr_ratio)):
        raise FinetuneError(f"--lambda-lr-ratio {cfg.lambda_lr_ratio}: must be a positive number (omit it to use --lr)")
    if cfg.lambda_lr_ratio is not None and cfg.lambda_lr is not None:
        raise FinetuneError("--lambda-lr and --lambda-lr-ratio both given: pass one (a rate, or a multiple of --lr)")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):  # NaN fails both comparisons
        raise FinetuneError(f"--weight-decay {cfg.weight_decay}: must be a finite number >= 0")
    if cfg.save_every < 0 or not 0 <= cfg.warmup < 1:
        raise FinetuneError("--save-every must be >= 0 and --warmup in [0, 1)")
    if cfg.eval_every < 0:
        raise FinetuneError(f"--eval-every {cfg.eval_every}: must be >= 0 (0: evaluate only at the end)")


def auto_threads() -> int:
    """torch's default (all cores), or 1 thread when the machine is already busy.

    Measured on a 2-core machine shared with other jobs (load average > cores):
    MiniLM training ran at 1.25 steps/s with 1 thread and 0.08 steps/s with 2, the
    OpenMP workers spinning against the other processes.
    """
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


class Batches:
    """Step ``k``'s batch is a pure function of (seed, k): shuffled epochs, padded per batch."""

    def __init__(self, encoded: dict[str, list], labels: torch.Tensor, batch_size: int, seed: int,
                 pad_id: int):
        self.encoded, self.labels, self.bs, self.seed, self.pad_id = encoded, labels, batch_size, seed, pad_id
        self.n = len(labels)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)  # seeds reach 2**63 - 1
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        idx, pos = [], step * self.bs
        while len(idx) < self.bs:
            epoch, i = divmod(pos + len(idx), self.n)
            idx += self._perm(epoch)[i:i + self.bs - len(idx)]
        return idx

    def collate(self, idx: list[int], device) -> dict[str, torch.Tensor]:
        width = max(len(self.encoded["input_ids"][i]) for i in idx)
        batch = {}
        for key, seqs in self.encoded.items():
            pad = self.pad_id if key == "input_ids" else 0
            rows = [seqs[i] + [pad] * (width - len(seqs[i])) for i in idx]
            batch[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return batch


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, list]:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return {k: enc[k] for k in TOKEN_KEYS if k in enc}


def _targets(data: Dataset, train: Dataset) -> tuple[torch.Tensor, dict]:
    """Training targets: standardized values (regression) or class indices."""
    if data.task == "regression":
        y = torch.tensor(train.labels, dtype=torch.float32)
        mean, std = y.mean().item(), y.std().item() or 1.0
        return (y - mean) / std, {"mean": mean, "std": std}
    return torch.tensor(train.labels, dtype=torch.long), {"classes": data.classes}


@torch.no_grad()
def evaluate(model: TextModel, batches: Batches, task: str, norm: dict, device, batch_size: int = 256) -> dict:
    model.eval()
    order = sorted(range(batches.n), key=lambda i: len(batches.encoded["input_ids"][i]))
    preds = torch.empty(batches.n) if task == "regression" else torch.empty(batches.n, dtype=torch.long)
    for start in range(0, batches.n, batch_size):
        idx = order[start:start + batch_size]
        out = model(batches.collate(idx, device)).float().cpu()
        preds[idx] = out * norm["std"] + norm["mean"] if task == "regression" else out.argmax(-1)
    model.train()
    y = batches.labels
    if task == "regression":
        err = preds - y
        pearson = torch.corrcoef(torch.stack([preds, y]))[0, 1].item()
        return {"pearson": pearson if math.isfinite(pearson) else 0.0, "rmse": err.square().mean().sqrt().item(),
                "mae": err.abs().mean().item()}
    acc = (preds == y).float().mean().item()
    f1s = []
    for c in range(len(norm["classes"])):
        tp = ((preds == c) & (y == c)).sum().item()
        denom = (preds == c).sum().item() + (y == c).sum().item()
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s)}


PRIMARY = {"regression": "pearson", "classification": "accuracy"}


class PeakMemory:
    """Peak memory of the run: CUDA allocator peak, or the process's peak RSS on CPU
    (reset at the start through /proc/self/clear_refs where Linux allows it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def read_mb(self) -> tuple[float, str]:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process peak RSS"
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (since start)"


def _step_peak_mb(model, optimizer, loss) -> float | None:
    """Peak memory of one training step, as ``lorakit bench`` measures it: the bytes kept
    between steps (weights, adapter, optimizer state) + the highest extra allocation
    during the step (profiled). Unlike the process's peak RSS it does not depend on what
    ran before in the process, so every run of one ``compare`` is measured alike.

    Run after everything is saved; with the learning rate at 0 AdamW moves no weight.
    None when lorakit-bench is not installed (the caller keeps the RSS figure)."""
    try:
        from lorakit.bench.measure import step_peak_bytes
        from lorakit.bench.methods import resident_bytes
    except ImportError:
        return None
    lrs = [group["lr"] for group in optimizer.param_groups]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.zero_grad(set_to_none=True)  # the last training step's gradients are not part of this one
        return (step_peak_bytes(step, "cpu") + resident_bytes(model, optimizer)) / 2**20
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)


def _progress(total: int, initial: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5, leave=True)


def _param_groups(model, cfg: FinetuneConfig) -> list[dict]:
    try:  # per-slot learning rates (DeLoRA's λ) where core provides them
        from lorakit.core import param_groups
    except ImportError:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                 "weight_decay": cfg.weight_decay}]
    lambda_lr = cfg.lambda_lr if cfg.lambda_lr_ratio is None else cfg.lambda_lr_ratio * cfg.lr
    return param_groups(model, cfg.lr, weight_decay=cfg.weight_decay, lambda_lr=lambda_lr)


def _export_peft(backbone, path: Path, base: Path) -> tuple[str | None, str | None]:
    try:
        from lorakit.transformers import export_peft
    except ImportError as exc:
        return None, f"lorakit-transformers has no export_peft ({exc})"
    export_peft(backbone, path, base_model_name_or_path=str(base))
    return str(path), None


def finetune(cfg: FinetuneConfig, *, label: str | None = None, log=print) -> dict:
    """Run one fine-tune; return the summary (also written to ``out/summary.json``)."""
    threads = torch.get_num_threads()
    try:
        return _finetune(cfg, label, log)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as it was


def _frozen_base_mb(backbone, quantize: str | None) -> dict:
    """The backbone's frozen-base size in fp32, and after ``quantize`` (nf4/fp4/int8:
    its linear layers replaced in place by bitsandbytes ones, as BitsAndBytesConfig
    would load them)."""
    fp32 = sum(p.numel() * 4 for p in backbone.parameters()) / 2**20
    if not quantize:
        return {"fp32": fp32}
    try:
        from lorakit.bitsandbytes import frozen_base_bytes
        from lorakit.bitsandbytes import quantize as quantize_model
    except ImportError as exc:
        raise FinetuneError(f"--quantize {quantize} needs lorakit-bitsandbytes: pip install lorakit-bitsandbytes "
                            f"({exc})") from None
    quantize_model(backbone, quantize)
    return {"fp32": fp32, "quantized": frozen_base_bytes(backbone) / 2**20}


def _device(name: str) -> torch.device:
    from lorakit.core.cli import check_device  # the same check as every lorakit command's --device

    return check_device(name)


def _finetune(cfg: FinetuneConfig, label: str | None, log) -> dict:
    """Every check first (nothing is written until the adapter, data, model and --resume
    are known good), then train, evaluate and write the run's files."""
    _check_numbers(cfg)
    out = Path(cfg.out)
    check_output(out)  # created below, once the adapter, data, model and --resume are known good
    adapter, name = build_adapter(cfg.recipe, generator=cfg.generator, normalizer=cfg.normalizer,
                                  init=cfg.init, magnitude=cfg.magnitude,
                                  **{n: getattr(cfg, n) for n in schema.cli_fields(Adapter)})  # --rank, --seed, ...
    label = label or name
    data = load_data(cfg.data, cfg.text_column, cfg.label_column, cfg.task)
    train, test = split(data, cfg.test_fraction, cfg.split_seed)
    torch.set_num_threads(cfg.threads or auto_threads())
    device = _device(cfg.device)
    run = _build(cfg, adapter, data, train, test, device)
    optimizer, scheduler = _optimizer(run.model, cfg)
    state = {"label": label, "task": data.task, "norm": run.norm, "model": str(run.folder), "data": data.source,
             "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "losses": [], "curve": []}
    start = _resume(cfg, run.model, optimizer, scheduler, state) if cfg.resume else 0
    state["run_id"] = uuid.uuid4().hex
    check_writable(out)
    memory = PeakMemory(device)
    timing = _train(cfg, run, optimizer, scheduler, state, start, out / "checkpoints", label)
    summary = _finish(cfg, run, optimizer, state, memory, timing, start, out, label, adapter)
    log(f"{label}: {summary['metric']['name']}={summary['metric']['value']:.4f} "
        + " ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items() if k != summary["metric"]["name"])
        + f"  trainable={summary['trainable_parameters']['adapter']:,}+{run.head_params:,} head"
        + f"  {summary['steps_per_second']:.2f} steps/s"
        + (f"  frozen base {run.base_mb['quantized']:.1f} MB {cfg.quantize} (fp32 {run.base_mb['fp32']:.1f} MB)"
           if cfg.quantize else "") + f"  -> {out}")
    return summary


@dataclass
class _Built:
    """The adapted model of a run and what its steps read."""

    backbone: Any
    model: TextModel
    folder: Path
    base_mb: dict
    norm: dict
    head_params: int
    report: dict
    batches: Batches
    test_batches: Batches
    loss_fn: Any
    device: torch.device
    data: Dataset
    train: Dataset
    test: Dataset


def _build(cfg: FinetuneConfig, adapter: Adapter, data: Dataset, train: Dataset, test: Dataset,
           device: torch.device) -> _Built:
    """The backbone (quantized if asked) with its head, the adapter applied, and the batches."""
    torch.manual_seed(cfg.seed)
    backbone, tokenizer, folder = load_backbone(cfg.model)
    base_mb = _frozen_base_mb(backbone, cfg.quantize)
    y_train, norm = _targets(data, train)
    n_out = 1 if data.task == "regression" else len(data.classes)
    # the head inside the backbone, trained as a module to save: the PEFT export holds it
    attach_head(backbone, n_out, torch.Generator().manual_seed(cfg.seed))
    adapter.modules_to_save = [HEAD]
    adapter.apply(backbone, targets=cfg.targets or None)
    model = TextModel(backbone).to(device)
    model.train()
    head_params = sum(p.numel() for p in model.head.trained.parameters())
    report = core.parameter_report(backbone)
    report["trainable"] -= head_params  # the adapter's own, reported apart from the head
    pad_id = tokenizer.pad_token_id
    batches = Batches(_encode(tokenizer, train.texts, cfg.max_length), y_train, cfg.batch_size, cfg.seed, pad_id)
    y_test = torch.tensor(test.labels, dtype=torch.float32 if data.task == "regression" else torch.long)
    test_batches = Batches(_encode(tokenizer, test.texts, cfg.max_length), y_test, cfg.batch_size, 0, pad_id)
    loss_fn = torch.nn.functional.mse_loss if data.task == "regression" else torch.nn.functional.cross_entropy
    return _Built(backbone, model, folder, base_mb, norm, head_params, report, batches, test_batches, loss_fn,
                  device, data, train, test)


def _optimizer(model: TextModel, cfg: FinetuneConfig):
    """AdamW over the per-slot groups, linear warm-up then linear decay to 0."""
    optimizer = torch.optim.AdamW(_param_groups(model, cfg))
    warm = max(1, round(cfg.warmup * cfg.steps)) if cfg.warmup else 0
    schedule = lambda k: min((k + 1) / warm, 1.0) if k < warm else max(0.0, (cfg.steps - k) / max(1, cfg.steps - warm))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _resume(cfg: FinetuneConfig, model: TextModel, optimizer, scheduler, state: dict) -> int:
    """Load ``--resume`` into the model and optimizer; set the schedule at its step; return it."""
    restored = load_checkpoint(model, optimizer, Path(cfg.resume))
    start = restored.get("step") if isinstance(restored, dict) else None
    losses = restored.get("losses", []) if isinstance(restored, dict) else None
    if not isinstance(start, int) or isinstance(start, bool) or start < 0 or not isinstance(losses, list):
        raise FinetuneError(f"--resume {cfg.resume}: its trainer_state.json is damaged (no valid step or "
                            "losses); resume from another checkpoint or start again")
    state["losses"] = losses[:start]
    curve = restored.get("curve", [])  # older checkpoints have none
    state["curve"] = [p for p in curve if isinstance(p, list) and len(p) == 2 and p[0] <= start] \
        if isinstance(curve, list) else []
    if start >= cfg.steps:
        raise FinetuneError(f"--resume {cfg.resume}: it is at step {start}, not before --steps {cfg.steps}")
    # The learning rate of step `start`, set directly: scheduler.step() before any
    # optimizer.step() would make PyTorch warn about the call order.
    scheduler.last_epoch = start
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(start)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return start


def _train(cfg: FinetuneConfig, run: _Built, optimizer, scheduler, state: dict, start: int, ckpt_root: Path,
           label: str) -> dict:
    """Steps ``start`` … ``cfg.steps - 1`` with periodic checkpoints; a Ctrl-C reports the
    last checkpoint this run wrote. Returns the wall and CPU time and the running loss."""
    model, batches, device = run.model, run.batches, run.device
    train_time, cpu_time, ema = 0.0, 0.0, None
    bar = _progress(cfg.steps, start, label, cfg.progress)
    last_ckpt = None
    try:
        for step in range(start, cfg.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            idx = batches.indices(step)
            loss = run.loss_fn(model(batches.collate(idx, device)), batches.labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = loss.item()
            train_time += time.perf_counter() - t0
            cpu_time += time.process_time() - c0
            if not math.isfinite(value):
                raise FinetuneError(f"{label}: the loss became {value} at step {step + 1}; lower --lr")
            state["losses"].append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
            bar.update(1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                # no RNG drawn, no gradient, the model back in train mode: the trajectory is unchanged
                metric = evaluate(model, run.test_batches, run.data.task, run.norm, device)[PRIMARY[run.data.task]]
                state["curve"].append([step + 1, metric])
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                last_ckpt = save_checkpoint(model, optimizer, ckpt_root, step + 1, state) or last_ckpt
    except KeyboardInterrupt:
        bar.close()
        latest = latest_checkpoint(ckpt_root)  # Ctrl-C may land between the rename and the assignment
        raise Interrupted(latest if written_by(latest, state["run_id"]) else last_ckpt) from None
    bar.close()
    return {"train": train_time, "cpu": cpu_time, "ema": ema}


def _finish(cfg: FinetuneConfig, run: _Built, optimizer, state: dict, memory: PeakMemory, timing: dict,
            start: int, out: Path, label: str, adapter: Adapter) -> dict:
    """Evaluate, then write the final checkpoint, the PEFT export, the loss plot and
    ``summary.json``; the run's older checkpoints go only once all of it succeeded."""
    model, batches, device, data = run.model, run.batches, run.device, run.data
    ckpt_root = out / "checkpoints"
    t_eval = time.perf_counter()
    metrics = evaluate(model, run.test_batches, data.task, run.norm, device)
    eval_seconds = time.perf_counter() - t_eval
    if cfg.eval_every:  # the curve ends at the final evaluation
        state["curve"].append([cfg.steps, metrics[PRIMARY[data.task]]])
    peak_mb, peak_kind = memory.read_mb()  # CPU: replaced below by one measured step (after the saves)
    # None when another run's checkpoint has this name: replaced only once this run has succeeded
    saved = save_checkpoint(model, optimizer, ckpt_root, cfg.steps, state)
    ckpt = checkpoint_path(ckpt_root, cfg.steps)
    peft_path, peft_error = _export_peft(run.backbone, out / "peft", run.folder)  # the head included
    if device.type == "cpu":
        idx = batches.indices(0)
        step_mb = _step_peak_mb(model, optimizer, lambda: run.loss_fn(model(batches.collate(idx, device)),
                                                                      batches.labels[idx].to(device)))
        if step_mb is not None:
            peak_mb, peak_kind = step_mb, "one training step, measured as lorakit bench does"
    primary = PRIMARY[data.task]
    steps_done = cfg.steps - start
    train_time, cpu_time = timing["train"], timing["cpu"]
    summary = {
        "label": label, "recipe": adapter.recipe, "adapter": dict(core.adapter_config(run.backbone)),
        "model": str(run.folder), "data": data.source, "task": data.task,
        "n_train": len(run.train), "n_test": len(run.test), "steps": cfg.steps, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "rank": cfg.rank, "seed": cfg.seed, "split_seed": cfg.split_seed,
        "metric": {"name": primary, "value": metrics[primary], "higher_is_better": True},
        "metrics": metrics,
        "trainable_parameters": {"adapter": run.report["trainable"], "head": run.head_params,
                                 "total": run.report["trainable"] + run.head_params},
        # less the head's untouched initial copy, which the saved-module wrapper keeps
        "total_parameters": sum(p.numel() for p in model.parameters()) - run.head_params,
        "steps_per_second": steps_done / train_time if train_time else None,
        "train_seconds": train_time, "eval_seconds": eval_seconds,
        # CPU time (all threads) per step: comparable across runs even on a busy machine
        "cpu_ms_per_step": 1000 * cpu_time / steps_done if device.type == "cpu" else None,
        "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind,
        "quantize": cfg.quantize, "frozen_base_mb": run.base_mb,
        "device": str(device), "threads": torch.get_num_threads(),
        "final_loss": timing["ema"], "losses": state["losses"],
        "curve": state["curve"],  # [[step, held-out metric], ...] with --eval-every, else []
        "checkpoint": str(ckpt), "peft_export": peft_path, "peft_export_error": peft_error,
        "loss_plot": str(out / "loss.png"), "versions": {"torch": torch.__version__},
    }
    from .plots import loss_curve

    loss_curve(state["losses"], out / "loss.png", f"{label}: {primary} {metrics[primary]:.3f}",
               "MSE (standardized)" if data.task == "regression" else "cross-entropy")
    if saved is None:
        save_checkpoint(model, optimizer, ckpt_root, cfg.steps, state, replace=True)
    keep_only(ckpt_root, ckpt)  # this run succeeded: the other checkpoints go
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
