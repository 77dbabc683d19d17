"""The learned attention sink of `window_sink` (policies/window_sink.py): a virtual key per head.

A bounded layer of a sink policy attends over its held members plus one virtual key per query
head h, whose logit is a trained number s_h and whose value is a trained vector u_g, one per
key/value head g (the query heads of a GQA group share it, as they share every real value):

    out_t = softmax([l_t1 .. l_tS, s_h]) @ [v_1 .. v_S, u_g]                     (the definition)
          = softmax(l_t) @ (V - u_g) * sigmoid(logsumexp(l_t) - s_h) + u_g       (`sink_attention`)

The second form is the first rewritten with sum_j p_j + p_sink = 1, and it is what a stock
GraniteSWA layer computes when its v_proj bias is -u_g and its o_proj bias is W_o u (its eager
attention multiplies softmax(l) @ V by sigmoid(lse - sink)): msrnn_train/export.py writes
exactly that, so the exported model serves the learned value with no code of ours. With u = 0
(gpt-oss's and GraniteSWA's own sinks, `budget.sink_value: false`) both forms are the logit-only
sink, bit for bit the same numbers as before the value existed. Computing the second form keeps
the exported model's rounding close to the simulation's (real SmolLM2, 512 tokens, fp32: max
logit difference 6.8e-5, against 2.1e-4 with the first form). The sink path is dense (a (B, Hq,
T, S) float32 score tensor) on every device: FlexAttention (return_lse) is not wired for it yet.

**Why a value** (results/sink_value.md, scripts/sink_value.py): the first tokens a pretrained
model attends to do not hold zero: on the untrained SmolLM2-135M, window-32 + full layer 18,
perplexity on a validation book is 335 with no sink, 76 with calibrated logits alone and 44 with calibrated
logits and values, against 40 for `sinks` (window + the first 4 tokens, which no stock config
expresses).

**Initialisation**: s_h = `SINK_INIT` (1.0) for every head and u = 0, the best constant logit on
the untrained model (results/sink_init.md); or, with the recipe key `budget.sink_init: calibrate`,
`controller.calibrate_sinks` on the first training windows: s_h = the mean logsumexp of head h's
logits on the first tokens under `sinks`, plus a shift (`CALIBRATION_SHIFT`, -2, for a logit
alone; `CALIBRATION_SHIFT_WITH_VALUE`, -1, with the value), and u_g = the first tokens' values as
the sink mixes them, averaged over queries with weight exp(their logsumexp).

The logits and values are float32 parameters of an `AttentionSink` module attached to each
bounded attention module (`msrnn_sink`) by apply_budget, after peft wrapped the model, so they
train with the LoRA (their own learning rate: recipe `budget.sink_learning_rate`; the value is
frozen at 0 with `budget.sink_value: false`). `save_sinks` writes them beside the adapter
(`SINK_FILENAME`) and `load_sinks` puts them back (a file without values, written before they
existed, loads with u = 0), both through `controller.save_budget_modules` / `load_budget_modules`
(every save path; hub.load_bounded, a resumed run, lora.init_adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

SINK_FILENAME = "msrnn_sink.safetensors"
SINK_INIT = 1.0
CALIBRATION_SHIFT = -2.0  # results/sink_init.md: calibrated -2 / -3 give 87.0 / 87.1, +0 gives 144.9
CALIBRATION_SHIFT_WITH_VALUE = -1.0  # results/sink_value.md: -2 / -1 / 0 / +1 give 46.3 / 43.7 / 43.8 / 48.8


class AttentionSink(nn.Module):
    """One layer's virtual sink key: logits (Hq,) and values (Hkv, D), float32."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, init: float = SINK_INIT):
        super().__init__()
        self.logit = nn.Parameter(torch.full((heads,), float(init)))
        self.value = nn.Parameter(torch.zeros(kv_heads, head_dim))


def attach_sinks(attention_modules, layers, heads: int, kv_heads: int, head_dim: int) -> None:
    """Give every bounded layer of a sink policy an AttentionSink (one it has already is kept: it may
    hold trained values)."""
    for mod, lb in zip(attention_modules, layers, strict=True):
        if lb.policy is None or not lb.policy.attention_sink:
            continue
        sink = getattr(mod, "msrnn_sink", None)
        if sink is None or sink.logit.shape != (heads,) or sink.value.shape != (kv_heads, head_dim):
            mod.msrnn_sink = AttentionSink(heads, kv_heads, head_dim).to(next(mod.parameters()).device)


def sink_of(module, layer) -> AttentionSink | None:
    """The layer's sink (logits and values), or None when its policy has no sink (or it is unbounded)."""
    if layer.policy is None or not layer.policy.attention_sink:
        return None
    return module.msrnn_sink


def sink_attention(query, key, value, visible, scaling, sink, dropout: float = 0.0,
                   sink_value: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: (B, Hq, T, D) queries over (B, Hkv, S, D) keys, `visible` (B, Hq or 1, T, S) bool,
    `sink` (Hq,) logits, `sink_value` (Hkv, D) or None (zero) -> (B, Hq, T, D). Softmax in float32 (or
    wider) over the visible keys and the virtual sink key."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    if sink_value is not None:  # softmax(l) @ (V - u) * keep + u: GraniteSWA's form with v/o_proj biases
        u = sink_value.to(value.dtype).view(1, Hkv, 1, D)
        value = value - u
        sink_value = (u.repeat_interleave(Hq // Hkv, dim=1) if Hq != Hkv else u)
    if Hq != Hkv:
        key = key.repeat_interleave(Hq // Hkv, dim=1)
        value = value.repeat_interleave(Hq // Hkv, dim=1)
    dt = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for a float64 model
    logits = torch.matmul(query.to(dt), key.to(dt).transpose(-1, -2)) * scaling  # (B, Hq, T, S)
    logits = logits.masked_fill(~visible, -torch.inf)  # every row sees at least its own key
    # softmax over [logits, s_h] restricted to the logits = softmax(logits) * sigmoid(lse - s_h): computed
    # in GraniteSWA's order (its eager attention), so the exported model rounds as the simulation does
    keep = torch.sigmoid(torch.logsumexp(logits, -1, keepdim=True) - sink.to(dt).view(1, Hq, 1, 1))  # (B, Hq, T, 1)
    weights = torch.softmax(logits, -1)
    if dropout:
        weights = torch.nn.functional.dropout(weights, dropout)
    out = torch.matmul(weights.to(value.dtype), value) * keep.to(value.dtype)
    return out if sink_value is None else out + sink_value


def sinks(model) -> dict[int, AttentionSink]:
    """{layer index: sink} of a model (peft-wrapped or not)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AttentionSink):
            out[next(int(p) for p in reversed(name.split(".")) if p.isdigit())] = mod
    return out


def save_sinks(model, directory: str | Path) -> Path | None:
    """Write the sink logits and values (if any) to `directory`/SINK_FILENAME ("{layer}" -> logits,
    "{layer}.value" -> values); returns the path or None."""
    from safetensors.torch import save_file

    found = sinks(model)
    if not found:
        return None
    path = Path(directory) / SINK_FILENAME
    tensors = {}
    for i, s in found.items():
        tensors[str(i)] = s.logit.detach().float().cpu().contiguous()
        tensors[f"{i}.value"] = s.value.detach().float().cpu().contiguous()
    save_file(tensors, str(path), metadata={"layers": json.dumps(sorted(found))})
    return path


def load_sinks(model, directory: str | Path) -> bool:
    """Restore saved sink logits (and values: a file without them, from before they existed, leaves
    them at 0) into a model whose sink budget is applied (sinks attached)."""
    from safetensors.torch import load_file

    path = Path(directory) / SINK_FILENAME
    if not path.is_file():
        return False
    found = sinks(model)
    saved = load_file(str(path))
    for key, tensor in saved.items():
        i, _, part = key.partition(".")
        if int(i) not in found:
            raise ValueError(f"{path}: sink {part or 'logits'} for layer {i}, but the model's budget has no sink "
                             f"layer {i}")
        target = getattr(found[int(i)], "value" if part == "value" else "logit")
        if target.shape != tensor.shape:
            raise ValueError(f"{path}: layer {i}'s sink {part or 'logits'} have shape {tuple(tensor.shape)}, the "
                             f"model's {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.device))
    for i in {int(k) for k in saved if "." not in k}:
        if f"{i}.value" not in saved:
            with torch.no_grad():
                found[i].value.zero_()
    return True
