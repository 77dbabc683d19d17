"""The vectorised scan (used by teacher forcing and by the cache) against the spec written as
plain Python sets, on fresh random inputs."""

import pytest
import torch

from conftest import bounded_policies
from msrnn_train.policies import make_policy
from msrnn_train.schedule import (NEVER, LogitRows, Slots, reference_schedule, rolling_schedule, scan,
                                  unbounded_schedule)

POLICIES = bounded_policies()
ROLLING = [name for name in POLICIES if make_policy(name, 4).rolling_sinks() is not None]  # with a closed form


def _random_case(seed, B=3, Hq=4, Hkv=2, T=26, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 2
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    valid = torch.ones(B, T, dtype=torch.bool)
    if B >= 3:
        valid[1, :5] = False  # left padding
        valid[2, T - 4:] = False  # right padding
    return q, k, valid


def _run_scan(policy, budget, q, k, valid, window=None):
    B, T = valid.shape
    groups = k.shape[1] if policy is not None and policy.head_wise else 1
    order = valid.long().cumsum(-1) - 1
    return scan(policy, budget, LogitRows(q, k, 0.35), valid, order, torch.arange(T),
                window=window, groups=groups)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("budget", [1, 2, 5, 11, 40])
@pytest.mark.parametrize("window", [None, 9])
def test_scan_equals_reference(name, budget, window):
    q, k, valid = _random_case(seed=budget * 7 + (window or 0))
    policy = make_policy(name, budget)
    sched = _run_scan(policy, budget, q, k, valid, window)
    ref = reference_schedule(policy, budget, q, k, 0.35, valid, window=window, head_wise=policy.head_wise)
    for b, per_group in enumerate(ref):
        for g, evict in enumerate(per_group):
            got = {j: int(sched.evict[b, g, j]) for j in range(valid.shape[1]) if valid[b, j]}
            assert got == evict, (b, g)
            # padding never occupies a state
            assert all(int(sched.evict[b, g, j]) == -1 for j in range(valid.shape[1]) if not valid[b, j])


@pytest.mark.parametrize("name", POLICIES)
def test_every_step_holds_exactly_min_budget(name):
    budget = 4
    q, k, valid = _random_case(seed=3)
    policy = make_policy(name, budget)
    sched = _run_scan(policy, budget, q, k, valid)
    T = valid.shape[1]
    for t in range(T):
        held = (sched.arrive.view(1, 1, -1) <= t) & (sched.evict > t)
        n_real = valid[:, : t + 1].sum(-1)
        assert torch.equal(held.sum(-1)[:, 0], torch.minimum(n_real, torch.tensor(budget)))


def test_policies_keep_what_they_promise():
    q, k, valid = _random_case(seed=5, B=1)
    valid[:] = True
    T = valid.shape[1]
    # window: always the K most recent
    s = _run_scan(make_policy("window", 4), 4, q, k, valid)
    assert [int(e) for e in s.evict[0, 0]] == [j + 4 for j in range(T - 4)] + [NEVER] * 4
    # sinks: the first 4 never leave, the rest roll through 2 slots
    s = _run_scan(make_policy("sinks", 6, sinks=4), 6, q, k, valid)
    assert all(int(e) == NEVER for e in s.evict[0, 0, :4])
    assert [int(e) for e in s.evict[0, 0, 4:T - 2]] == [j + 2 for j in range(4, T - 2)]
    # h2o: the r = K/2 most recent are never the victim
    s = _run_scan(make_policy("h2o", 6), 6, q, k, valid)
    e = s.evict[0, 0]
    for j in range(T):
        if e[j] != NEVER:
            assert e[j] - j >= 3


def test_tova_drops_the_least_attended():
    # one head, hand-made logits: key 1 is the least attended by query 3
    q = torch.zeros(1, 1, 4, 1)
    k = torch.tensor([0.0, -5.0, 1.0, 2.0]).view(1, 1, 4, 1)
    q[0, 0, 3, 0] = 1.0
    valid = torch.ones(1, 4, dtype=torch.bool)
    s = scan(make_policy("tova", 3), 3, LogitRows(q, k, 1.0), valid, torch.arange(4).view(1, 4), torch.arange(4))
    assert s.evict[0, 0].tolist() == [NEVER, 3, NEVER, NEVER]
    # ties go to the oldest: all-zero queries give equal scores
    q2 = torch.zeros(1, 1, 4, 1)
    s = scan(make_policy("tova", 3), 3, LogitRows(q2, k, 1.0), valid, torch.arange(4).view(1, 4), torch.arange(4))
    assert s.evict[0, 0].tolist() == [3, NEVER, NEVER, NEVER]


def test_unbounded_closed_form_equals_scan():
    q, k, valid = _random_case(seed=9)
    for window in (None, 1, 4, 30):
        a = unbounded_schedule(valid, torch.arange(valid.shape[1]), None, window, 1)
        b = _run_scan(None, None, q, k, valid, window)
        assert torch.equal(a.evict, b.evict), window


def test_scan_continues_from_held_slots():
    """Scanning 26 tokens at once equals scanning 10, keeping the held slots, then 16 more."""
    q, k, valid = _random_case(seed=13)
    policy = make_policy("h2o", 5)
    whole = _run_scan(policy, 5, q, k, valid)
    order = valid.long().cumsum(-1) - 1
    first = scan(policy, 5, LogitRows(q[:, :, :10], k[:, :, :10], 0.35), valid[:, :10], order[:, :10],
                 torch.arange(10))
    held = first.final
    n = held.src.shape[-1]
    keys0 = torch.stack([k[b, :, held.src[b, 0].clamp(min=0)] for b in range(3)])  # (B, Hkv, n, D)
    init = Slots(src=torch.where(held.src >= 0, torch.arange(n), -1), order=held.order, pos=held.pos, acc=held.acc)
    kk = torch.cat([keys0, k[:, :, 10:]], 2)
    second = scan(policy, 5, LogitRows(q[:, :, 10:], kk, 0.35), valid[:, 10:], order[:, 10:],
                  torch.arange(10, 26), init=init)
    # map back: keys evicted in the second call
    for b in range(3):
        for slot in range(n):
            j = int(held.src[b, 0, slot])
            if j >= 0:
                e2 = int(second.evict[b, 0, slot])
                assert int(whole.evict[b, 0, j]) == (e2 + 10 if e2 != NEVER else NEVER)
        for t in range(16):
            e2 = int(second.evict[b, 0, n + t])
            expect = int(whole.evict[b, 0, 10 + t])
            assert (e2 + 10 if e2 >= 0 and e2 != NEVER else e2) == expect


@pytest.mark.parametrize("name", ROLLING)
@pytest.mark.parametrize("budget", [1, 2, 4, 5, 9, 40])
def test_rolling_closed_form_equals_scan(name, budget):
    q, k, valid = _random_case(seed=budget)
    policy = make_policy(name, budget)
    order = valid.long().cumsum(-1) - 1
    fast = rolling_schedule(policy, budget, valid, order)
    slow = _run_scan(policy, budget, q, k, valid)
    assert torch.equal(fast.evict, slow.evict)
