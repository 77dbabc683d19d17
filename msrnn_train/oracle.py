"""Evaluation only: a non-causal oracle retention rule, as a reference ceiling for learned policies.

The priority of a member is the attention mass that all *later* queries give it in the full-state
model (summed over those queries, averaged over the layer's query heads): it knows the future, so
it never ships as a policy (it is not registered). It runs through the learned policy's exact
machinery with `retention: logit`: the value a member carries is its future mass instead of a
scorer's logit, so the same fixed-K process decides (the lowest mass is dropped, ties toward the
oldest). It shows how much a well-informed rule can recover at K; it is not the optimum.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import padding_mask
from .controller import apply_budget, budget_scope, get_budget
from .spec import BudgetSpec

PROBE = "msrnn_oracle_probe"
_MASS: dict[int, torch.Tensor] = {}


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain causal attention (no padding in the evaluation windows) that records, per layer, the
    mass each key receives from the later queries: (B, S)."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    scaling = scaling if scaling is not None else D ** -0.5
    k = key.repeat_interleave(Hq // Hkv, 1)
    v = value.repeat_interleave(Hq // Hkv, 1)
    s = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    p = torch.softmax(s.masked_fill(~causal, -torch.inf), -1)  # (B, Hq, T, T)
    later = torch.ones(T, T, dtype=torch.bool, device=query.device).tril(-1)  # query t > key j
    _MASS[module.layer_idx] = (p.mean(1) * later).sum(1)  # (B, S)
    out = torch.matmul(p.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE, _probe_attention)
AttentionMaskInterface.register(PROBE, padding_mask)


class _FixedValues(nn.Module):
    """Stands in for a retention scorer: returns the values set before the forward."""

    groups = 1

    def __init__(self):
        super().__init__()
        self.values: torch.Tensor | None = None

    def forward(self, hidden):
        return self.values[:, :, : hidden.shape[1]]


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


@torch.no_grad()
def oracle_perplexity(model, windows: torch.Tensor, budgets: list[int]) -> dict[str, float]:
    """{str(K): perplexity} of the model run with the oracle rule at each K (windows (N, T), no padding).
    The model's own budget is put back afterwards."""
    own = get_budget(model)
    config = model.config
    mods = _attention_modules(model)
    saved = [getattr(m, "msrnn_scorer", None) for m in mods]
    fixed = [_FixedValues() for _ in mods]
    nll = {k: 0.0 for k in budgets}
    tokens = 0
    try:
        for m, f in zip(mods, fixed):
            m.msrnn_scorer = f
        for w in windows:
            ids = w.view(1, -1).to(next(model.parameters()).device)
            with budget_scope(model, BudgetSpec(policy="full")):
                before = config._attn_implementation
                config._attn_implementation_internal = PROBE
                try:
                    model(input_ids=ids, use_cache=False)
                finally:
                    config._attn_implementation_internal = before
            for m, f in zip(mods, fixed):
                f.values = _MASS[m.layer_idx].unsqueeze(1)  # (1, 1, T): the value each member carries
            for k in budgets:
                with budget_scope(model, BudgetSpec(policy="learned", budget=k, retention="logit")):
                    logits = model(input_ids=ids, use_cache=False).logits.float()
                nll[k] += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    finally:
        for m, s in zip(mods, saved):
            if s is None:
                del m.msrnn_scorer
            else:
                m.msrnn_scorer = s
        _MASS.clear()
        if own is not None:
            apply_budget(model, own)
    return {str(k): math.exp(nll[k] / tokens) for k in budgets}
