"""BoundedCache: a transformers `Cache` that physically holds at most K states per bounded layer.

Each forward, a layer's `update` hands attention its held states plus the new tokens; the
registered attention function runs the shared step process (`schedule.scan`) over them and
`commit`s what is still held. Stored tensors never exceed K per bounded layer (K+1 while a
single new token is being attended), so memory is truly bounded. Works with
`model.generate()` and with manual loops, prompt at once or token by token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .schedule import Slots


class BoundedLayer(CacheLayerMixin):
    """One layer's held set: keys/values (B, Hkv, n, D) and per-slot bookkeeping (B, G, n)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, budget: int | None, groups: int):
        super().__init__()
        self.budget = budget
        self.groups = groups
        self.seen = 0  # columns processed (the logical sequence length)
        self.n_real = None  # (B,) real tokens processed per sequence
        self.order = self.pos = self.acc = self.valid = None
        self._pending = None

    def lazy_initialization(self, key_states, value_states):
        B, Hkv, _, D = key_states.shape
        dev, dt = key_states.device, key_states.dtype
        self.dtype, self.device = dt, dev
        self.keys = torch.zeros(B, Hkv, 0, D, dtype=dt, device=dev)
        self.values = torch.zeros(B, Hkv, 0, value_states.shape[-1], dtype=dt, device=dev)
        shape = (B, self.groups, 0)
        self.order = torch.zeros(shape, dtype=torch.long, device=dev)
        self.pos = torch.zeros(shape, dtype=torch.long, device=dev)
        self.acc = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=dev)
        self.n_real = torch.zeros(B, dtype=torch.long, device=dev)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = key_states.shape[-2]
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    def slots(self) -> Slots:
        n = self.valid.shape[-1]
        src = torch.arange(n, device=self.valid.device).expand_as(self.valid)
        return Slots(src=torch.where(self.valid, src, -1), order=self.order, pos=self.pos, acc=self.acc)

    def commit(self, final: Slots, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor, T: int):
        """Keep only the members still held after the call, compacted (held slots first)."""
        held = final.src >= 0  # (B, G, C)
        n = int(held.sum(-1).max().item()) if held.numel() else 0
        order = torch.argsort((~held).to(torch.int8), dim=-1, stable=True)[..., :n]  # held first
        src = final.src.gather(-1, order)
        B, Hkv, _, D = keys.shape
        idx = src.clamp(min=0)
        if self.groups == 1:
            idx = idx.expand(B, Hkv, n)
        self.keys = keys.gather(2, idx.unsqueeze(-1).expand(B, Hkv, n, D)).contiguous()
        self.values = values.gather(2, idx.unsqueeze(-1).expand(B, Hkv, n, values.shape[-1])).contiguous()
        self.valid = held.gather(-1, order)
        self.order = final.order.gather(-1, order)
        self.pos = final.pos.gather(-1, order)
        self.acc = final.acc.gather(-1, order)
        self.seen += T
        self.n_real = self.n_real + new_valid.long().sum(-1)
        self._pending = None

    # ----------------------------------------------------------------- Cache API
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the mask function hands the attention the padding of every column seen so far
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def held_positions(self) -> list[list[list[int]]]:
        """Column index of every held member, per batch element and head group (sorted)."""
        out = []
        for b in range(self.valid.shape[0]):
            out.append([sorted(self.pos[b, g][self.valid[b, g]].tolist()) for g in range(self.groups)])
        return out

    def reset(self):
        self.is_initialized = False
        self.keys = self.values = None
        self.seen = 0

    def reorder_cache(self, beam_idx):
        for name in ("keys", "values", "order", "pos", "acc", "valid", "n_real"):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.keys.device)))

    def batch_repeat_interleave(self, repeats: int):
        for name in ("keys", "values", "order", "pos", "acc", "valid", "n_real"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        for name in ("keys", "values", "order", "pos", "acc", "valid", "n_real"):
            setattr(self, name, getattr(self, name)[indices])


class BoundedCache(Cache):
    """The inference counterpart of the simulation. Build it with `make_cache(model)` (or let
    a budgeted model create it: `generate()` and `model(..., use_cache=True)` do)."""

    def __init__(self, model):
        from .apply import get_controller

        ctrl = get_controller(model)
        if ctrl is None:
            raise ValueError("BoundedCache needs a model with a budget: call apply_budget(model, spec) first")
        layers = [BoundedLayer(lb.budget if lb.policy is not None else None, lb.groups) for lb in ctrl.layers]
        super().__init__(layers=layers)
        self.spec = ctrl.spec

    def held_positions(self, layer_idx: int):
        return self.layers[layer_idx].held_positions()

    def state_sizes(self) -> list[int]:
        """Stored states (slots) per layer: never more than K for a bounded layer."""
        return [0 if layer.keys is None else layer.keys.shape[-2] for layer in self.layers]
