"""full: never drops (K = infinity): the ordinary Transformer. A spec with it leaves every layer
unbounded, so no step ever asks it to choose."""

from .base import Policy, register


@register
class Full(Policy):
    name = "full"
