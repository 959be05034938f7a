"""The Adapter's fields, each declared once with everything that reads or writes it.

Every field of :class:`lorakit.core.Adapter` is a dataclass field made by
:func:`adapter_field`, carrying an :class:`AdapterField`: how a value is checked (and
normalized), how it is written to JSON and read back, what a checkpoint that lacks it
means, and the command-line flag and help that set it. From the declarations follow

- the checks of ``Adapter(...)`` (``__post_init__``),
- ``Adapter.config()`` and ``Adapter.from_config()``,
- the validation of a checkpoint's ``adapter`` object (:func:`file_problem`),
- the adapter flags of ``lorakit finetune`` and ``lorakit sweep`` (:func:`cli_fields`).

Adding a field is one ``adapter_field(...)`` line in ``Adapter`` and its test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .primitives import AdapterError

#: ``file_default`` of a field every checkpoint holds (it existed when the format shipped)
REQUIRED = object()


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class AdapterField:
    """One Adapter field's contract.

    ``check(value, field)`` returns the value to store (a name may become a primitive, a
    range a sorted list) or raises :class:`AdapterError` naming ``field``; ``to_json``
    writes the stored value; ``from_json(value, field)`` turns what a file holds into what
    ``check`` takes, refusing malformed input without building anything (default:
    ``check``). ``file_default`` is what a checkpoint without the field means
    (:data:`REQUIRED`: every file has it). ``flag`` is the CLI option that sets it
    (``type`` converts the text), ``help`` its help.
    """

    check: Callable[[Any, str], Any]
    to_json: Callable[[Any], Any] = _same
    from_json: Callable[[Any, str], Any] | None = None
    file_default: Any = REQUIRED
    flag: str | None = None
    type: Callable[[str], Any] | None = None
    help: str = ""

    def read(self, value: Any, field: str) -> Any:
        return (self.from_json or self.check)(value, field)


SCHEMA_KEY = "lorakit.schema"


def adapter_field(spec: AdapterField, **field_kwargs: Any) -> Any:
    """A dataclass field (``default=`` / ``default_factory=``) carrying ``spec``."""
    return dataclasses.field(metadata={SCHEMA_KEY: spec}, **field_kwargs)


def fields_of(cls: type) -> dict[str, AdapterField]:
    """``name → AdapterField`` of every declared field of ``cls``, in declaration order."""
    return {f.name: f.metadata[SCHEMA_KEY] for f in dataclasses.fields(cls) if SCHEMA_KEY in f.metadata}


def default_of(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_all(obj: Any) -> None:
    """Check (and normalize) every declared field of ``obj`` in place."""
    for name, spec in fields_of(type(obj)).items():
        object.__setattr__(obj, name, spec.check(getattr(obj, name), f"adapter.{name}"))


def to_json(obj: Any) -> dict:
    return {name: spec.to_json(getattr(obj, name)) for name, spec in fields_of(type(obj)).items()}


def from_json(cls: type, config: Any) -> dict:
    """Constructor arguments from a JSON description (fields it lacks take their defaults;
    other keys, such as ``targets``, are not fields and are left out)."""
    if not isinstance(config, dict):
        raise AdapterError(f"adapter config {config!r:.80}: give a dict like Adapter.config() returns")
    return {name: spec.read(config[name], f"adapter.{name}") for name, spec in fields_of(cls).items()
            if name in config}


def file_problem(cls: type, adapter: Any) -> str | None:
    """What is wrong with a checkpoint's ``adapter`` object, or None; builds nothing."""
    if not isinstance(adapter, dict):
        return "'adapter' must be an object"
    specs = fields_of(cls)
    required = {n for n, s in specs.items() if s.file_default is REQUIRED}
    optional = set(specs) - required  # added after the format shipped: older files load with the defaults
    if not required <= set(adapter) <= set(specs):
        return f"adapter fields must be {sorted(required)} (optionally {sorted(optional)}); got {sorted(adapter)}"
    for name, value in adapter.items():
        try:
            specs[name].read(value, f"adapter.{name}")
        except AdapterError as exc:
            return str(exc)
    return None


def cli_fields(cls: type) -> dict[str, AdapterField]:
    """The fields a command line sets, by name (each has a ``flag``)."""
    return {name: spec for name, spec in fields_of(cls).items() if spec.flag}


def add_cli_arguments(group: Any, cls: type, defaults: Any = None) -> None:
    """Add every flagged field's option to an argparse group; ``defaults``: an object whose
    same-named attributes override the fields' defaults (a run's config)."""
    for name, spec in cli_fields(cls).items():
        default = getattr(defaults, name) if defaults is not None and hasattr(defaults, name) \
            else default_of(cls, name)
        group.add_argument(spec.flag, type=spec.type, default=default, help=spec.help or None)
