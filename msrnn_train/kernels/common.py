"""What the fast scans share: the rule numbers they have compiled in, which layers they run
(`has_kernel`) and the state they start from (`start_state`).

Its own module so that cpu_scan.py and triton_scan.py import it without importing the package's
face (kernels/__init__.py), which imports them back to pick one (`default_scan`).
"""

from __future__ import annotations

import torch

from ..policies.base import (KERNEL_H2O, KERNEL_LEARNED_DECAY, KERNEL_LEARNED_VALUE, KERNEL_SINKS, KERNEL_TOVA,
                             KERNEL_WINDOW)
from ..schedule import NEVER, Slots

# The rules the kernels have compiled in (a policy names its own: `Policy.kernel_code`, with its
# integer parameters `Policy.kernel_args()` = (number of sinks, recent window)):
#   WINDOW  lowest order first              SINKS  the same, never the first n_sinks tokens
#   H2O     lowest accumulated mass first,  TOVA   lowest score (current query) first
#           never the `recent` newest
#   LEARNED_DECAY  lowest age * value first (value: log sigmoid of the learned logit, carried by the slot),
#                  never the first n_sinks tokens
#   LEARNED_VALUE  lowest value first, never the first n_sinks (numba only; the Triton kernel has the first four)
WINDOW, SINKS, H2O, TOVA = KERNEL_WINDOW, KERNEL_SINKS, KERNEL_H2O, KERNEL_TOVA
LEARNED_DECAY, LEARNED_VALUE = KERNEL_LEARNED_DECAY, KERNEL_LEARNED_VALUE


def has_kernel(policy, budget) -> bool:
    """Whether a fast scan runs this layer (a bounded policy whose rule the kernels know); the
    others go to `schedule.scan`."""
    return policy is not None and budget is not None and policy.kernel_code is not None


def start_state(budget: int, init: Slots | None, new_valid: torch.Tensor, groups: int, device):
    """What a fast scan starts from, on `device`: a private copy of the held slots (at least
    K + 1 wide), the eviction array (NEVER for keys that may be seen, -1 for padding and empty
    slots) and each key's arrival step (-1 for keys held before the call)."""
    B, T = new_valid.shape
    P = 0 if init is None else init.src.shape[-1]
    capacity = max(budget + 1, P + 1)
    slots = Slots.empty(B, groups, capacity, device) if init is None else init.grow(capacity)
    slots = Slots(*(x.to(device).contiguous().clone() for x in (slots.src, slots.order, slots.pos)),
                  acc=slots.acc.to(device, torch.float32).contiguous().clone())
    evict = torch.full((B, groups, P + T), NEVER, dtype=torch.long, device=device)
    if P:
        evict[:, :, :P] = torch.where(init.src.to(device) >= 0, NEVER, -1)
    evict[:, :, P:] = torch.where(new_valid.to(device), NEVER, -1).unsqueeze(1)
    arrive = torch.cat([torch.full((P,), -1, dtype=torch.long), torch.arange(T)]).to(device)
    return slots, evict, arrive
