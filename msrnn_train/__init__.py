"""msrnn-train: fine-tune decoder LLMs to keep their quality as finite multi-state RNNs.

    from msrnn_train import BudgetSpec, apply_budget, make_cache
    apply_budget(model, BudgetSpec(policy="tova", budget=512))
    model.generate(**inputs, past_key_values=make_cache(model))
"""

from .controller import apply_budget, full_state, get_budget, make_cache, record_schedules, remove_budget
from .cache import BoundedCache
from .policies import POLICIES
from .spec import BudgetError, BudgetSpec

__version__ = "0.1.0"
__all__ = [
    "BudgetSpec", "BudgetError", "POLICIES", "apply_budget", "remove_budget", "full_state", "get_budget",
    "make_cache", "record_schedules", "BoundedCache",
]
