"""FlexAttention backend: attention masked by the eviction schedule without a T x S tensor.

The mask is a `mask_mod` reading O(S) schedule data per (batch, head group): query t sees key j
iff arrive_j <= t <= evict_j. In soft mode a `score_mod` adds each evicted key's keep-logit to
the queries after its eviction. On CUDA the kernel is compiled once (torch.compile); on the CPU
the eager path runs (forward only: FlexAttention has no CPU backward), which the tests use to
compare it with the dense reference backend.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .schedule import Schedule


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_masked_attention(query, key, value, sched: Schedule, new_valid, scaling, groups: int,
                          soft_keep: torch.Tensor | None = None):
    """(B, Hq, T, D) -> (B, T, Hq, D). soft_keep: (B, G, S) additive logit for the queries after
    a key's eviction (-inf: hard), or None for the hard process."""
    B, Hq, T, D = query.shape
    S = key.shape[2]
    P = S - T
    per_group = Hq // groups
    evict = sched.evict  # (B, G, S)
    arrive = sched.arrive  # (S,)
    query_pad = ~new_valid  # (B, T)

    def visible(b, h, q_idx, kv_idx):
        g = h // per_group if groups > 1 else 0
        seen = (arrive[kv_idx] <= q_idx) & (q_idx <= evict[b, g, kv_idx])
        return seen | (query_pad[b, q_idx] & (kv_idx == q_idx + P))

    if soft_keep is None:
        mask_mod, score_mod = visible, None
    else:
        kept = torch.isfinite(soft_keep.detach())  # a mask_mod may not capture tensors that need grad

        def mask_mod(b, h, q_idx, kv_idx):
            g = h // per_group if groups > 1 else 0
            soft = (q_idx > evict[b, g, kv_idx]) & (evict[b, g, kv_idx] >= 0) & kept[b, g, kv_idx]
            return visible(b, h, q_idx, kv_idx) | soft

        def score_mod(score, b, h, q_idx, kv_idx):
            g = h // per_group if groups > 1 else 0
            e = evict[b, g, kv_idx]
            after = (q_idx > e) & (e >= 0)  # evicted earlier (padding keys have e = -1)
            return score + torch.where(after, soft_keep[b, g, kv_idx], 0.0)

    block_mask = create_block_mask(mask_mod, B, Hq if groups > 1 else None, T, S, device=query.device)
    fn = _compiled_flex() if query.is_cuda else flex_attention
    out = fn(query, key, value, block_mask=block_mask, score_mod=score_mod, scale=scaling,
             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()
