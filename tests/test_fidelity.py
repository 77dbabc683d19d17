"""The heart of the product: teacher-forced simulation == token-by-token decoding through a
physically bounded cache, for every policy, budget, architecture and padding."""

from types import SimpleNamespace

import pytest
import torch

from conftest import bounded_policies, padded_batch, tiny_config, tiny_model
from msrnn_train.compat import cache_kwargs
from msrnn_train import BudgetError, BudgetSpec, apply_budget, make_cache, remove_budget
from msrnn_train.fidelity import compare, decode_token_by_token, position_ids_for, teacher_forced

POLICIES = bounded_policies()
ARCHS = ["llama", "mistral", "qwen2", "gemma3"]  # mistral, gemma3: the model's own sliding window too
T = 20
BUDGETS = [1, 3, 8, 64]  # 1, small, medium, larger than the sequence


def _check(model, spec, ids, mask, prompt_len=0):
    apply_budget(model, spec)
    result = compare(model, ids, mask, prompt_len=prompt_len)
    assert result["max_abs_diff"] < 1e-4, result
    assert result["held_mismatch"] is None, result["held_mismatch"]
    for layer, size in enumerate(result["state_sizes"]):
        k = spec.layer_budget(layer)
        if k is not None:
            assert size <= k, (layer, size, k)
    return result


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_simulation_equals_bounded_decoding_padded_batch(arch, policy, budget):
    model = tiny_model(arch)
    side = "left" if budget % 2 else "right"
    ids, mask = padded_batch([T, T - 4, T - 9], T, side=side, seed=budget)
    _check(model, BudgetSpec(policy=policy, budget=budget), ids, mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", POLICIES)
def test_hybrid_with_one_full_layer(arch, policy):
    model = tiny_model(arch)
    ids, mask = padded_batch([T, T - 5, T - 2], T, side="left", seed=3)
    spec = BudgetSpec(policy=policy, budget=[4, None, 2])
    result = _check(model, spec, ids, mask)
    assert result["state_sizes"][1] > 4  # the full layer really holds more


def test_gemma3_sliding_layers_drop_keys_leaving_their_window():
    """Gemma-3's sliding layers (window 5 in the tiny config: a query sees itself and 4 earlier keys)
    combine with the budget: with K = 64 > T they hold 4 keys, the global layer all T."""
    model = tiny_model("gemma3")
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    ids, mask = padded_batch([T, T], T, seed=2)
    result = _check(model, BudgetSpec(policy="tova", budget=64), ids, mask)
    assert result["state_sizes"] == [4, T, 4]
    result = _check(model, BudgetSpec(policy="tova", budget=[3, 8, 6]), ids, mask)
    assert result["state_sizes"] == [3, 8, 4]
    with pytest.raises(BudgetError, match="bidirectional"):
        apply_budget(tiny_model("gemma3", use_bidirectional_attention=True), BudgetSpec(policy="tova", budget=4))


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_at_once_then_token_by_token(policy):
    model = tiny_model("llama")
    ids, mask = padded_batch([T, T - 3, T - 7], T, side="left", seed=5)
    apply_budget(model, BudgetSpec(policy=policy, budget=5))
    once, _, _ = decode_token_by_token(model, ids, mask, prompt_len=11, track_held=False)
    each, _, _ = decode_token_by_token(model, ids, mask, prompt_len=0, track_held=False)
    real = mask.bool()
    assert (once - each).abs().amax(-1)[real].max() < 1e-4
    _check(model, BudgetSpec(policy=policy, budget=5), ids, mask, prompt_len=11)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_policy_gives_the_unmodified_model(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch([T, T - 6, T - 1], T, side="left", seed=7)
    pos = position_ids_for(mask)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        base_nopad = model(input_ids=ids[:1], use_cache=False).logits
        apply_budget(model, BudgetSpec(policy="full"))
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        full_nopad = model(input_ids=ids[:1], use_cache=False).logits
        unbounded_list = apply_budget(model, BudgetSpec(policy="tova", budget=[None] * 3))
        hybrid_none = unbounded_list(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    real = mask.bool()
    assert (base - full).abs().amax(-1)[real].max() < 1e-5
    assert (base_nopad - full_nopad).abs().max() < 1e-5
    assert (base - hybrid_none).abs().amax(-1)[real].max() < 1e-5
    remove_budget(model)
    with torch.no_grad():
        again = model(input_ids=ids[:1], use_cache=False).logits
    assert torch.equal(again, base_nopad)


def test_budget_changes_the_output_and_large_budget_does_not():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        apply_budget(model, BudgetSpec(policy="tova", budget=T))
        big = model(ids, use_cache=False).logits
        apply_budget(model, BudgetSpec(policy="tova", budget=3))
        small = model(ids, use_cache=False).logits
    assert (base - big).abs().max() < 1e-5
    assert (base - small).abs().max() > 1e-2
    assert (base[:, :3] - small[:, :3]).abs().max() < 1e-5  # the first K+1 queries see everything


def test_generate_uses_a_bounded_cache_and_matches_manual_greedy():
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="tova", budget=4))
    ids, mask = padded_batch([8, 5], 8, side="left", seed=11)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    cache = make_cache(model)
    out2 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=None, **cache_kwargs(cache))
    assert torch.equal(out, out2)
    assert max(cache.state_sizes()) <= 4
    # manual greedy decoding with teacher forcing over the growing sequence gives the same tokens
    seq, m = ids, mask
    for _ in range(12):
        logits, _ = teacher_forced(model, seq, m)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        m = torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(seq, out)


def test_cache_never_grows_past_budget():
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="h2o", budget=6))
    cache = make_cache(model)
    ids = torch.randint(3, 128, (2, 1))
    sizes = []
    with torch.no_grad():
        for t in range(40):
            seen_keys = []
            for layer in cache.layers:
                if layer.keys is not None:
                    seen_keys.append(layer.keys.shape[-2])
            out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
            ids = out.logits[:, -1:].argmax(-1)
            sizes.append(max(cache.state_sizes()))
    assert max(sizes) == 6 and cache.get_seq_length() == 40


def test_non_bounded_cache_is_refused():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        dyn = DynamicCache(config=model.config)
        model(input_ids=ids, **cache_kwargs(dyn), use_cache=True)
        apply_budget(model, BudgetSpec(policy="tova", budget=3))
        with pytest.raises(ValueError, match="make_cache"):
            model(input_ids=ids[:, :1], **cache_kwargs(dyn), use_cache=True)


def test_gradient_checkpointing_reuses_the_schedule():
    from msrnn_train.controller import get_controller

    grads = {}
    for ckpt in (False, True):
        model = tiny_model("llama").train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_budget(model, BudgetSpec(policy="tova", budget=4))
        ctrl = get_controller(model)
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert ctrl.scans == model.config.num_hidden_layers  # once per layer, not again in backward
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[False], grads[True], atol=1e-5)


def test_bad_specs_fail_clearly():
    with pytest.raises(BudgetError, match="policy.*allowed: full, window, sinks"):
        BudgetSpec(policy="lru", budget=8).validate()
    with pytest.raises(BudgetError, match="budget.*>= 1"):
        BudgetSpec(policy="tova", budget=0).validate()
    with pytest.raises(BudgetError, match="budget.*integer"):
        BudgetSpec(policy="tova", budget="many").validate()
    with pytest.raises(BudgetError, match="3 layers, the list has 2"):
        BudgetSpec(policy="tova", budget=[4, 4]).validate_for(tiny_config())
    # a config whose 6 query heads do not split over 4 key/value heads
    odd = SimpleNamespace(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(BudgetError, match="head-wise.*divide"):
        BudgetSpec(policy="tova_head", budget=8).validate_for(odd)
    BudgetSpec(policy="tova", budget=8).validate_for(odd)  # layer-wise is fine
    with pytest.raises(BudgetError, match="recent"):
        BudgetSpec(policy="h2o", budget=4, recent=9).validate()
    model = tiny_model("llama")
    with pytest.raises(BudgetError):
        apply_budget(model, BudgetSpec(policy="tova", budget=[4, 4]))
    with pytest.raises(BudgetError, match="unknown budget key"):
        BudgetSpec.from_dict({"policy": "tova", "budgett": 3})


def test_spec_round_trip(tmp_path):
    spec = BudgetSpec(policy="h2o", budget={"0": None, "default": 16}, recent=4)
    spec.save(tmp_path)
    again = BudgetSpec.load(tmp_path)
    assert again == spec
    assert [again.layer_budget(i) for i in range(3)] == [None, 16, 16]


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    """The real model in float64: the process is compared exactly, free of fp32 rounding (the
    unmodified model's own teacher-forced vs. cached-decoding difference in fp32 is ~1e-4)."""
    import copy

    model, tokenizer = smollm2
    return copy.deepcopy(model).to(torch.float64), tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_real_smollm2_fidelity(smollm2_f64, policy):
    model, tokenizer = smollm2_f64
    texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             "Of Man's first disobedience, and the fruit of that forbidden tree",
             "Now is the winter of our discontent made glorious summer"]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_layers = model.config.num_hidden_layers
    for budget in [1, 5, 12, 100]:
        _check(model, BudgetSpec(policy=policy, budget=budget), ids, mask)
    hybrid = [6] * n_layers
    hybrid[n_layers // 2] = None
    _check(model, BudgetSpec(policy=policy, budget=hybrid), ids, mask)
    remove_budget(model)
