"""tova_head: head-wise TOVA. Each key/value head keeps its own K members, scored by the
current query's probabilities averaged over the query heads of its group."""

from .base import register
from .tova import TOVA


@register
class TOVAHead(TOVA):
    name = "tova_head"
    head_wise = True
