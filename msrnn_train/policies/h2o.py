"""h2o: the r most recent members are safe; among the rest drop the one with the lowest
attention mass accumulated since it arrived (probabilities averaged over query heads)."""

from .base import Policy


class H2O(Policy):
    name = "h2o"
    needs_scores = True
    accumulates = True

    def eligible(self, held, order):
        # rank by recency among the held members: 0 = newest
        newer = (order.unsqueeze(-1) < order.unsqueeze(-2)) & held.unsqueeze(-2)
        rank = newer.sum(-1)
        return held & (rank >= self.recent)

    def priority(self, score, acc, order):
        return acc
