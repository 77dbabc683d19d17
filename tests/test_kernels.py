"""Fast scans against the torch reference scan, on fresh random inputs."""

import pytest
import torch

from conftest import bounded_policies
from msrnn_train.kernels.cpu_scan import fast_scan
from msrnn_train.policies import make_policy
from msrnn_train.schedule import LogitRows, Slots, scan

POLICIES = bounded_policies()
SCORED = bounded_policies(lambda cls: cls.needs_scores)  # those whose choice reads attention scores


def _inputs(seed, B=3, Hq=6, Hkv=2, T=70, D=8, P=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, P + T, D, generator=g) * 1.5
    valid = torch.rand(B, T, generator=g) > 0.15  # scattered padding
    valid[0] = True
    if B > 1:
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
    extra = _carried(policy, valid.shape[0], groups, valid.shape[1], seed=budget)
    a = scan(*args[:2], LogitRows(q, k, 0.3, block=16), *args[3:], window=window, groups=groups, **extra)
    b = fast_scan(*args[:2], LogitRows(q, k, 0.3, block=16), *args[3:], window=window, groups=groups, **extra)
    assert torch.equal(a.evict, b.evict)
    assert torch.equal(a.final.src, b.final.src)
    held = a.final.src >= 0
    for field in ("order", "pos"):
        assert torch.equal(getattr(a.final, field)[held], getattr(b.final, field)[held])
    assert torch.allclose(a.final.acc[held], b.final.acc[held], atol=1e-5)
    if policy.relaxable:  # soft mode's outputs: same schedule, same SoftRows
        a2 = scan(*args[:2], LogitRows(q, k, 0.3, block=16), *args[3:], window=window, groups=groups, soft_rows=True)
        b2 = fast_scan(*args[:2], LogitRows(q, k, 0.3, block=16), *args[3:], window=window, groups=groups,
                       soft_rows=True)
        _same_schedule(a, a2)
        _same_soft_rows(a2, b2)


def _carried(policy, B, groups, T, seed=0):
    """A policy that `carries_value` (the learned ones): a fresh random value per new token, as
    its scorer would write; {} for the others."""
    if not policy.carries_value:
        return {}
    g = torch.Generator().manual_seed(100 + seed)
    return {"new_value": policy.carried_value(torch.randn(B, groups, T, generator=g) * 3)}


def _same_soft_rows(a, b):
    assert torch.equal(a.soft.runner.cpu(), b.soft.runner.cpu())
    assert torch.allclose(a.soft.lse.cpu(), b.soft.lse.cpu(), atol=1e-5)
    # a runner-up exactly for the policy's victims: evicted at that step, by the policy
    victims = a.soft.runner.cpu() >= 0
    evict = a.evict.cpu()
    assert (evict[victims] >= 0).all() and (evict[victims] < a.arrive.numel()).all()
    # the runner-up stays at least to the end of that step (the sliding window may drop it then)
    assert (evict.gather(2, a.soft.runner.cpu().clamp_min(0))[victims] >= evict[victims]).all()


@pytest.mark.parametrize("name", SCORED + bounded_policies(lambda cls: cls.carries_value))
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
    extra = _carried(policy, B, groups, 20)
    if extra:  # a carried value per held member too (acc: decay's log sigmoid is <= 0)
        init.acc = policy.carried_value(torch.randn(B, groups, P, generator=g) * 3)
    a = scan(policy, budget, LogitRows(q, k, 0.3), valid, order + P, torch.arange(P, P + 20), init=init, groups=groups,
             **extra)
    b = fast_scan(policy, budget, LogitRows(q, k, 0.3), valid, order + P, torch.arange(P, P + 20), init=init,
                  groups=groups, **extra)
    assert torch.equal(a.evict, b.evict)


# ------------------------------------------------------------------------------------------
# The Triton kernel (kernels/triton_scan.py): on CUDA when there is a GPU; on the CPU through
# Triton's interpreter (TRITON_INTERPRET=1) when triton is installed, so the kernel's logic is
# exercised by the CPU suite too. Without either the tests skip.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_backend():
    import importlib.util
    import os

    if torch.cuda.is_available():
        pytest.importorskip("triton")
        from msrnn_train.kernels.triton_scan import triton_scan

        return triton_scan, "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        pytest.skip("needs CUDA, or the CPU under TRITON_INTERPRET=1 (test_triton_kernel_under_interpreter runs these)")
    import triton.runtime.interpreter as interp

    # NumPy >= 2.3 refuses int() of a 1-element array, which the interpreter of triton < 3.7 does
    # for loop bounds (later versions squeeze first): give it the single element instead
    scope = getattr(interp, "_LangPatchScope", None)
    if scope is not None and hasattr(scope, "set_attr"):
        orig_set_attr = scope.set_attr

        def set_attr(self, obj, name, value):
            if name == "__index__":
                value = lambda t: int(t.handle.data.reshape(-1)[0])  # noqa: E731
            return orig_set_attr(self, obj, name, value)

        scope.set_attr = set_attr
    from msrnn_train.kernels.triton_scan import triton_scan

    return triton_scan, "cpu"


@pytest.mark.slow  # 25-35 s on 2 CPU cores: a fresh process runs the Triton kernel's tests interpreted
def test_triton_kernel_under_interpreter():
    """The CPU suite runs the Triton kernel's tests through Triton's interpreter, in a fresh
    process (TRITON_INTERPRET must be set before triton is first imported)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("on CUDA the kernel tests run compiled")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel tests run interpreted in this process already")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'msrnn-train[dev]' brings it on Linux x86-64)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "triton_scan_equals or triton_scan_continues"],
                          capture_output=True, text=True, env=env, timeout=1800)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    n = len(TRITON_CASES) + len(SCORED)
    assert f"{n} passed" in proc.stdout, tail


def _same_schedule(a, b):
    assert torch.equal(a.evict.cpu(), b.evict.cpu())
    assert torch.equal(a.final.src.cpu(), b.final.src.cpu())
    held = a.final.src.cpu() >= 0
    for field in ("order", "pos"):
        assert torch.equal(getattr(a.final, field).cpu()[held], getattr(b.final, field).cpu()[held])
    assert torch.allclose(a.final.acc.cpu()[held], b.final.acc.cpu()[held], atol=1e-5)


TRITON_CASES = [  # (policy, budget, window, shape)
    ("tova", 8, None, {}), ("tova", 1, 13, {}), ("tova", 25, None, {"Hq": 8, "Hkv": 8}),
    ("tova_head", 3, None, {}), ("tova_head", 8, 13, {"Hq": 8, "Hkv": 4}),
    ("h2o", 8, None, {}), ("h2o", 3, 13, {"B": 1}), ("h2o", 25, None, {"Hq": 4, "Hkv": 1}),
    ("sinks", 8, 13, {}), ("window", 3, None, {}), ("tova", 100, None, {}),
]


@pytest.mark.parametrize("name,budget,window,shape", TRITON_CASES)
def test_triton_scan_equals_torch_scan(triton_backend, name, budget, window, shape):
    triton_scan, device = triton_backend
    seed = budget * 7 + (window or 0) + len(shape)
    q, k, valid, order = _inputs(seed=seed, **{"T": 60, **shape})
    q, k, valid, order = q.to(device), k.to(device), valid.to(device), order.to(device)
    policy = make_policy(name, budget)
    groups = k.shape[1] if policy.head_wise else 1
    pos = torch.arange(valid.shape[1], device=device)
    a = scan(policy, budget, LogitRows(q, k, 0.3, block=16), valid, order, pos, window=window, groups=groups)
    b = triton_scan(policy, budget, LogitRows(q, k, 0.3, block=16), valid, order, pos, window=window,
                    groups=groups)
    _same_schedule(a, b)
    if policy.relaxable:  # soft mode's outputs
        a2 = scan(policy, budget, LogitRows(q, k, 0.3, block=16), valid, order, pos, window=window, groups=groups,
                  soft_rows=True)
        b2 = triton_scan(policy, budget, LogitRows(q, k, 0.3, block=16), valid, order, pos, window=window,
                         groups=groups, soft_rows=True)
        _same_schedule(a, b2)
        _same_soft_rows(a2, b2)


@pytest.mark.parametrize("name", SCORED)
def test_triton_scan_continues_from_held_slots(triton_backend, name):
    triton_scan, device = triton_backend
    budget, P, T = 6, 6, 20
    q, k, valid, order = _inputs(seed=11, P=P, T=T)
    B, Hkv = k.shape[:2]
    policy = make_policy(name, budget)
    groups = Hkv if policy.head_wise else 1
    g = torch.Generator().manual_seed(9)
    src = torch.arange(P).expand(B, groups, P).clone()
    src[2, :, 4:] = -1
    init = Slots(src=src, order=torch.arange(P).expand(B, groups, P).clone(),
                 pos=torch.arange(P).expand(B, groups, P).clone(), acc=torch.rand(B, groups, P, generator=g))
    init = Slots(*(x.to(device) for x in (init.src, init.order, init.pos, init.acc)))
    q, k, valid, order = q.to(device), k.to(device), valid.to(device), order.to(device)
    pos = torch.arange(P, P + T, device=device)
    a = scan(policy, budget, LogitRows(q, k, 0.3), valid, order + P, pos, init=init, groups=groups)
    b = triton_scan(policy, budget, LogitRows(q, k, 0.3), valid, order + P, pos, init=init, groups=groups)
    _same_schedule(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SCORED)
def test_triton_scan_large_random_inputs_cuda(name):
    """Realistic sizes on the GPU: T = 1024, K = 128, 32 query / 8 KV heads, d = 64, batch 2,
    left padding; bf16 queries/keys as in training (scores are fp32 either way)."""
    from msrnn_train.kernels.triton_scan import triton_scan

    g = torch.Generator(device="cuda").manual_seed(123)
    B, Hq, Hkv, T, D, K = 2, 32, 8, 1024, 64, 128
    q = torch.randn(B, Hq, T, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    valid = torch.ones(B, T, dtype=torch.bool, device="cuda")
    valid[1, :100] = False
    order = valid.long().cumsum(-1) - 1
    policy = make_policy(name, K)
    groups = Hkv if policy.head_wise else 1
    pos = torch.arange(T, device="cuda")
    a = scan(policy, K, LogitRows(q, k, D ** -0.5), valid, order, pos, groups=groups)
    b = triton_scan(policy, K, LogitRows(q, k, D ** -0.5), valid, order, pos, groups=groups)
    _same_schedule(a, b)
    if policy.relaxable:
        a2 = scan(policy, K, LogitRows(q, k, D ** -0.5), valid, order, pos, groups=groups, soft_rows=True)
        b2 = triton_scan(policy, K, LogitRows(q, k, D ** -0.5), valid, order, pos, groups=groups, soft_rows=True)
        _same_schedule(a, b2)
        _same_soft_rows(a2, b2)


def test_default_scan_choice(monkeypatch):
    from msrnn_train.kernels import default_scan

    monkeypatch.setenv("MSRNN_SCAN", "torch")
    assert default_scan("cpu") is scan
    monkeypatch.setenv("MSRNN_SCAN", "numba")
    assert default_scan("cpu") is fast_scan
    monkeypatch.setenv("MSRNN_SCAN", "fast")
    with pytest.raises(ValueError, match="MSRNN_SCAN"):
        default_scan("cpu")
    monkeypatch.delenv("MSRNN_SCAN")
    assert default_scan("cpu") is fast_scan
