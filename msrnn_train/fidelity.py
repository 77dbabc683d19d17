"""The fidelity contract, as code: teacher-forced simulation vs. true token-by-token decoding
through a physically bounded cache. Used by the test suite and by `scripts/fidelity_report.py`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .compat import cache_kwargs
from .controller import get_controller, make_cache, record_schedules


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (as generate() does), 0 on padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


@torch.no_grad()
def teacher_forced(model, input_ids, attention_mask=None):
    """Logits of one teacher-forced pass and every layer's schedule."""
    pos = None if attention_mask is None else position_ids_for(attention_mask)
    with record_schedules(model) as rec:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits
    schedules = {layer: s[0] for layer, s in rec.items()}
    return logits, schedules


@torch.no_grad()
def decode_token_by_token(model, input_ids, attention_mask=None, prompt_len: int = 0, track_held: bool = True,
                          desc: str | None = None):
    """Logits of feeding the sequence through a BoundedCache (the first `prompt_len` columns at
    once, then one token per forward) and, after every step, each layer's held set. `desc`: a
    progress bar with this label."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = position_ids_for(attention_mask)
    cache = make_cache(model)
    logits, held = [], []  # held[t][layer] = held positions after column t
    start = 0
    chunks = ([(0, prompt_len)] if prompt_len > 0 else []) + [(t, t + 1) for t in range(prompt_len, T)]
    for a, b in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        out = model(input_ids=input_ids[:, a:b], attention_mask=attention_mask[:, :b], position_ids=pos[:, a:b],
                    use_cache=True, **cache_kwargs(cache))
        logits.append(out.logits)
        if track_held:
            held.append({i: cache.held_positions(i) for i in range(len(cache.layers))})
        start = b
    assert start == T
    return torch.cat(logits, 1), held, cache


def held_after(schedule, column: int, groups: int, batch: int) -> list[list[int]]:
    """From a teacher-forced schedule: columns held after step `column`, per (batch, group)."""
    evict, arrive = schedule.evict, schedule.arrive
    ok = (arrive <= column).view(1, 1, -1) & (evict > column)
    return [[sorted(torch.nonzero(ok[b, g]).flatten().tolist()) for g in range(groups)] for b in range(batch)]


def compare(model, input_ids, attention_mask=None, prompt_len: int = 0) -> dict:
    """Run both forms; return the max |logit difference| over real tokens and the first
    mismatch of held sets (None when they agree at every step of every layer)."""
    tf_logits, schedules = teacher_forced(model, input_ids, attention_mask)
    dec_logits, held, cache = decode_token_by_token(model, input_ids, attention_mask, prompt_len)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    diff = (tf_logits - dec_logits).abs().amax(-1)[mask].max().item()
    ctrl = get_controller(model)
    mismatch = None
    B, T = input_ids.shape
    steps = list(range(prompt_len, T)) if prompt_len == 0 else [prompt_len - 1] + list(range(prompt_len, T))
    for k, column in enumerate(steps):
        for layer, lb in enumerate(ctrl.layers):
            expect = held_after(schedules[layer], column, lb.groups, B)
            if held[k][layer] != expect:
                mismatch = {"column": column, "layer": layer, "simulated": expect, "cache": held[k][layer]}
                break
        if mismatch:
            break
    return {"max_abs_diff": diff, "held_mismatch": mismatch, "state_sizes": cache.state_sizes()}
