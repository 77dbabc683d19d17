"""The learned retention scorer, and the relaxations that let gradients reach it.

A learned policy (policies/learned.py) ranks each held member by a retention logit that a small
scorer per layer reads off the token's hidden state (the attention layer's input, captured by a
forward pre-hook) once, when the token is written. The scorer is

    hidden (B, T, H) -> LayerNorm (no parameters) -> [Linear(H, h) -> SiLU ->] Linear(.., G) -> logits (B, G, T)

with G = 1 (layer-wise `learned`) or the key/value heads (`learned_head`). **Initialisation:**
the last layer's weights are zero and its bias is `init_bias` (3.0: sigmoid = 0.95, "keep nearly
everything", as TRIM-KV's gate), so every token gets the same logit and the rule starts as
`window` (oldest first); training starts from a working model.

The hard schedule is not differentiable. While training, the controller's `relaxation` picks how
the scorer gets gradients on a teacher-forced forward (the exact hard process otherwise):

* "ste"  - straight-through: the forward is the exact hard attention; in the backward each key j
           is kept for query t with probability sigmoid((prio_j(t) - theta_t) / tau), theta_t
           the priority of the member dropped at step t (1 where no member was dropped), so
           the gradient says which members should have been kept.
* "decay" - the retention decay as an attention bias (TRIM-KV): query t sees every earlier key,
           its logit shifted by log keep_j(t) (decay: age * log sigmoid(l_j)), plus a capacity
           loss that holds the expected number of kept members sum_j keep_j(t) at K or below.
           Not the hard process: the last training steps must run hard (`learned.hard_fraction`).

The scorers' weights are saved beside the adapter (`SCORER_FILENAME`) and restored by
`hub.load_bounded`, so a loaded adapter brings its learned policy with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORER_FILENAME = "msrnn_scorer.safetensors"
RELAXATIONS = ("none", "ste", "decay")
INIT_BIAS = 3.0


class RetentionScorer(nn.Module):
    """One layer's scorer: hidden states (B, T, H) -> retention logits (B, G, T), fp32."""

    def __init__(self, hidden_size: int, groups: int, hidden_dim: int = 0, init_bias: float = INIT_BIAS):
        super().__init__()
        self.hidden_size, self.groups, self.hidden_dim, self.init_bias = hidden_size, groups, hidden_dim, init_bias
        self.inner = nn.Linear(hidden_size, hidden_dim) if hidden_dim else None
        self.out = nn.Linear(hidden_dim or hidden_size, groups)
        nn.init.zeros_(self.out.weight)  # every token the same logit at first: the rule starts as `window`
        nn.init.constant_(self.out.bias, init_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # normalised without parameters: the attention input of some layers has massive outlier
        # channels, which would otherwise dominate the scorer's gradient
        x = F.layer_norm(hidden.to(self.out.weight.dtype), (self.hidden_size,))
        if self.inner is not None:
            x = F.silu(self.inner(x))
        return self.out(x).float().transpose(1, 2)  # (B, G, T)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "groups": self.groups, "hidden_dim": self.hidden_dim,
                "init_bias": self.init_bias}


def attach_scorers(attention_modules, layers, hidden_size: int, hidden_dim: int = 0) -> list:
    """Give every bounded layer of a learned policy a scorer (kept if it has one of the right shape)
    and a pre-hook that captures the attention layer's input. Returns the hook handles."""
    hooks = []
    for mod, lb in zip(attention_modules, layers, strict=True):
        if lb.policy is None or not lb.policy.carries_value:
            continue
        scorer = getattr(mod, "msrnn_scorer", None)
        if scorer is None or scorer.groups != lb.groups:
            ref = next(mod.parameters())
            scorer = RetentionScorer(hidden_size, lb.groups, hidden_dim).to(ref.device)
            mod.msrnn_scorer = scorer
        hooks.append(mod.register_forward_pre_hook(_capture_hidden, with_kwargs=True))
    return hooks


def _capture_hidden(module, args, kwargs):
    lb = getattr(module, "_msrnn", None)
    if lb is not None:
        lb.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return None


def retention_logits(module, layer, T: int) -> torch.Tensor:
    """(B, G, T) logits of the call's new tokens, from the hidden states the pre-hook captured."""
    hidden = getattr(layer, "hidden", None)
    if hidden is None or hidden.shape[1] != T:
        raise RuntimeError(f"layer {layer.layer_idx}: the learned policy found no hidden states for this call "
                           "(apply_budget attaches the scorer's hook; was the attention called directly?)")
    layer.hidden = None
    return module.msrnn_scorer(hidden)


def scorers(model) -> dict[int, RetentionScorer]:
    """{layer index: scorer} of a model (peft-wrapped or not)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, RetentionScorer):
            idx = next(int(p) for p in reversed(name.split(".")) if p.isdigit())
            out[idx] = mod
    return out


def save_scorers(model, directory: str | Path) -> Path | None:
    """Write the scorers (if any) to `directory`/SCORER_FILENAME; returns the path or None."""
    from safetensors.torch import save_file

    found = scorers(model)
    if not found:
        return None
    tensors = {f"{i}.{k}": v.detach().float().cpu().contiguous() for i, s in found.items()
               for k, v in s.state_dict().items()}
    meta = {"config": json.dumps({str(i): s.config() for i, s in found.items()})}
    path = Path(directory) / SCORER_FILENAME
    save_file(tensors, str(path), metadata=meta)
    return path


def load_scorers(model, directory: str | Path) -> bool:
    """Restore saved scorers into a model whose learned budget is applied (scorers attached)."""
    from safetensors import safe_open

    path = Path(directory) / SCORER_FILENAME
    if not path.is_file():
        return False
    found = scorers(model)
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        for i, cfg in config.items():
            i = int(i)
            if i not in found:
                raise ValueError(f"{path}: a scorer for layer {i}, but the model's budget has no learned layer {i}")
            s = found[i]
            if s.hidden_dim != cfg["hidden_dim"] or s.groups != cfg["groups"]:
                new = RetentionScorer(cfg["hidden_size"], cfg["groups"], cfg["hidden_dim"], cfg["init_bias"])
                new.to(next(s.parameters()).device)
                _replace(model, s, new)
                s = new
            state = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split(".", 1)[0] == str(i)}
            s.load_state_dict({k: v.to(s.out.weight.dtype) for k, v in state.items()})
    return True


def _replace(model, old: nn.Module, new: nn.Module) -> None:
    for mod in model.modules():
        if getattr(mod, "msrnn_scorer", None) is old:
            mod.msrnn_scorer = new


# ----------------------------------------------------------------------------- relaxations
def victims_per_step(evict: torch.Tensor, T: int) -> torch.Tensor:
    """(B, G, S) eviction steps -> (B, G, T) the key dropped at each step (-1: none)."""
    B, G, S = evict.shape
    dropped = (evict >= 0) & (evict < T)
    at = torch.where(dropped, evict, T)
    out = torch.full((B, G, T + 1), -1, dtype=torch.long, device=evict.device)
    out.scatter_(2, at, torch.arange(S, device=evict.device).expand(B, G, S))
    return out[:, :, :T]


def ste_keep(policy, logit, sched, new_valid, new_order, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight-through relaxation's soft keep probabilities (teacher forcing, S = T):
    (B, G, T, S) p_tj = sigmoid((prio_j(t) - theta_t) / tau) over the causal keys, theta_t the
    priority of the member dropped at step t (p = 1 where none was), and the keys each query may
    see in the soft attention (causal, or the hard schedule's own), (B, G, T, S) bool."""
    B, G, S = logit.shape
    T = new_valid.shape[1]
    prio = policy.priority_matrix(logit, new_order, new_order)  # (B, G, T, S)
    victim = victims_per_step(sched.evict, T)  # (B, G, T)
    theta = prio.gather(3, victim.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    theta = torch.where(victim >= 0, theta, -torch.inf).unsqueeze(-1)
    p = torch.sigmoid((prio - theta) / tau)
    p = torch.where(_protected(policy, new_order), 1.0, p)  # the first tokens are never dropped
    causal = _causal(new_valid, T, S)
    return torch.where(causal, p, 0.0), causal | sched.visible(new_valid)


def decay_bias(policy, logit, new_valid, new_order) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft retention: (B, G, T, S) log keep_j(t) over the causal keys (-inf elsewhere, the
    diagonal always 0) and the expected number of members kept per query, (B, G, T)."""
    T = new_valid.shape[1]
    S = logit.shape[-1]
    if policy.form == "decay":
        log_keep = policy.priority_matrix(logit, new_order, new_order)  # age * log sigmoid(l) <= 0
    else:
        log_keep = F.logsigmoid(logit).unsqueeze(2).expand(-1, -1, T, -1)
    causal = _causal(new_valid, T, S)
    diag = torch.eye(T, S, dtype=torch.bool, device=logit.device)
    log_keep = torch.where(diag | _protected(policy, new_order), 0.0, log_keep)
    log_keep = torch.where(causal | diag, log_keep, -torch.inf)
    expected = torch.where(causal, log_keep.exp(), 0.0).sum(-1)
    return log_keep, expected


def capacity_excess(expected: torch.Tensor, budget: int, new_valid: torch.Tensor) -> torch.Tensor:
    """Mean over real queries of relu(expected kept - K) / K: 0 when the soft state fits in K."""
    excess = F.relu(expected - budget) / budget  # (B, G, T)
    w = new_valid.unsqueeze(1).to(excess.dtype)
    return (excess * w).sum() / (w.sum() * excess.shape[1]).clamp_min(1)


def _protected(policy, new_order):
    """(B, 1, 1, S): keys the policy never drops (its first tokens)."""
    return (new_order < policy.kept_first).view(new_order.shape[0], 1, 1, -1)


def _causal(new_valid, T, S):
    """(B, 1, T, S) key j is a real token at or before query t (teacher forcing, S = T)."""
    t = torch.arange(T, device=new_valid.device).view(T, 1)
    j = torch.arange(S, device=new_valid.device).view(1, S)
    return ((j <= t).view(1, 1, T, S) & new_valid.view(-1, 1, 1, S))


def relaxed_attention(query, key, value, scaling, groups, keep=None, bias=None, allowed=None):
    """Dense attention with a multiplicative keep mask (ste) or an additive bias (decay), each
    (B, G, T, S); `allowed` (B, G, T, S) bool: the keys a query may see at all."""
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv:
        key = key.repeat_interleave(Hq // Hkv, dim=1)
        value = value.repeat_interleave(Hq // Hkv, dim=1)
    rep = Hq // groups

    def per_head(x):
        return x.repeat_interleave(rep, dim=1) if rep > 1 else x

    s = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (B, Hq, T, S)
    if bias is not None:
        s = s + per_head(bias)
    if allowed is not None:
        s = s.masked_fill(~per_head(allowed), -torch.inf)
    s = s - s.amax(-1, keepdim=True).detach()
    w = s.exp()
    if keep is not None:
        w = w * per_head(keep)
    w = w / w.sum(-1, keepdim=True)
    out = torch.matmul(w.to(value.dtype), value)
    return out.transpose(1, 2).contiguous()
