"""Bounds on untrusted input: regexes, numbers and JSON files.

A checkpoint, a recipe or a CLI argument may be hostile or just odd. Everything here
turns such input into a one-line :class:`AdapterError` (or the subclass the caller
passes) that names the field, instead of a hang, a huge allocation or a raw error.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .primitives import AdapterError

try:  # the parser re.compile uses: re._parser from Python 3.11, sre_parse before
    from re import _parser as _re_parser  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_parse as _re_parser  # type: ignore[no-redef]

#: longest regex a config or an Adapter may carry (module-name patterns are short)
MAX_PATTERN_CHARS = 1024
#: module names are rarely longer; the backtracking estimate assumes this length
NAME_CHARS = 256
#: estimated backtracking steps per match: three unbounded quantifiers in a row
#: (256**3) are allowed, a fourth takes ~0.5 s per 256-char name and is refused
MAX_BACKTRACK = NAME_CHARS ** 3
#: integers in a config: 2**64 has 20 digits, nothing lorakit reads needs more
MAX_INT_DIGITS = 20
#: nesting of a config (lists/objects); lorakit's own is 4 deep
MAX_JSON_DEPTH = 32
MAX_SEED = 2**63 - 1


# -- regexes -------------------------------------------------------------------------------
def _cost(items: Any, field: str) -> int:
    """Worst-case backtracking steps of a parsed regex over a NAME_CHARS name (an
    over-estimate: every variable quantifier multiplies, alternation adds).
    Refuses what can take exponential time: a variable quantifier over something
    that itself backtracks (``(.*)*``, ``(a+)+``, ``(ab|a)*``) and backreferences."""
    total = 1
    for op, arg in items:
        op = str(op)
        if op in ("GROUPREF", "GROUPREF_EXISTS"):
            raise AdapterError(f"{field}: backreferences are not supported in module patterns")
        if op == "SUBPATTERN":
            cost = _cost(arg[-1], field)
        elif op == "BRANCH":
            cost = sum(_cost(branch, field) for branch in arg[1])
        elif op in ("ASSERT", "ASSERT_NOT"):
            cost = _cost(arg[1], field)
        elif op == "ATOMIC_GROUP":
            cost = _cost(arg, field)
        elif op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = arg
            inner = _cost(body, field)
            if high > low and inner > 1 and op != "POSSESSIVE_REPEAT":
                raise AdapterError(
                    f"{field}: a quantifier over a group that itself repeats or alternates "
                    "(like (.*)* or (a|ab)+) can take exponential time; write it without nesting")
            cost = inner ** min(low, 64) if inner > 1 else 1
            if high > low and op != "POSSESSIVE_REPEAT":
                cost *= min(high - low + 1, NAME_CHARS)
        else:  # a single character, class or anchor
            cost = 1
        total = min(total * cost, MAX_BACKTRACK + 1)
    return total


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, field: str, max_chars: int | None) -> re.Pattern:
    if not isinstance(pattern, str):
        raise AdapterError(f"{field}={pattern!r}: a module pattern must be a string")
    if max_chars is not None and len(pattern) > max_chars:
        raise AdapterError(f"{field}: the pattern is {len(pattern)} characters; at most {max_chars} are allowed")
    try:
        parsed = _re_parser.parse(pattern)  # the parse re.compile does
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(f"{field} is not a valid regex ({exc}); fix or escape it") from None
    if _cost(parsed.data, field) > MAX_BACKTRACK:
        raise AdapterError(
            f"{field}: too many quantifiers in a row (matching could take minutes); "
            "use at most three unbounded ones (*, +, {n,})")
    return compiled


def safe_regex(pattern: Any, field: str, max_chars: int | None = MAX_PATTERN_CHARS) -> re.Pattern:
    """``re.compile(pattern)`` if it is a valid regex that cannot backtrack
    catastrophically, else an :class:`AdapterError` naming ``field`` (which
    should show the pattern, e.g. ``adapter.rank_pattern['(.*)*y']``).
    ``max_chars=None`` for patterns lorakit builds itself (escaped module names)."""
    if not isinstance(pattern, str):
        raise AdapterError(f"{field}={pattern!r}: a module pattern must be a string")
    return _compile(pattern, field, max_chars)


# -- numbers -------------------------------------------------------------------------------
def check_int(value: Any, field: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) within [low, high], else AdapterError."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(b for b in (low is not None and f">= {low}", high is not None and f"<= {high}") if b)
        raise AdapterError(f"{field}={_short(value)}: must be an integer{' ' + bounds if bounds else ''}")
    return value


def check_number(value: Any, field: str, low: float | None = None, positive: bool = False) -> float:
    """``value`` if it is a finite int or float (not a bool), >= low (> 0 if positive)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok or (low is not None and value < low) or (positive and not value > 0):
        need = " > 0" if positive else f" >= {low}" if low is not None else ""
        raise AdapterError(f"{field}={_short(value)}: must be a finite number{need}")
    return value


def check_probability(value: Any, field: str) -> float:
    """``value`` if it is a number in [0, 1) (a dropout rate), else AdapterError."""
    if check_number(value, field, low=0) >= 1:
        raise AdapterError(f"{field}={_short(value)}: must be in [0, 1)")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterError(f"{field}={_short(value)}: must be true or false")
    return value


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"<{value.bit_length()}-bit int>"
    return text if len(text) <= 60 else text[:57] + "..."


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """AdapterError naming the first tensor with NaN/inf values."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{what}: {name} has non-finite values (NaN/inf); nothing was written. "
                               "Check the adapter's parameters (a diverged run?) or export in a wider dtype")


# -- files and JSON ------------------------------------------------------------------------
def _open_regular(file: Path, error: type[AdapterError]) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``file`` and its stat, if it is a regular file.

    Opened non-blocking, so a FIFO named like a checkpoint file is refused instead of
    blocking forever; OS errors (a symlink loop, a file where a folder should be)
    become ``error`` naming the path. FileNotFoundError propagates.
    """
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise error(f"{file}: {file.parent} is not a folder; give the checkpoint folder") from None
        if exc.errno == errno.EISDIR:
            raise error(f"{file} is a folder, not a file; the checkpoint is malformed") from None
        raise error(f"{file} cannot be read ({exc.strerror or exc}); check the path") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO or a device?)"
        raise error(f"{file} is {kind}; a checkpoint holds regular files only")
    return fd, info


def check_regular_file(file: Path, error: type[AdapterError] = AdapterError) -> None:
    """Refuse ``file`` unless it is a regular file (see :func:`read_regular_file`)."""
    os.close(_open_regular(file, error)[0])


def read_regular_file(file: Path, max_bytes: int, error: type[AdapterError] = AdapterError) -> bytes:
    """The bytes of ``file`` if it is a regular file of at most ``max_bytes``; a FIFO,
    a device, a folder or an unreadable path is ``error`` naming the path, never a
    blocking read. FileNotFoundError propagates."""
    fd, info = _open_regular(file, error)
    try:
        if info.st_size > max_bytes:
            raise error(f"{file} is {info.st_size} bytes; at most {max_bytes} are read. Is it the right file?")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{file} cannot be read ({exc.strerror or exc}); check the path") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew since fstat
        raise error(f"{file} is over {max_bytes} bytes; at most {max_bytes} are read. Is it the right file?")
    return data


class _Bad:
    """A JSON value refused while parsing; reported with its field path after parsing."""

    def __init__(self, why: str) -> None:
        self.why = why


def _parse_int(text: str) -> int | _Bad:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Bad(f"is an integer of {digits} digits; at most {MAX_INT_DIGITS} are allowed")
    return int(text)


def _parse_float(text: str) -> float | _Bad:
    value = float(text)
    return value if math.isfinite(value) else _Bad(f"is {text[:20]}, which overflows; only finite numbers "
                                                   "are allowed")


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            value = _Bad(f"is given twice (key {key!r})")  # a JSON reader would silently keep one
        out[key] = value
    return out


def _find_bad(value: Any, field: str, depth: int = 0) -> str | None:
    if isinstance(value, _Bad):
        return f"{field} {value.why}"
    if depth > MAX_JSON_DEPTH:
        return f"{field[:60]}... is nested more than {MAX_JSON_DEPTH} levels deep"
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        sub = f"{field}.{key}" if isinstance(key, str) and key.isidentifier() else f"{field}[{key!r}]"
        if problem := _find_bad(child, sub.lstrip("."), depth + 1):
            return problem
    return None


def loads_strict(data: bytes | str, what: str, error: type[AdapterError] = AdapterError) -> Any:
    """JSON without NaN/Infinity, overflowing floats, huge integers, duplicate keys
    or deep nesting; each refused value is reported with its field path."""
    try:
        value = json.loads(data, parse_constant=lambda c: _Bad(f"is {c}; only finite numbers are allowed"),
                           parse_int=_parse_int, parse_float=_parse_float, object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON ({exc}); the file is corrupt") from None
    if problem := _find_bad(value, ""):
        raise error(f"{what}: {problem}")
    return value


def read_json(file: Path, error: type[AdapterError] = AdapterError, max_bytes: int = 16 * 2**20) -> Any:
    """A JSON file from outside (a checkpoint's, a run's, a model folder's), read strictly:
    a bounded regular file (:func:`read_regular_file`) parsed by :func:`loads_strict`; any
    defect is ``error`` naming the file. FileNotFoundError propagates."""
    return loads_strict(read_regular_file(file, max_bytes, error), str(file), error)

