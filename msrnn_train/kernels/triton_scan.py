"""GPU fast path of `schedule.scan`: the step process as one Triton program per (sequence, group).

The plain reference is `schedule.scan` (vectorised torch ops, ~20 tiny kernels per step: about
a second per layer at T = 2048 on an H100). Here each program keeps its K + 1 held slots in
registers and runs the T steps in one loop; the query-key logits come from `LogitRows` (fp32,
computed block by block on tensor cores), so one step is a gather of the held slots' logits,
a softmax per query head and a min-reduction. Same arguments and the same `Schedule` as
`scan` (and the numba CPU loop): the three are compared on fresh random inputs in
tests/test_kernels.py (on CUDA; on the CPU through Triton's interpreter, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from ..schedule import Schedule, SoftRows, Slots, emits_soft_rows
from .common import H2O, SINKS, TOVA, WINDOW, has_kernel, start_state

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs: schedule.scan is used instead
    HAVE_TRITON = False

if HAVE_TRITON:
    # the kernels' rule numbers (kernels/common.py), as compile-time constants of the program
    _SINKS, _H2O, _TOVA = tl.constexpr(SINKS), tl.constexpr(H2O), tl.constexpr(TOVA)

    @triton.jit
    def _scan_block(rows_ptr, s_rb, s_rh, s_rt,
                    valid_ptr, onew_ptr, pnew_ptr,
                    src_ptr, order_ptr, pos_ptr, acc_ptr, evict_ptr, runner_ptr, lse_ptr,
                    t0, t1, T, C, S, P, budget, n_sinks, recent, window, hstride, nh, G, Hq,
                    CODE: tl.constexpr, HAS_WINDOW: tl.constexpr, EMIT: tl.constexpr,
                    BC: tl.constexpr, HC: tl.constexpr):
        b = tl.program_id(0)
        g = tl.program_id(1)
        idx = tl.arange(0, BC)
        cm = idx < C
        sbase = (b * G + g) * C
        ebase = (b * G + g).to(tl.int64) * S
        src = tl.load(src_ptr + sbase + idx, mask=cm, other=-1)
        order = tl.load(order_ptr + sbase + idx, mask=cm, other=0)
        pos = tl.load(pos_ptr + sbase + idx, mask=cm, other=0)
        acc = tl.load(acc_ptr + sbase + idx, mask=cm, other=0.0)
        h0 = g * hstride
        hidx = tl.arange(0, HC)
        rbase = rows_ptr + b.to(tl.int64) * s_rb
        for t in range(t0, t1):
            tt = (t0 * 0 + t).to(tl.int64)  # the step as an int64 tensor (also under the interpreter)
            v = tl.load(valid_ptr + b * T + t)
            if v != 0:
                onew = tl.load(onew_ptr + b * T + t)
                # C_t = H_{t-1} + {t}: the new token takes the first free slot
                free = tl.min(tl.where((src < 0) & cm, idx, BC), 0)
                on = idx == free
                src = tl.where(on, P + tt, src)
                order = tl.where(on, onew, order)
                pos = tl.where(on, tl.load(pnew_ptr + t), pos)
                acc = tl.where(on, 0.0, acc)
                held = (src >= 0) & cm
                need = tl.sum(held.to(tl.int32), 0) > budget
                score = tl.zeros([BC], dtype=tl.float32)
                if CODE >= _H2O:  # h2o, tova: query t's probabilities over C_t, mean over its heads
                    if need | (CODE == _H2O):
                        col = tl.where(held, src, 0)
                        for hc in range(0, nh, HC):
                            hm = (hc + hidx) < nh
                            ptrs = (rbase + (h0 + hc + hidx)[:, None].to(tl.int64) * s_rh
                                    + (t - t0) * s_rt + col[None, :])
                            x = tl.load(ptrs, mask=hm[:, None] & held[None, :], other=float("-inf"))
                            m = tl.max(x, 1)
                            m = tl.where(hm, m, 0.0)
                            e = tl.exp(x - m[:, None])
                            z = tl.sum(e, 1)
                            z = tl.where(hm, z, 1.0)
                            score += tl.sum(e / z[:, None], 0)
                            if EMIT:  # soft mode (TOVA, so here `need`): each head's log normaliser over C_t
                                tl.store(lse_ptr + (b * Hq + h0 + hc + hidx).to(tl.int64) * T + t, m + tl.log(z),
                                         mask=hm)
                        score = score / nh
                        if CODE == _H2O:
                            acc = acc + tl.where(held, score, 0.0)
                if need:
                    elig = held
                    if CODE == _SINKS:
                        elig = elig & (order >= n_sinks)
                    if CODE == _H2O:
                        # the r most recent real tokens are always held
                        elig = elig & (order <= onew - recent)
                    if CODE == _TOVA:
                        prio = score
                    elif CODE == _H2O:
                        prio = acc
                    else:
                        prio = order.to(tl.float32)
                    prio = tl.where(elig, prio, float("inf"))
                    low = tl.min(prio, 0)
                    tied = elig & (prio == low)
                    oldest = tl.min(tl.where(tied, order, 9223372036854775807), 0)
                    victim = tl.min(tl.where(tied & (order == oldest), idx, BC), 0)
                    vsrc = tl.sum(tl.where(idx == victim, src, 0), 0)
                    tl.store(evict_ptr + ebase + vsrc, tt)
                    if EMIT:  # the runner-up: the same choice among the rest of C_t
                        prio2 = tl.where(idx == victim, float("inf"), prio)
                        elig2 = elig & (idx != victim)
                        low2 = tl.min(prio2, 0)
                        tied2 = elig2 & (prio2 == low2)
                        oldest2 = tl.min(tl.where(tied2, order, 9223372036854775807), 0)
                        second = tl.min(tl.where(tied2 & (order == oldest2), idx, BC), 0)
                        rsrc = tl.sum(tl.where(idx == second, src, 0), 0)
                        tl.store(runner_ptr + ebase + vsrc, tl.where(second < BC, rsrc, -1).to(tl.int64))
                    src = tl.where(idx == victim, -1, src)
            if HAS_WINDOW:
                # the model's own sliding window: a key at column p leaves at the end of step p + W - 1
                gone = (src >= 0) & cm & (pos <= tl.load(pnew_ptr + t) + 1 - window)
                tl.store(evict_ptr + ebase + tl.where(gone, src, 0), tl.zeros([BC], dtype=tl.int64) + tt,
                         mask=gone)
                src = tl.where(gone, -1, src)
        tl.store(src_ptr + sbase + idx, src, mask=cm)
        tl.store(order_ptr + sbase + idx, order, mask=cm)
        tl.store(pos_ptr + sbase + idx, pos, mask=cm)
        tl.store(acc_ptr + sbase + idx, acc, mask=cm)


def supported(policy, budget) -> bool:
    # the four rules compiled below (the learned ones run in the numba kernel and the torch scan)
    return HAVE_TRITON and has_kernel(policy, budget) and policy.kernel_code in (WINDOW, SINKS, H2O, TOVA)


def triton_scan(policy, budget, logits, new_valid, new_order, new_pos, init: Slots | None = None,
                window: int | None = None, groups: int = 1, soft_rows: bool = False,
                new_value: torch.Tensor | None = None) -> Schedule:
    """Drop-in for `schedule.scan` (same arguments, same result) on CUDA tensors, or on CPU
    tensors under TRITON_INTERPRET=1. Unbounded layers and policies without a kernel code go to
    `schedule.scan`."""
    if not supported(policy, budget):
        from ..schedule import scan

        return scan(policy, budget, logits, new_valid, new_order, new_pos, init=init, window=window, groups=groups,
                    soft_rows=soft_rows, new_value=new_value)
    dev = new_valid.device
    B, T = new_valid.shape
    P = 0 if init is None else init.src.shape[-1]
    S = P + T
    slots, evict, arrive = start_state(budget, init, new_valid, groups, dev)
    C = slots.src.shape[-1]
    valid = new_valid.to(torch.int8).contiguous()
    onew = new_order.to(dev, torch.long).contiguous()
    pnew = new_pos.to(dev, torch.long).contiguous()
    code = policy.kernel_code
    n_sinks, recent = policy.kernel_args()
    Hq = logits.q.shape[1]
    per_group = Hq // groups
    nh = per_group if groups > 1 else Hq
    hstride = per_group if groups > 1 else 0
    BC = triton.next_power_of_2(C)
    HC = max(1, min(triton.next_power_of_2(nh), 4096 // BC))
    dummy = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev)
    num_warps = 4 if BC * HC <= 2048 else 8
    emit = bool(soft_rows and emits_soft_rows(policy, budget))
    runner = torch.full((B, groups, S) if emit else (1,), -1, dtype=torch.long, device=dev)
    lse = torch.zeros((B, Hq, T) if emit else (1,), dtype=torch.float32, device=dev)
    for t0 in range(0, T, logits.block):
        t1 = min(T, t0 + logits.block)
        rows = logits.block_rows(t0) if policy.needs_scores else dummy
        _scan_block[(B, groups)](
            rows, rows.stride(0), rows.stride(1), rows.stride(2),
            valid, onew, pnew, slots.src, slots.order, slots.pos, slots.acc, evict, runner, lse,
            t0, t1, T, C, S, P, budget, n_sinks, recent, window or 0, hstride, nh, groups, Hq,
            CODE=code, HAS_WINDOW=window is not None, EMIT=emit, BC=BC, HC=HC, num_warps=num_warps)
    return Schedule(evict=evict, arrive=arrive, final=slots, soft=SoftRows(runner, lse) if emit else None)
