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


def soft_dense_mask(sched: Schedule, new_valid, keep: torch.Tensor) -> torch.Tensor:
    """Additive (B, G, T, S) mask: 0 where the hard process sees the key, the key's keep-logit
    for queries after its eviction, -inf elsewhere."""
    vis = sched.visible(new_valid)
    T = vis.shape[2]
    t = torch.arange(T, device=vis.device).view(1, 1, T, 1)
    after = t > sched.evict.unsqueeze(2)
    soft = torch.where(after, keep.unsqueeze(2), -torch.inf)
    return torch.where(vis, torch.zeros((), dtype=keep.dtype, device=keep.device), soft)


def set_soft_temperature(model, tau: float | None) -> None:
    """Switch a budgeted model to soft mode at temperature tau (None: hard, as at inference)."""
    from .apply import get_controller

    ctrl = get_controller(model)
    if ctrl is None:
        raise ValueError("set_soft_temperature: the model has no budget (apply_budget first)")
    ctrl.soft_temperature = None if tau is None else float(tau)


def tau_at(step: int, total: int, start: float, end: float, hard_fraction: float = 0.1) -> float | None:
    """Temperature at a training step: geometric anneal from `start` to `end` over the first
    (1 - hard_fraction) of training, then None (hard) so training ends on the inference process."""
    anneal = max(1, int(total * (1.0 - hard_fraction)))
    if step >= anneal:
        return None
    frac = step / anneal
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))


def budget_at(step: int, total: int, start: int, end: int, ramp_fraction: float = 0.5) -> int:
    """Budget ramp: linear from `start` states down to `end` over the first ramp_fraction of training."""
    ramp = max(1, int(total * ramp_fraction))
    if step >= ramp:
        return end
    return int(round(start + (end - start) * step / ramp))
