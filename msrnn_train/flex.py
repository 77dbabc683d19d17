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
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .schedule import NEVER, Schedule


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_masked_attention(query, key, value, sched: Schedule, new_valid, scaling, groups: int,
                          soft_keep: torch.Tensor | None = None, block: int = 128):
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

    # built once per schedule: gradient checkpointing's recompute of the layer finds the stored
    # schedule (controller.Controller) and with it this mask (its mask_mod reads the same schedule)
    cache_key = ("block_mask", soft_keep is not None, block, Hq)
    block_mask = sched.cache.get(cache_key)
    if block_mask is None:
        block_mask = schedule_block_mask(sched, new_valid, mask_mod, kept=None if soft_keep is None else kept,
                                         block=block, heads=Hq)
        sched.cache[cache_key] = block_mask
    fn = _compiled_flex() if query.is_cuda else flex_attention
    out = fn(query, key, value, block_mask=block_mask, score_mod=score_mod, scale=scaling,
             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def schedule_block_mask(sched: Schedule, new_valid, mask_mod, kept=None, block: int = 128,
                        heads: int | None = None) -> BlockMask:
    """The BlockMask of `mask_mod`, built from the schedule in O(S) per (batch, group) instead of
    evaluating mask_mod on every (query, key) pair as `create_block_mask` does.

    Query t sees key j iff arrive_j <= t <= e_j (soft mode: e_j = NEVER for evicted keys that keep
    a soft logit). A (query block, key block) pair is *full* when every key of the block is seen by
    every query of the block, *empty* when no key can be, else partial (mask_mod decides per
    element); the classification is conservative (a partial block is always correct), and
    `reference_block_mask` (create_block_mask) is the plain reference it is tested against.
    """
    evict, arrive = sched.evict, sched.arrive  # (B, G, S), (S,)
    B, G, S = evict.shape
    T = new_valid.shape[1]
    P = S - T
    dev = evict.device
    if kept is not None:
        evict = torch.where(kept, NEVER, evict)
    nq, nk = -(-T // block), -(-S // block)
    pad = nk * block - S
    valid = evict >= 0
    arr = arrive.view(1, 1, S).expand(B, G, S)
    big = torch.iinfo(torch.long).max

    def blocks(x, fill):
        return torch.nn.functional.pad(x, (0, pad), value=fill).view(B, G, nk, block)

    arrivals = blocks(torch.where(valid, arr, big), big)  # never-visible keys arrive "never"
    evictions = blocks(torch.where(valid, evict, -1), -1)  # ... and leave before the first query
    amin, amax = arrivals.amin(-1), arrivals.amax(-1)  # earliest / latest arrival in each key block
    emin, emax = evictions.amin(-1), evictions.amax(-1)
    q0 = torch.arange(nq, device=dev).view(1, 1, nq, 1) * block
    q1 = (q0 + block).clamp(max=T) - 1  # last query of the block
    some = (amin.unsqueeze(2) <= q1) & (emax.unsqueeze(2) >= q0)  # (B, G, nq, nk)
    full = (amax.unsqueeze(2) <= q0) & (emin.unsqueeze(2) >= q1)
    # a padding query sees its own key (mask_mod's diagonal rule): keep that block. A masked
    # scatter, not .nonzero(): no host sync
    t_idx = torch.arange(T, device=dev)
    diag_block = (t_idx // block) * nk + (t_idx + P) // block  # (T,) flat (query block, key block)
    pads = torch.zeros(B, nq * nk, dtype=torch.int32, device=dev).scatter_add_(
        1, diag_block.expand(B, T), (~new_valid).to(torch.int32))
    some = some | (pads > 0).view(B, 1, nq, nk)
    partial = some & ~full

    def as_kv(m):
        num = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    if G > 1:  # head-wise groups: one row of blocks per query head (heads = query heads)
        partial = partial.repeat_interleave(heads // G, dim=1)
        full = full.repeat_interleave(heads // G, dim=1)
    kv_num, kv_idx = as_kv(partial)
    full_num, full_idx = as_kv(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, S))


def reference_block_mask(mask_mod, B, H, T, S, device, block: int = 128) -> BlockMask:
    """The plain reference: mask_mod evaluated on every (query, key) pair."""
    return create_block_mask(mask_mod, B, H, T, S, device=device, BLOCK_SIZE=block)
