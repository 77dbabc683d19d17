"""learned: drop the member with the lowest learned retention priority.

Each member carries one number written once, when it arrives: the retention logit l_j that a
small per-layer scorer (msrnn_train/retention.py) reads off the token's hidden state (the
attention layer's input). No attention probabilities are needed, at training or at inference,
so decoding keeps the fused attention path.

The first `sinks` tokens (BudgetSpec.sinks, default 4; counted as min(sinks, K - 1), as for the
`sinks` policy) are never dropped: attention sinks that a token's own hidden state cannot always
tell apart (the first layer sees only its embedding). Among the others, the priority of member j
when query t arrives (lowest is dropped, ties toward the oldest):
  retention="decay" (default):  (order_t - order_j) * log sigmoid(l_j)
      the log of beta_j ** age, TRIM-KV's retention decay: a member fades at its own rate
      beta_j = sigmoid(l_j). With all logits equal (the scorer's initialisation: zero weights,
      one shared bias) the oldest member has the lowest priority, so the rule starts as `sinks`
      (window + the first tokens; with sinks: 0, as `window`): training starts from a working model.
  retention="logit":  l_j alone (a static rank; equal logits: the oldest goes first, `sinks` too)

The slot keeps one value per member (`Slots.acc`), written when it arrives (`carries_value`) and
never accumulated into: log sigmoid(l_j) for decay (so a step costs one multiply per member, the
same float32 product in the torch scan and the numba kernel), l_j itself for logit.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import KERNEL_LEARNED_DECAY, KERNEL_LEARNED_VALUE, Policy, register

RETENTION_FORMS = ("decay", "logit")


@register
@dataclass(repr=False, eq=False)
class Learned(Policy):
    form: str = "decay"  # how the logit ranks members: decay | logit (BudgetSpec.retention)
    n_sinks: int = 4  # the first tokens that never leave (BudgetSpec.sinks)

    name = "learned"
    carries_value = True
    spec_params = {"retention": "form", "sinks": "n_sinks"}

    def __post_init__(self):
        if self.form not in RETENTION_FORMS:
            raise ValueError(f"retention: unknown form {self.form!r}; allowed: {', '.join(RETENTION_FORMS)}")

    @property
    def kept_first(self) -> int:
        return min(self.n_sinks, self.budget - 1)

    def eligible(self, held, order):
        return held & (order >= self.kept_first)

    def kernel_args(self):
        return self.kept_first, 0

    @property
    def kernel_code(self) -> int:  # the numba scan runs both forms (kernels/cpu_scan.py)
        return KERNEL_LEARNED_VALUE if self.form == "logit" else KERNEL_LEARNED_DECAY

    def carried_value(self, logit):
        return logit if self.form == "logit" else F.logsigmoid(logit)

    def priority(self, score, acc, order):
        if self.form == "logit":
            return acc
        # acc = log sigmoid(l); the newest member (the query's own token) has the highest order of
        # every slot ever written, so age = its order - the member's
        age = (order.max(-1, keepdim=True).values - order).to(acc.dtype)
        return age * acc

    def priority_matrix(self, logit: torch.Tensor, q_order: torch.Tensor, k_order: torch.Tensor) -> torch.Tensor:
        """The same priority for every (query, key) pair at once, for the training relaxations:
        logit (B, G, S), q_order (B, T), k_order (B, S) -> (B, G, T, S), differentiable in `logit`."""
        lg = logit.unsqueeze(2)
        if self.form == "logit":
            return lg.expand(-1, -1, q_order.shape[1], -1)
        age = (q_order.unsqueeze(-1) - k_order.unsqueeze(-2)).clamp(min=0).unsqueeze(1).to(logit.dtype)  # (B, 1, T, S)
        return age * F.logsigmoid(lg)
