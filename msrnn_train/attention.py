"""The attention function registered with transformers: attention masked to what a bounded
cache holds.

Per layer and forward: the eviction schedule is computed once, without gradient (from the
held slots of a BoundedCache when decoding, from an empty state under teacher forcing), then
attention runs masked to it: dense mask + SDPA on the CPU (the training path there), or
FlexAttention driven by the schedule on CUDA (no T x T tensor). In soft mode an additive
bias from `soft.py` lets gradients reach the scores that decided the evictions.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .schedule import (NEVER, LogitRows, Schedule, Slots, decode_step, emits_soft_rows,
                       rolling_schedule, unbounded_schedule)
from .kernels import default_scan
from .retention import capacity_excess, decay_bias, relaxed_attention, retention_logits, ste_keep
from .sink import sink_attention, sink_of

ATTN_NAME = "msrnn"


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Mask function registered for `msrnn`: it hands the attention function the 2-D padding
    mask (B, kv_length) of real tokens (or None); causality and the budget are applied there."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    total = kv_offset + kv_length
    if mask.shape[-1] < total:
        mask = F.pad(mask, (0, total - mask.shape[-1]), value=True)
    mask = mask[:, :total]
    if q_length == 1:  # a decoding step: no check that would wait for the device
        return mask
    return None if bool(mask.all()) else mask


def msrnn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """(B, Hq, T, D) queries over (B, Hkv, S, D) keys -> ((B, T, Hq, D), None)."""
    layer = module._msrnn  # LayerBudget, attached by apply_budget
    ctrl = layer.controller
    B, Hq, T, D = query.shape
    scaling = scaling if scaling is not None else D ** -0.5
    window = kwargs.get("sliding_window", None) or None
    cache_layer = ctrl.cache_layer(layer.layer_idx)

    new_valid = (attention_mask[:, -T:] if attention_mask is not None
                 else torch.ones(B, T, dtype=torch.bool, device=query.device))
    # a learned policy: each new token's retention logit, read once off its hidden state (B, G, T)
    carried = (retention_logits(module, layer, T) if layer.policy is not None and layer.policy.carries_value
               else None)
    sink = sink_of(module, layer)  # a sink policy's AttentionSink (logits, values: sink.py), else None
    if cache_layer is None:  # teacher forcing
        return _attend(layer, ctrl, None, query, key, value, new_valid, scaling,
                       dropout if module.training else 0.0, window, carried, sink), None
    if cache_layer.free is not None:  # `update` wrote the token into the layer's K + 1 slot buffer
        return _decode_in_buffer(layer, cache_layer, query, key, value, new_valid, scaling, window, carried,
                                 sink), None
    # a prompt (or any multi-token call) through the cache: chunks of c queries, each scanned
    # from the slots held after the previous one, so no mask is larger than c x (K + 1 + c)
    c = ctrl.cache.prefill_chunk
    P = key.shape[-2] - T
    outs = []
    for a in range(0, T, c):
        b = min(T, a + c)
        if a == 0:
            k, v = key[:, :, :P + b], value[:, :, :P + b]
        else:
            k = torch.cat([cache_layer.keys, key[:, :, P + a:P + b]], -2)
            v = torch.cat([cache_layer.values, value[:, :, P + a:P + b]], -2)
        outs.append(_attend(layer, ctrl, cache_layer, query[:, :, a:b], k, v, new_valid[:, a:b], scaling, 0.0, window,
                            None if carried is None else carried[:, :, a:b], sink))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), None


def _attend(layer, ctrl, cache_layer, query, key, value, new_valid, scaling, dropout, window, carried=None,
            sink=None):
    """One call's schedule (from the cache's held slots, or from an empty state under teacher
    forcing), the attention masked to it, and the cache's new held set. `carried`: (B, G, T) the
    learned policy's retention logits of the new tokens (None for the other policies); `sink`: a sink
    policy's AttentionSink (its (Hq,) logits and (Hkv, D) values; None: no sink)."""
    B, Hq, T, D = query.shape
    if cache_layer is not None:
        init, past = cache_layer.slots(), cache_layer.seen
        first_order = cache_layer.n_real
    else:
        init, past = None, 0
        first_order = torch.zeros(B, dtype=torch.long, device=query.device)
    new_pos = torch.arange(past, past + T, device=query.device)
    new_order = first_order.view(B, 1) + new_valid.long().cumsum(-1) - 1

    # soft mode (training, relaxable policies): keep-logits for the keys the policy dropped; the
    # sparse path needs the scan's SoftRows (under teacher forcing), the dense reference only the schedule
    soft = (ctrl.soft_temperature is not None and layer.policy is not None and layer.policy.relaxable
            and cache_layer is None)
    sparse = soft and ctrl.soft_path == "sparse" and emits_soft_rows(layer.policy, layer.budget)
    sched = ctrl.stored_schedule(layer.layer_idx, cache_layer is None, T)
    if sched is None:
        with torch.no_grad():
            if layer.policy is None:
                sched = unbounded_schedule(new_valid, new_pos, init, window, layer.groups)
                if cache_layer is not None:
                    sched.final = _unbounded_final(init, sched, new_order, new_pos, new_valid, layer.groups)
            elif cache_layer is None and window is None and layer.policy.rolling_sinks() is not None:
                sched = rolling_schedule(layer.policy, layer.budget, new_valid, new_order, layer.groups)
            else:
                ctrl.scans += 1
                logits = LogitRows(query.detach(), key.detach(), scaling)
                scan_fn = layer.scan_fn or default_scan(query.device)
                sched = scan_fn(layer.policy, layer.budget, logits, new_valid, new_order, new_pos,
                                init=init, window=window, groups=layer.groups,
                                **({"soft_rows": True} if sparse else {}),
                                **({"new_value": layer.policy.carried_value(carried.detach())}
                                   if carried is not None else {}))
        ctrl.store_schedule(layer.layer_idx, cache_layer is None, sched)
    if ctrl.recording is not None:
        ctrl.recording.setdefault(layer.layer_idx, []).append(sched)

    if carried is not None and cache_layer is None and ctrl.relaxation not in (None, "none") and torch.is_grad_enabled():
        return _relaxed(layer, ctrl, query, key, value, sched, new_valid, new_order, scaling, carried)

    keep = None  # soft mode: per-key keep-logits after eviction
    if soft:
        from .soft import soft_keep_logits, soft_keep_sparse

        if sparse and sched.soft is not None:
            keep = soft_keep_sparse(query, key, scaling, sched, layer.groups, ctrl.soft_temperature, layer.budget)
        else:
            keep = soft_keep_logits(query, key, scaling, sched, new_valid, layer.groups, ctrl.soft_temperature)

    out = masked_attention(query, key, value, sched, new_valid, scaling, dropout, layer.groups, soft_keep=keep,
                           backend=ctrl.backend, sink=sink)
    if cache_layer is not None:
        cache_layer.commit(sched.final, key, value, new_valid, T)
    return out


def _relaxed(layer, ctrl, query, key, value, sched, new_valid, new_order, scaling, carried):
    """Training a learned policy (retention.py): the straight-through hard attention ("ste") or
    the soft retention decay with its capacity term ("decay"), so gradients reach the scorer."""
    if ctrl.relaxation == "ste":
        hard = dense_masked_attention(query, key, value, sched, new_valid, scaling, 0.0, layer.groups)
        keep, allowed = ste_keep(layer.policy, carried, sched, new_valid, new_order, ctrl.relax_tau)
        soft = relaxed_attention(query, key, value, scaling, layer.groups, keep=keep, allowed=allowed)
        return hard + (soft - soft.detach())  # the exact forward, the soft backward
    bias, expected = decay_bias(layer.policy, carried, new_valid, new_order)
    ctrl.aux_losses.append(capacity_excess(expected, layer.budget, new_valid))
    return relaxed_attention(query, key, value, scaling, layer.groups, bias=bias)


def _decode_in_buffer(layer, cache_layer, query, key, value, new_valid, scaling, window, carried=None, sink=None):
    """One decoding step of a bounded layer over its K + 1 slots (the new token already written
    into the free slot by `BoundedLayer.update`): attend over C_t, then the policy's step."""
    B, Hq, _, D = query.shape
    Hkv, G = key.shape[1], layer.groups
    on = cache_layer.new_slot()  # (B, G, C)
    valid = new_valid[:, -1]
    held = cache_layer.valid | (on & valid.view(B, 1, 1))  # C_t
    see = held | on  # a padding query sees its own key, so its softmax stays finite
    mask = see.unsqueeze(2)  # (B, G, 1, C)
    if G > 1:
        mask = mask.repeat_interleave(Hq // G, dim=1)
    if sink is not None:
        out = sink_attention(query, key, value, mask, scaling, sink.logit, sink_value=sink.value)
    else:  # GQA without copying the keys per query head
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=Hq != Hkv)
    with torch.no_grad():
        row = None
        if layer.policy.needs_scores:  # fp32 logits, as `LogitRows` gives the scan (query heads as a view per key head)
            with torch.autocast(query.device.type, enabled=False):
                qg = query.detach().float().view(B, Hkv, Hq // Hkv, D)
                row = torch.matmul(qg, key.detach().float().transpose(-1, -2)).view(B, Hq, -1) * scaling
        new = 0.0 if carried is None else layer.policy.carried_value(carried[:, :, -1:].detach().float())
        acc = torch.where(on, new, cache_layer.acc)
        order = torch.where(on, cache_layer.n_real.view(B, 1, 1), cache_layer.order)
        pos = torch.where(on, cache_layer.seen, cache_layer.pos)
        held, acc = decode_step(layer.policy, layer.budget, row, held, order, pos, acc, valid, cache_layer.seen,
                                window, G)
    cache_layer.commit_step(held, order, pos, acc, valid)
    return out.transpose(1, 2).contiguous()


def masked_attention(query, key, value, sched: Schedule, new_valid, scaling, dropout, groups, soft_keep=None,
                     backend="auto", sink=None):
    if sink is not None:  # a sink policy (sink.py): the dense reference on every device, for now
        return dense_masked_attention(query, key, value, sched, new_valid, scaling, dropout, groups, sink=sink)
    # FlexAttention is compiled per shape: calls of fewer than FLEX_MIN_LEN queries (decoding steps,
    # whose key length changes every call) take the dense path whatever the backend
    use_flex = query.shape[-2] >= FLEX_MIN_LEN and (
        backend == "flex" or (backend == "auto" and query.is_cuda and dropout == 0.0 and not _FLEX_FAILED))
    if use_flex:
        from .flex import flex_masked_attention

        try:
            return flex_masked_attention(query, key, value, sched, new_valid, scaling, groups, soft_keep=soft_keep)
        except Exception as err:  # a shape the compiled kernel has no config for: the dense path is exact too
            if backend == "flex":
                raise
            _FLEX_FAILED.append(repr(err)[:300])
            warnings.warn(f"msrnn_train: FlexAttention failed ({_FLEX_FAILED[0]}); using the dense masked SDPA "
                          "backend from now on (set MSRNN_ATTN=dense to choose it up front)", stacklevel=2)
    return dense_masked_attention(query, key, value, sched, new_valid, scaling, dropout, groups, soft_keep)


FLEX_MIN_LEN = 128
_FLEX_FAILED: list[str] = []


def dense_masked_attention(query, key, value, sched: Schedule, new_valid, scaling, dropout, groups, soft_keep=None,
                           sink=None):
    """Reference backend: a dense (B, Hq, T, S) mask from the schedule, then SDPA. It has a
    backward on every device (FlexAttention has none on the CPU). In soft mode the mask is
    additive, with each evicted key's keep-logit (soft.py) after its eviction. With a sink (an
    AttentionSink): `sink.sink_attention` over the same mask."""
    Hq, Hkv = query.shape[1], key.shape[1]
    if soft_keep is None:
        mask = sched.visible(new_valid)  # (B, G, T, S) bool
    else:
        from .soft import soft_dense_mask

        mask = soft_dense_mask(sched, new_valid, soft_keep).to(query.dtype)
    if groups > 1:
        mask = mask.repeat_interleave(Hq // groups, dim=1)
    if sink is not None:
        return sink_attention(query, key, value, mask, scaling, sink.logit, dropout,
                              sink.value).transpose(1, 2).contiguous()
    if Hq != Hkv:
        key = key.repeat_interleave(Hq // Hkv, dim=1)
        value = value.repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _unbounded_final(init: Slots | None, sched: Schedule, new_order, new_pos, new_valid, groups) -> Slots:
    """Slots held after an unbounded (full, or sliding-window-only) layer's call."""
    B, T = new_valid.shape
    S = sched.evict.shape[-1]
    P = S - T
    src = torch.arange(S, device=new_valid.device).view(1, 1, S).expand(B, groups, S)
    order = new_order.view(B, 1, T).expand(B, groups, T)
    pos = new_pos.view(1, 1, T).expand(B, groups, T)
    acc = torch.zeros(B, groups, T, device=new_valid.device)
    if P:
        order = torch.cat([init.order, order], -1)
        pos = torch.cat([init.pos, pos], -1)
        acc = torch.cat([init.acc, acc], -1)
    held = sched.evict == NEVER  # still held
    return Slots(src=torch.where(held, src, -1), order=order.clone(), pos=pos.clone(), acc=acc.clone())
