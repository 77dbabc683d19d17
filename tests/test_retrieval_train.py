"""Training for retrieval: the answer-weighted loss, generated retrieval rows mixed into the LM
data, the recipe keys (data.retrieval_fraction, data.retrieval_tasks, loss.answer_weight,
budget.hybrid, budget.hybrid_probe_tasks, the null-layer budget map's warning) and a tiny run with a
probed hybrid (tiny random model)."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe

from msrnn_train import BudgetSpec
from msrnn_train.losses import causal_lm_loss, weighted_causal_lm_loss
from msrnn_train.recipe import Recipe, RecipeError, RecipeWarning, load_recipe
from msrnn_train.retrieval_data import RetrievalMixDataset, retrieval_row


TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, token caches in a temp folder


def _byte_tokenizer():
    from msrnn_train.models import random_model

    return random_model()[1]


# ----------------------------------------------------------------------------- the loss
def test_weighted_loss_is_the_lm_loss_with_ones_and_weighs_each_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[1, 5:] = -100
    ones = torch.ones(2, 7)
    assert torch.allclose(weighted_causal_lm_loss(logits, labels, ones), causal_lm_loss(logits, labels), atol=1e-6)
    w = ones.clone()
    w[0, 3] = 5.0  # weighs the prediction of labels[0, 3], made at position 2
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100,
                         reduction="none").view(2, 6)
    scored = labels[:, 1:] != -100
    expected = (ce[scored].sum() + 4.0 * ce[0, 2]) / scored.sum()
    assert torch.allclose(weighted_causal_lm_loss(logits, labels, w), expected, atol=1e-6)


# ----------------------------------------------------------------------------- the rows
def test_retrieval_row_is_seq_len_long_with_the_answer_weighted():
    tok = _byte_tokenizer()
    for seed in range(3):
        row = retrieval_row("mqar", seed, 256, tok, answer_weight=5.0)
        assert {k: v.shape for k, v in row.items()} == {k: (256,) for k in ("input_ids", "labels", "loss_weight")}
        used = row["labels"] != -100
        n = int(used.sum())
        assert used[:n].all() and not used[n:].any()  # right padding, not scored
        assert 200 < n <= 256
        answer = row["loss_weight"] == 5.0
        assert answer.sum() == 2 and answer[n - 2:n].all()  # the two answer digits end the text
        assert (row["loss_weight"][~answer] == 1.0).all()
        text = tok.decode(row["input_ids"][:n])
        key, value = re.search(r"\n(\w+): (\d\d)$", text).groups()
        assert value == tok.decode(row["input_ids"][answer])
        listed = re.findall(rf"(?m)^{key}: (\d\d)$", text.split("\n\n")[1])
        assert listed == [value]  # the answer is the listed value of the asked key
    assert torch.equal(retrieval_row("mqar", 1, 256, tok)["input_ids"], retrieval_row("mqar", 1, 256, tok)["input_ids"])


def test_mix_dataset_holds_the_fraction_and_is_deterministic():
    tok = _byte_tokenizer()
    windows = torch.randint(3, 200, (9, 192))
    ds = RetrievalMixDataset(windows, tok, 0.25, ["mqar"], answer_weight=3.0, seed=1)
    assert len(ds) == 12 and ds.n_retrieval == 3
    assert torch.equal(ds[0]["input_ids"], windows[0]) and (ds[0]["loss_weight"] == 1).all()
    r = ds[10]
    assert torch.equal(r["input_ids"], ds[10]["input_ids"]) and (r["loss_weight"] == 3.0).sum() == 2
    assert not torch.equal(ds[9]["input_ids"], ds[10]["input_ids"])
    with pytest.raises(IndexError):
        ds[12]
    batch = torch.utils.data.default_collate([ds[0], ds[9]])  # LM and retrieval rows batch together
    assert batch["loss_weight"].shape == (2, 192)


def test_an_augmented_row_is_the_evaluation_s_augmented_prompt():
    """data.augment_*: a training row is the same instance, augmented exactly as the evaluation
    augments it (`augment.augment`, same max tokens and chunk words), answer still weighted last."""
    from msrnn_train.augment import augment
    from msrnn_train.retrieval_tasks import encode, make_task, token_counter

    tok = _byte_tokenizer()
    for seed in range(3):
        row = retrieval_row("mqar", seed, 256, tok, answer_weight=5.0, augment_tokens=40, augment_chunk_words=4)
        plain = retrieval_row("mqar", seed, 256, tok, answer_weight=5.0)
        n = int((row["labels"] != -100).sum())
        text = tok.decode(row["input_ids"][:n])
        # rebuild: the row's instance is the task at the length the row settled on; find it by its list
        length = 256 - 4 - 40
        while True:
            inst = make_task("mqar", 1, length, seed=seed, tokenizer=tok)[0]
            aug = augment(inst, 40, token_counter(tok), chunk_words=4)
            enc = encode(aug, tok)
            if len(enc.ids) <= 256 or length <= 16:
                break
            length -= len(enc.ids) - 256 + 4
        assert row["input_ids"][:n].tolist() == enc.ids
        assert aug.meta["retrieved_tokens"] > 0 and aug.meta["hit"]  # byte tokens: the source fits in 40
        answer = row["loss_weight"] == 5.0
        assert answer.sum() == 2 and answer[n - 2:n].all()
        assert text != tok.decode(plain["input_ids"][:int((plain["labels"] != -100).sum())])
        # the excerpt sits between the context and the question, and repeats the asked pair
        key, value = re.search(r"\n(\w+): (\d\d)$", text).groups()
        excerpt = text[:text.rindex("\n" + key + ": ")].rsplit("\n\n", 1)[1]
        assert f"{key}: {value}" in excerpt


def test_the_augmented_share_is_exact_and_spread():
    tok = _byte_tokenizer()
    windows = torch.randint(3, 200, (8, 192))
    for f, want in ((0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)):
        ds = RetrievalMixDataset(windows, tok, 0.5, ["mqar"], seed=1, augment_fraction=f, augment_tokens=24)
        flags = [ds.augmented(j) for j in range(ds.n_retrieval)]
        assert sum(flags) == want and (f != 0.5 or flags == [False, True] * 4)
    ds = RetrievalMixDataset(windows, tok, 0.5, ["mqar"], seed=1, augment_fraction=0.5, augment_tokens=24)
    off = RetrievalMixDataset(windows, tok, 0.5, ["mqar"], seed=1)
    assert torch.equal(ds[8]["input_ids"], off[8]["input_ids"])  # row 0 of the retrieval rows: not augmented
    assert not torch.equal(ds[9]["input_ids"], off[9]["input_ids"])  # row 1: augmented
    with pytest.raises(ValueError, match="augment_tokens"):
        RetrievalMixDataset(windows, tok, 0.5, ["mqar"], augment_fraction=0.5)


def test_augment_max_tokens_defaults_to_k_minus_8():
    r = load_recipe(TINY, {"data.retrieval_fraction": 0.5, "data.retrieval_tasks": ["mqar"],
                           "data.augment_fraction": 1.0})
    assert r.budget.budget == 8 and r.augment_max_tokens() == 8  # K - 8, at least 8
    assert load_recipe(TINY, {"data.retrieval_fraction": 0.5, "data.augment_fraction": 1.0,
                              "data.augment_tokens": 10}).augment_max_tokens() == 10
    assert load_recipe(TINY, {"data.retrieval_fraction": 0.5}).augment_max_tokens() is None


# ----------------------------------------------------------------------------- the recipe keys
@pytest.mark.parametrize("override,match", [
    ({"data.retrieval_fraction": 1.0}, "data.retrieval_fraction"),
    ({"data.retrieval_fraction": 0.2, "data.retrieval_tasks": ["mqar", "recal"]}, r"data.retrieval_tasks\[1\]"),
    ({"data.retrieval_fraction": 0.2, "data.retrieval_tasks": []}, "data.retrieval_tasks"),
    ({"loss.answer_weight": -1.0}, "loss.answer_weight"),
    ({"data.augment_fraction": 0.5}, r"^data.augment_fraction: 0.5 augments retrieval rows, but data.retrieval_fraction is 0"),
    ({"data.retrieval_fraction": 0.2, "data.augment_fraction": 1.5}, r"^data.augment_fraction: must be in \[0, 1\]"),
    ({"data.retrieval_fraction": 0.2, "data.augment_fraction": 1.0, "data.augment_tokens": 0}, "^data.augment_tokens"),
    ({"data.retrieval_fraction": 0.2, "data.augment_chunk_words": 1}, "^data.augment_chunk_words"),
    ({"data.retrieval_fraction": 0.2, "data.augment_fraction": 1.0, "budget.budget": [8, 4]},
     r"^data.augment_tokens: null means K - 8, but budget.budget is not one int"),
    ({"budget.hybrid": "auto:x"}, "budget.hybrid"),
    ({"budget.hybrid": "auto:1", "budget.budget": [8, None]}, "budget.hybrid"),
    ({"budget.hybrid": "auto:1", "budget.hybrid_probe_tasks": ["mqar", "needle"]},
     r"^budget.hybrid_probe_tasks\[1\]: 'needle' is not allowed. Did you mean 'needles'\? "
     r"Allowed: mqar, kv, needles, vartrack$"),
    ({"budget.hybrid": "auto:1", "budget.hybrid_probe_tasks": []},
     r"^budget.hybrid_probe_tasks: empty; name at least one of mqar, kv, needles, vartrack, or null"),
    ({"budget.hybrid": "auto:1", "data.retrieval_tasks": []},
     r"^budget.hybrid_probe_tasks: 'auto:1' probes the model, but data.retrieval_tasks \(its default\) is empty"),
    ({"budget.hybrid_probe_tasks": "mqar"}, "^budget.hybrid_probe_tasks: expected a list"),
])
def test_recipe_rejects_bad_retrieval_keys(override, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(TINY, override)
    assert "\n" not in str(err.value)  # one line


def test_the_probe_set_has_its_own_key_and_defaults_to_the_training_tasks(tmp_path, monkeypatch):
    """budget.hybrid_probe_tasks picks auto:N's probe set; unset, it is data.retrieval_tasks (as
    before the key existed), so an old recipe probes as it did."""
    import msrnn_train.hybrid as H
    from msrnn_train.models import random_model

    old = load_recipe(TINY, {"budget.hybrid": "auto:1", "data.retrieval_tasks": ["mqar"], "data.seq_len": 64})
    assert old.budget.hybrid_probe_tasks is None and old.probe_tasks() == ["mqar"]
    new = load_recipe(TINY, {"budget.hybrid": "auto:1", "budget.hybrid_probe_tasks": ["kv", "mqar"]})
    assert new.probe_tasks() == ["kv", "mqar"] and new.data.retrieval_tasks == ["mqar", "kv", "needles", "vartrack"]
    asked = []
    real = H.probe_instances
    monkeypatch.setattr(H, "probe_instances", lambda tok, tasks, length: asked.append((tasks, length)) or
                        real(tok, tasks=("mqar",), length=length))
    model, tok = random_model()
    spec = BudgetSpec(policy="tova", budget=8)
    for recipe in (old, new):
        assert H.resolve_hybrid(recipe, model, tok, spec).budget.count(None) == 1
    assert asked == [(("mqar",), 64), (("kv", "mqar"), 64)]


@pytest.mark.parametrize("raw,probe", [({"budget.hybrid_probe_tasks": ["mqar"]}, False),
                                       ({"budget.hybrid_probe_tasks": ["mqar"], "budget.hybrid": "middle"}, False),
                                       ({"budget.hybrid_probe_tasks": ["mqar"], "budget.hybrid": "auto:1"}, True)])
def test_probe_tasks_without_an_auto_hybrid_are_warned_about(raw, probe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(TINY, raw)
    said = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert any(m.startswith("budget.hybrid_probe_tasks: has no effect without budget.hybrid auto:N") for m in said) \
        != probe, said


@pytest.mark.parametrize("budget,hybrid", [([8, None], (8, "1")), ({"0": None, "default": 8}, (8, "0")),
                                           ({"0": "full", "1": 8, "default": 8}, (8, "0")),
                                           ([None, 8, None, 8], (8, "0+2")),
                                           ([8, 4], None), ([8, None, 4], None),
                                           ({"0": None, "1": 4, "default": 8}, None), ({"1": None}, None), (8, None)])
def test_a_null_layer_budget_loads_and_is_warned_toward_budget_hybrid(budget, hybrid):
    """A per-layer budget whose layers are one K or null is a hybrid that budget.hybrid writes: it
    still loads, unchanged, with one warning naming the budget.hybrid equivalent. Budgets that
    budget.hybrid cannot write (different K per layer) get no such warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = Recipe.from_dict({"budget": {"budget": budget}})  # the built-in default, K = 8 where bounded
    assert recipe.budget.budget == budget and recipe.budget_spec().budget == budget
    said = [str(w.message) for w in caught if "budget.hybrid" in str(w.message)]
    if hybrid is None:
        assert said == []
    else:
        assert said == [f"budget.budget: {budget} makes a hybrid with null layers; write it as budget.budget: "
                        f"{hybrid[0]} with budget.hybrid: \"{hybrid[1]}\" (the one documented notation; this form "
                        "still loads)"]


def test_recipe_warns_about_an_answer_weight_without_retrieval_rows(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_recipe(tmp_path, **{"loss.answer_weight": 4.0})
    assert any(issubclass(w.category, RecipeWarning) and "answer_weight" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- a tiny run
def test_tiny_run_mixes_retrieval_rows_under_a_probed_hybrid(tmp_path, monkeypatch):
    import msrnn_train.train as T
    from msrnn_train.hybrid import choose_full_layers, probe_instances

    seen = {}
    real = T.BoundedTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        seen.setdefault("weights", []).append(inputs["loss_weight"].detach().clone())
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(T.BoundedTrainer, "compute_loss", spy)
    recipe = tiny_recipe(tmp_path, **{"data.seq_len": 256, "data.max_train_windows": 6, "data.retrieval_fraction": 0.5,
                                      "data.retrieval_tasks": ["mqar"], "loss.answer_weight": 4.0,
                                      "budget.hybrid": "auto:1", "budget.budget": 16, "budget.ramp_start": 32,
                                      "training.max_steps": 3, "training.save_steps": 3, "eval.budgets": [16],
                                      "eval.max_windows": 1, "eval.at_start": False})
    summary = T.train(recipe)
    spec = BudgetSpec.load(summary["output_dir"])
    assert spec.budget.count(None) == 1 and len(spec.budget) == 2 and 16 in spec.budget
    from msrnn_train.models import random_model

    model, tok = random_model()
    probe = probe_instances(tok, tasks=("mqar",), length=min(256, 256))
    assert [i for i, k in enumerate(spec.budget) if k is None] == choose_full_layers("auto:1", model, tok, probe=probe)
    weights = torch.cat(seen["weights"])
    assert (weights == 4.0).any() and (weights == 1.0).all(dim=1).any()  # retrieval and LM rows were trained on
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["log_history"] if "loss" in h)
    assert json.loads((Path(summary["output_dir"]) / "msrnn_budget.json").read_text())["budget"] == spec.budget


def test_a_hybrid_keeps_every_other_key_of_the_spec(tmp_path):
    """budget.hybrid only unbounds layers: a learned policy's retention and scorer width, h2o's recent
    window and the prefill chunk of the spec stay as they were."""
    from msrnn_train.hybrid import resolve_hybrid
    from msrnn_train.models import random_model

    model, tok = random_model()
    # (tiny.yaml trains soft-TOVA: a learned policy runs hard, with tiny's soft.tau_end back at its default)
    recipe = tiny_recipe(tmp_path, **{"budget.policy": "learned", "budget.retention": "logit",
                                      "budget.scorer_hidden": 8, "budget.hybrid": "first", "budget.mode": "hard",
                                      "soft.tau_end": 0.05, "learned.relaxation": "decay"})
    spec = BudgetSpec(policy="learned", budget=8, retention="logit", scorer_hidden=8, prefill_chunk=16)
    hybrid = resolve_hybrid(recipe, model, tok, spec)
    assert hybrid.budget == [None, 8]
    assert {k: v for k, v in hybrid.to_dict().items() if k != "budget"} == \
        {k: v for k, v in spec.to_dict().items() if k != "budget"}
