"""In-context retrieval: generators (deterministic, answers checkable and unique), the
teacher-forced scorer against real greedy decoding through a bounded cache, hybrids, and -
slow - the real SmolLM2 model solving easy instances with its full state."""

import re

import pytest
import torch
from conftest import tiny_model
from test_evaluate import tiny_text, tiny_tokenizer

from msrnn_train.compat import cache_kwargs
from msrnn_train import BudgetSpec, apply_budget, get_budget, make_cache, remove_budget
from msrnn_train.retrieval import (
    GENERATED_FILLER,
    KEY_WORDS,
    NEEDLE,
    Instance,
    accuracy,
    associative_recall,
    encode,
    evaluate_retrieval,
    hybrid_spec,
    needle_in_haystack,
    solved,
)


# ----------------------------------------------------------------------------- generators
def test_recall_is_deterministic_and_seeded():
    a = associative_recall(5, pairs=12, seed=3)
    assert a == associative_recall(5, pairs=12, seed=3)
    assert [x.prompt for x in a] != [x.prompt for x in associative_recall(5, pairs=12, seed=4)]
    assert len({x.prompt for x in a}) == 5


@pytest.mark.parametrize("pairs,distance", [(1, 0), (8, 0), (8, 7), (30, 26), (20, None)])
def test_recall_answer_is_unique_and_at_the_stated_distance(pairs, distance):
    for inst in associative_recall(10, pairs=pairs, distance=distance, seed=1):
        body, _, query = inst.prompt.rpartition("\n\n")
        lines = [ln for ln in body.splitlines() if re.fullmatch(r"[a-z]+: \d+", ln)]
        kv = [ln.split(": ") for ln in lines]
        keys, values = [k for k, _ in kv], [v for _, v in kv]
        assert len(kv) == pairs and len(set(keys)) == pairs and len(set(values)) == pairs
        assert set(keys) <= set(KEY_WORDS) and all(len(v) == 2 for v in values)
        *demos, query = query.split("\n")
        assert len(demos) == min(2, pairs - 1)
        for demo in demos:  # answered queries of other keys, true to the list
            k, v = demo.split(": ")
            assert values[keys.index(k)] == v
        assert query.endswith(": ")
        key = query[:-2]
        assert key not in [d.split(": ")[0] for d in demos]
        assert keys.count(key) == 1
        i = keys.index(key)
        assert values[i] == inst.answer  # the only value that answers the question
        assert pairs - 1 - i == inst.meta["distance"]
        if distance is not None:
            assert inst.meta["distance"] == distance


def test_recall_rejects_impossible_settings():
    with pytest.raises(ValueError):
        associative_recall(1, pairs=5, distance=5)
    with pytest.raises(ValueError):
        associative_recall(1, pairs=20, value_digits=1)


@pytest.mark.parametrize("filler", [GENERATED_FILLER, None])
def test_needle_once_with_checkable_answer_and_distance(filler):
    insts = needle_in_haystack(6, context_words=200, distance_words=150, seed=2, filler=filler)
    assert insts == needle_in_haystack(6, context_words=200, distance_words=150, seed=2, filler=filler)
    for inst in insts:
        assert re.fullmatch(r"\d{4}", inst.answer)
        needles = re.findall(r"The secret number is (\d+)\.", inst.prompt)
        assert needles == [inst.answer]  # exactly one needle; it holds the answer
        after = inst.prompt.split(NEEDLE.format(number=inst.answer))[1].split("\n\nWhat is")[0]
        assert len(after.split()) == inst.meta["distance"]
        assert 150 <= inst.meta["distance"] <= 180  # moved back to a sentence end, at most 30 words
        assert inst.prompt.endswith("The secret number is ")
    if filler is None:
        assert insts[0].meta["filler"].startswith(("gutenberg:", "generated"))


def test_encode_locates_answer_and_evidence():
    tok = tiny_tokenizer()
    inst = associative_recall(1, pairs=4, distance=1)[0]
    inst = Instance("recall", inst.prompt, inst.answer, inst.meta)
    enc = encode(inst, tok)
    assert tok.decode(enc.ids[enc.answer_start:]).replace(" ", "") == inst.answer
    assert enc.ids[:enc.answer_start] == tok(inst.prompt)["input_ids"]
    # evidence: the queried line ends 1 pair (4 tokens: key, ':', two digits) + blank before the question
    assert 0 < enc.evidence_end < enc.answer_start


# ----------------------------------------------------------------------------- scorer
def _greedy_instances(model, tok, n=5, new=2):
    """Prompts whose answer is, by construction, the model's own greedy continuation through its
    bounded cache: the teacher-forced scorer must call every one solved."""
    out = []
    for i in range(n):
        prompt = tiny_text(8 + 4 * i, seed=10 + i) + " "
        ids = torch.tensor([tok(prompt)["input_ids"]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             **cache_kwargs(make_cache(model)), pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        answer = tok.decode(gen)
        assert tok(prompt + answer)["input_ids"] == ids[0].tolist() + gen.tolist()  # round trip
        out.append(Instance("custom", prompt, answer))
    return out


def test_teacher_forced_scorer_equals_greedy_decoding_through_the_bounded_cache():
    tok = tiny_tokenizer()
    model = tiny_model()
    model.resize_token_embeddings(len(tok))
    apply_budget(model, BudgetSpec(policy="tova", budget=4))
    insts = _greedy_instances(model, tok)
    # batched with right padding (lengths 9..25 words), under the same bounded policy
    assert solved(model, tok, insts, batch_size=3, progress=False) == [True] * 5
    wrong = []
    for inst in insts:
        words = inst.answer.split()
        words[-1] = next(w for w in ("king", "queen") if w != words[-1])
        wrong.append(Instance("custom", inst.prompt, " ".join(words)))
    assert solved(model, tok, wrong, batch_size=3, progress=False) == [False] * 5
    res = accuracy(model, tok, insts + wrong, batch_size=4, progress=False)
    assert (res["accuracy"], res["correct"], res["n"]) == (0.5, 5, 10)


def test_scorer_sees_the_budget():
    """The same instances scored unbounded vs bounded give different answers on a random model
    (the budget is really in force during scoring)."""
    tok = tiny_tokenizer()
    model = tiny_model()
    model.resize_token_embeddings(len(tok))
    apply_budget(model, BudgetSpec(policy="window", budget=2))
    insts = _greedy_instances(model, tok, n=5, new=3)
    remove_budget(model)
    assert solved(model, tok, insts, progress=False) != [True] * 5


def test_hybrid_spec_and_labels():
    spec = hybrid_spec("tova", 64, 30, ["middle"])
    assert spec.budget == [64] * 15 + [None] + [64] * 14
    assert spec.layer_budget(15) is None and spec.layer_budget(0) == 64
    assert hybrid_spec("sinks", 8, 4, ["last", 0]).budget == [None, 8, 8, None]
    assert spec.label == "tova-64+full[15]"
    assert BudgetSpec(policy="h2o", budget=32).label == "h2o-32"
    assert BudgetSpec(policy="full").label == "full"
    with pytest.raises(ValueError):
        hybrid_spec("tova", 8, 4, [4])


def test_evaluate_retrieval_records_and_restores_spec():
    tok = tiny_tokenizer()
    model = tiny_model()
    model.resize_token_embeddings(len(tok))
    own = BudgetSpec(policy="h2o", budget=5)
    apply_budget(model, own)
    tasks = {"custom": _greedy_instances(model, tok, n=3)}
    specs = [BudgetSpec(policy="full"), BudgetSpec(policy="h2o", budget=5), hybrid_spec("tova", 3, 3, ["last"])]
    recs = evaluate_retrieval(model, tok, tasks, specs, batch_size=2, progress=False)
    assert [(r["label"], r["budget"], r["full_layers"]) for r in recs] == [
        ("full", None, []), ("h2o-5", 5, []), ("tova-3+full[2]", 3, [2])]
    assert recs[1]["accuracy"] == 1.0  # the answers are h2o-5's own greedy continuations
    assert get_budget(model) == own


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_full_state_solves_easy_instances_and_a_small_window_does_not(smollm2):
    model, tok = smollm2
    recall = associative_recall(12, pairs=8, distance=5, seed=0)
    needle = needle_in_haystack(8, context_words=250, distance_words=180, seed=0)
    assert accuracy(model, tok, recall, progress=False)["accuracy"] >= 0.6
    full = accuracy(model, tok, needle, progress=False)
    assert full["accuracy"] >= 0.75 and full["distance_tokens"] > 200
    # the needle is ~250 tokens back: a 16-state window cannot hold it
    res = evaluate_retrieval(model, tok, {"needle": needle}, [BudgetSpec(policy="window", budget=16)],
                             progress=False)
    assert res[0]["accuracy"] <= 0.25
    assert get_budget(model) is None
