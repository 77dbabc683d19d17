"""Fast scans against the torch reference scan, on fresh random inputs."""

import pytest
import torch

from msrnn_train.kernels.cpu_scan import fast_scan
from msrnn_train.policies import make_policy
from msrnn_train.schedule import LogitRows, Slots, scan

POLICIES = ["window", "sinks", "h2o", "tova", "tova_head"]


def _inputs(seed, B=3, Hq=6, Hkv=2, T=70, D=8, P=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, P + T, D, generator=g) * 1.5
    valid = torch.rand(B, T, generator=g) > 0.15  # scattered padding
    valid[0] = True
    valid[1, :9] = False
    order = valid.long().cumsum(-1) - 1
    return q, k, valid, order


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("budget", [1, 3, 8, 25, 100])
@pytest.mark.parametrize("window", [None, 13])
def test_cpu_fast_scan_equals_torch_scan(name, budget, window):
    q, k, valid, order = _inputs(seed=budget + (window or 0))
    policy = make_policy(name, budget)
    groups = k.shape[1] if policy.head_wise else 1
    args = (policy, budget, None, valid, order, torch.arange(valid.shape[1]))
    a = scan(*args[:2], LogitRows(q, k, 0.3, block=16), *args[3:], window=window, groups=groups)
    b = fast_scan(*args[:2], LogitRows(q, k, 0.3, block=16), *args[3:], window=window, groups=groups)
    assert torch.equal(a.evict, b.evict)
    assert torch.equal(a.final.src, b.final.src)
    held = a.final.src >= 0
    for field in ("order", "pos"):
        assert torch.equal(getattr(a.final, field)[held], getattr(b.final, field)[held])
    assert torch.allclose(a.final.acc[held], b.final.acc[held], atol=1e-5)


@pytest.mark.parametrize("name", ["h2o", "tova", "tova_head"])
def test_cpu_fast_scan_continues_from_held_slots(name):
    budget, P = 6, 6
    q, k, valid, order = _inputs(seed=5, P=P, T=20)
    B, Hkv = k.shape[:2]
    policy = make_policy(name, budget)
    groups = Hkv if policy.head_wise else 1
    g = torch.Generator().manual_seed(9)
    src = torch.arange(P).expand(B, groups, P).clone()
    src[2, :, 4:] = -1  # a sequence that holds fewer members
    init = Slots(src=src, order=torch.arange(P).expand(B, groups, P).clone(),
                 pos=torch.arange(P).expand(B, groups, P).clone(), acc=torch.rand(B, groups, P, generator=g))
    a = scan(policy, budget, LogitRows(q, k, 0.3), valid, order + P, torch.arange(P, P + 20), init=init, groups=groups)
    b = fast_scan(policy, budget, LogitRows(q, k, 0.3), valid, order + P, torch.arange(P, P + 20), init=init,
                  groups=groups)
    assert torch.equal(a.evict, b.evict)
