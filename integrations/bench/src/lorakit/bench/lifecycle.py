"""Load and merge times of a trained adapter: lorakit's ``load`` and
``merge_and_unload`` against PEFT's ``PeftModel.from_pretrained`` and
``merge_and_unload``.

Each method's adapter, as it stands after the timed steps, is saved once; then, in
``repeats`` rounds, a fresh copy of the base model (its own weights: merging writes
into them, and the benchmark's base is shared by every method) gets the adapter
loaded (timed), then merged into its weights and unwrapped (timed). The copy is
made outside the timings. A method's figure is the median over the rounds.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from functools import partial

from torch import nn

from .measure import synchronize
from .methods import Method


def _timed_ms(fn, device: str):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


def load_and_merge_ms(method: Method, model: nn.Module, base: nn.Module, device: str,
                      repeats: int = 3) -> dict[str, float] | None:
    """``{"load_ms", "merge_ms"}`` (medians), None for the floor (no adapter)."""
    if method.library == "reference":
        return None
    from lorakit.core import load, merge_and_unload, save

    loads, merges = [], []
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on loading into a model that is not a hub one
        if method.library == "lorakit":
            save(model, folder)
        else:
            model.save_pretrained(folder)
        for _ in range(repeats):
            fresh = copy.deepcopy(base)
            if method.library == "lorakit":
                loaded, ms = _timed_ms(partial(load, fresh, folder), device)
                _, merge = _timed_ms(partial(merge_and_unload, loaded), device)
            else:
                from peft import PeftModel

                loaded, ms = _timed_ms(partial(PeftModel.from_pretrained, fresh, folder), device)
                _, merge = _timed_ms(loaded.merge_and_unload, device)
            loads.append(ms)
            merges.append(merge)
            del fresh, loaded
    return {"load_ms": statistics.median(loads), "merge_ms": statistics.median(merges)}
