"""Push an adapter from memory into a running vLLM server.

One push: the adapter's PEFT export is written as one unit (``export_peft``: the folder
is the old export or the new one at every instant) and the server is asked to load it
(``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``); then the previous version,
if named, is unloaded (``POST /v1/unload_lora_adapter``), so requests always find one.
vLLM has no DoRA: a magnitude head is folded into plain LoRA factors of
``W_eff − W̄`` (exact at full rank, so the server's ``--max-lora-rank`` must cover it).

Every check that can fail (server down, the name already served, ``previous`` not
served, runtime LoRA updating disabled) runs before anything is written; a load the
server refuses removes the folder push created. Only the standard library talks HTTP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.core import AdapterError

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "lorakit-vllm"  # folder=None: DEFAULT_ROOT / name
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # also a folder name: no separators
START = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R"


class PushError(AdapterError):
    """The server is unreachable, refuses the adapter, or the arguments are wrong."""


@dataclass(frozen=True)
class Pushed:
    """What :func:`push` did: the served name, the folder the server read, and seconds
    spent writing the export, in the server's load and in the previous version's unload."""

    name: str
    path: Path
    export_s: float
    load_s: float
    unload_s: float

    @property
    def total_s(self) -> float:
        return self.export_s + self.load_s + self.unload_s


def _base_url(url: str) -> str:
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+(/v1)?/?", url):
        raise PushError(f"push url={url!r}: give the server's root, e.g. 'http://127.0.0.1:8000'")
    return url.rstrip("/").removesuffix("/v1")


def _call(base: str, route: str, payload: dict | None, timeout: float) -> tuple[int, str]:
    """``(status, body)`` of a GET (``payload`` None) or a JSON POST; an HTTP error is a
    status, an unreachable server a :class:`PushError`."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(base + route, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PushError(f"vLLM server at {base} is not reachable ({reason}); start it with {START}") from None


def _message(body: str) -> str:
    """The one-line reason in a vLLM (``{"error": {"message"}}``) or FastAPI
    (``{"detail"}``) error body, else the body itself, shortened."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        found = error.get("message") if isinstance(error, dict) else parsed.get("detail", parsed.get("message"))
        if found is not None:
            body = str(found)
    line = " ".join(body.split())
    return line if len(line) <= 300 else line[:297] + "..."


def _served(base: str, timeout: float) -> list[str]:
    status, body = _call(base, "/v1/models", None, timeout)
    try:
        ids = [card["id"] for card in json.loads(body)["data"]] if status == 200 else None
    except (ValueError, KeyError, TypeError):
        ids = None
    if ids is None:
        raise PushError(f"{base}/v1/models answered HTTP {status} ({_message(body)}); is this a vLLM server?")
    return ids


def _check_runtime_updating(base: str, timeout: float) -> None:
    """vLLM registers the load/unload routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING:
    an unload of the empty name is refused (400) when they exist and changes nothing;
    without them the route itself is missing (FastAPI's 404 ``Not Found``)."""
    status, body = _call(base, "/v1/unload_lora_adapter", {"lora_name": ""}, timeout)
    if status in (404, 405) and _message(body) in ("Not Found", "Method Not Allowed"):
        raise PushError(f"{base} has runtime LoRA updating disabled (no /v1/load_lora_adapter): "
                        f"restart it as {START}")


def push(model: nn.Module, url: str, name: str, *, folder: str | os.PathLike | None = None,
         previous: str | None = None, max_rank: int | str | None = None, timeout: float = 120.0) -> Pushed:
    """Serve ``model``'s adapter as ``name`` on the vLLM server at ``url``, then unload
    ``previous`` (the version it replaces), if given.

    The PEFT export (``lorakit.transformers.export_peft``, DoRA folded, exact unless
    ``max_rank`` caps it) is written to ``folder`` (default ``DEFAULT_ROOT / name``),
    which the server must be able to read (same machine or a shared disk). Each version
    needs its own name (vLLM refuses to load a served name again): e.g. ``policy-v7`` with
    ``previous="policy-v6"``. Folders are kept; delete old versions' yourself.

    Raises :class:`PushError` (nothing written, nothing served) when the server is down,
    already serves ``name``, does not serve ``previous``, has runtime LoRA updating
    disabled, or refuses the load (its error message quoted; push's new folder removed).
    """
    from lorakit.transformers import export_peft

    base = _base_url(url)
    for what, value in (("name", name), ("previous", previous)):
        if value is not None and not (isinstance(value, str) and NAME.fullmatch(value)):
            raise PushError(f"push {what}={value!r}: use letters, digits, '.', '_' and '-' (it names a folder too)")
    if previous == name:
        raise PushError(f"push previous={previous!r} is the name being pushed: give each version a new name")
    served = _served(base, timeout)
    if name in served:
        raise PushError(f"{base} already serves {name!r}: push under a new name (e.g. {name + '-2'!r}) "
                        f"with previous={name!r}")
    if previous is not None and previous not in served:
        raise PushError(f"push previous={previous!r}: {base} does not serve it (it serves {', '.join(served)})")
    _check_runtime_updating(base, timeout)

    path = Path(folder) if folder is not None else DEFAULT_ROOT / name
    created = not os.path.lexists(path)
    start = time.perf_counter()
    export_peft(model, path, max_rank=max_rank, fold_magnitude=True, task_type="CAUSAL_LM")
    loaded = time.perf_counter()
    lora_path = os.path.realpath(path)
    status, body = _call(base, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": lora_path}, timeout)
    if status != 200:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise PushError(f"vLLM at {base} refused to load {name!r} from {lora_path}: HTTP {status}: {_message(body)}")
    unloading = end = time.perf_counter()
    if previous is not None:
        status, body = _call(base, "/v1/unload_lora_adapter", {"lora_name": previous}, timeout)
        if status != 200:
            raise PushError(f"{name!r} is served, but unloading previous={previous!r} failed: "
                            f"HTTP {status}: {_message(body)}")
        end = time.perf_counter()
    return Pushed(name, Path(lora_path), loaded - start, unloading - loaded, end - unloading)
