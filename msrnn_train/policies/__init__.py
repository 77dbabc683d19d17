"""Eviction policies: each file holds one policy's whole rule (base.py says what that is); the
step process that asks them lives once, in schedule.py. A new policy is one file plus one
import line here (the order of the imports is the order of POLICIES)."""

from .base import POLICIES, Policy, register
from .full import Full
from .window import Window
from .sinks import Sinks
from .h2o import H2O
from .tova import TOVA
from .tova_head import TOVAHead
from .learned import Learned
from .learned_head import LearnedHead
from .window_sink import WindowSink


def make_policy(name: str, budget: int, sinks: int = 4, recent: int | None = None, retention: str | None = None) -> Policy:
    """The policy `name` for K = budget; BudgetSpec's sinks/recent/retention go to the policies that have them."""
    return POLICIES[name].from_spec(budget, sinks=sinks, recent=recent, retention=retention)


__all__ = ["POLICIES", "Policy", "register", "make_policy", "Full", "Window", "Sinks", "H2O", "TOVA", "TOVAHead", "Learned", "LearnedHead", "WindowSink"]
