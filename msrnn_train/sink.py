"""The learned attention sink of `window_sink` (policies/window_sink.py): one logit per query head.

A bounded layer of a sink policy attends over its held members plus one virtual key per query
head h, whose logit is a trained number s_h and whose value is zero:

    out_t = softmax([l_t1 .. l_tS, s_h])[:S] @ V                  (the definition)
          = softmax(l_t) @ V * sigmoid(logsumexp(l_t) - s_h)     (`sink_attention` computes this form:
                                                                   GraniteSWA's eager attention does too)

Both forms are the same number; computing the second keeps the exported GraniteSWA model's rounding
close to the simulation's (real SmolLM2, 512 tokens, fp32: max logit difference 6.8e-5, against
2.1e-4 with the first form). The sink path is dense (a (B, Hq, T, S) float32 score tensor) on
every device: FlexAttention (return_lse) is not wired for it yet.

**Initialisation** (`SINK_INIT`): s_h = 1.0 for every head, the best constant on the untrained
SmolLM2-135M: held-out perplexity (4 Gutenberg windows of T = 512) of window-32 + full layer 18
(results/sink_init.md, scripts/sink_init.py):

    sink logit s   -inf (= window)   -2      0      1      2      3      4      6     | sinks (window+4)
    perplexity      432.8            164.5   148.8  138.7  145.2  185.1  291.2  4428  | 57.4

so training starts from a model three times better than `window` (a constant cannot reach `sinks`:
the first tokens' logit varies with the query; training moves each head's s_h from here). A
per-head value calibrated on data starts better still (the mean logsumexp of the
head's logits on the first 4 tokens, minus 2: 87.0; results/sink_init.md): `controller.calibrate_sinks`,
which the recipe key
`budget.sink_init: calibrate` runs on the first training windows before training.

The logits are float32 parameters of an `AttentionSink` module attached to each bounded attention
module (`msrnn_sink`) by apply_budget, after peft wrapped the model, so they train with the LoRA
(their own learning rate: recipe `budget.sink_learning_rate`). `save_sinks` writes them beside the
adapter (`SINK_FILENAME`) and `load_sinks` puts them back, both through
`controller.save_budget_modules` / `load_budget_modules` (every save path; hub.load_bounded, a
resumed run, lora.init_adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

SINK_FILENAME = "msrnn_sink.safetensors"
SINK_INIT = 1.0
CALIBRATION_SHIFT = -2.0  # results/sink_init.md: calibrated -2 / -3 give 87.0 / 87.1, +0 gives 144.9


class AttentionSink(nn.Module):
    """One layer's sink logits, (Hq,) float32."""

    def __init__(self, heads: int, init: float = SINK_INIT):
        super().__init__()
        self.logit = nn.Parameter(torch.full((heads,), float(init)))


def attach_sinks(attention_modules, layers, heads: int) -> None:
    """Give every bounded layer of a sink policy an AttentionSink (one it has already is kept: it may
    hold trained values)."""
    for mod, lb in zip(attention_modules, layers, strict=True):
        if lb.policy is None or not lb.policy.attention_sink:
            continue
        sink = getattr(mod, "msrnn_sink", None)
        if sink is None or sink.logit.shape != (heads,):
            mod.msrnn_sink = AttentionSink(heads).to(next(mod.parameters()).device)


def sink_logit(module, layer) -> torch.Tensor | None:
    """(Hq,) the layer's sink logits, or None when its policy has no sink (or it is unbounded)."""
    if layer.policy is None or not layer.policy.attention_sink:
        return None
    return module.msrnn_sink.logit


def sink_attention(query, key, value, visible, scaling, sink, dropout: float = 0.0) -> torch.Tensor:
    """The reference: (B, Hq, T, D) queries over (B, Hkv, S, D) keys, `visible` (B, Hq or 1, T, S) bool,
    `sink` (Hq,) -> (B, Hq, T, D). Softmax in float32 (or wider) over the visible keys and the virtual sink key."""
    B, Hq, T, _ = query.shape
    Hkv = key.shape[1]
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
    return torch.matmul(weights.to(value.dtype), value) * keep.to(value.dtype)


def sinks(model) -> dict[int, AttentionSink]:
    """{layer index: sink} of a model (peft-wrapped or not)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AttentionSink):
            out[next(int(p) for p in reversed(name.split(".")) if p.isdigit())] = mod
    return out


def save_sinks(model, directory: str | Path) -> Path | None:
    """Write the sink logits (if any) to `directory`/SINK_FILENAME; returns the path or None."""
    from safetensors.torch import save_file

    found = sinks(model)
    if not found:
        return None
    path = Path(directory) / SINK_FILENAME
    save_file({str(i): s.logit.detach().float().cpu().contiguous() for i, s in found.items()}, str(path),
              metadata={"layers": json.dumps(sorted(found))})
    return path


def load_sinks(model, directory: str | Path) -> bool:
    """Restore saved sink logits into a model whose sink budget is applied (sinks attached)."""
    from safetensors.torch import load_file

    path = Path(directory) / SINK_FILENAME
    if not path.is_file():
        return False
    found = sinks(model)
    for i, logit in load_file(str(path)).items():
        if int(i) not in found:
            raise ValueError(f"{path}: sink logits for layer {i}, but the model's budget has no sink layer {i}")
        s = found[int(i)]
        if s.logit.shape != logit.shape:
            raise ValueError(f"{path}: layer {i} has {logit.numel()} sink logits, the model {s.logit.numel()} heads")
        with torch.no_grad():
            s.logit.copy_(logit.to(s.logit.device))
    return True

