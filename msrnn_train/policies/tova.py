"""tova: drop the member the current query attends to least (probabilities averaged over all
query heads of the layer; the paper's layer-wise default)."""

from .base import Policy


class TOVA(Policy):
    name = "tova"
    needs_scores = True

    def priority(self, score, acc, order):
        return score
