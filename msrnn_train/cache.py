"""BoundedCache: a transformers `Cache` that physically holds at most K states per bounded layer.

A bounded layer keeps a preallocated buffer of K + 1 slots: at most K held members and one free
slot. A decoding step writes the new token into the free slot (`update`), attends over the
buffer, runs the policy's step on it (`schedule.decode_step`) and marks the dropped slot free:
no concatenation, no Python loop over positions and no host sync. A multi-token forward (a
prompt) is processed in chunks of `prefill_chunk` tokens: each chunk's schedule is scanned from
the slots held after the previous chunk and its keys are attended with an O(c (K + c)) mask, and
what is still held is written back into the buffer (`commit`). So prefill holds O(K + c) keys
per layer whatever the prompt length, and equals one-token-at-a-time decoding exactly.
`generate()` feeds the prompt c tokens per forward (apply_budget sets its `prefill_chunk_size`).
Unbounded layers (full, or a hybrid's full layer) keep every member, compacted after each call.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .schedule import Slots


class BoundedLayer(CacheLayerMixin):
    """One layer's held set: keys/values (B, Hkv, n, D) and per-slot bookkeeping (B, G, n):
    valid (slot holds a member), order (index among the sequence's real tokens), pos (column),
    acc (h2o's accumulated attention mass). n = K + 1 for a bounded layer."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, budget: int | None, groups: int, decode_buffer: bool = True):
        super().__init__()
        self.budget = budget
        self.groups = groups
        self.capacity = None if budget is None else budget + 1  # slots of a bounded layer
        self.decode_buffer = decode_buffer  # False: decode like a prompt (concatenate, scan, compact)
        self.seen = 0  # columns processed (the logical sequence length)
        self.n_real = None  # (B,) real tokens processed per sequence
        self.order = self.pos = self.acc = self.valid = None
        self.free = None  # (B, G) slot the current decoding step's token was written to (None: not in place)

    def lazy_initialization(self, key_states, value_states):
        B, Hkv, _, D = key_states.shape
        dev, dt = key_states.device, key_states.dtype
        self.dtype, self.device = dt, dev
        n = self.capacity or 0
        self.keys = torch.zeros(B, Hkv, n, D, dtype=dt, device=dev)
        self.values = torch.zeros(B, Hkv, n, value_states.shape[-1], dtype=dt, device=dev)
        shape = (B, self.groups, n)
        self.order = torch.zeros(shape, dtype=torch.long, device=dev)
        self.pos = torch.zeros(shape, dtype=torch.long, device=dev)
        self.acc = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=dev)
        self.n_real = torch.zeros(B, dtype=torch.long, device=dev)
        self.is_initialized = True

    def decodes_in_place(self, key_states) -> bool:
        """One new token of a bounded layer goes into the buffer (not while building a graph for
        backward: an in-place write would invalidate the previous step's saved tensors)."""
        return (self.capacity is not None and self.decode_buffer and key_states.shape[-2] == 1
                and not (torch.is_grad_enabled() and key_states.requires_grad))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.decodes_in_place(key_states):
            # the new token takes the first free slot of each (sequence, group): one always is,
            # since at most K of the K + 1 slots are held
            self.free = (~self.valid).to(torch.int8).argmax(-1)  # (B, G)
            B, Hkv, _, D = self.keys.shape
            idx = self.free.view(B, -1, 1, 1).expand(B, Hkv, 1, D)
            self.keys.scatter_(2, idx, key_states)
            self.values.scatter_(2, idx.expand(B, Hkv, 1, self.values.shape[-1]), value_states)
            return self.keys, self.values
        self.free = None
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    def slots(self) -> Slots:
        n = self.valid.shape[-1]
        src = torch.arange(n, device=self.valid.device).expand_as(self.valid)
        return Slots(src=torch.where(self.valid, src, -1), order=self.order, pos=self.pos, acc=self.acc)

    def commit(self, final: Slots, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor, T: int):
        """Keep only the members still held after the call, compacted (held slots first) into
        K + 1 slots for a bounded layer (at most K are held), into as many as needed otherwise."""
        held = final.src >= 0  # (B, G, C)
        if self.capacity is not None:
            n = self.capacity
        else:
            n = int(held.sum(-1).max().item()) if held.numel() else 0
        order = torch.argsort((~held).to(torch.int8), dim=-1, stable=True)[..., :n]  # held first
        if order.shape[-1] < n:  # fewer slots than the buffer: pad with empty ones
            held = torch.nn.functional.pad(held, (0, n - order.shape[-1]))
            order = torch.nn.functional.pad(order, (0, n - order.shape[-1]), value=order.shape[-1])
            final = final.grow(n)
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

    def commit_step(self, held, order, pos, acc, new_valid: torch.Tensor):
        """After a decoding step in the buffer: the slots' bookkeeping with the new token, and
        the held set after the policy's drop (`schedule.decode_step`)."""
        self.order, self.pos = order, pos
        self.valid = held
        self.acc = acc
        self.seen += 1
        self.n_real = self.n_real + new_valid.long().view(-1)
        self.free = None

    def new_slot(self) -> torch.Tensor:
        """(B, G, C) one-hot: the slot of the current decoding step's token."""
        return torch.arange(self.capacity, device=self.free.device) == self.free.unsqueeze(-1)

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
        self.free = None

    def nbytes(self) -> int:
        """Bytes this layer stores: keys, values and the per-slot bookkeeping."""
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.order, self.pos, self.acc,
                                                          self.valid, self.n_real))

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
    a budgeted model create it: `generate()` and `model(..., use_cache=True)` do).

    budgets       – K per layer (None: an unbounded layer)
    groups        – head groups per layer (1: layer-wise; the key/value heads: head-wise)
    prefill_chunk – tokens per prefill chunk (the spec's `prefill_chunk`)
    decode_buffer – decode in the preallocated K + 1 slots (True) or, as a prompt of one token,
                    by concatenating, scanning and compacting (False; kept for the benchmark)
    """

    def __init__(self, budgets: list[int | None], groups: list[int], prefill_chunk: int, decode_buffer: bool = True):
        layers = [BoundedLayer(k, g, decode_buffer) for k, g in zip(budgets, groups, strict=True)]
        super().__init__(layers=layers)
        self.prefill_chunk = int(prefill_chunk)
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be >= 1, got {prefill_chunk!r}")

    def held_positions(self, layer_idx: int):
        return self.layers[layer_idx].held_positions()

    def state_sizes(self) -> list[int]:
        """Held states per layer (the most over sequences and head groups): never more than K
        for a bounded layer. Reads the device: for checks, not for a decoding loop."""
        return [0 if layer.valid is None or layer.valid.numel() == 0 else int(layer.valid.sum(-1).max())
                for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes the cache stores (keys, values, bookkeeping) over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
