"""Timing and peak memory of one training step (forward + backward + AdamW).

Peak memory of a step = the bytes the method keeps between steps (base weights,
adapter, optimizer state: :func:`lorakit.bench.methods.resident_bytes`) plus the
highest extra allocation reached *during* the step (activations, gradients,
temporaries) — what the step would need if it ran alone:

- CUDA: ``torch.cuda.max_memory_allocated() − memory_allocated()`` around the step;
- CPU: PyTorch has no CPU peak counter, so the step runs once under
  ``torch.profiler`` with ``profile_memory=True``, which records every allocation
  and free of PyTorch's CPU allocator (compiled code included); the peak is the
  maximum of their running sum. Scratch space that a BLAS library allocates on its
  own is not seen (the same for every method). The profiled step is not timed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: str) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one step; CUDA work is waited for on both
    ends. CPU time is the whole process's (all threads): on a machine shared with
    other jobs it counts only the work this step did, not the time it waited."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_peak_bytes(step: Callable[[], float], device: str) -> int:
    """Highest bytes allocated during ``step`` above what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    return _running_peak((e.start_ns(), e.nbytes()) for e in events)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _running_peak(events) -> int:
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak
