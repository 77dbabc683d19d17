"""The learned retention policy: the same exact fixed-K process as every other policy, ranked by a
scorer's logit written once per token. Simulation = decoding with trained-looking (random)
scorers, the plain reference = the scan = the decoding step, the start state is `window`, the
relaxations reach the scorer, and the scorer travels with the adapter."""

import pytest
import torch

from conftest import padded_batch, tiny_model
from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache, remove_budget
from msrnn_train.controller import get_controller
from msrnn_train.fidelity import compare, teacher_forced
from msrnn_train.policies import make_policy
from msrnn_train.retention import (SCORER_FILENAME, load_scorers, save_scorers, scorers)
from msrnn_train.schedule import NEVER, LogitRows, decode_step, reference_schedule, scan
from msrnn_train.spec import BudgetError

LEARNED = ["learned", "learned_head"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed=0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    found = scorers(model)
    assert found, "the learned budget attached no scorer"
    for s in found.values():
        with torch.no_grad():
            s.out.weight.copy_(torch.randn(s.out.weight.shape, generator=g) * std)
            s.out.bias.copy_(torch.randn(s.out.bias.shape, generator=g))
    return found


def _scan_inputs(name, form, T, K, lengths, seed):
    """A learned policy and fresh random queries/keys over a left-padded batch (Hq 4, Hkv 2)."""
    torch.manual_seed(seed)
    policy = make_policy(name, K, retention=form)
    G = 2 if policy.head_wise else 1
    q, k = torch.randn(len(lengths), 4, T, 8), torch.randn(len(lengths), 2, T, 8)
    valid = padded_batch(lengths, T, side="left", seed=seed + 1)[1].bool()
    return policy, G, q, k, valid, valid.long().cumsum(-1) - 1


@pytest.mark.parametrize("form", ["decay", "logit"])
@pytest.mark.parametrize("name", LEARNED)
def test_reference_equals_scan_on_random_values(name, form):
    B, T, K = 3, 24, 5
    policy, G, q, k, valid, order = _scan_inputs(name, form, T, K, [T, T - 5, T - 11], seed=1)
    values = torch.randn(B, G, T) * 3
    ref = reference_schedule(policy, K, q, k, 0.3, valid, head_wise=policy.head_wise, values=values)
    s = scan(policy, K, LogitRows(q, k, 0.3), valid, order, torch.arange(T), groups=G, new_value=values)
    for b in range(B):
        for g in range(G):
            got = {j: int(s.evict[b, g, j]) for j in range(T) if bool(valid[b, j])}
            assert got == ref[b][g]
    # the values decide: the same inputs with the values reversed give another schedule
    s2 = scan(policy, K, LogitRows(q, k, 0.3), valid, order, torch.arange(T), groups=G, new_value=-values)
    assert not torch.equal(s.evict, s2.evict)


@pytest.mark.parametrize("form", ["decay", "logit"])
@pytest.mark.parametrize("name", LEARNED)
def test_numba_scan_equals_torch_scan(name, form):
    from msrnn_train.kernels.cpu_scan import fast_scan

    B, T, K = 3, 90, 7
    policy, G, q, k, valid, order = _scan_inputs(name, form, T, K, [T, T - 20, T - 41], seed=12)
    values = policy.carried_value(torch.randn(B, G, T) * 3)
    args = (policy, K, LogitRows(q, k, 0.3, block=16), valid, order, torch.arange(T))
    for window in (None, 11):
        a = scan(*args, groups=G, new_value=values, window=window)
        b = fast_scan(*args, groups=G, new_value=values, window=window)
        assert torch.equal(a.evict, b.evict) and torch.equal(a.final.src, b.final.src)
        held = a.final.src >= 0
        assert torch.equal(a.final.acc[held], b.final.acc[held])


@pytest.mark.parametrize("name", LEARNED)
def test_decode_step_equals_scan(name):
    torch.manual_seed(3)
    B, T, K, G = 2, 30, 6, 2
    policy = make_policy(name, K)
    G = G if policy.head_wise else 1
    valid = torch.ones(B, T, dtype=torch.bool)
    order = torch.arange(T).expand(B, T)
    values = torch.randn(B, G, T) * 2
    s = scan(policy, K, None, valid, order, torch.arange(T), groups=G, new_value=values)
    C = K + 1
    held = torch.zeros(B, G, C, dtype=torch.bool)
    slot_order = torch.zeros(B, G, C, dtype=torch.long)
    slot_pos = torch.zeros(B, G, C, dtype=torch.long)
    acc = torch.zeros(B, G, C)
    col = torch.full((B, G, C), -1)
    for t in range(T):
        free = (~held).to(torch.int8).argmax(-1, keepdim=True)
        held = held.scatter(2, free, True)
        slot_order = slot_order.scatter(2, free, t)
        slot_pos = slot_pos.scatter(2, free, t)
        acc = acc.scatter(2, free, values[:, :, t:t + 1])
        col = col.scatter(2, free, t)
        held, acc = decode_step(policy, K, None, held, slot_order, slot_pos, acc, torch.ones(B, dtype=torch.bool),
                                t, None, G)
        want = [[sorted(j for j in range(t + 1) if int(s.evict[b, g, j]) > t) for g in range(G)] for b in range(B)]
        got = [[sorted(col[b, g][held[b, g]].tolist()) for g in range(G)] for b in range(B)]
        assert got == want, t


@pytest.mark.parametrize("sinks", [4, 0])
@pytest.mark.parametrize("form", ["decay", "logit"])
def test_at_initialisation_the_rule_is_sinks_or_window(form, sinks):
    """Equal logits: the rule is `sinks` (window + the first tokens), or `window` with sinks 0."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20))
    apply_budget(model, BudgetSpec(policy="sinks" if sinks else "window", budget=8, sinks=sinks))
    _, start = teacher_forced(model, ids)
    apply_budget(model, BudgetSpec(policy="learned", budget=8, retention=form, sinks=sinks))
    logits, learned = teacher_forced(model, ids)
    for layer in start:
        assert torch.equal(start[layer].evict, learned[layer].evict)
    # ... and a trained (here: random) scorer changes which members are held, never the first tokens
    _randomise(model)
    _, changed = teacher_forced(model, ids)
    assert any(not torch.equal(start[i].evict, changed[i].evict) for i in start)
    if sinks:
        assert all((s.evict[..., :sinks] == NEVER).all() for s in changed.values())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", LEARNED)
def test_simulation_equals_bounded_decoding(arch, name):
    model = tiny_model(arch)
    apply_budget(model, BudgetSpec(policy=name, budget=4, sinks=1))
    _randomise(model, seed=4)
    ids, mask = padded_batch([18, 13], 18, side="left", seed=5)
    res = compare(model, ids, mask)
    assert res["max_abs_diff"] < 1e-4, res
    assert res["held_mismatch"] is None, res
    assert max(res["state_sizes"]) <= 4


def test_hybrid_and_prompt_then_token_by_token():
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="learned", budget={"1": None, "default": 4}, sinks=1))
    _randomise(model, seed=6)
    assert sorted(scorers(model)) == [0, 2]  # the full layer has no scorer
    ids, mask = padded_batch([20, 16], 20, side="left", seed=7)
    res = compare(model, ids, mask, prompt_len=9)
    assert res["max_abs_diff"] < 1e-4 and res["held_mismatch"] is None, res


def test_generate_holds_at_most_k():
    model = tiny_model("qwen2")
    apply_budget(model, BudgetSpec(policy="learned_head", budget=3, sinks=1))
    _randomise(model, seed=8)
    ids = torch.randint(3, 128, (1, 7))
    cache = make_cache(model)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None, **cache_kwargs(cache))
    assert out.shape[1] == 19 and max(cache.state_sizes()) == 3


@pytest.mark.parametrize("relaxation", ["ste", "decay"])
def test_relaxations_reach_the_scorer(relaxation):
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="learned", budget=4, sinks=1))
    found = _randomise(model, seed=9, std=0.5)
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        hard = model(input_ids=ids, use_cache=False).logits
    ctrl = get_controller(model)
    ctrl.relaxation, ctrl.relax_tau = relaxation, 1.0
    logits = model(input_ids=ids, use_cache=False).logits
    loss = logits.logsumexp(-1).mean()
    if relaxation == "decay":
        assert len(ctrl.aux_losses) == 3
        loss = loss + torch.stack(ctrl.aux_losses).sum()
    else:  # straight-through: the forward is the exact hard process
        assert (logits - hard).abs().max() < 1e-4
    loss.backward()
    for s in found.values():
        assert s.out.weight.grad is not None and s.out.weight.grad.abs().sum() > 0


def test_scorers_round_trip_and_refuse_a_mismatch(tmp_path):
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="learned", budget=4, sinks=1))
    _randomise(model, seed=10)
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert save_scorers(model, tmp_path) == tmp_path / SCORER_FILENAME
    fresh = tiny_model("llama")
    apply_budget(fresh, BudgetSpec(policy="learned", budget=4, sinks=1))
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - want).abs().max() > 1e-3  # untrained scorers: another schedule
    assert load_scorers(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
    hybrid = tiny_model("llama")
    apply_budget(hybrid, BudgetSpec(policy="learned", budget={"0": None, "default": 4}))
    with pytest.raises(ValueError, match="no learned layer 0"):
        load_scorers(hybrid, tmp_path)


def test_scorer_survives_remove_and_reapply():
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="learned", budget=4))
    before = {i: s.out.weight.clone() for i, s in _randomise(model, seed=11).items()}
    remove_budget(model)
    apply_budget(model, BudgetSpec(policy="learned", budget=6))
    assert all(torch.equal(s.out.weight, before[i]) for i, s in scorers(model).items())


def test_bad_retention_is_refused_by_name():
    with pytest.raises(BudgetError, match="retention: unknown form 'age'; allowed: decay, logit"):
        BudgetSpec(policy="learned", budget=4, retention="age").validate()
    with pytest.raises(BudgetError, match="scorer_hidden"):
        BudgetSpec(policy="learned", budget=4, scorer_hidden=-1).validate()


def test_never_needs_attention_scores():
    for name in LEARNED:
        assert not make_policy(name, 4).needs_scores
    assert NEVER > 0


def _tiny_learned_run(tmp_path, name, **overrides):
    from pathlib import Path

    from conftest import make_corpus, tiny_run_env

    from msrnn_train.recipe import load_recipe
    from msrnn_train.train import train

    root = Path(__file__).resolve().parents[1]
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_corpus(corpus, n_docs=3, words=300)
    keys = {"data.source": str(corpus), "data.heldout": 1, "data.seq_len": 32, "budget.policy": "learned", "budget.mode": "hard",
            "budget.budget": 6, "training.output_dir": str(tmp_path / name), "training.max_steps": 4,
            "training.save_steps": 4, "eval.max_windows": 0, "eval.at_start": False, "wandb.project": None,
            "eval.policies": ["learned", "full"], "eval.budgets": [6]}
    keys.update(overrides)
    with tiny_run_env(tmp_path / "cache"):
        return train(load_recipe(root / "recipes" / "tiny.yaml", keys))


@pytest.mark.parametrize("relaxation", ["ste", "decay"])
def test_training_moves_the_scorer_saves_it_and_load_bounded_restores_it(tmp_path, relaxation):
    from msrnn_train.hub import load_bounded

    summary = _tiny_learned_run(tmp_path, "run", **{"learned.relaxation": relaxation, "learned.hard_fraction": 0.5,
                                                    "learned.scorer_learning_rate": 0.05})
    out = tmp_path / "run"
    assert (out / SCORER_FILENAME).is_file()
    trained = scorers(summary["model"])
    assert trained and all(s.out.weight.abs().sum() > 0 for s in trained.values())  # zero at initialisation
    model, _ = load_bounded(out)
    loaded = scorers(model)
    assert sorted(loaded) == sorted(trained)
    for i, s in loaded.items():
        assert torch.equal(s.out.weight.float(), trained[i].out.weight.detach().float().cpu())
    assert get_controller(model).relaxation is None  # inference runs the exact process


def test_scorer_only_training_keeps_the_lora_weights(tmp_path):
    first = _tiny_learned_run(tmp_path, "plain", **{"budget.policy": "window", "eval.policies": ["full"]})
    lora_before = {n: p.detach().clone() for n, p in first["model"].named_parameters() if "lora_" in n}
    summary = _tiny_learned_run(tmp_path, "scorer", **{"lora.init_adapter": str(tmp_path / "plain"),
                                                       "learned.train_lora": False,
                                                       "learned.scorer_learning_rate": 0.05})
    after = {n: p for n, p in summary["model"].named_parameters() if "lora_" in n}
    assert after and all(torch.equal(after[n].detach().cpu(), lora_before[n].cpu()) for n in after)
    assert any(s.out.weight.abs().sum() > 0 for s in scorers(summary["model"]).values())


def test_learned_keys_without_a_learned_policy_are_refused():
    from msrnn_train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"learned.relaxation: has no effect with budget.policy 'tova'"):
        load_recipe(None, {"learned.relaxation": "decay"})
    with pytest.raises(RecipeError, match=r"learned.relaxation: 'soft' is not allowed. Allowed: none, ste, decay"):
        load_recipe(None, {"budget.policy": "learned", "learned.relaxation": "soft"})


def test_a_resumed_run_continues_the_same_scorer(tmp_path):
    """Checkpoints hold the scorer: resuming from checkpoint-2 of a 4-step run gives the scorer of
    the uninterrupted run (the LoRA too)."""
    from safetensors.torch import load_file

    over = {"training.max_steps": 4, "training.save_steps": 2, "training.save_total_limit": 5,
            "learned.scorer_learning_rate": 0.05, "learned.hard_fraction": 0.25}  # step 3 relaxed, step 4 hard
    _tiny_learned_run(tmp_path, "whole", **over)
    _tiny_learned_run(tmp_path, "cut", **over)
    cut = tmp_path / "cut"
    assert (cut / "checkpoint-2" / SCORER_FILENAME).is_file()
    for name in ("checkpoint-4", SCORER_FILENAME, "adapter_model.safetensors"):  # killed after checkpoint-2
        target = cut / name
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
    _tiny_learned_run(tmp_path, "cut", **over, **{"training.resume_from_checkpoint": True})
    wa, wb = load_file(str(tmp_path / "whole" / SCORER_FILENAME)), load_file(str(cut / SCORER_FILENAME))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name
    first = load_file(str(cut / "checkpoint-2" / SCORER_FILENAME))
    assert any(not torch.equal(first[n], wb[n]) for n in first)  # steps 3-4 did train it further
