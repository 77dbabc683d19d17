"""h2o: the r most recent members are safe; among the rest drop the one with the lowest
attention mass accumulated since it arrived (probabilities averaged over query heads)."""

from dataclasses import dataclass

from .base import KERNEL_H2O, Policy, register


@register
@dataclass(repr=False, eq=False)
class H2O(Policy):
    recent: int | None = None  # r, the protected recent window; None: K // 2 (follows K when K changes)

    name = "h2o"
    needs_scores = True
    accumulates = True
    kernel_code = KERNEL_H2O
    spec_params = {"recent": "recent"}

    @property
    def kept_recent(self) -> int:
        return self.budget // 2 if self.recent is None else self.recent

    def eligible(self, held, order):
        # rank by recency among the held members: 0 = newest
        newer = (order.unsqueeze(-1) < order.unsqueeze(-2)) & held.unsqueeze(-2)
        rank = newer.sum(-1)
        return held & (rank >= self.kept_recent)

    def priority(self, score, acc, order):
        return acc

    def kernel_args(self):
        # the kernels protect by order (o > newest - r): the r most recent real tokens were
        # protected on every step since they arrived, so they are exactly the r newest held
        return 0, self.kept_recent
