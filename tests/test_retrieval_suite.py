"""Retrieval beyond the state: the seeded task generators (deterministic, lengths, answers
present once and determined), retrieval augmentation (BM25 chunks within the budget), the
layer probe of `hybrid: auto:N`, the Wilson intervals, the grid and the `evaluate --retrieval`
CLI (tiny random models; the real model in results/retrieval_hybrid.md)."""

import json
import re

import pytest
import torch
from conftest import tiny_model
from test_evaluate import _tiny_model_dir, tiny_text, tiny_tokenizer

from msrnn_train import BudgetSpec, apply_budget, get_budget
from msrnn_train.augment import ChunkStore, augment
from msrnn_train.eval_cli import main
from msrnn_train.hybrid import (
    choose_full_layers,
    eager_attention,
    probe_instances,
    rank_layers,
    retrieval_head_scores,
    source_positions,
)
from msrnn_train.retrieval import retrieval_grid, wilson
from msrnn_train.retrieval_tasks import TASKS, Instance, answer_is_unique, encode, make_task, token_counter, words

# real-looking prose without downloads: sentences of varied words (the books are used by default)
FILLER = " ".join(f"{w.capitalize()} {tiny_text(7, seed=i)}." for i, w in enumerate(tiny_text(600, seed=1).split()))


def _make(task, n=6, length=300, difficulty=None, seed=0, **kw):
    fn = TASKS[task]
    args = {} if difficulty is None else {"difficulty": difficulty}
    return fn(n, length, seed=seed, filler=None if task == "mqar" else FILLER, **args, **kw)


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("task", list(TASKS))
def test_generators_are_deterministic_per_seed(task):
    a = _make(task, seed=3)
    assert a == _make(task, seed=3)
    b = _make(task, seed=4)
    assert [x.prompt for x in a] != [x.prompt for x in b]
    assert len({x.prompt for x in a}) == len(a)  # every instance its own


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [160, 400])
def test_prompts_have_the_asked_length(task, length):
    for inst in _make(task, n=4, length=length):
        assert abs(words(inst.prompt) - length) <= 0.1 * length + 8, (task, words(inst.prompt))


def test_length_in_tokens_makes_prompts_many_times_k():
    tok = tiny_tokenizer()
    count = token_counter(tok)
    for task in TASKS:
        for inst in TASKS[task](3, 256, seed=1, count=count, filler=None if task == "mqar" else FILLER):
            n = len(tok(inst.prompt)["input_ids"])
            assert 230 <= n <= 285, (task, n)  # 8x K = 32


@pytest.mark.parametrize("task", list(TASKS))
def test_answer_is_in_the_first_half_and_determined(task):
    for inst in _make(task, n=8, length=300, difficulty={"mqar": 3, "kv": 6, "needles": 5, "vartrack": 3}[task]):
        a, b = inst.meta["source"]
        assert inst.prompt[a:b] == inst.answer
        assert inst.prompt.count(inst.meta["evidence"]) == 1
        assert inst.meta["evidence"] in inst.prompt[:a + len(inst.meta["evidence"])]
        assert a < 0.6 * len(inst.prompt)  # at least ~half the prompt lies between source and question
        assert inst.prompt.endswith(inst.meta["question"])
        assert answer_is_unique(inst)
        assert _solve(inst) == inst.answer  # a reader that follows the rules finds exactly this answer


def _solve(inst: Instance) -> str:
    """Answer the question by the task's own rules, from the prompt alone."""
    body, question = inst.prompt[:-len(inst.meta["question"])], inst.meta["question"]
    if inst.task == "mqar":
        key = question[:-2]
        pairs = re.findall(r"(?m)^([a-z]+): (\d+)$", body.split("\n\n", 1)[1].split("\n\n")[0])
        found = [v for k, v in pairs if k == key]
        assert len(found) == 1 and len({k for k, _ in pairs}) == len(pairs)
        return found[0]
    if inst.task == "kv":
        key = re.search(r"code of (\w+) in", question).group(1)
        found = re.findall(rf"(?m)^{key}: (\d+)$", body)
        assert len(found) == 1
        return found[0]
    if inst.task == "needles":
        key = re.search(r"number for (\w+)\?", question).group(1)
        found = dict(re.findall(r"The special magic number for (\w+) is (\d+)\.", body))
        assert len(found) == len(re.findall(r"The special magic number for", body)) == inst.meta["difficulty"]
        return found[key]
    if inst.task == "vartrack":
        name = re.search(r"VAR (\w+) hold\?", question).group(1)
        binds = {}
        for var, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", body):
            assert var not in binds
            binds[var] = rhs
        seen = 0
        while binds[name].startswith("VAR "):
            prev = binds[name][4:]
            assert body.index(f"VAR {prev} = ") < body.index(f"VAR {name} = ")  # read before it is used
            name, seen = prev, seen + 1
        assert seen == inst.meta["difficulty"] - 1
        values = [v for v in binds.values() if not v.startswith("VAR")]
        assert len(values) == 2 and len(set(values)) == 2  # the distractor chain holds another value
        return binds[name]
    raise AssertionError(inst.task)


def test_generators_reject_bad_settings():
    with pytest.raises(ValueError, match="difficulty"):
        make_task("needles", 1, 100, difficulty=0, filler=FILLER)
    with pytest.raises(ValueError, match="unknown"):
        make_task("recall9", 1, 100)
    with pytest.raises(ValueError, match="lower the length"):
        make_task("mqar", 1, 5000)


@pytest.mark.slow
def test_filler_is_the_books_by_default_and_never_a_repeated_pattern():
    insts = make_task("needles", 2, 200, seed=0)
    for inst in insts:
        assert inst.meta["filler"] == "gutenberg"
        text = inst.prompt.split()
        grams = [tuple(text[i:i + 8]) for i in range(len(text) - 8)]
        assert len(set(grams)) == len(grams)  # no 8-word sequence repeats


# ----------------------------------------------------------------------------- augmentation
def test_chunk_store_ranks_the_chunk_with_the_rare_key_first():
    store = ChunkStore(chunk_words=6)
    store.read("the king went home . the queen said the night was long . the zebra code is 4242 . the end")
    spans = store.retrieve("what is the zebra code", max_tokens=20, count=words, top_k=1)
    assert len(spans) == 1 and "zebra code is 4242" in store.text[spans[0][0]:spans[0][1]]
    assert store.retrieve("zebra", max_tokens=3, count=words) == []  # no chunk fits 3 words


@pytest.mark.parametrize("task", list(TASKS))
def test_augment_reinserts_the_source_before_the_question_within_the_budget(task):
    insts = _make(task, n=6, length=300)
    for inst in insts:
        aug = augment(inst, max_tokens=24)
        q = inst.meta["question"]
        assert aug.prompt.endswith(q) and aug.prompt.startswith(inst.prompt[:-len(q)].rstrip("\n"))
        inserted = aug.prompt[len(inst.prompt) - len(q):-len(q)]
        assert words(inserted) == aug.meta["retrieved_tokens"] <= 24
        assert aug.answer == inst.answer
        if task != "vartrack":  # one-hop tasks: the rare key finds its source (variable tracking is multi-hop)
            evidence = inst.meta["evidence"]
            assert aug.meta["hit"] and evidence[evidence.index(inst.meta["key"]):].strip() in inserted


# ----------------------------------------------------------------------------- intervals
def test_wilson_interval_matches_known_values():
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(100, 100) == pytest.approx([0.9630, 1.0], abs=1e-4)
    lo, hi = wilson(37, 100)
    assert lo < 0.37 < hi and hi - lo < 0.2


# ----------------------------------------------------------------------------- the probe (hybrid: auto:N)
def _tiny(n_layers=3):
    tok = tiny_tokenizer()
    model = tiny_model(num_hidden_layers=n_layers)
    model.resize_token_embeddings(len(tok))
    return model, tok


def test_probe_mass_is_a_softmax_share_and_leaves_the_model_as_it_was():
    model, tok = _tiny()
    prompt = "the king and the queen of the night : "
    whole = Instance("custom", prompt, "4", {"source": [0, len(prompt)]})
    # one answer token: its predicting position sees exactly the prompt, so all of it is the source
    own = BudgetSpec(policy="tova", budget=3)
    apply_budget(model, own)
    scores = retrieval_head_scores(model, tok, [whole])
    assert scores.shape == (3, 4) and torch.allclose(scores, torch.ones(3, 4), atol=1e-5)
    assert get_budget(model) == own and model.config._attn_implementation == "msrnn"
    one = Instance("custom", prompt, "4", {"source": [4, 8]})  # "king"
    assert source_positions(one, tok) == [1]
    enc = encode(one, tok)
    s = retrieval_head_scores(model, tok, [one])
    # against the plain attention probabilities of the eager model
    with eager_attention(model), torch.no_grad():
        att = model(input_ids=torch.tensor([enc.ids]), output_attentions=True).attentions
    ref = torch.stack([a[0, :, enc.answer_start - 1, 1] for a in att])
    assert torch.allclose(s, ref, atol=1e-6) and (s > 0).all() and (s < 1).all()


def test_rank_and_choice_of_full_layers():
    scores = torch.tensor([[0.1, 0.2], [0.05, 0.9], [0.3, 0.3], [0.0, 0.0]])
    assert rank_layers(scores) == [1, 2, 0, 3]  # by the best head
    model, tok = _tiny(n_layers=4)
    assert choose_full_layers("middle", model) == [2]
    assert choose_full_layers("0+last", model) == [0, 3]
    assert choose_full_layers("none", model) == []
    r = choose_full_layers("random:2", model, seed=1)
    assert r == choose_full_layers("random:2", model, seed=1) and len(set(r)) == 2
    probe = [Instance("custom", f"{tiny_text(12, seed=i)} : ", "4", {"source": [0, 9]}) for i in range(3)]
    auto = choose_full_layers("auto:2", model, tok, probe=probe)
    assert auto == sorted(rank_layers(retrieval_head_scores(model, tok, probe))[:2])
    with pytest.raises(ValueError, match="of 4 layers"):
        choose_full_layers("auto:5", model, tok, probe=probe)
    with pytest.raises(ValueError, match="out of range"):
        choose_full_layers("0+4", model)


def test_probe_set_draws_each_named_task_apart_from_the_evaluation_seed():
    tok = tiny_tokenizer()
    probe = probe_instances(tok, n=4, length=60, tasks=("mqar",))  # (kv, needles, vartrack read the books)
    assert [i.task for i in probe] == ["mqar"] * 4 and all(i.meta["seed"] == 10_000 for i in probe)
    assert [i.prompt for i in probe] != [i.prompt for i in make_task("mqar", 4, 60, tokenizer=tok)]
    with pytest.raises(ValueError, match="no task"):
        probe_instances(tok, tasks=())


# ----------------------------------------------------------------------------- the grid and the CLI
def test_retrieval_grid_records():
    model, tok = _tiny()
    tasks = {"mqar": make_task("mqar", 5, 60, difficulty=2, tokenizer=tok)}
    probe = make_task("mqar", 2, 40, difficulty=2, tokenizer=tok, seed=9)
    own = BudgetSpec(policy="h2o", budget=5)
    apply_budget(model, own)
    recs = retrieval_grid(model, tok, tasks, [4, 8], ["none", "auto:1"], augment=(False, True), probe=probe,
                          progress=False)
    assert get_budget(model) == own
    assert len(recs) == 1 + 2 * 2 * 2
    assert (recs[0]["budget"], recs[0]["augmented"], recs[0]["full_layers"]) == (None, False, [0, 1, 2])
    for r in recs:
        assert {"task", "budget", "full_layers", "trained", "augmented", "accuracy", "n", "ci95"} <= set(r)
        assert r["n"] == 5 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["trained"] is False
        assert len(r["full_layers"]) == {"none": 0, "auto:1": 1}[r["hybrid"]] or r["budget"] is None
        if r["budget"] is not None:
            assert r["ratio"] == pytest.approx(r["tokens"] / r["budget"])
        assert ("hit" in r) == r["augmented"]


def test_cli_retrieval_json_table_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    model_dir, _ = _tiny_model_dir(tmp_path)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--model", str(model_dir), "--retrieval", "--retrieval-tasks", "mqar", "--retrieval-length", "48",
               "--retrieval-n", "4", "--retrieval-difficulty", "mqar=2", "--policies", "tova", "--budgets", "6,12",
               "--full-layers", "none;last", "--augment", "both", "--json", str(out), "--plot", str(png),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["results"] == []  # --retrieval alone measures no perplexity
    recs = doc["retrieval_suite"]
    assert [(r["budget"], r["hybrid"], r["augmented"]) for r in recs] == [
        (None, "none", False), (6, "none", False), (6, "none", True), (6, "last", False), (6, "last", True),
        (12, "none", False), (12, "none", True), (12, "last", False), (12, "last", True)]
    assert all(r["n"] == 4 and len(r["ci95"]) == 2 for r in recs)
    assert "| state | full layers | model | augmented | mqar |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags,match", [(["--retrieval-tasks", "mqar,bogus"], "retrieval-tasks"),
                                         (["--full-layers", "none;auto:x"], "full-layers"),
                                         (["--retrieval-difficulty", "kv=3"], "retrieval-difficulty")])
def test_cli_retrieval_options_are_checked_before_loading(flags, match, monkeypatch, capsys):
    import msrnn_train.models

    monkeypatch.setattr(msrnn_train.models, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    code = main(["--retrieval", "--retrieval-tasks", "mqar", *flags] if flags[0] != "--retrieval-tasks"
                else ["--retrieval", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("evaluate: error: --" + match)
