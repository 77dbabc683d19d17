"""learned_head: the learned retention rule per key/value head. The scorer gives one logit per
key/value head, and each head keeps its own K members by them."""

from .base import register
from .learned import Learned


@register
class LearnedHead(Learned):
    name = "learned_head"
    head_wise = True
