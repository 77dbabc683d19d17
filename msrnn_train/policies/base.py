"""The shared shape of a policy, and the registry of policies.

A policy is one small dataclass that owns its whole rule (kvpress's presses are the model):

* its selection rule: which held members may be dropped (`eligible`) and in what order
  (`priority`, lowest is dropped). The shared machinery (schedule.py) asks it, in all three
  forms of the process: the plain reference, the scan and the cache's decoding step.
  For every (sequence, head group) and every held slot of the current set C_t it sees
    order  - the member's index among the sequence's real (non-padding) tokens,
    score  - the current query's attention probability on it, averaged over query heads
             (only computed when `needs_scores`),
    acc    - the attention mass it has received since it arrived (only when `accumulates`), or,
             for a policy that `carries_value`, the value written when it arrived (learned: the
             scorer's retention logit, never accumulated into),
    held   - whether the slot holds a member of C_t at all.
  Ties break toward the oldest member (lowest order) in the shared machinery, never here.
* `kernel_code`: the rule's number among those compiled into the fast scans (kernels/), with
  `kernel_args()` its integer parameters there; None: no fast kernel, the torch scan runs it.
* `rolling_sinks()`: its closed form, when it has one (schedule.rolling_schedule).
* `relaxable`: whether soft mode (soft.py) may relax its evictions during training.
* its own parameters, as dataclass fields after the budget K (`Sinks(K, n_sinks)`,
  `H2O(K, recent)`); `spec_params` maps BudgetSpec's keys to them.

Adding a policy is one file with one `@register`d class, imported in policies/__init__.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

# The selection rules compiled into the fast scans (kernels/cpu_scan.py, kernels/triton_scan.py),
# by number: a policy whose rule is one of them names it in `kernel_code`.
KERNEL_WINDOW, KERNEL_SINKS, KERNEL_H2O, KERNEL_TOVA = 0, 1, 2, 3
# the learned retention rule, on the value each member carries: age * value (decay) or the value alone
KERNEL_LEARNED_DECAY, KERNEL_LEARNED_VALUE = 4, 5

POLICIES: dict[str, type["Policy"]] = {}


def register(cls: type["Policy"]) -> type["Policy"]:
    """Class decorator: the policy becomes known under its `name` (BudgetSpec, recipes, the CLIs
    and every test parametrised over `POLICIES`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a policy needs a name")
    if POLICIES.get(cls.name, cls) is not cls:
        raise ValueError(f"policy {cls.name!r} is registered already ({POLICIES[cls.name].__name__})")
    POLICIES[cls.name] = cls
    return cls


@dataclass(repr=False, eq=False)
class Policy:
    budget: int  # K: the states it holds

    name: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False  # needs the current query's attention probabilities
    accumulates: ClassVar[bool] = False  # keeps the accumulated attention mass of every member (h2o)
    head_wise: ClassVar[bool] = False  # each key/value head keeps its own set
    relaxable: ClassVar[bool] = False  # soft mode may relax it: the victim is the least attended (needs_scores)
    carries_value: ClassVar[bool] = False  # each member carries a value written once on arrival (learned: its logit)
    attention_sink: ClassVar[bool] = False  # its bounded layers attend with a learned sink key: logits, values (sink.py)
    kernel_code: ClassVar[int | None] = None  # its rule in the fast scans; None: the torch scan runs it
    spec_params: ClassVar[dict[str, str]] = {}  # BudgetSpec key -> its own field (e.g. sinks -> n_sinks)

    @classmethod
    def from_spec(cls, budget: int, **spec_values) -> "Policy":
        """The policy for K = budget from BudgetSpec's values (sinks=, recent=): it takes only its
        own parameters; None leaves a parameter at its default."""
        own = {field: spec_values[key] for key, field in cls.spec_params.items() if spec_values.get(key) is not None}
        return cls(budget, **own)

    def eligible(self, held: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return held

    def priority(self, score: torch.Tensor | None, acc: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rolling_sinks(self) -> int | None:
        """The closed form: i when the rule is "drop the oldest member that is not among the first
        i tokens" (schedule.rolling_schedule then computes the schedule without the step loop);
        None when the step process must run."""
        return None

    def carried_value(self, logit: torch.Tensor) -> torch.Tensor:
        """For a policy that `carries_value`: what a new member's slot keeps, from the scorer's logit."""
        return logit

    def kernel_args(self) -> tuple[int, int]:
        """(number of sinks, recent window): the integer parameters the fast scans read."""
        return 0, 0

    def __repr__(self) -> str:
        own = "".join(f", {f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)[1:])
        return f"{type(self).__name__}(K={self.budget}{own})"
