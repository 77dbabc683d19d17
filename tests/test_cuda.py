"""The CUDA paths: Triton scan + compiled FlexAttention in a model, against the CPU-proven
dense path and against token-by-token decoding on the GPU. Skipped without CUDA (the kernels'
random-input tests are in test_kernels.py; the interpreter runs them on the CPU)."""

import pytest
import torch

from conftest import bounded_policies, padded_batch, tiny_model
from msrnn_train import BudgetSpec, apply_budget
from msrnn_train.controller import get_controller
from msrnn_train.fidelity import compare, position_ids_for
from msrnn_train.controller import set_soft_temperature

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
POLICIES = bounded_policies()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("policy", POLICIES)
def test_simulation_equals_bounded_decoding_on_cuda(arch, policy):
    """Teacher forcing on the GPU (Triton scan, compiled FlexAttention) == decoding token by token
    through a BoundedCache on the GPU, held sets identical at every step."""
    model = tiny_model(arch, head_dim=32, hidden_size=128).cuda()
    T = 130
    ids, mask = padded_batch([T, T - 5, T - 13], T, side="left", seed=3)
    spec = BudgetSpec(policy=policy, budget=6)
    apply_budget(model, spec)
    get_controller(model).backend = "flex"  # teacher forcing on flex; cache decoding on dense below
    result = compare(model, ids.cuda(), mask.cuda())
    assert result["held_mismatch"] is None, result["held_mismatch"]
    assert result["max_abs_diff"] < 1e-4, result
    assert max(result["state_sizes"]) <= 6


@pytest.mark.parametrize("policy", bounded_policies(lambda cls: cls.needs_scores))
@pytest.mark.parametrize("soft", [False, True])
def test_gpu_path_equals_cpu_path(policy, soft):
    """Loss and gradients of a training forward: CUDA (Triton scan + flex) vs the CPU (numba
    scan + dense SDPA), same weights and batch, fp32."""
    ids, mask = padded_batch([128, 100], 128, side="right", seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", head_dim=32, hidden_size=128).to(device).train()
        apply_budget(model, BudgetSpec(policy=policy, budget=9))
        if device == "cuda":
            get_controller(model).backend = "flex"
        if soft:
            set_soft_temperature(model, 0.5)
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                     position_ids=position_ids_for(mask).to(device), use_cache=False).loss
        loss.backward()
        out[device] = (loss.item(), torch.cat([p.grad.flatten().cpu() for p in model.parameters()
                                                if p.grad is not None]))
    assert abs(out["cpu"][0] - out["cuda"][0]) < 1e-4
    assert torch.allclose(out["cpu"][1], out["cuda"][1], atol=1e-4, rtol=1e-3)


def test_flex_backend_equals_dense_backend_on_cuda():
    model = tiny_model("llama", head_dim=32, hidden_size=128).cuda()
    ids, mask = padded_batch([256, 200], 256, side="left", seed=8)
    apply_budget(model, BudgetSpec(policy="tova", budget=12))
    ctrl = get_controller(model)
    logits = {}
    with torch.no_grad():
        for backend in ("dense", "flex"):
            ctrl.backend = backend
            logits[backend] = model(input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                    position_ids=position_ids_for(mask).cuda(), use_cache=False).logits
    real = mask.bool().cuda()
    assert (logits["dense"] - logits["flex"]).abs().amax(-1)[real].max() < 1e-4


def test_bf16_training_step_on_cuda():
    model = tiny_model("llama", head_dim=32, hidden_size=128).cuda().train()
    apply_budget(model, BudgetSpec(policy="tova", budget=8))
    get_controller(model).backend = "flex"
    set_soft_temperature(model, 0.3)
    ids = torch.randint(3, 128, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
