"""CPU fast path of `schedule.scan`: the same step process compiled with numba.

The torch scan spends its time dispatching ~20 tiny tensor ops per step; here one compiled
loop runs the steps over blocks of precomputed fp32 logits (`LogitRows`). It reads and
writes the same `Slots`/`Schedule` structures, so teacher forcing and the BoundedCache both
use it on the CPU, and tests/test_kernels.py compares it with `schedule.scan` on fresh
random inputs for every policy, budget, padding and sliding window.
"""

from __future__ import annotations

import numpy as np

import torch

from ..schedule import Schedule, SoftRows, Slots, emits_soft_rows, scan
from .common import H2O, LEARNED_DECAY, LEARNED_VALUE, SINKS, TOVA, has_kernel, start_state

try:
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; the torch scan is the fallback
    HAVE_NUMBA = False


def _steps(logits, t0, t1, valid, order_new, pos_new, src, order, pos, acc, evict,
           code, budget, n_sinks, recent, window, P, S, per_group, groups,
           emit, runner, lse, values):  # pragma: no cover - compiled
    B, G, C = src.shape
    Hq = logits.shape[1]
    score = np.zeros(C, dtype=np.float64)
    for b in range(B):
        for g in range(G):
            h0 = g * per_group if groups > 1 else 0
            nh = per_group if groups > 1 else Hq
            for t in range(t0, t1):
                if valid[b, t]:
                    # C_t = H_{t-1} + {t}
                    free = 0
                    while src[b, g, free] >= 0:
                        free += 1
                    src[b, g, free] = P + t
                    order[b, g, free] = order_new[b, t]
                    pos[b, g, free] = pos_new[t]
                    acc[b, g, free] = values[b, g, t] if code >= LEARNED_DECAY else np.float32(0.0)
                    if budget >= 0:
                        count = 0
                        for c in range(C):
                            if src[b, g, c] >= 0:
                                count += 1
                        need = count > budget
                        if (code == H2O or code == TOVA) and (need or code == H2O):
                            for c in range(C):
                                score[c] = 0.0
                            for h in range(h0, h0 + nh):
                                m = -np.inf
                                for c in range(C):
                                    if src[b, g, c] >= 0:
                                        x = logits[b, h, t - t0, src[b, g, c]]
                                        if x > m:
                                            m = x
                                z = 0.0
                                for c in range(C):
                                    if src[b, g, c] >= 0:
                                        z += np.exp(np.float64(logits[b, h, t - t0, src[b, g, c]]) - m)
                                if emit and need:
                                    lse[b, h, t] = np.float32(m + np.log(z))
                                for c in range(C):
                                    if src[b, g, c] >= 0:
                                        score[c] += np.exp(np.float64(logits[b, h, t - t0, src[b, g, c]]) - m) / z / nh
                            if code == H2O:
                                for c in range(C):
                                    if src[b, g, c] >= 0:
                                        acc[b, g, c] += np.float32(score[c])
                        if need:
                            best = -1
                            best_p = np.inf
                            best_o = 0
                            second = -1  # the runner-up (soft mode)
                            second_p = np.inf
                            second_o = 0
                            for c in range(C):
                                if src[b, g, c] < 0:
                                    continue
                                o = order[b, g, c]
                                if (code == SINKS or code >= LEARNED_DECAY) and o < n_sinks:
                                    continue
                                # the r most recent real tokens are always held (each was
                                # protected on every step since it arrived): they are the safe ones
                                if code == H2O and o > order_new[b, t] - recent:
                                    continue
                                if code == TOVA:
                                    p = np.float32(score[c])
                                elif code == H2O or code == LEARNED_VALUE:
                                    p = acc[b, g, c]
                                elif code == LEARNED_DECAY:  # the same float32 product as the torch scan
                                    p = np.float32(order_new[b, t] - o) * acc[b, g, c]
                                else:
                                    p = np.float32(o)
                                if best < 0 or p < best_p or (p == best_p and o < best_o):
                                    second, second_p, second_o = best, best_p, best_o
                                    best, best_p, best_o = c, p, o
                                elif second < 0 or p < second_p or (p == second_p and o < second_o):
                                    second, second_p, second_o = c, p, o
                            evict[b, g, src[b, g, best]] = t
                            if emit:
                                runner[b, g, src[b, g, best]] = src[b, g, second] if second >= 0 else -1
                            src[b, g, best] = -1
                if window > 0:
                    for c in range(C):
                        if src[b, g, c] >= 0 and pos[b, g, c] <= pos_new[t] + 1 - window:
                            evict[b, g, src[b, g, c]] = t
                            src[b, g, c] = -1


if HAVE_NUMBA:
    _steps = numba.njit(cache=True, nogil=True)(_steps)


def fast_scan(policy, budget, logits, new_valid, new_order, new_pos, init: Slots | None = None,
              window: int | None = None, groups: int = 1, soft_rows: bool = False,
              new_value: torch.Tensor | None = None) -> Schedule:
    """Drop-in for `schedule.scan` on the CPU (same arguments, same result). A policy without a
    kernel code (and an unbounded layer) goes to `schedule.scan`."""
    if not has_kernel(policy, budget):
        return scan(policy, budget, logits, new_valid, new_order, new_pos, init=init, window=window, groups=groups,
                    soft_rows=soft_rows, new_value=new_value)
    B, T = new_valid.shape
    P = 0 if init is None else init.src.shape[-1]
    slots, evict, arrive = start_state(budget, init, new_valid, groups, "cpu")
    src, order, pos, acc = (x.numpy() for x in (slots.src, slots.order, slots.pos, slots.acc))
    evict_np = evict.numpy()
    valid_np = new_valid.cpu().numpy()
    order_np = new_order.cpu().numpy().astype(np.int64)
    pos_np = new_pos.cpu().numpy().astype(np.int64)
    code = policy.kernel_code
    n_sinks, recent = policy.kernel_args()
    Hq = logits.q.shape[1] if logits is not None else groups  # no logits: a policy that needs no scores
    block = logits.block if logits is not None else max(T, 1)
    per_group = Hq // groups
    empty = np.zeros((B, Hq, 1, 1), dtype=np.float32)
    values = np.zeros((1, 1, 1), dtype=np.float32)  # what each new token carries (learned policies only)
    if code >= LEARNED_DECAY:
        values = (np.zeros((B, groups, T), dtype=np.float32) if new_value is None
                  else np.ascontiguousarray(new_value.detach().float().cpu().expand(B, groups, T).numpy()))
    emit = bool(soft_rows and emits_soft_rows(policy, budget))
    runner = torch.full((B, groups, P + T) if emit else (1, 1, 1), -1, dtype=torch.long)
    lse = torch.zeros((B, Hq, T) if emit else (1, 1, 1), dtype=torch.float32)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        rows = logits.block_rows(t0).numpy() if policy.needs_scores else empty
        _steps(rows, t0, t1, valid_np, order_np, pos_np, src, order, pos, acc, evict_np, code, budget,
               n_sinks, recent, window or 0, P, P + T, per_group, groups, emit, runner.numpy(), lse.numpy(), values)
    dev = new_valid.device
    final = Slots(*(x.to(dev) for x in (slots.src, slots.order, slots.pos, slots.acc)))
    soft = SoftRows(runner=runner.to(dev), lse=lse.to(dev)) if emit else None
    return Schedule(evict=evict.to(dev), arrive=arrive.to(dev), final=final, soft=soft)
