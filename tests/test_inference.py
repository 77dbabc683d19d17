"""Inference in constant memory: chunked prefill equals one-token-at-a-time decoding, the
decoding step in the K + 1 slot buffer equals the reference scan, the cache never holds more than
K states, and batched generate() equals per-sequence generation."""

import pytest
import torch

from conftest import padded_batch, tiny_model
from msrnn_train.compat import cache_kwargs
from msrnn_train import POLICIES, BudgetError, BudgetSpec, apply_budget, make_cache, remove_budget
from msrnn_train import attention as attention_mod
from msrnn_train.fidelity import decode_token_by_token, position_ids_for
from msrnn_train.policies import make_policy
from msrnn_train.schedule import LogitRows, decode_step, scan

BOUNDED = [name for name in POLICIES if name != "full"]
ARCHS = ["llama", "mistral", "qwen2"]  # GQA (4 query heads, 2 key/value heads); mistral adds its sliding window
T, K = 20, 5


# --------------------------------------------------------------- the decoding step vs the scan
@pytest.mark.parametrize("policy_name", BOUNDED)
@pytest.mark.parametrize("window", [None, 6])
def test_decode_step_in_a_buffer_equals_the_scan(policy_name, window):
    """Fresh random queries/keys: stepping `decode_step` over K + 1 fixed slots holds, after
    every step, exactly the members the reference `scan` holds."""
    g = torch.Generator().manual_seed(hash((policy_name, window)) % 1000)
    B, Hq, Hkv, D, steps, budget = 3, 4, 2, 8, 24, 4
    policy = make_policy(policy_name, budget)
    groups = Hkv if policy.head_wise else 1
    q = torch.randn(B, Hq, steps, D, generator=g)
    k = torch.randn(B, Hkv, steps, D, generator=g)
    valid = torch.rand(B, steps, generator=g) > 0.2
    order = valid.long().cumsum(-1) - 1
    pos = torch.arange(steps)
    ref = scan(policy, budget, LogitRows(q, k, 0.35), valid, order, pos, window=window, groups=groups)

    C = budget + 1
    kv_of = torch.zeros(B, groups, C, dtype=torch.long)  # which key column each slot holds
    held = torch.zeros(B, groups, C, dtype=torch.bool)
    s_order = torch.zeros(B, groups, C, dtype=torch.long)
    s_pos = torch.zeros(B, groups, C, dtype=torch.long)
    acc = torch.zeros(B, groups, C)
    kr = k.repeat_interleave(Hq // Hkv, 1)
    for t in range(steps):
        free = (~held).to(torch.int8).argmax(-1, keepdim=True)  # (B, G, 1)
        on = torch.arange(C) == free
        kv_of = torch.where(on, t, kv_of)
        s_order = torch.where(on, order[:, t].view(B, 1, 1), s_order)
        s_pos = torch.where(on, t, s_pos)
        acc = torch.where(on, 0.0, acc)
        c_t = held | (on & valid[:, t].view(B, 1, 1))
        # per query head, the key column of each slot of its group
        cols = kv_of.repeat_interleave(Hq // groups, 1)  # (B, Hq, C)
        row = (q[:, :, t:t + 1] @ kr.transpose(-1, -2)).squeeze(2).gather(-1, cols) * 0.35
        held, acc = decode_step(policy, budget, row, c_t, s_order, s_pos, acc, valid[:, t], t, window, groups)
        for b in range(B):
            for gi in range(groups):
                mine = sorted(kv_of[b, gi][held[b, gi]].tolist())
                seen = (ref.arrive <= t) & (ref.evict[b, gi] > t)
                assert mine == torch.nonzero(seen).flatten().tolist(), (t, b, gi)
        assert int(held.sum(-1).max()) <= budget


# --------------------------------------------------------------- chunked prefill fidelity
def _feed(model, ids, mask, cache, per_forward):
    """Feed columns `per_forward` at a time (generate()'s chunked prefill), checking after every
    call that no bounded layer holds more than K states; returns the logits."""
    pos = position_ids_for(mask)
    out = []
    for a in range(0, ids.shape[1], per_forward):
        b = min(ids.shape[1], a + per_forward)
        with torch.no_grad():
            out.append(model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                             **cache_kwargs(cache), use_cache=True).logits)
        _assert_bounded(cache)
    return torch.cat(out, 1)


def _assert_bounded(cache):
    for layer, size in zip(cache.layers, cache.state_sizes()):
        if layer.budget is not None:
            assert size <= layer.budget, (size, layer.budget)
            assert layer.keys.shape[-2] == layer.budget + 1  # the K + 1 slot buffer, never more


def _held(cache):
    return [cache.held_positions(i) for i in range(len(cache.layers))]


@pytest.fixture
def mask_sizes(monkeypatch):
    """Records (queries, keys) of every masked attention of the prompt path."""
    sizes = []
    original = attention_mod.masked_attention

    def recording(query, key, *args, **kwargs):
        sizes.append((query.shape[-2], key.shape[-2]))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(attention_mod, "masked_attention", recording)
    return sizes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_chunked_prefill_equals_one_token_at_a_time(arch, policy, mask_sizes):
    """A left-padded batch of prompts through a BoundedCache: in one forward split into chunks of
    c queries, and in forwards of c tokens (as generate() feeds it), against token-by-token
    decoding: same held sets, logits within 1e-4 (fp32); no mask larger than c x (K + 1 + c)."""
    model = tiny_model(arch)
    ids, mask = padded_batch([T, T - 6, T - 11], T, side="left", seed=4)
    apply_budget(model, BudgetSpec(policy=policy, budget=K))
    each, _, ref_cache = decode_token_by_token(model, ids, mask, prompt_len=0, track_held=False)
    real = mask.bool()
    for c in (3, 7):
        cache = make_cache(model, prefill_chunk=c)
        mask_sizes.clear()
        with torch.no_grad():
            once = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                         **cache_kwargs(cache), use_cache=True).logits
        _assert_bounded(cache)
        assert (once - each).abs().amax(-1)[real].max() < 1e-4
        assert _held(cache) == _held(ref_cache)
        if policy != "full":
            assert mask_sizes and max(q for q, _ in mask_sizes) == c
            assert max(s for _, s in mask_sizes) <= K + 1 + c
        fed = _feed(model, ids, mask, make_cache(model, prefill_chunk=c), c)
        assert (fed - each).abs().amax(-1)[real].max() < 1e-4


@pytest.mark.parametrize("policy", BOUNDED)
def test_hybrid_chunked_prefill_then_decoding(policy):
    """Hybrid budget {"0": null, "default": K}: a chunked prompt then token-by-token decoding
    equals token-by-token decoding throughout; the full layer holds everything."""
    model = tiny_model("llama")
    ids, mask = padded_batch([T, T - 3, T - 8], T, side="left", seed=9)
    apply_budget(model, BudgetSpec(policy=policy, budget={"0": None, "default": K}))
    each, held_each, _ = decode_token_by_token(model, ids, mask, prompt_len=0)
    cache = make_cache(model, prefill_chunk=4)
    prompt = 13
    out = [_feed(model, ids[:, :prompt], mask[:, :prompt], cache, prompt)]
    assert _held(cache) == [held_each[prompt - 1][i] for i in range(3)]
    pos = position_ids_for(mask)
    for t in range(prompt, T):
        with torch.no_grad():
            out.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                             **cache_kwargs(cache), use_cache=True).logits)
        _assert_bounded(cache)
        assert _held(cache) == [held_each[t][i] for i in range(3)]
    real = mask.bool()
    assert (torch.cat(out, 1) - each).abs().amax(-1)[real].max() < 1e-4
    assert cache.state_sizes()[0] == int(mask.sum(-1).max())  # layer 0 is full


def test_buffer_and_concatenation_decode_alike():
    """decode_buffer=False (concatenate, scan, compact every step) gives the same logits."""
    model = tiny_model("mistral")
    ids, mask = padded_batch([T, T - 5], T, side="left", seed=2)
    apply_budget(model, BudgetSpec(policy="h2o", budget=K))
    a = _feed(model, ids, mask, make_cache(model), 1)
    b = _feed(model, ids, mask, make_cache(model, decode_buffer=False), 1)
    assert (a - b).abs().amax(-1)[mask.bool()].max() < 1e-5


def test_memory_stays_bounded_over_a_long_stream():
    """A long prompt in chunks, then 100 decoding steps: held states <= K and the stored bytes
    constant after every call, while the sequence grows past 10 K."""
    model = tiny_model("qwen2")
    apply_budget(model, BudgetSpec(policy="tova", budget=8, prefill_chunk=16))
    cache = make_cache(model)
    ids = torch.randint(3, 128, (2, 50), generator=torch.Generator().manual_seed(0))
    _feed(model, ids, torch.ones_like(ids), cache, 50)
    nbytes = cache.nbytes()
    nxt = ids[:, -1:]
    with torch.no_grad():
        for _ in range(100):
            nxt = model(input_ids=nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            _assert_bounded(cache)
            assert cache.nbytes() == nbytes
    assert cache.get_seq_length() == 150 and max(cache.state_sizes()) == 8


def test_prefill_chunk_is_validated_and_reaches_generate():
    with pytest.raises(BudgetError, match="prefill_chunk"):
        BudgetSpec(policy="tova", budget=4, prefill_chunk=0).validate()
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="tova", budget=4, prefill_chunk=6))
    assert model.generation_config.prefill_chunk_size == 6
    assert make_cache(model).prefill_chunk == 6 and make_cache(model, prefill_chunk=3).prefill_chunk == 3
    remove_budget(model)
    assert model.generation_config.prefill_chunk_size is None


# --------------------------------------------------------------- batched generation
def _generate(model, ids, mask, seed=None, new=10):
    kwargs = dict(max_new_tokens=new, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
    if seed is None:
        kwargs["do_sample"] = False
    else:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def _check_batch_equals_single(model, ids, mask, new=10):
    """Greedy: the batch's tokens equal each sequence generated alone. Sampling (seeded): the
    same seed gives the same tokens, and each sequence alone, fed the batch's sampled tokens,
    gets the same next-token logits at every step, so it draws from the same distributions."""
    P = ids.shape[1]
    greedy = _generate(model, ids, mask, new=new)
    sampled = _generate(model, ids, mask, seed=7, new=new)
    assert torch.equal(sampled.sequences, _generate(model, ids, mask, seed=7, new=new).sequences)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = _generate(model, ids[b:b + 1, real], mask[b:b + 1, real], new=new)
        assert torch.equal(alone.sequences[0, real.sum():], greedy.sequences[b, P:])
        # sampling: the same continuation through a fresh cache, one token at a time
        seq = torch.cat([ids[b, real], sampled.sequences[b, P:]]).unsqueeze(0)
        logits, _, cache = decode_token_by_token(model, seq, None, prompt_len=int(real.sum()), track_held=False)
        _assert_bounded(cache)
        for i in range(new):
            got = logits[0, int(real.sum()) - 1 + i]
            assert (got - sampled.logits[i][b]).abs().max() < 1e-4, (b, i)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", BOUNDED + ["hybrid"])
def test_batched_generate_equals_per_sequence(arch, policy):
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    spec = (BudgetSpec(policy="tova", budget={"0": None, "default": 4}, prefill_chunk=4) if policy == "hybrid"
            else BudgetSpec(policy=policy, budget=4, prefill_chunk=4))
    apply_budget(model, spec)
    ids, mask = padded_batch([11, 7, 4], 11, side="left", seed=1)
    _check_batch_equals_single(model, ids, mask)


@pytest.mark.slow
def test_smollm2_batched_generate_equals_per_sequence(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    batch = tok(["The king is dead, long live the", "Once upon a time"], return_tensors="pt", padding=True)
    apply_budget(model, BudgetSpec(policy="tova", budget=6, prefill_chunk=4))
    try:
        _check_batch_equals_single(model, batch["input_ids"], batch["attention_mask"], new=6)
    finally:
        remove_budget(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["window", "h2o", "tova", "tova_head"])
def test_chunked_prefill_on_cuda(policy):
    """On the GPU (Triton scan, FlexAttention for chunks of >= 128 queries, the decoding step in
    the buffer): a chunked prompt equals token-by-token decoding."""
    model = tiny_model("llama", head_dim=32, hidden_size=128).cuda()
    n = 300
    ids, mask = padded_batch([n, n - 7], n, side="left", seed=6)
    ids, mask = ids.cuda(), mask.cuda()
    apply_budget(model, BudgetSpec(policy=policy, budget=16))
    each, _, ref_cache = decode_token_by_token(model, ids, mask, prompt_len=0, track_held=False)
    cache = make_cache(model, prefill_chunk=128)
    with torch.no_grad():
        once = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                     **cache_kwargs(cache), use_cache=True).logits
    _assert_bounded(cache)
    assert _held(cache) == _held(ref_cache)
    assert (once - each).abs().amax(-1)[mask.bool()].max() < 1e-4
