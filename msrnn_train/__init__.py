"""msrnn-train: fine-tune decoder LLMs to keep their quality as finite multi-state RNNs.

    from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache
    apply_budget(model, BudgetSpec(policy="tova", budget=512))
    model.generate(**inputs, **cache_kwargs(make_cache(model)))  # `cache=` (transformers >= 5.24) or `past_key_values=`
"""

from .cache import BoundedCache
from .compat import CACHE_KWARG, TESTED_TRANSFORMERS, cache_kwargs, check_transformers
from .controller import apply_budget, full_state, get_budget, make_cache, record_schedules, remove_budget
from .policies import POLICIES
from .spec import BudgetError, BudgetSpec

check_transformers()  # warns once when the installed transformers lies outside the tested range

__version__ = "0.1.0"
__all__ = [
    "BudgetSpec", "BudgetError", "POLICIES", "apply_budget", "remove_budget", "full_state", "get_budget",
    "make_cache", "record_schedules", "BoundedCache", "cache_kwargs", "CACHE_KWARG", "TESTED_TRANSFORMERS",
]
