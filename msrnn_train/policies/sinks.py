"""sinks (window+i): drop the oldest member that is not among the first i tokens.

With K <= i the first i tokens alone would fill the budget and nothing could roll; the
sinks then count as min(i, K - 1), so at least one slot always holds recent tokens.
"""

from dataclasses import dataclass

from .base import KERNEL_SINKS, Policy, register


@register
@dataclass(repr=False, eq=False)
class Sinks(Policy):
    n_sinks: int = 4  # i: the first tokens that never leave

    name = "sinks"
    kernel_code = KERNEL_SINKS
    spec_params = {"sinks": "n_sinks"}

    @property
    def kept_first(self) -> int:
        return min(self.n_sinks, self.budget - 1)

    def eligible(self, held, order):
        return held & (order >= self.kept_first)

    def priority(self, score, acc, order):
        return order.float()

    def rolling_sinks(self):
        return self.kept_first

    def kernel_args(self):
        return self.kept_first, 0
