"""The evaluation-only oracle (msrnn_train/oracle.py): the same fixed-K process with a clairvoyant
choice, run through a layer's scan_fn."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from msrnn_train import BudgetSpec, apply_budget, get_budget
from msrnn_train.evaluate import evaluate_specs
from msrnn_train.oracle import _oracle_scan, _REMAINING, oracle_perplexity
from msrnn_train.policies import POLICIES, make_policy
from msrnn_train.schedule import NEVER

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_oracle_drops_the_member_with_the_least_attention_still_to_come():
    T, K = 7, 3
    R = np.zeros((T, T))
    R[:, 0] = 5.0  # key 0 is attended a lot later: never dropped
    R[:, 1] = 0.1  # key 1: first to go
    R[:, 2] = 1.0
    R[:, 3] = 0.5
    _REMAINING[0] = R
    try:
        sched = _oracle_scan(0)(make_policy("tova", K), K, None, torch.ones(1, T, dtype=torch.bool),
                                torch.arange(T).view(1, T), torch.arange(T))
    finally:
        _REMAINING.clear()
    evict = sched.evict.view(-1).tolist()
    assert evict[0] == NEVER and evict[1] == 3  # at step 3 (4 held) the least-attended-later goes
    held_end = [j for j in range(T) if evict[j] == NEVER]
    assert len(held_end) == K
    for t in range(T):  # never more than K held after a step
        assert sum(1 for j in range(t + 1) if evict[j] > t) <= K


def test_oracle_perplexity_is_the_full_state_when_nothing_is_evicted_and_restores_the_budget():
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="sinks", budget=6))
    windows = torch.randint(3, 128, (2, 24))
    full = evaluate_specs(model, windows, [BudgetSpec(policy="full")], progress=False)[0]["ppl"]
    got = oracle_perplexity(model, windows, [24, 4])
    assert math.isclose(got["24"], full, rel_tol=1e-5)
    assert math.isfinite(got["4"]) and not math.isclose(got["4"], full, rel_tol=1e-4)
    assert get_budget(model).policy == "sinks"  # the model's own budget is back
    assert "oracle" not in POLICIES  # evaluation only: never a user-facing policy
