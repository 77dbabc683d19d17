"""sinks (window+i): drop the oldest member that is not among the first i tokens.

With K <= i the first i tokens alone would fill the budget and nothing could roll; the
sinks then count as min(i, K - 1), so at least one slot always holds recent tokens.
"""

from .base import Policy


class Sinks(Policy):
    name = "sinks"

    def eligible(self, held, order):
        return held & (order >= min(self.sinks, self.budget - 1))

    def priority(self, score, acc, order):
        return order.float()
