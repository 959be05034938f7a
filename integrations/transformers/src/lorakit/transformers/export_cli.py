"""``lorakit export``: a native lorakit checkpoint (``lorakit.core.checkpoint.save``,
a ``lorakit finetune`` run) written in any format registered through the
``lorakit_exporters`` hook (``peft``, ``diffusers``, ``kohya``, a plugin's own).

The checkpoint holds the adapter only; ``--base`` is the model it was trained on,
a local folder loaded offline: a transformers model (``AutoModel``, the class a
``lorakit finetune`` checkpoint is relative to) or a diffusers model folder (its
``config.json`` names a ``_class_name``, e.g. a pipeline's ``unet/``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.core import AdapterError, checkpoint, registry

FORMATS_HELP = "registered exporter (lorakit_exporters hook): peft, diffusers, kohya, ..."


def configure_export(parser) -> None:
    parser.add_argument("checkpoint", help="native lorakit checkpoint folder (or a lorakit finetune --out folder: "
                                           "its latest step-* checkpoint)")
    parser.add_argument("--format", required=True, help=FORMATS_HELP)
    parser.add_argument("--base", required=True, help="local folder of the base model the adapter was trained on")
    parser.add_argument("--out", required=True, help="output folder (kohya: the .safetensors file path, or a "
                                                     "folder to write lora.safetensors into)")
    parser.add_argument("--max-rank", default=None,
                        help="truncate every module to rank <= K, or 'auto' (the fewest directions holding "
                             "--energy of each update); default: exact")
    parser.add_argument("--energy", type=float, default=0.999, help="energy kept with --max-rank auto")
    parser.add_argument("--fold-magnitude", action="store_true",
                        help="write a DoRA adapter as plain LoRA (for vLLM, llama.cpp, ComfyUI)")


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


def load_base(folder: Path):
    """The base model in ``folder``: diffusers when its config names a ``_class_name``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AdapterError(f"--base {folder}: no config.json there; give a local model folder")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise AdapterError(f"--base {folder}: config.json is not a JSON object") from None
    try:
        if class_name:
            import diffusers

            cls = getattr(diffusers, class_name, None)
            if cls is None:
                raise AdapterError(f"--base {folder}: diffusers has no model class {class_name!r}")
            return cls.from_pretrained(folder, local_files_only=True)
        from transformers import AutoModel

        return AutoModel.from_pretrained(folder, local_files_only=True)
    except AdapterError:
        raise
    except Exception as exc:  # transformers/diffusers raise many types for a bad folder
        first = (str(exc).strip().splitlines() or [""])[0]
        raise AdapterError(f"--base {folder}: cannot load the model ({type(exc).__name__}: {first})") from None


def run_export(args) -> int:
    exporters = registry.load().exporters
    if args.format not in exporters:
        raise AdapterError(f"--format {args.format!r}: not a registered exporter; choose from "
                           f"{', '.join(sorted(exporters))}")
    max_rank = _max_rank(args.max_rank)
    if not 0 < args.energy <= 1:
        raise AdapterError(f"--energy {args.energy}: give a fraction in (0, 1]")
    source = resolve_checkpoint(Path(args.checkpoint))
    model = load_base(Path(args.base))
    checkpoint.load(model, source)
    model.eval()
    options = {"max_rank": max_rank, "fold_magnitude": args.fold_magnitude}
    if max_rank == "auto":
        options["energy"] = args.energy
    try:
        written = exporters[args.format](model, Path(args.out), **options)
    except TypeError as exc:  # a plugin exporter without these options
        raise AdapterError(f"--format {args.format}: the exporter does not take these options ({exc})") from None
    report = getattr(written, "path", written)
    print(f"wrote {report} ({args.format}) from {source}")
    return 0
