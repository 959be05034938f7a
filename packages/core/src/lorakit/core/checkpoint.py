"""Native checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

The config names primitives by registered name + JSON arguments, so loading never
imports code by path and never unpickles. Optionally the optimizer state is saved
beside it (``optimizer.safetensors`` + ``optimizer.json``) so a resumed run takes
the identical next step.

A checkpoint folder is replaced as a whole, never file by file (``lorakit.core.atomic``
has the scheme): every instant of a ``kill -9`` leaves the old or the new checkpoint,
optimizer state included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import schema
from .adapter import Adapter, adapted_layers, adapter_config
from .atomic import carry_over, publish, readable, recover, staging_folder
from .experts import split_layer_names
from .functional import all_finite
from .plugins import registry
from .primitives import COMPOSITION_KINDS, AdapterError
from .trained import load_trained_base_state, trained_base_state
from .validation import check_regular_file, loads_strict, read_regular_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
OPT_STATE, OPT_CONFIG = "optimizer.safetensors", "optimizer.json"
FORMAT = "lorakit"
FORMAT_VERSION = 1
#: a config lists each adapted module in ~60 bytes; 16 MiB is ~250k modules
MAX_CONFIG_BYTES = 16 * 2**20


class CheckpointError(AdapterError):
    """A checkpoint that cannot be loaded into this model; nothing was changed."""


def _versions(adapter: dict) -> dict[str, str]:
    """torch, lorakit-core and the distribution of every primitive this adapter uses
    (a third-party plugin's too), as ``{distribution: version}``."""
    out = {"torch": str(torch.__version__)}
    try:
        out["lorakit-core"] = version("lorakit-core")
    except PackageNotFoundError:
        pass
    for info in _providers(adapter).values():
        if info.distribution and info.version:
            out[info.distribution] = info.version
    return out


def _providers(adapter: dict) -> dict[str, Any]:
    """``{"generator mlp": PluginInfo, ...}``: the plugin that registered each primitive used."""
    out = {}
    for field, kind in COMPOSITION_KINDS.items():
        spec = adapter.get(field)
        if spec is not None and (info := registry.provider(kind, spec["name"])) is not None:
            out[f"{kind} {spec['name']}"] = info
    return out


def _install_hint(primitives: Any) -> str:
    """Which distributions the checkpoint's primitives came from (the ones not installed)."""
    if not isinstance(primitives, dict):
        return ""
    missing = sorted({str(dist) for used, dist in primitives.items()
                      if isinstance(used, str) and " " in used and registry.provider(*used.split(" ", 1)) is None})
    return f" (it was saved with {', '.join(missing)}: pip install it)" if missing else ""


def adapter_state(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """Every adapter tensor (slots, generator, frozen residual), base weights excluded,
    and the base tensors it trains (biases, modules to save: ``trained.trained_base_state``).
    ``copy=False``: the layers' live tensors, not copies (for a check of keys, dtypes, shapes)."""
    state = trained_base_state(model)
    for name, layer in adapted_layers(model).items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = value.detach().contiguous().clone() if copy else value
    return state


_FILES = (CONFIG, WEIGHTS, OPT_STATE, OPT_CONFIG)


def _check_whole(state: dict[str, torch.Tensor]) -> None:
    """A shard is never written as if it were the tensor: an FSDP2 ``DTensor`` or a DeepSpeed
    ZeRO-3 partition (its parameters are ``Size([0])`` outside the forward) would silently
    save one rank's piece or nothing. No adapter tensor is empty on a whole model."""
    from torch.distributed.tensor import DTensor

    for key, value in state.items():
        if isinstance(value, DTensor) or value.numel() == 0:
            what = "an FSDP2 DTensor shard" if isinstance(value, DTensor) else "empty (a ZeRO-3 partition?)"
            raise AdapterError(f"{key} is {what}, not the whole tensor; on a sharded model call "
                               "lorakit.core.distributed.save_full(model, path) on every rank")


def save(model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, *,
         tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (and ``optimizer``'s state) to the folder ``path`` as one unit:
    a kill at any moment leaves the previous checkpoint there or this one (see above).
    ``tensors``: the adapter tensors to write instead of the model's own (whole ones gathered
    from a sharded model, ``save``'s keys: see ``lorakit.core.distributed.save_full``)."""
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter to save")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("the adapter is merged; unmerge(model) before saving")
    if tensors is not None and set(tensors) != set(ours := adapter_state(model, copy=False)):
        missing, unexpected = sorted(set(ours) - set(tensors))[:3], sorted(set(tensors) - set(ours))[:3]
        raise AdapterError(f"tensors: keys differ from the model's adapter (missing {missing}, unexpected "
                           f"{unexpected}); pass adapter_state_dict(model)")
    _check_whole(tensors if tensors is not None else adapter_state(model, copy=False))
    path = Path(os.path.realpath(path))  # a symlinked folder is replaced where it points
    recover(path)  # a previous save killed mid-swap: reinstate it, so its other files carry over
    folder = staging_folder(path)
    try:
        write_files(model, folder, optimizer, tensors)
        if path.is_dir():
            carry_over(path, folder, _FILES)
        publish(folder, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already once published
    return path


def write_files(model: nn.Module, folder: Path, optimizer: torch.optim.Optimizer | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> None:
    """The checkpoint files, written straight into ``folder`` (a fresh staging folder:
    callers that add files of their own then :func:`publish` it); ``tensors`` as in :func:`save`."""
    layers = adapted_layers(model)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        # the Adapter's fields only: not where it applies (targets) nor an integration's state
        "adapter": {k: v for k, v in adapter_config(model).items() if k in schema.fields_of(Adapter)},
        # the shape the layer was built with: the base weight may be an FSDP2 shard or a
        # ZeRO-3 partition (Size([0])) now, and a quantized one need not be dequantized for it
        "modules": {n: {"shape": list(getattr(layer, "shape", None) or layer.kind.matrix(layer.base).shape),
                        "rank": layer.rank}
                    for n, layer in layers.items()},
        "base_model": type(model).__name__,
        # the class trained on, for lorakit export (a class name that is no identifier is left out)
        **({"architecture": arch} if _architecture_problem(arch := architecture(model)) is None else {}),
        "versions": _versions(adapter_config(model)),
        # which plugin (and distribution) provided each primitive, to name what to install
        "primitives": {used: info.distribution or info.name
                       for used, info in _providers(adapter_config(model)).items()},
    }
    save_file(adapter_state(model) if tensors is None else {k: v.detach().contiguous() for k, v in tensors.items()},
              str(folder / WEIGHTS), metadata={"format": "pt"})
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(folder / OPT_STATE))
        (folder / OPT_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def architecture(model: nn.Module) -> dict[str, str]:
    """The class the adapter was trained on, ``{"library": top-level package, "class": name}``
    (``{"library": "transformers", "class": "LlamaForCausalLM"}``): what ``lorakit export``
    rebuilds from a base folder, so the export's module names are the training model's.
    Optional in a checkpoint (older ones lack it); it names a class, it imports nothing."""
    return {"library": type(model).__module__.partition(".")[0], "class": type(model).__name__}


def _architecture_problem(value: Any) -> str | None:
    if not (isinstance(value, dict) and set(value) == {"library", "class"}
            and all(isinstance(v, str) and v.isidentifier() for v in value.values())):
        return f'architecture must be {{"library": name, "class": name}}, got {value!r:.80}'
    return None


def read_config(path: str | os.PathLike) -> dict:
    """Read and validate ``adapter_config.json``; any defect is a :class:`CheckpointError`."""
    file = Path(path) / CONFIG
    try:  # a FIFO, a folder, a symlink loop or a huge file is refused, not read
        data = read_regular_file(file, MAX_CONFIG_BYTES, CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{file} not found; is {path} a lorakit checkpoint folder?") from None
    # NaN/Infinity, overflowing floats, huge integers, duplicate keys: refused, naming the field
    config = loads_strict(data, str(file), CheckpointError)
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    return config


def _is_int(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _config_problem(config: Any) -> str | None:
    """What is wrong with a config, or None. Unknown fields are errors, not ignored."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        return 'not a lorakit config (no "format": "lorakit")'
    if config.get("format_version") != FORMAT_VERSION:
        return f"format_version {config.get('format_version')!r} is not {FORMAT_VERSION}; upgrade lorakit-core"
    extra = set(config) - {"format", "format_version", "adapter", "modules", "base_model", "versions", "primitives",
                           "architecture"}
    if extra:
        return f"unknown fields {sorted(extra)}; remove them"
    if "architecture" in config and (problem := _architecture_problem(config["architecture"])):
        return problem
    adapter, modules = config.get("adapter"), config.get("modules")
    if not isinstance(adapter, dict) or not isinstance(modules, dict) or not modules:
        return "'adapter' must be an object and 'modules' a non-empty object"
    if problem := schema.file_problem(Adapter, adapter):  # every field as Adapter declares it
        return problem
    for name, info in modules.items():
        if not (isinstance(info, dict) and set(info) == {"shape", "rank"} and _is_int(info["rank"], 1)
                and isinstance(info["shape"], list) and len(info["shape"]) == 2
                and all(_is_int(n, 1) for n in info["shape"])):
            return f"modules[{name!r}] must be {{\"shape\": [out, in], \"rank\": r}}"
    return None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        check_regular_file(file, CheckpointError)  # safetensors would block on a FIFO
        return load_file(str(file))
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{file} not found; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt ({exc}); use an earlier checkpoint") from None


def load(model: nn.Module, path: str | os.PathLike,
         optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Apply the saved adapter to ``model`` (or check the one it has) and load its tensors.

    All or nothing: every file (the optimizer's too) is read and checked before
    anything is copied. On any mismatch a :class:`CheckpointError` names the module
    and the model and optimizer are left as they were.

    A model built on the meta device (FSDP2's flow) gets the adapter's structure on meta
    (no initializer runs, nothing to copy); after ``model.to_empty(device=...)`` and
    loading the base weights, a second ``load`` copies the values.
    """
    path = readable(Path(path))  # reading never writes: a killed save is recovered by the next writer
    config = read_config(path)
    tensors = _read_tensors(path / WEIGHTS)
    opt_state = None if optimizer is None else _read_optimizer(optimizer, path)
    modules = config["modules"]
    applied_here = not adapted_layers(model)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    if applied_here:
        try:
            adapter = Adapter.from_config(config["adapter"])
            # the checkpoint holds every slot and residual buffer: build without running the
            # initializers (a PiSSA/LoLDU SVD or LU per layer), then copy them in
            names, parameters = split_layer_names(modules)  # fused expert tensors: per-expert layers
            adapter.apply(model, targets="(?:" + "|".join(re.escape(n) for n in names) + ")" if names else None,
                          target_parameters=sorted(parameters) or None,
                          restore={n: f"{n}.residual_B" in tensors for n in modules})
        except Exception as exc:  # e.g. a primitive rejecting its arguments, or one not installed
            raise CheckpointError(f"{path / CONFIG}: cannot build the saved adapter: {exc}"
                                  + _install_hint(config.get("primitives"))) from None
    try:
        _check_untrusted(model, config, tensors, path)
        _check_and_load(model, config, tensors, path, optimizer, opt_state)
    except Exception:
        if applied_here:  # leave the model exactly as it was
            from .model_ops import unload

            unload(model)
            for p, flag in grad_flags:
                p.requires_grad_(flag)
        raise
    return model


def _check_untrusted(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A checkpoint is untrusted input: refuse NaN/inf tensors and a ``modules`` entry whose
    ``shape`` or ``rank`` is not the model's (consumers read them), naming the field; warn on
    an ``adapter.rank_pattern`` entry that matches no saved module (it does nothing)."""
    for key, value in tensors.items():  # one pass each; a diverged run's save would load silently
        if value.is_floating_point() and value.numel() and not all_finite(value):  # one aminmax, not a bool copy
            raise CheckpointError(f"{path / WEIGHTS}: {key} has non-finite values (NaN/inf); the checkpoint is "
                                  "corrupt or from a diverged run: use an earlier checkpoint")
    layers = adapted_layers(model)
    for name, info in config["modules"].items():
        layer = layers.get(name)
        if layer is None:
            continue  # a module the model lacks: the module check names it
        if list(info["shape"]) != list(layer.shape):
            raise CheckpointError(f"{path / CONFIG}: modules[{name!r}] has shape {list(info['shape'])} in the "
                                  f"checkpoint but {list(layer.shape)} in the model; the checkpoint was made for "
                                  "another model")
        if info["rank"] != layer.rank:
            raise CheckpointError(f"{path / CONFIG}: modules[{name!r}].rank is {info['rank']} in the checkpoint "
                                  f"but {layer.rank} in the model (adapter.rank, rank_pattern); the checkpoint was "
                                  "made with another rank, or its config is inconsistent")
    from .adapter import _matches

    for pattern in config["adapter"].get("rank_pattern") or {}:
        if not any(_matches(n, [pattern]) or _matches(n, pattern) for n in config["modules"]):
            import warnings

            warnings.warn(f"{path / CONFIG}: adapter.rank_pattern[{pattern!r:.80}] matches no saved module "
                          "(it has no effect); mistyped, or the checkpoint was made for another model",
                          stacklevel=3)


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Restore an optimizer saved by :func:`save` (built over the same parameters);
    on a :class:`CheckpointError` the optimizer is unchanged."""
    path = readable(Path(path))  # reading never writes: a killed save is recovered by the next writer
    _load_optimizer_state(optimizer, _read_optimizer(optimizer, path), path)


def _read_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict:
    """The saved optimizer state, checked against ``optimizer``'s groups and parameter shapes."""
    file = path / OPT_CONFIG
    try:
        meta = loads_strict(read_regular_file(file, MAX_CONFIG_BYTES, CheckpointError), str(file), CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{file} not found; the checkpoint has no optimizer state "
                              "(save it with save(model, dir, optimizer=...)) or load without optimizer=") from None
    tensors = _read_tensors(path / OPT_STATE)
    try:
        state = _unflatten_optimizer(tensors, meta)
        saved_sizes = [len(group["params"]) for group in state["param_groups"]]
        ids = [i for group in state["param_groups"] for i in group["params"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{file} is malformed ({type(exc).__name__}: {exc}); the checkpoint is corrupt") from None
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise CheckpointError(f"{path}: the optimizer state has parameter groups of sizes {saved_sizes}, this "
                              f"optimizer {sizes}; build it over the same parameters as the saved one")
    params = dict(zip(ids, (p for group in optimizer.param_groups for p in group["params"])))
    for idx, values in state["state"].items():
        for key, value in values.items():
            if idx not in params:
                raise CheckpointError(f"{file}: state of parameter {idx}, which no group lists; "
                                      "the checkpoint is corrupt")
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[idx].shape:
                raise CheckpointError(f"{path}: optimizer state {idx}.{key} has shape {tuple(value.shape)}, its "
                                      f"parameter {tuple(params[idx].shape)}; it belongs to another model")
    return state


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: Path) -> None:
    try:  # torch checks everything before it changes the optimizer
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({exc})") from None


def _check_and_load(model, config, tensors, path, optimizer=None, opt_state=None) -> None:
    """Check every tensor against the model, then load the optimizer state, then the tensors."""
    layers = adapted_layers(model)
    # the adapter's fields as the file and the model have them (a field a file lacks means its
    # file_default); the seed only drew the initial values, which the checkpoint replaces
    fields = {n: spec for n, spec in schema.fields_of(Adapter).items() if n != "seed"}
    saved = {n: config["adapter"].get(n, spec.file_default) for n, spec in fields.items()}
    model_config = adapter_config(model)
    current = json.loads(json.dumps({n: model_config.get(n) for n in fields}))  # as JSON: tuples become lists
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise CheckpointError(f"{path}: the checkpoint's adapter differs from the model's in {diff}; "
                              "load it into a model without an adapter, or apply the same recipe")
    if set(config["modules"]) != set(layers):
        missing = sorted(set(config["modules"]) - set(layers))
        extra = sorted(set(layers) - set(config["modules"]))
        raise CheckpointError(f"{path}: adapted modules differ (in checkpoint only: {missing}; "
                              f"in model only: {extra})")
    expected = adapter_state(model, copy=False)  # keys, dtypes and shapes: no copies
    # row norms a magnitude head that does not use them was once given (files of older versions)
    for name, layer in layers.items():
        if layer.row_sq_norm is None:
            tensors.pop(f"{name}.row_sq_norm", None)
    if set(expected) != set(tensors):
        raise CheckpointError(f"{path}: tensors missing {sorted(set(expected) - set(tensors))[:5]}, "
                              f"unexpected {sorted(set(tensors) - set(expected))[:5]}")
    for key, value in expected.items():
        if tensors[key].dtype != value.dtype:
            raise CheckpointError(
                f"{path}: {key} is {tensors[key].dtype} in the checkpoint but {value.dtype} in the model; "
                "apply the adapter with the checkpoint's dtype (Adapter(dtype=...)) or convert the checkpoint")
        if tensors[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)} in the checkpoint but "
                f"{tuple(value.shape)} in the model; the checkpoint was made for another model or rank")
    if opt_state is not None:  # the last step that can fail; nothing was copied yet
        _load_optimizer_state(optimizer, opt_state, path)
    for name, layer in layers.items():
        # a tensor on meta (load into a model built on meta) has no storage to copy into: it
        # gets its value from a second load after model.to_empty(...)
        targets = {k: v for k, v in layer.state_dict().items() if not v.is_meta}
        own = {k: tensors[f"{name}.{k}"] for k in targets if f"{name}.{k}" in tensors}  # not a scan per layer
        layer.load_state_dict(own, strict=False)
    load_trained_base_state(model, tensors)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
