"""In-context retrieval: the teacher-forced scorer against real greedy decoding through a bounded
cache, `encode`, the one hybrid notation (the recipe's budget.hybrid and evaluate --full-layers read
the same strings with the same parser), the removed retrieval interface refused by name, and -
slow - the real SmolLM2 model solving easy MQAR with its full state and failing with a small window."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from test_evaluate import tiny_text, tiny_tokenizer

from msrnn_train import BudgetSpec, apply_budget, get_budget, make_cache, remove_budget
from msrnn_train.compat import cache_kwargs
from msrnn_train.eval_cli import REMOVED_OPTIONS, ArgError, _suite_args, build_parser, main
from msrnn_train.hybrid import hybrid_spec, parse_hybrid
from msrnn_train.recipe import Recipe, RecipeError, load_recipe
from msrnn_train.retrieval import accuracy, retrieval_grid, solved
from msrnn_train.retrieval_tasks import Instance, encode, make_task

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


# ----------------------------------------------------------------------------- encode
def test_encode_locates_answer_and_evidence():
    tok = tiny_tokenizer()
    inst = make_task("mqar", 1, 40, difficulty=2)[0]
    enc = encode(inst, tok)
    assert tok.decode(enc.ids[enc.answer_start:]).replace(" ", "") == inst.answer
    assert enc.ids[:enc.answer_start] == tok(inst.prompt)["input_ids"]
    # the evidence (the asked pair's line) ends before the demo queries and the question
    evidence_end_char = inst.prompt.index(inst.meta["evidence"]) + len(inst.meta["evidence"])
    assert enc.evidence_end == len(tok(inst.prompt[:evidence_end_char])["input_ids"])
    assert 0 < enc.evidence_end < enc.answer_start
    custom = encode(Instance("custom", "the king : ", "4"), tok)  # no evidence known: the prompt's end
    assert custom.evidence_end == custom.answer_start


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


# ----------------------------------------------------------------------------- one hybrid notation
def test_hybrid_spec_and_labels():
    spec = hybrid_spec("tova", 64, 30, ["middle"])
    assert spec.budget == [64] * 15 + [None] + [64] * 14
    assert spec.layer_budget(15) is None and spec.layer_budget(0) == 64
    assert hybrid_spec("sinks", 8, 4, ["last", 0]).budget == [None, 8, 8, None]
    assert hybrid_spec("tova", 8, 4, "-1").budget == [8, 8, 8, None]
    assert spec.label == "tova-64+full[15]"
    with pytest.raises(ValueError):
        hybrid_spec("tova", 8, 4, [4])


def test_parse_hybrid_reads_every_form():
    assert parse_hybrid(None) == parse_hybrid("none") == ("none", [])
    assert parse_hybrid("auto:3") == ("auto", 3) and parse_hybrid("random:1") == ("random", 1)
    assert parse_hybrid("middle") == ("fixed", ["middle"])
    assert parse_hybrid("0+last") == ("fixed", ["0", "last"])
    assert parse_hybrid(17) == parse_hybrid("17") == ("fixed", ["17"])  # YAML reads `hybrid: 17` as an int
    assert parse_hybrid(-1) == ("fixed", ["-1"])
    for bad in ("auto:x", "auto:0", "some", "3+x", "first+", "auto:", ""):
        with pytest.raises(ValueError, match="auto:N|N >= 1"):
            parse_hybrid(bad)


def _recipe_hybrid(value):
    """budget.hybrid read by the recipe (None: accepted), else its one-line error. The value goes
    in as the string a quoted YAML value gives (an unquoted `3` is an int: the same layer)."""
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["budget"]["hybrid"] = value
    try:
        Recipe.from_dict(raw)
    except RecipeError as err:
        return str(err)
    return None


def _cli_hybrid(value):
    """--full-layers read by the command line (None: accepted), else its one-line error."""
    args = build_parser().parse_args(["--retrieval", "--full-layers", value])
    try:
        _suite_args(args)
    except ArgError as err:
        return str(err)
    return None


@pytest.mark.parametrize("value", ["none", "auto:1", "auto:12", "random:2", "first", "middle", "last", "3", "-1",
                                   "3+17", "0+last", "auto:0", "auto:x", "random:", "some", "3+x", "first+",
                                   "middle;last"])
def test_recipe_and_cli_accept_the_same_hybrid_strings(value):
    """budget.hybrid and --full-layers: the same strings accepted, the same message for the others
    (the CLI's ';' joins several hybrids for a grid; the recipe takes one)."""
    recipe, cli = _recipe_hybrid(value), _cli_hybrid(value)
    if ";" in value:
        assert cli is None and recipe is not None and "budget.hybrid:" in recipe
        return
    try:
        parse_hybrid(value)
        expected = None
    except ValueError as err:
        expected = str(err)
    assert recipe == (None if expected is None else f"budget.hybrid: {expected}")
    assert cli == (None if expected is None else f"--full-layers: {expected}")
    if expected is None and value.lstrip("-").isdigit():  # unquoted in YAML or on the command line: an int
        assert load_recipe(TINY_RECIPE, {"budget.hybrid": value}).budget.hybrid == int(value)
        assert _recipe_hybrid(int(value)) is None and parse_hybrid(int(value)) == parse_hybrid(value)


def test_help_lists_one_retrieval_interface():
    parser = build_parser()
    text = parser.format_help()
    for flag in REMOVED_OPTIONS:
        assert flag not in text
    groups = [g for g in parser._action_groups if "retrieval" in (g.title or "")]
    assert len(groups) == 1
    ours = {o for a in groups[0]._group_actions for o in a.option_strings}
    assert {"--retrieval", "--retrieval-tasks", "--retrieval-n", "--retrieval-batch-size", "--full-layers",
            "--augment"} <= ours
    named = {o for a in parser._actions for o in a.option_strings if "retrieval" in o or "full-layers" in o}
    assert named <= ours  # no retrieval option outside the one group
    full_layers = parser._option_string_actions["--full-layers"].help
    assert "budget.hybrid" in full_layers and all(n in full_layers for n in ("auto:N", "random:N", "3+17"))


@pytest.mark.parametrize("flag", list(REMOVED_OPTIONS))
def test_removed_retrieval_options_are_refused_naming_the_replacement(flag, monkeypatch, capsys):
    import msrnn_train.models

    monkeypatch.setattr(msrnn_train.models, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    argv = [flag] if flag == "--chat" else [f"{flag}=middle" if flag == "--hybrid-layers" else flag, "4"]
    code = main(["--model", "random:tiny-llama", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    replacement = REMOVED_OPTIONS[flag].split()[0]
    assert err[0].startswith(f"evaluate: error: {flag}: removed") and f"use {replacement}" in err[0]
    assert replacement in build_parser()._option_string_actions  # the replacement exists


def test_tasks_retrieval_is_refused_naming_retrieval(monkeypatch, capsys):
    code = main(["--tasks", "ppl,retrieval"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("evaluate: error: --tasks retrieval: removed") and "use --retrieval" in err


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_full_state_solves_easy_mqar_and_a_small_window_does_not(smollm2):
    model, tok = smollm2
    tasks = {"mqar": make_task("mqar", 12, 256, difficulty=4, tokenizer=tok)}
    recs = retrieval_grid(model, tok, tasks, [16], policy="window", augment=(False,), progress=False)
    full, window = recs
    assert full["budget"] is None and full["accuracy"] >= 0.75 and full["distance_tokens"] > 100
    assert window["budget"] == 16 and window["accuracy"] <= 0.25  # the source is > 100 tokens back
    assert get_budget(model) is None
