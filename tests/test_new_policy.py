"""A new policy is one file: a throw-away policy (tests/throwaway_policy.py) runs through the plain
reference, the scans, the BoundedCache and the simulation (masked attention in one forward), the
forms agree, and the registry forgets it afterwards."""

import contextlib
import importlib
import sys

import pytest
import torch

from conftest import padded_batch, tiny_model
from msrnn_train import BudgetError, BudgetSpec, apply_budget
from msrnn_train.fidelity import compare
from msrnn_train.kernels import default_scan
from msrnn_train.kernels.cpu_scan import fast_scan
from msrnn_train.policies import POLICIES, make_policy, register
from msrnn_train.schedule import LogitRows, reference_schedule, scan

NAME = "most_attended"


@contextlib.contextmanager
def added_policy():
    """Import the policy's file (its @register adds it to POLICIES); take it out again after."""
    assert NAME not in POLICIES
    sys.modules.pop("throwaway_policy", None)
    try:
        yield importlib.import_module("throwaway_policy").MostAttended
    finally:
        POLICIES.pop(NAME, None)
        sys.modules.pop("throwaway_policy", None)


@pytest.fixture
def most_attended():
    with added_policy() as cls:
        yield cls


def _random_case(seed, B=3, Hq=4, Hkv=2, T=30, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 2
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    valid[2, T - 4:] = False  # right padding
    return q, k, valid


@pytest.mark.parametrize("budget", [1, 3, 6])
@pytest.mark.parametrize("window", [None, 7])
def test_reference_equals_the_scans(most_attended, budget, window):
    """The spec in plain Python (it asks the policy's eligible/priority) == the torch scan == the
    CPU fast scan, which has no kernel for the policy and hands it to the torch scan."""
    q, k, valid = _random_case(seed=budget + (window or 0))
    policy = make_policy(NAME, budget)
    assert isinstance(policy, most_attended) and policy.kernel_code is None
    order = valid.long().cumsum(-1) - 1
    T = valid.shape[1]
    sched = scan(policy, budget, LogitRows(q, k, 0.35), valid, order, torch.arange(T), window=window)
    fast = fast_scan(policy, budget, LogitRows(q, k, 0.35), valid, order, torch.arange(T), window=window)
    assert torch.equal(sched.evict, fast.evict)
    assert default_scan("cpu") is fast_scan  # what a model on the CPU runs, so the fallback is the path
    ref = reference_schedule(policy, budget, q, k, 0.35, valid, window=window)
    for b in range(valid.shape[0]):
        got = {j: int(sched.evict[b, 0, j]) for j in range(T) if valid[b, j]}
        assert got == ref[b][0], b
    # the rule is really its own: it keeps other members than TOVA (the least attended) does
    tova = scan(make_policy("tova", budget), budget, LogitRows(q, k, 0.35), valid, order, torch.arange(T),
                window=window)
    assert not torch.equal(sched.evict, tova.evict)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: the model's own sliding window too
@pytest.mark.parametrize("budget", [2, 5])
def test_simulation_equals_bounded_decoding(most_attended, arch, budget):
    """Teacher forcing (the schedule, masked attention in one forward) == decoding token by token
    through a BoundedCache of K + 1 slots: logits within 1e-4 in fp32, held sets equal at every
    step of every layer, never more than K states."""
    model = tiny_model(arch)
    ids, mask = padded_batch([20, 16, 11], 20, side="left" if budget % 2 else "right", seed=budget)
    spec = BudgetSpec(policy=NAME, budget=budget)
    apply_budget(model, spec)
    result = compare(model, ids, mask)
    assert result["max_abs_diff"] < 1e-4, result
    assert result["held_mismatch"] is None, result["held_mismatch"]
    assert max(result["state_sizes"]) <= budget


def test_registry_forgets_the_throwaway_policy():
    with added_policy() as cls:
        assert POLICIES[NAME] is cls and list(POLICIES)[-1] == NAME
        BudgetSpec(policy=NAME, budget=4).validate()
        with pytest.raises(ValueError, match="registered already"):
            register(type("Other", (cls,), {}))  # one name, one class
    assert NAME not in POLICIES and "throwaway_policy" not in sys.modules
    with pytest.raises(BudgetError, match=f"unknown policy '{NAME}'"):
        BudgetSpec(policy=NAME, budget=4).validate()


def test_the_builtin_policies_declare_what_the_code_used_to_switch_on_by_name():
    """Kernel codes, closed forms, relaxability and own parameters, now attributes of each policy."""
    from msrnn_train.kernels import H2O, SINKS, TOVA, WINDOW
    from msrnn_train.kernels.common import LEARNED_DECAY, LEARNED_VALUE

    assert list(POLICIES) == ["full", "window", "sinks", "h2o", "tova", "tova_head", "learned", "learned_head",
                              "window_sink"]
    assert {n: make_policy(n, 6).kernel_code for n in POLICIES} == {
        "full": None, "window": WINDOW, "sinks": SINKS, "h2o": H2O, "tova": TOVA, "tova_head": TOVA,
        "learned": LEARNED_DECAY, "learned_head": LEARNED_DECAY,  # learned: numba only (not the Triton kernel)
        "window_sink": WINDOW}  # window's eviction; the sink is in the attention
    assert [n for n, c in POLICIES.items() if c.attention_sink] == ["window_sink"]
    assert make_policy("learned", 6, retention="logit").kernel_code == LEARNED_VALUE
    assert [n for n, c in POLICIES.items() if c.carries_value] == ["learned", "learned_head"]
    assert not any(c.needs_scores for n, c in POLICIES.items() if c.carries_value)  # no attention probabilities
    assert [n for n, c in POLICIES.items() if c.relaxable] == ["tova", "tova_head"]  # soft mode: TOVA only
    assert {n: make_policy(n, 6, sinks=8).rolling_sinks() for n in POLICIES if n != "full"} == {
        "window": 0, "sinks": 5, "h2o": None, "tova": None, "tova_head": None, "learned": None,
        "learned_head": None, "window_sink": 0}  # sinks: min(i, K - 1)
    # each takes only its own parameters from the spec; h2o's r defaults to K // 2 and follows K
    assert repr(make_policy("sinks", 6, sinks=2, recent=3)) == "Sinks(K=6, n_sinks=2)"
    assert repr(make_policy("tova", 6, sinks=2, recent=3)) == "TOVA(K=6)"
    assert repr(make_policy("learned", 6, retention="logit")) == "Learned(K=6, form='logit', n_sinks=4)"
    assert make_policy("learned", 6, sinks=8).kernel_args() == (5, 0)  # min(sinks, K - 1), as sinks
    h2o = make_policy("h2o", 6)
    assert h2o.kernel_args() == (0, 3)
    h2o.budget = 10  # the training-time budget ramp changes K in place
    assert h2o.kernel_args() == (0, 5)
    assert make_policy("h2o", 6, recent=2).kernel_args() == (0, 2)
