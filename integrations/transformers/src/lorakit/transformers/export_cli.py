"""``lorakit export``: a native lorakit checkpoint (``lorakit.core.checkpoint.save``,
a ``lorakit finetune`` run) written in any format registered through the
``lorakit_exporters`` hook (``peft``, ``diffusers``, ``kohya``, a plugin's own).

The checkpoint holds the adapter only; ``--base`` is the folder of the model it was
trained on, loaded offline (for a ``lorakit finetune`` run, the model its
``summary.json`` records). The model built from it is the class the adapter was
trained on, which the checkpoint records (``architecture``: e.g. transformers'
``LlamaForCausalLM``, looked up by name in its library, never imported by path), so
the export's module names are the training model's and the file equals
``export_peft`` on that model. A checkpoint saved before lorakit recorded it gets
``AutoModel``, or the diffusers class a folder's ``config.json`` names
(``_class_name``, e.g. a pipeline's ``unet/``).

A module to save that the rebuilt base lacks (``lorakit finetune``'s ``head``, which it
adds to the backbone) gets an untrained ``nn.Linear`` of the saved shape, as a PEFT
user adds it before ``PeftModel.from_pretrained``: the export is relative to that model.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

import torch
from torch import nn

from lorakit.core import AdapterError, CheckpointError, checkpoint, registry
from lorakit.core.cli import output_problem
from lorakit.core.validation import read_json

FORMATS_HELP = "registered exporter (lorakit_exporters hook): peft, delora (PEFT's DeLoRA), diffusers, kohya, ..."
# the libraries whose model classes an export rebuilds by name, and the class each must derive from
LIBRARIES = {"transformers": "PreTrainedModel", "diffusers": "ModelMixin"}
ONE_FILE = ".safetensors"  # an --out ending so names the file of a one-file format (kohya)


def configure_export(parser) -> None:
    parser.add_argument("checkpoint", help="native lorakit checkpoint folder (or a lorakit finetune --out folder: "
                                           "its latest step-* checkpoint)")
    parser.add_argument("--format", required=True, help=FORMATS_HELP)
    parser.add_argument("--base", default=None,
                        help="local folder of the base model the adapter was trained on (default for a lorakit "
                             "finetune run: the model its summary.json records)")
    parser.add_argument("--out", required=True, help="output folder (kohya: the .safetensors file path, or a "
                                                     "folder to write lora.safetensors into)")
    parser.add_argument("--max-rank", default=None,
                        help="truncate every module to rank <= K, or 'auto' (the fewest directions holding "
                             "--energy of each update); default: exact")
    parser.add_argument("--energy", type=float, default=0.999, help="energy kept with --max-rank auto")
    parser.add_argument("--fold-magnitude", action="store_true",
                        help="write a DoRA adapter as plain LoRA (for vLLM, llama.cpp, ComfyUI; kohya always folds)")


def _max_rank(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise AdapterError(f"--max-rank {value!r}: give an integer >= 1 or 'auto'") from None
    if k < 1:
        raise AdapterError(f"--max-rank {value}: give an integer >= 1 or 'auto'")
    return k


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself, or the latest ``step-*`` checkpoint under a run folder."""
    if (path / checkpoint.CONFIG).is_file():
        return path
    # a finetune --out folder keeps its checkpoints under checkpoints/step-NNNNNN
    steps = sorted(p for pattern in ("step-*", "checkpoints/step-*") for p in path.glob(pattern)
                   if (p / checkpoint.CONFIG).is_file()) if path.is_dir() else []
    if not steps:
        raise AdapterError(f"checkpoint {path}: no {checkpoint.CONFIG} there (nor in a step-* folder); give a "
                           "folder written by lorakit.core.checkpoint.save or lorakit finetune")
    return steps[-1]


def recorded_base(given: Path, source: Path) -> Path:
    """The model a ``lorakit finetune`` run trained: its ``summary.json``, else the
    checkpoint's ``trainer_state.json`` (a run stopped before its summary)."""
    for file in (given / "summary.json", source / "trainer_state.json"):
        try:
            model = read_json(file).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(model, str) and model:
            return Path(model)
    raise AdapterError(f"--base: required for {given} (no lorakit finetune summary.json records its model); "
                       "give the folder of the model the adapter was trained on")


def model_class(architecture: dict | None) -> type | None:
    """The class a checkpoint records, by name in its library; None when it records none
    (an older lorakit) or one of a library an export does not rebuild."""
    if not architecture or architecture["library"] not in LIBRARIES:
        return None
    library = architecture["library"]
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise AdapterError(f"checkpoint: it was trained on {library}.{architecture['class']}: pip install "
                           f"{library}") from None
    cls = getattr(module, architecture["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, getattr(module, LIBRARIES[library]))):
        raise AdapterError(f"checkpoint: it was trained on {library}.{architecture['class']}, which {library} "
                           f"{getattr(module, '__version__', '')} does not have; install the {library} it was "
                           "trained with")
    return cls


def load_base(folder: Path, cls: type | None = None):
    """The base model in ``folder`` as ``cls``; without one, diffusers' class when the
    folder's config names a ``_class_name``, else ``AutoModel``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AdapterError(f"--base {folder}: no config.json there; give a local model folder")
    try:
        class_name = read_json(config_file).get("_class_name")
    except (AdapterError, AttributeError):
        raise AdapterError(f"--base {folder}: config.json is not a JSON object") from None
    try:
        if cls is None and class_name:
            import diffusers

            cls = getattr(diffusers, class_name, None)
            if cls is None:
                raise AdapterError(f"--base {folder}: diffusers has no model class {class_name!r}")
        if cls is None:
            from transformers import AutoModel as cls
        if cls.__module__.startswith("transformers."):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # a command's output: its result or one error line, no load report
            hf_logging.disable_progress_bar()
        return cls.from_pretrained(folder, local_files_only=True)
    except AdapterError:
        raise
    except Exception as exc:  # transformers/diffusers raise many types for a bad folder
        first = (str(exc).strip().splitlines() or [""])[0]
        raise AdapterError(f"--base {folder}: cannot load the model ({type(exc).__name__}: {first})") from None


_SAVED = re.compile(r"(?P<module>.+)\.trained\.(?P<param>weight|bias)")


def add_missing_heads(model: nn.Module, source: Path, modules_to_save: list[str] | None) -> list[str]:
    """Put an untrained ``nn.Linear`` of the saved shape and dtype where a module to save
    is missing from ``model`` (its parent present); return their names."""
    from safetensors import safe_open

    if not modules_to_save:
        return []
    present = dict(model.named_modules())
    saved: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(source / checkpoint.WEIGHTS), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            m = _SAVED.fullmatch(key)
            if m and m["module"] not in present and any(m["module"] == s or m["module"].endswith("." + s)
                                                        for s in modules_to_save):
                saved.setdefault(m["module"], {})[m["param"]] = f.get_tensor(key)
    added = []
    for name, params in saved.items():
        parent, _, child = name.rpartition(".")
        weight, bias = params.get("weight"), params.get("bias")
        if parent not in present or weight is None or weight.dim() != 2 or (
                bias is not None and bias.shape != weight.shape[:1]):
            continue  # not a linear head: checkpoint.load names what is missing
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        present[parent].add_module(child, head)
        added.append(name)
    return added


def _check_out(out: Path, source: Path, base: Path) -> None:
    """Every --out problem, before anything is loaded; nothing is created."""
    problem = output_problem(out, "file" if out.suffix == ONE_FILE else "folder")
    if problem:
        raise AdapterError(f"--out {out}: {problem}; give another --out")
    for what, folder in (("checkpoint", source), ("--base", base)):
        if os.path.realpath(out) == os.path.realpath(folder):
            raise AdapterError(f"--out {out}: is the {what} folder, which the export would overwrite; give "
                               "another --out")


def run_export(args) -> int:
    exporters = registry.load().exporters
    if args.format not in exporters:
        raise AdapterError(f"--format {args.format!r}: not a registered exporter; choose from "
                           f"{', '.join(sorted(exporters))}")
    max_rank = _max_rank(args.max_rank)
    if not 0 < args.energy <= 1:
        raise AdapterError(f"--energy {args.energy}: give a fraction in (0, 1]")
    given = Path(args.checkpoint)
    source = resolve_checkpoint(given)
    base = Path(args.base) if args.base is not None else recorded_base(given, source)
    out = Path(args.out)
    _check_out(out, source, base)
    config = checkpoint.read_config(source)
    model = load_base(base, model_class(config.get("architecture")))
    add_missing_heads(model, source, config["adapter"].get("modules_to_save"))
    try:
        checkpoint.load(model, source)
    except CheckpointError as exc:
        if "architecture" not in config and config.get("base_model") != type(model).__name__:
            raise CheckpointError(f"{exc} (the checkpoint was saved from a {config.get('base_model')} by an older "
                                  f"lorakit that records no architecture, and --base loaded as "
                                  f"{type(model).__name__}: export it in Python with the format's exporter on "
                                  f"a {config.get('base_model')}, or save the checkpoint again)") from None
        raise
    model.eval()
    exporter = exporters[args.format]
    options: dict = {"max_rank": max_rank}
    if max_rank == "auto":
        options["energy"] = args.energy
    if args.fold_magnitude:  # otherwise the exporter's default (kohya always folds)
        options["fold_magnitude"] = True
    if "base_model_name_or_path" in _parameters(exporter):  # as lorakit finetune's own export records it
        options["base_model_name_or_path"] = str(base)
    try:
        written = exporter(model, out, **options)
    except TypeError as exc:  # a plugin exporter without these options
        raise AdapterError(f"--format {args.format}: the exporter does not take these options ({exc})") from None
    except OSError as exc:  # e.g. the disk filled up; the previous --out is intact (atomic writes)
        raise AdapterError(f"--out {out}: cannot write it ({exc.strerror or exc}); nothing was replaced") from None
    report = getattr(written, "path", written)
    print(f"wrote {report} ({args.format}) from {source}")
    return 0


def _parameters(function) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # a builtin or C function
        return set()
