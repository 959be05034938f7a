"""Build the adapter of a run from a recipe name and/or primitives given on the command line.

``--generator mlp:32`` sets the primitive's first field (``MLP.width``);
``--normalizer delora:lambda0=4,weight_norm=frobenius`` sets fields by name;
``--magnitude none`` removes the magnitude head. Names resolve through the plugin
registry only (registered names, never import paths).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from lorakit.core import Adapter, AdapterError, registry
from lorakit.core.plugins import format_spec
from lorakit.core.primitives import COMPOSITION_KINDS

from .errors import FinetuneError

PARTS = COMPOSITION_KINDS  # each part of a composition and the kind of primitive it holds


def _value(text: str) -> Any:
    try:
        return json.loads(text)  # numbers, true/false, null, quoted strings
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def parse_spec(kind: str, text: str) -> dict | None:
    """``"mlp"``, ``"mlp:32"`` or ``"mlp:width=32,embed_dim=64"`` → a registry spec."""
    name, _, rest = text.strip().partition(":")
    if kind == "magnitude" and name.lower() in ("none", ""):
        return None
    cls = registry.primitive_class(kind, name)  # unknown name: AdapterError listing the known ones
    fields = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
    args: dict[str, Any] = {}
    for i, item in enumerate(filter(None, rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:  # positional: the first field (only in first position)
            if i or not fields:
                raise FinetuneError(f"{kind} {text!r}: give arguments as {name}:VALUE (its first field"
                                    f"{' ' + fields[0] if fields else ''}) or {name}:key=value,key=value")
            key, val = fields[0], item
        if key.strip() not in fields:
            raise FinetuneError(f"{kind} {name!r} has no argument {key.strip()!r}; "
                                f"its arguments: {', '.join(fields) or 'none'}")
        args[key.strip()] = _value(val.strip())
    return {"name": name, "args": args}


def build_adapter(recipe: str | None = None, *, generator: str | None = None, normalizer: str | None = None,
                  init: str | None = None, magnitude: str | None = None, **fields: Any) -> tuple[Adapter, str]:
    """``(adapter, label)``: the recipe (default ``lora``) with any part replaced; ``fields``:
    other Adapter fields (``rank``, ``seed``, ``dropout``: what the command line sets)."""
    parts = {"generator": generator, "normalizer": normalizer, "init": init, "magnitude": magnitude}
    composition = dict(registry.recipe(recipe or "lora").composition())
    given = {k: v for k, v in parts.items() if v is not None}
    for part, text in given.items():
        composition[part] = parse_spec(PARTS[part], text)
    if given:
        label = "+".join(format_spec(composition[k]) for k in PARTS if composition[k] is not None)
        name = None
    else:
        label = name = recipe or "lora"
    try:
        adapter = Adapter(**composition, **fields, recipe=name)
    except AdapterError:
        raise
    except (TypeError, ValueError) as exc:  # a primitive rejecting its arguments
        raise FinetuneError(f"adapter {label}: {exc}") from None
    return adapter, label
