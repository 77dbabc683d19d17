"""Evaluation only: a non-causal oracle eviction rule, as a reference ceiling for learned policies.

At step t, when the held set exceeds K, the oracle drops the member that the *remaining* queries
(t' > t) will attend to least in the full-state model: R_j(t) = sum over t' > t of a(t', j), the
attention probability of query t' on key j averaged over the layer's query heads (ties toward the
oldest). It knows the future, so it never ships as a policy (it is not registered). It runs the
same fixed-K process (one member dropped per step, query t attends over the held set plus itself),
through the layer's `scan_fn` hook, so only the choice differs from the shipped policies. It shows
how much a well-informed rule can recover at K; it is not the optimum (the attention pattern of
the bounded model differs from the full-state one it reads).

A static oracle (each member ranked once by the mean attention all later queries give it) was
measured too and is far weaker than TOVA (SmolLM2 plain LoRA, 4 validation windows, K = 32:
95.6 vs TOVA 35.4, full 25.8): usefulness is local in time, so the ranking must move with t.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import padding_mask
from .controller import apply_budget, budget_scope, get_budget, get_controller
from .schedule import NEVER, Schedule
from .spec import BudgetSpec

PROBE = "msrnn_oracle_probe"
_REMAINING: dict[int, np.ndarray] = {}  # layer -> (T, S): R_j(t), the attention still to come after query t


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain causal attention (one window, no padding) that records, per layer, the attention each
    key will still receive after every query: (T, S)."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    scaling = scaling if scaling is not None else D ** -0.5
    k = key.repeat_interleave(Hq // Hkv, 1)
    v = value.repeat_interleave(Hq // Hkv, 1)
    s = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    p = torch.softmax(s.masked_fill(~causal, -torch.inf), -1)  # (B, Hq, T, T)
    a = p.mean(1)[0].double()  # (T, S), batch of one
    after = a.flip(0).cumsum(0).flip(0)  # sum over t' >= t
    remaining = torch.cat([after[1:], torch.zeros_like(after[:1])])  # sum over t' > t
    _REMAINING[module.layer_idx] = remaining.cpu().numpy()
    out = torch.matmul(p.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE, _probe_attention)
AttentionMaskInterface.register(PROBE, padding_mask)


def _oracle_scan(layer_idx: int):
    def scan_fn(policy, budget, logits, new_valid, new_order, new_pos, init=None, window=None, groups=1, **kw):
        if init is not None or window is not None or groups != 1 or new_valid.shape[0] != 1:
            raise ValueError("the oracle runs teacher forcing on one window (no cache, no sliding window)")
        R = _REMAINING[layer_idx]
        T = new_valid.shape[1]
        evict = np.full(T, NEVER, dtype=np.int64)
        held: list[int] = []
        for t in range(T):
            held.append(t)
            if len(held) > budget:
                victim = min(held, key=lambda j: (R[t, j], j))  # least attention still to come; ties: oldest
                evict[victim] = t
                held.remove(victim)
        dev = new_valid.device
        return Schedule(evict=torch.from_numpy(evict).view(1, 1, T).to(dev), arrive=torch.arange(T, device=dev),
                        final=None)

    return scan_fn


@torch.no_grad()
def oracle_perplexity(model, windows: torch.Tensor, budgets: list[int]) -> dict[str, float]:
    """{str(K): perplexity} of the model run with the oracle rule at each K (windows (N, T), no
    padding). The model's own budget is put back afterwards."""
    own = get_budget(model)
    config = model.config
    nll = {k: 0.0 for k in budgets}
    tokens = 0
    try:
        for w in windows:
            ids = w.view(1, -1).to(next(model.parameters()).device)
            with budget_scope(model, BudgetSpec(policy="full")):
                before = config._attn_implementation
                config._attn_implementation_internal = PROBE
                try:
                    model(input_ids=ids, use_cache=False)
                finally:
                    config._attn_implementation_internal = before
            for k in budgets:
                # any scan-driven policy (tova: no closed form); the oracle's scan makes the choice
                with budget_scope(model, BudgetSpec(policy="tova", budget=k)):
                    for lb in get_controller(model).layers:
                        lb.scan_fn = _oracle_scan(lb.layer_idx)
                    try:
                        logits = model(input_ids=ids, use_cache=False).logits.float()
                    finally:
                        for lb in get_controller(model).layers:
                            lb.scan_fn = None
                nll[k] += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    finally:
        _REMAINING.clear()
        if own is not None:
            apply_budget(model, own)
    return {str(k): math.exp(nll[k] / tokens) for k in budgets}
