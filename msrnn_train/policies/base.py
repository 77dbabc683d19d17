"""The shared shape of a policy: which held members may be dropped, and in what order.

A policy sees, for every (sequence, head-group) and every held slot of the current set C_t:
  order  - the member's index among the sequence's real (non-padding) tokens,
  score  - the current query's attention probability on it, averaged over query heads
           (only computed when `needs_scores`),
  acc    - the attention mass it has received since it arrived (only when `accumulates`),
  held   - whether the slot holds a member of C_t at all.
It returns `eligible` (may be dropped) and `priority` (lowest is dropped). Ties break toward
the oldest member (lowest order) in the shared machinery, never here.
"""

from __future__ import annotations

import torch


class Policy:
    name: str = ""
    needs_scores: bool = False  # needs the current query's attention probabilities
    accumulates: bool = False  # keeps the accumulated attention mass of every member (h2o)
    head_wise: bool = False  # each key/value head keeps its own set

    def __init__(self, budget: int, sinks: int = 4, recent: int | None = None):
        self.budget = budget
        self.sinks = sinks
        self.recent = budget // 2 if recent is None else recent

    def eligible(self, held: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return held

    def priority(self, score: torch.Tensor | None, acc: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.budget})"
