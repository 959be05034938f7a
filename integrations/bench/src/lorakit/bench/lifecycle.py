"""Load and merge times of a trained adapter: lorakit's ``load`` and
``merge_and_unload`` against PEFT's ``PeftModel.from_pretrained`` and
``merge_and_unload``.

Each method's adapter, as it stands after the timed steps, is saved once. Then, in
``repeats`` *alternating* rounds (round ``k`` visits every method once, starting at a
rotated position, as the step timings do), a fresh copy of the base model (its own
weights: merging writes into them, and the benchmark's base is shared by every
method) gets the adapter loaded (timed), then merged into its weights and unwrapped
(timed). The copy is made outside the timings. Wall and process CPU time are both
recorded; a method's figure is the median over the rounds, and each round's value is
kept so that a ratio can be given per round (min–max).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import warnings
from functools import partial

from torch import nn

from .measure import timed
from .methods import Method


def _save(method: Method, model: nn.Module, folder: str) -> None:
    if method.library == "lorakit":
        from lorakit.core import save

        save(model, folder)
    else:
        model.save_pretrained(folder)


def _load_and_merge(method: Method, base: nn.Module, folder: str, device: str) -> tuple[tuple, tuple]:
    """``((load wall, load CPU), (merge wall, merge CPU))`` in seconds, on a fresh copy of ``base``."""
    fresh = copy.deepcopy(base)
    loaded = {}
    if method.library == "lorakit":
        from lorakit.core import load, merge_and_unload

        load_times = timed(lambda: loaded.setdefault("m", load(fresh, folder)), device)
        merge_times = timed(partial(merge_and_unload, loaded["m"]), device)
    else:
        from peft import PeftModel

        load_times = timed(lambda: loaded.setdefault("m", PeftModel.from_pretrained(fresh, folder)), device)
        merge_times = timed(loaded["m"].merge_and_unload, device)
    return load_times, merge_times


def load_and_merge_ms(methods: list[tuple[Method, nn.Module]], base: nn.Module, device: str,
                      repeats: int = 5) -> dict[Method, dict]:
    """Per method (the floor has none): ``load_ms``, ``merge_ms`` (wall medians), ``load_cpu_ms``,
    ``merge_cpu_ms`` (CPU medians) and ``round_load_ms`` … ``round_merge_cpu_ms`` (every round)."""
    methods = [(m, model) for m, model in methods if m.library != "reference"]
    keys = ("load_ms", "load_cpu_ms", "merge_ms", "merge_cpu_ms")
    rounds: dict[Method, dict[str, list[float]]] = {m: {k: [] for k in keys} for m, _ in methods}
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on loading into a model that is not a hub one
        folders = {}
        for i, (method, model) in enumerate(methods):
            folders[method] = f"{root}/{i}"
            _save(method, model, folders[method])
        for k in range(repeats):
            start = k % max(len(methods), 1)
            for method, _ in methods[start:] + methods[:start]:
                (load_wall, load_cpu), (merge_wall, merge_cpu) = _load_and_merge(method, base, folders[method],
                                                                                  device)
                for key, seconds in zip(keys, (load_wall, load_cpu, merge_wall, merge_cpu)):
                    rounds[method][key].append(seconds * 1e3)
    return {m: {**{k: statistics.median(v) for k, v in r.items()}, **{f"round_{k}": v for k, v in r.items()}}
            for m, r in rounds.items()}
