"""Soft-TOVA: a differentiable relaxation of the hard eviction mask, for training.

The hard process drops, at step e_j, the member j that query e_j attends to least. Under
teacher forcing its attention scores at that step are the hard-masked attention
probabilities of row e_j (averaged over the heads of the group). Soft-TOVA keeps every
evicted key visible to later queries with an additive logit bias

    bias(t, j) = log sigmoid((log s_{e_j}(j) - log s_{e_j}(runner-up)) / tau)      for t > e_j

where the runner-up is the member query e_j would have dropped next. The log-ratio margin is
<= 0 (j lost), so as tau -> 0 the bias -> -inf and the forward pass becomes the hard process
(exactly so on a random tiny model at tau = 1e-6); for larger tau the loss sees evicted keys
at a reduced weight and its gradient reaches the query/key scores that decided the eviction.
Keys that left the model's own sliding window (not a policy choice) stay hard-masked.

Two implementations of the keep-logits, selected by `$MSRNN_SOFT` / `Controller.soft_path`:

* `soft_keep_logits` (dense, the reference): the (B, H, T, S) scores, their two lowest values
  per row, then the margin. O(T^2 H) memory.
* `soft_keep_sparse` (the default where it applies: TOVA policies under teacher forcing): the
  scan emits, per policy eviction, the victim (its eviction step), the runner-up and each query
  head's log normaliser lse_h over C_t (`schedule.SoftRows`). Then

      log s_t(j) = logsumexp_h(q_t,h . k_j * scale - lse_h(t)) - log(heads)

  needs only the 2 gathered products q_{e_j} . k_j and q_{e_j} . k_{runner} per head and key:
  O(T H d) time and memory. The value equals the dense one. For the gradient, lse_h(t) is a
  function of every member of C_t, so no few products give it: `_Normaliser` returns the
  scan's lse in the forward and, in the backward, the exact gradient of a log-sum-exp over C_t
  (d lse = sum_i p_i d logit_i), computed block by block of 128 rows over the at most
  K + 128 keys such a block can see (compacted): O(T (K + 128) H d) time like an attention
  backward, O(128 (K + 128) H) transient memory, never a T x T tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .schedule import Schedule


def soft_keep_logits(query, key, scaling, sched: Schedule, new_valid, groups: int, tau: float) -> torch.Tensor:
    """Per key (B, G, S): the additive logit log sigmoid(margin / tau) that queries after its
    eviction give it; -inf for keys never evicted by the policy (held, padding, or expired from
    the model's own sliding window). Differentiable in query and key."""
    B, Hq, T, _ = query.shape
    S = key.shape[2]
    vis = sched.visible(new_valid)  # (B, G, T, S)
    k = key.repeat_interleave(Hq // key.shape[1], dim=1) if Hq != key.shape[1] else key
    dt = torch.float64 if query.dtype == torch.float64 else torch.float32
    with torch.autocast(query.device.type, enabled=False):
        logits = torch.matmul(query.to(dt), k.to(dt).transpose(-1, -2)) * scaling
    vis_h = vis.repeat_interleave(Hq // groups, dim=1) if groups > 1 else vis
    probs = torch.softmax(logits.masked_fill(~vis_h, -torch.inf), dim=-1).nan_to_num(0.0)
    score = probs.view(B, groups, Hq // groups, T, S).mean(2)  # (B, G, T, S): s_t(j)

    evict = sched.evict  # (B, G, S)
    evicted = (evict >= 0) & (evict < T)
    row = evict.clamp(0, T - 1)
    s_self = score.gather(2, row.unsqueeze(2)).squeeze(2)  # s_{e_j}(j)
    two = score.masked_fill(~vis, torch.inf).topk(min(2, S), dim=-1, largest=False).values  # (B, G, T, 2)
    lowest = two[..., 0].gather(2, row)
    runner_up = (two[..., 1] if S > 1 else two[..., 0]).gather(2, row)
    policy_victim = evicted & (s_self <= lowest)  # a key expired by the sliding window is not one
    margin = (torch.log(s_self.clamp_min(1e-30)) - torch.log(runner_up.clamp_min(1e-30))).clamp(max=0.0)
    keep = F.logsigmoid(margin / tau)
    return torch.where(policy_victim, keep, -torch.inf)


def soft_keep_sparse(query, key, scaling, sched: Schedule, groups: int, tau: float, budget: int,
                     block: int = 128) -> torch.Tensor:
    """`soft_keep_logits` from the scan's `SoftRows` (sched.soft) and gathered q . k products:
    same values and gradients, no T x T tensor. Teacher forcing from an empty state only (every
    key is a query of this call). `budget` bounds the keys a block of rows can see."""
    if sched.soft is None:
        raise ValueError("soft_keep_sparse: the schedule has no SoftRows (scan with soft_rows=True, TOVA policies)")
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if S != T:
        raise ValueError("soft_keep_sparse: teacher forcing only (keys = the call's own tokens)")
    runner, lse = sched.soft.runner, sched.soft.lse  # (B, G, S), (B, Hq, T)
    victim = runner >= 0  # (B, G, S): dropped by the policy
    row = torch.where(victim, sched.evict, 0)  # its eviction step (a query row)
    per_group = Hq // groups
    dt = torch.float64 if query.dtype == torch.float64 else torch.float32

    def per_head(x):  # (B, G, S) -> (B, Hq, S)
        return x.repeat_interleave(per_group, dim=1) if groups > 1 else x.expand(B, Hq, S)

    def per_kv(x):  # (B, G, S) -> (B, Hkv, S)
        return x.repeat_interleave(Hkv // groups, dim=1) if groups > 1 else x.expand(B, Hkv, S)

    row_h = per_head(row)
    with torch.autocast(query.device.type, enabled=False):
        q_e = query.gather(2, row_h.unsqueeze(-1).expand(B, Hq, S, D)).to(dt)  # q_{e_j}: (B, Hq, S, D)
        q_e = q_e.view(B, Hkv, Hq // Hkv, S, D)  # GQA view: the query heads of each key/value head
        k_run = key.gather(2, per_kv(runner.clamp_min(0)).unsqueeze(-1).expand(B, Hkv, S, D)).to(dt)
        l_self = (q_e * key.to(dt).unsqueeze(2)).sum(-1).view(B, Hq, S) * scaling
        l_run = (q_e * k_run.unsqueeze(2)).sum(-1).view(B, Hq, S) * scaling
        norm = _Normaliser.apply(query, key, lse.to(dt), sched, groups, scaling, budget, block)  # (B, Hq, T)
        norm = norm.gather(2, row_h)

        def log_score(logit):  # log s_{e_j}(.) = log mean_h p_h, from the head-wise log-probabilities
            lp = (logit - norm).view(B, groups, per_group, S)
            return (torch.logsumexp(lp, dim=2) - math.log(per_group)).clamp_min(math.log(1e-30))

        margin = (log_score(l_self) - log_score(l_run)).clamp(max=0.0)
        keep = F.logsigmoid(margin / tau)
    return torch.where(victim, keep, -torch.inf)


class _Normaliser(torch.autograd.Function):
    """lse_h(t) = log sum_{i in C_t} exp(q_t,h . k_i * scale), per query head and row: the forward
    returns the scan's values (computed from the same q and k); the backward is the exact
    gradient, sum_i p_h,t(i) d(q_t,h . k_i * scale), over the rows that receive one."""

    @staticmethod
    def forward(ctx, query, key, lse, sched, groups, scaling, budget, block):
        ctx.save_for_backward(query, key, lse)
        ctx.args = (sched, groups, scaling, budget, block)
        return lse.clone()

    @staticmethod
    def backward(ctx, grad):
        query, key, lse = ctx.saved_tensors
        sched, groups, scaling, budget, block = ctx.args
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        dt = grad.dtype
        r = Hq // Hkv
        kv_per_group = Hkv // groups
        dq = torch.zeros(B, Hq, T, D, dtype=dt, device=query.device)
        dk = torch.zeros(B, Hkv, S, D, dtype=dt, device=key.device)
        evict, arrive = sched.evict, sched.arrive  # (B, G, S), (S,)
        W = min(S, budget + block)  # keys a block of rows can see: C_{t0} (<= K + 1) and its later arrivals
        with torch.autocast(query.device.type, enabled=False):
            for t0 in range(0, T, block):
                t1 = min(T, t0 + block)
                seen = (arrive < t1) & (evict >= t0)  # (B, G, S): visible to some row of the block
                order = torch.sort(seen.to(torch.int8), dim=-1, descending=True, stable=True)
                idx, ok = order.indices[..., :W], order.values[..., :W].bool()  # (B, G, W) compacted
                idx_kv = idx.repeat_interleave(kv_per_group, dim=1) if groups > 1 else idx.expand(B, Hkv, W)
                ok_kv = ok.repeat_interleave(kv_per_group, dim=1) if groups > 1 else ok.expand(B, Hkv, W)
                k_c = key.gather(2, idx_kv.unsqueeze(-1).expand(B, Hkv, W, D)).to(dt)  # (B, Hkv, W, D)
                q_b = query[:, :, t0:t1].to(dt).view(B, Hkv, r, t1 - t0, D)
                logits = torch.matmul(q_b, k_c.unsqueeze(2).transpose(-1, -2)) * scaling  # (B, Hkv, r, rows, W)
                t = torch.arange(t0, t1, device=query.device).view(1, 1, 1, -1, 1)
                e_c = evict.gather(2, idx).repeat_interleave(kv_per_group, dim=1) if groups > 1 else \
                    evict.gather(2, idx).expand(B, Hkv, W)
                a_c = arrive[idx_kv]
                vis = ok_kv.view(B, Hkv, 1, 1, W) & (a_c.view(B, Hkv, 1, 1, W) <= t) & (t <= e_c.view(B, Hkv, 1, 1, W))
                g = grad[:, :, t0:t1].view(B, Hkv, r, t1 - t0, 1)
                lse_b = lse[:, :, t0:t1].to(dt).view(B, Hkv, r, t1 - t0, 1)
                on = vis & (g != 0)  # rows without a policy eviction have no normaliser (lse = 0 there)
                w = torch.exp(torch.where(on, logits - lse_b, -torch.inf)) * g * scaling  # (B, Hkv, r, rows, W)
                dq[:, :, t0:t1] = torch.matmul(w, k_c.unsqueeze(2)).view(B, Hq, t1 - t0, D)
                dk_c = torch.matmul(w.transpose(-1, -2), q_b).sum(2)  # (B, Hkv, W, D)
                dk.scatter_add_(2, idx_kv.unsqueeze(-1).expand(B, Hkv, W, D), torch.where(
                    ok_kv.unsqueeze(-1), dk_c, 0.0))
        return dq.to(query.dtype), dk.to(key.dtype), None, None, None, None, None, None


def soft_dense_mask(sched: Schedule, new_valid, keep: torch.Tensor) -> torch.Tensor:
    """Additive (B, G, T, S) mask: 0 where the hard process sees the key, the key's keep-logit
    for queries after its eviction, -inf elsewhere."""
    vis = sched.visible(new_valid)
    T = vis.shape[2]
    t = torch.arange(T, device=vis.device).view(1, 1, T, 1)
    after = t > sched.evict.unsqueeze(2)
    soft = torch.where(after, keep.unsqueeze(2), -torch.inf)
    return torch.where(vis, torch.zeros((), dtype=keep.dtype, device=keep.device), soft)


def tau_at(step: int, total: int, start: float, end: float, hard_fraction: float = 0.1) -> float | None:
    """Temperature at a training step: geometric anneal from `start` to `end` over the first
    (1 - hard_fraction) of training, then None (hard) so training ends on the inference process."""
    anneal = max(1, int(total * (1.0 - hard_fraction)))
    if step >= anneal:
        return None
    frac = step / anneal
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))
