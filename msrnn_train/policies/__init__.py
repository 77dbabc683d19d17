"""Eviction policies: each file holds one selection rule; the step process lives in schedule.py."""

from .base import Policy
from .h2o import H2O
from .sinks import Sinks
from .tova import TOVA
from .tova_head import TOVAHead
from .window import Window


class Full(Policy):
    """full: never drops (K = infinity): the ordinary Transformer."""

    name = "full"


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Full, Window, Sinks, H2O, TOVA, TOVAHead)
}


def make_policy(name: str, budget: int, sinks: int = 4, recent: int | None = None) -> Policy:
    return POLICIES[name](budget, sinks=sinks, recent=recent)


__all__ = ["POLICIES", "Policy", "make_policy", "Full", "Window", "Sinks", "H2O", "TOVA", "TOVAHead"]
