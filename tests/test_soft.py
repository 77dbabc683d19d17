"""Soft-TOVA: converges to the hard process, has the right gradients, stays finite."""

import pytest
import torch

from conftest import bounded_policies, tiny_model
from msrnn_train import BudgetSpec, apply_budget
from msrnn_train.attention import dense_masked_attention
from msrnn_train.flex import flex_masked_attention
from msrnn_train.policies import make_policy
from msrnn_train.schedule import LogitRows, scan
from msrnn_train.controller import set_soft_temperature
from msrnn_train.soft import soft_keep_logits, tau_at
from msrnn_train.trainer import budget_at

RELAXABLE = bounded_policies(lambda cls: cls.relaxable)  # the policies soft mode relaxes


def _case(seed=0, B=2, Hq=4, Hkv=2, T=18, D=8, dtype=torch.float32, name="tova", K=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    valid = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        valid[1, :3] = False
    policy = make_policy(name, K)
    groups = Hkv if policy.head_wise else 1
    sched = scan(policy, K, LogitRows(q, k, D ** -0.5), valid, valid.long().cumsum(-1) - 1, torch.arange(T),
                 groups=groups)
    return q, k, v, valid, sched, groups


@pytest.mark.parametrize("policy", RELAXABLE)
def test_tiny_tau_equals_hard_in_a_model(policy):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    apply_budget(model, BudgetSpec(policy=policy, budget=5))
    with torch.no_grad():
        hard = model(ids, use_cache=False).logits
        set_soft_temperature(model, 1e-6)
        tiny = model(ids, use_cache=False).logits
        set_soft_temperature(model, 1.0)
        warm = model(ids, use_cache=False).logits
    assert (hard - tiny).abs().max() < 1e-4
    assert (hard - warm).abs().max() > 1e-3  # the relaxation really changes the forward at tau = 1


def test_soft_mask_converges_monotonically():
    q, k, v, valid, sched, groups = _case()
    hard = dense_masked_attention(q, k, v, sched, valid, 8 ** -0.5, 0.0, groups)
    diffs = []
    for tau in (1.0, 0.1, 0.01, 1e-6):
        keep = soft_keep_logits(q, k, 8 ** -0.5, sched, valid, groups, tau)
        soft = dense_masked_attention(q, k, v, sched, valid, 8 ** -0.5, 0.0, groups, soft_keep=keep)
        diffs.append((soft - hard)[valid.unsqueeze(-1).unsqueeze(-1).expand_as(soft)].abs().max().item())
    assert diffs == sorted(diffs, reverse=True) and diffs[-1] < 1e-5 and diffs[0] > 1e-3


@pytest.mark.parametrize("name", RELAXABLE)
def test_keep_logits_gradient_matches_finite_differences(name):
    q, k, _, valid, sched, groups = _case(dtype=torch.float64, T=10, K=3, name=name)
    fixed = soft_keep_logits(q, k, 8 ** -0.5, sched, valid, groups, 0.5)
    finite = torch.isfinite(fixed)
    assert finite.sum() > 5  # there are evicted keys to check
    weights = torch.randn(fixed.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(qq, kk):
        keep = soft_keep_logits(qq, kk, 8 ** -0.5, sched, valid, groups, 0.5)
        return (torch.where(finite, keep, 0.0) * weights).sum()

    assert torch.autograd.gradcheck(f, (q.clone().requires_grad_(), k.clone().requires_grad_()), eps=1e-6, atol=1e-6)


def test_gradient_reaches_the_query_that_decided_the_eviction():
    q, k, v, valid, sched, groups = _case(B=1, T=12, K=3)
    scale = 8 ** -0.5
    evicted_at = int(sched.evict[0, 0, 0])  # key 0 leaves at this step
    assert 0 <= evicted_at < 11
    grads = {}
    for mode in ("hard", "soft"):
        qq = q.clone().requires_grad_()
        keep = soft_keep_logits(qq, k, scale, sched, valid, groups, 0.5) if mode == "soft" else None
        out = dense_masked_attention(qq, k, v, sched, valid, scale, 0.0, groups, soft_keep=keep)
        out[:, evicted_at + 1:].sum().backward()  # only queries after the eviction
        grads[mode] = qq.grad[0, :, evicted_at].abs().sum().item()
    assert grads["hard"] == 0.0  # the hard process is a step function of that query
    assert grads["soft"] > 1e-6


def test_gradients_finite_when_a_row_keeps_only_itself():
    for tau in (None, 1.0, 1e-3):
        model = tiny_model("llama").train()
        apply_budget(model, BudgetSpec(policy="tova", budget=1))
        set_soft_temperature(model, tau)
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
        loss.backward()
        assert torch.isfinite(loss)
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("soft", [False, True])
def test_flex_backend_equals_dense_reference(soft):
    q, k, v, valid, sched, groups = _case(T=33, K=6)
    keep = soft_keep_logits(q, k, 8 ** -0.5, sched, valid, groups, 0.3) if soft else None
    dense = dense_masked_attention(q, k, v, sched, valid, 8 ** -0.5, 0.0, groups, soft_keep=keep)
    flex = flex_masked_attention(q, k, v, sched, valid, 8 ** -0.5, groups, soft_keep=keep)
    assert (dense - flex).abs().max() < 1e-5


def test_schedules():
    taus = [tau_at(s, 100, 1.0, 0.01) for s in range(100)]
    assert taus[0] == pytest.approx(1.0) and taus[-1] is None
    finite = [t for t in taus if t is not None]
    assert finite == sorted(finite, reverse=True) and len(finite) == 90 and finite[-1] > 0.01
    ks = [budget_at(s, 100, 512, 64) for s in range(100)]
    assert ks[0] == 512 and ks[49] > 64 and ks[50:] == [64] * 50 and ks == sorted(ks, reverse=True)


@pytest.mark.parametrize("name,soft,init", [("tova", False, False), ("tova_head", True, False),
                                            ("h2o", False, True), ("tova", True, False)])
def test_schedule_block_mask_against_create_block_mask(name, soft, init):
    """The O(S) block mask from the schedule vs mask_mod evaluated everywhere (create_block_mask):
    every block the reference finds non-empty is there, and every block called full is full."""
    from msrnn_train.flex import reference_block_mask, schedule_block_mask
    from msrnn_train.schedule import Slots

    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, T, D, K, P = 2, 4, 2, 100, 8, 40, (12 if init else 0)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, P + T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :7] = False
    valid[0, 50:53] = False
    policy = make_policy(name, K)
    groups = Hkv if policy.head_wise else 1
    start = None
    if init:
        start = Slots(src=torch.arange(P).expand(B, groups, P).clone(), order=torch.arange(P).expand(B, groups, P).clone(),
                      pos=torch.arange(P).expand(B, groups, P).clone(), acc=torch.rand(B, groups, P, generator=g))
    order = (valid.long().cumsum(-1) - 1) + P
    sched = scan(policy, K, LogitRows(q, k, 0.3), valid, order, torch.arange(P, P + T), init=start, groups=groups)
    kept = (torch.rand(B, groups, P + T, generator=g) > 0.5) & (sched.evict >= 0) & (sched.evict < T) if soft else None
    per_group = Hq // groups
    S = P + T

    def mask_mod(b, h, q_idx, kv_idx):
        gg = h // per_group if groups > 1 else 0
        e = sched.evict[b, gg, kv_idx]
        seen = (sched.arrive[kv_idx] <= q_idx) & (q_idx <= e)
        seen = seen | ((~valid)[b, q_idx] & (kv_idx == q_idx + P))
        if kept is not None:
            seen = seen | ((q_idx > e) & (e >= 0) & kept[b, gg, kv_idx])
        return seen

    mine = schedule_block_mask(sched, valid, mask_mod, kept=kept, block=16, heads=Hq)
    ref = reference_block_mask(mask_mod, B, Hq if groups > 1 else None, T, S, "cpu", block=16)
    dense_mine, dense_ref = mine.to_dense().bool(), ref.to_dense().bool()
    assert (dense_ref & ~dense_mine).sum() == 0  # nothing visible is skipped
    # blocks called full really are: mask_mod true on every element
    vis = torch.zeros(B, mine.kv_num_blocks.shape[1], T, S, dtype=torch.bool)
    bb, hh, tt, jj = torch.meshgrid(torch.arange(B), torch.arange(vis.shape[1]), torch.arange(T), torch.arange(S),
                                    indexing="ij")
    vis = mask_mod(bb, hh, tt, jj)
    nq = -(-T // 16)
    for b in range(B):
        for h in range(vis.shape[1]):
            for qi in range(nq):
                for n in range(int(mine.full_kv_num_blocks[b, h, qi])):
                    kj = int(mine.full_kv_indices[b, h, qi, n])
                    assert vis[b, h, qi * 16:(qi + 1) * 16, kj * 16:(kj + 1) * 16].all(), (b, h, qi, kj)
    assert int(mine.full_kv_num_blocks.sum()) > 0  # the test exercises full blocks
    # fewer partial blocks than non-empty ones: the full ones skip mask_mod
    assert int(mine.kv_num_blocks.sum()) < int(dense_mine.sum())


@pytest.mark.parametrize("soft", [False, True])
def test_flex_with_small_blocks_equals_dense(soft):
    """Many blocks (16 x 16) so that full, partial and empty blocks all occur."""
    q, k, v, valid, sched, groups = _case(T=90, K=7, name="tova_head" if soft else "tova")
    keep = soft_keep_logits(q, k, 8 ** -0.5, sched, valid, groups, 0.3) if soft else None
    dense = dense_masked_attention(q, k, v, sched, valid, 8 ** -0.5, 0.0, groups, soft_keep=keep)
    flex = flex_masked_attention(q, k, v, sched, valid, 8 ** -0.5, groups, soft_keep=keep, block=16)
    real = valid.view(valid.shape[0], valid.shape[1], 1, 1).expand_as(dense)
    assert (dense - flex)[real].abs().max() < 1e-5


def _sparse_case(seed, name, B=3, Hq=6, Hkv=2, T=70, D=8, K=9, dtype=torch.float64, scan_fn=None):
    """Random inputs with scattered and left padding, the schedule with the scan's SoftRows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype) * 1.5
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) * 1.5
    valid = torch.rand(B, T, generator=g) > 0.15
    valid[0] = True
    valid[1, :9] = False
    policy = make_policy(name, K)
    groups = Hkv if policy.head_wise else 1
    sched = (scan_fn or scan)(policy, K, LogitRows(q, k, D ** -0.5, block=16), valid, valid.long().cumsum(-1) - 1,
                              torch.arange(T), groups=groups, soft_rows=True)
    return q, k, valid, sched, groups


@pytest.mark.parametrize("name,shape", [("tova", {}), ("tova_head", {}), ("tova", {"Hq": 4, "Hkv": 4}),
                                        ("tova_head", {"Hq": 8, "Hkv": 4, "K": 20})])
@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_sparse_keep_logits_equal_dense_values_and_gradients(name, shape, tau):
    """soft_keep_sparse (scan outputs + gathered products, O(T H d)) against the dense reference:
    the same keys get a keep-logit, the same values, the same gradients in query and key."""
    from msrnn_train.soft import soft_keep_sparse

    K = shape.pop("K", 9)
    q, k, valid, sched, groups = _sparse_case(7 + len(shape), name, K=K, **shape)
    # the scan's normalisers are fp32: check them against fp64 ones, then use those (the rest is fp64)
    vis = sched.visible(valid).repeat_interleave(q.shape[1] // groups, dim=1)
    kh = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    lse64 = torch.logsumexp((q @ kh.transpose(-1, -2) * 8 ** -0.5).masked_fill(~vis, -torch.inf), dim=-1)
    rows = sched.soft.lse != 0
    assert rows.sum() > 30 and torch.allclose(sched.soft.lse[rows].double(), lse64[rows], atol=1e-5)
    sched.soft.lse = torch.where(rows, lse64, 0.0)
    wts = torch.randn(sched.evict.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = {}
    for path in ("dense", "sparse"):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        if path == "dense":
            keep = soft_keep_logits(qq, kk, 8 ** -0.5, sched, valid, groups, tau)
        else:
            keep = soft_keep_sparse(qq, kk, 8 ** -0.5, sched, groups, tau, budget=K, block=16)
        (torch.where(torch.isfinite(keep), keep, 0.0) * wts).sum().backward()
        out[path] = keep.detach(), qq.grad, kk.grad
    (kd, gqd, gkd), (ks, gqs, gks) = out["dense"], out["sparse"]
    assert torch.equal(torch.isfinite(kd), torch.isfinite(ks))
    assert int(torch.isfinite(ks).sum()) > 30  # many evictions are checked
    fin = torch.isfinite(kd)
    assert torch.allclose(ks[fin], kd[fin], rtol=1e-10, atol=1e-10)
    assert gqd.abs().max() > 1e-2
    assert torch.allclose(gqs, gqd, rtol=1e-9, atol=1e-10) and torch.allclose(gks, gkd, rtol=1e-9, atol=1e-10)


def test_scans_emit_the_same_soft_rows():
    """Torch scan and the numba scan emit the same runner-ups and normalisers."""
    from msrnn_train.kernels.cpu_scan import fast_scan

    for name in RELAXABLE:
        _, _, _, a, _ = _sparse_case(5, name, dtype=torch.float32)
        _, _, _, b, _ = _sparse_case(5, name, dtype=torch.float32, scan_fn=fast_scan)
        assert torch.equal(a.evict, b.evict) and torch.equal(a.soft.runner, b.soft.runner)
        assert (a.soft.runner >= 0).sum() > 30
        assert torch.allclose(a.soft.lse, b.soft.lse, atol=1e-5)
        # every policy victim has a runner-up evicted later or still held, never before it
        v = a.soft.runner >= 0
        e_run = a.evict.gather(2, a.soft.runner.clamp_min(0))
        assert (e_run[v] > a.evict[v]).all()


@pytest.mark.parametrize("policy", RELAXABLE)
def test_model_soft_step_sparse_equals_dense(policy):
    """A training forward/backward in soft mode: the sparse keep-logits (the default) give the
    dense reference's loss and gradients; the sparse one really runs (the scan emitted SoftRows)."""
    from msrnn_train.controller import get_controller, record_schedules

    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    res = {}
    for path in ("dense", "sparse"):
        model = tiny_model("llama").train()
        apply_budget(model, BudgetSpec(policy=policy, budget=6))
        set_soft_temperature(model, 0.3)
        get_controller(model).soft_path = path
        with record_schedules(model) as rec:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                         use_cache=False).loss
        loss.backward()
        assert all((s.soft is not None) == (path == "sparse") for v in rec.values() for s in v)
        res[path] = loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert abs(res["dense"][0] - res["sparse"][0]) < 1e-5
    for a, b in zip(res["dense"][1], res["sparse"][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_soft_path_env(monkeypatch):
    from msrnn_train.controller import BudgetError, get_controller

    monkeypatch.setenv("MSRNN_SOFT", "dense")
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="tova", budget=4))
    assert get_controller(model).soft_path == "dense"
    monkeypatch.setenv("MSRNN_SOFT", "fast")
    with pytest.raises(BudgetError, match="MSRNN_SOFT"):
        apply_budget(tiny_model("llama"), BudgetSpec(policy="tova", budget=4))


@pytest.mark.parametrize("soft", [False, True])
def test_flex_block_mask_built_once_per_schedule(soft, monkeypatch):
    """The block mask is cached with the schedule: a second call on the same schedule (gradient
    checkpointing's recompute) reuses it, with the same output."""
    import msrnn_train.flex as flex

    q, k, v, valid, sched, groups = _case(T=40, K=6, name="tova_head" if soft else "tova")
    keep = soft_keep_logits(q, k, 8 ** -0.5, sched, valid, groups, 0.3) if soft else None
    built = []
    real_build = flex.schedule_block_mask
    monkeypatch.setattr(flex, "schedule_block_mask", lambda *a, **kw: built.append(1) or real_build(*a, **kw))
    first = flex_masked_attention(q, k, v, sched, valid, 8 ** -0.5, groups, soft_keep=keep, block=16)
    again = flex_masked_attention(q, k, v, sched, valid, 8 ** -0.5, groups, soft_keep=keep, block=16)
    assert len(built) == 1 and torch.equal(first, again)
    dense = dense_masked_attention(q, k, v, sched, valid, 8 ** -0.5, 0.0, groups, soft_keep=keep)
    real = valid.view(valid.shape[0], valid.shape[1], 1, 1).expand_as(dense)
    assert (dense - again)[real].abs().max() < 1e-5
