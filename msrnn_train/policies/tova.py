"""tova: drop the member the current query attends to least (probabilities averaged over all
query heads of the layer; the paper's layer-wise default). Soft mode relaxes this rule."""

from .base import KERNEL_TOVA, Policy, register


@register
class TOVA(Policy):
    name = "tova"
    needs_scores = True
    relaxable = True
    kernel_code = KERNEL_TOVA

    def priority(self, score, acc, order):
        return score
