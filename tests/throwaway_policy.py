"""A throw-away policy, written the way a new policy is written: one file, one registered class.

most_attended: drop the member the current query attends to most, never the newest. The
kernels know no such rule (no `kernel_code`), so the torch scan runs it wherever a fast scan
would. tests/test_new_policy.py imports this file, runs the policy through every form of the
process, and takes it out of the registry again.
"""

import torch

from msrnn_train.policies import Policy, register


@register
class MostAttended(Policy):
    name = "most_attended"
    needs_scores = True

    def eligible(self, held, order):
        newest = torch.where(held, order, -1).amax(-1, keepdim=True)
        return held & (order < newest)

    def priority(self, score, acc, order):
        return -score
