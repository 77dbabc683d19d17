"""What the benchmark scripts share (bench_decode, bench_scan, bench_soft, bench_train): the
Mistral-7B shape they measure at, and one way to time a step (medians after warm-up).

Imported as `from _bench import ...` (a script's own folder is first on sys.path).
"""

from __future__ import annotations

import statistics
import time

import torch

# Mistral-7B's shape (random weights built from it; nothing is downloaded): 32 layers, hidden 4096,
# 32 query / 8 key-value heads of dimension 128, vocabulary 32,000
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000)


def sync(device) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so a clock read after it is the work's end."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 0, clock=time.perf_counter):
    """(fn's last result, [seconds of each of `reps` runs]) after `warmup` untimed runs; every timed
    run starts and ends synchronised with the device."""
    res = None
    for _ in range(warmup):
        res = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = clock()
        res = fn()
        sync(device)
        times.append(clock() - t0)
    return res, times


def median_time(fn, device, reps: int, warmup: int = 1) -> tuple:
    """(fn's last result, the median of `reps` timed runs after `warmup` untimed ones, in seconds)."""
    res, times = timed(fn, device, reps, warmup)
    return res, statistics.median(times)
