"""No run may silently save a wrong adapter: per-layer and hybrid budgets end to end, a run owns its
output folder (refusal, overwrite only on success), resume from the newest complete checkpoint,
and the divergence checks."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe
from msrnn_train.compat import cache_kwargs
from msrnn_train.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, token caches in a temp folder


def recipe_for(tmp_path, out="out", **overrides):
    """conftest's tiny recipe (4 documents), 4 steps, no evaluation, no W&B."""
    base = {"budget.ramp_start": None, "training.max_steps": 4, "eval.max_windows": 0, "wandb.mode": "disabled"}
    return tiny_recipe(tmp_path, out, corpus={"n_docs": 4, "words": 400}, **{**base, **overrides})


@pytest.mark.parametrize("budget, held", [([8, None], [8, 30]), ({"0": None, "default": 8}, [30, 8])],
                         ids=["list", "map"])
def test_per_layer_and_hybrid_budgets_train_evaluate_save_reload_generate(tmp_path, budget, held):
    from msrnn_train import make_cache
    from msrnn_train.controller import get_budget
    from msrnn_train.hub import load_bounded
    from msrnn_train.spec import BudgetSpec
    from msrnn_train.train import train

    recipe = recipe_for(tmp_path, **{"budget.budget": budget, "eval.max_windows": 2, "eval.policies": ["full"]})
    summary = train(recipe)  # used to end in TypeError: unhashable type: 'list' after saving
    out = Path(summary["output_dir"])
    after = {(r["policy"], str(r["budget"])): r["ppl"] for r in summary["after"]}
    before = {(r["policy"], str(r["budget"])): r["ppl"] for r in summary["before"]}
    assert ("tova", str(budget)) in after and after[("tova", str(budget))] < before[("tova", str(budget))]
    assert BudgetSpec.load(out).budget == budget
    assert "tova" in (out / "README.md").read_text()

    model, tok = load_bounded(out)
    assert get_budget(model).budget == budget
    cache = make_cache(model)
    enc = tok("the king is dead", return_tensors="pt")
    new = model.generate(**enc, max_new_tokens=30 - enc["input_ids"].shape[1] + 1, **cache_kwargs(cache),
                         do_sample=False)
    assert new.shape[1] == 31
    assert cache.state_sizes() == held  # K = 8 where bounded, every state where not


def _files(folder: Path) -> dict:
    return {n: (folder / n).read_bytes() for n in ("adapter_model.safetensors", "msrnn_budget.json", "recipe.yaml",
                                                   "adapter_config.json")}


def test_a_run_owns_its_folder_and_a_failed_overwrite_keeps_the_good_adapter(tmp_path):
    from msrnn_train.trainer import TrainingFailed
    from msrnn_train.train import train

    train(recipe_for(tmp_path, **{"budget.budget": 8}))
    out = tmp_path / "out"
    good = _files(out)
    with pytest.raises(RecipeError, match=r"already holds another run \(budget.budget: 8 -> 4\).*overwrite_output_dir"):
        train(recipe_for(tmp_path, **{"budget.budget": 4}))
    with pytest.raises(TrainingFailed, match="stopped being finite"):
        train(recipe_for(tmp_path, **{"budget.budget": 4, "training.overwrite_output_dir": True,
                                      "training.learning_rate": 1e30, "training.max_grad_norm": 0}))
    assert _files(out) == good  # the failed run replaced nothing: weights, budget and recipe all still run A's
    assert not (out / ".saving").exists()

    train(recipe_for(tmp_path, **{"budget.budget": 4, "training.overwrite_output_dir": True}))
    assert yaml.safe_load((out / "msrnn_budget.json").read_text())["budget"] == 4
    assert load_recipe(out / "recipe.yaml").budget.budget == 4
    assert _files(out)["adapter_model.safetensors"] != good["adapter_model.safetensors"]
    ckpts = sorted(out.glob("checkpoint-*"))  # only the new run's checkpoints; the old ones set aside, then gone
    assert ckpts and all(load_recipe(c / "recipe.yaml").budget.budget == 4 for c in ckpts)
    assert not (out / ".replaced-run").exists()


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    from msrnn_train.train import train

    over = {"training.max_steps": 8, "training.save_steps": 4, "training.save_total_limit": 5}
    whole = train(recipe_for(tmp_path, "a", **over))
    out = tmp_path / "b"
    train(recipe_for(tmp_path, "b", **over))
    (out / "checkpoint-8" / "trainer_state.json").unlink()  # killed while writing the last checkpoint
    (out / "checkpoint-8" / "msrnn_budget.json").unlink()
    (out / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    train(recipe_for(tmp_path, "b", **over, **{"training.resume_from_checkpoint": True}))
    err = capsys.readouterr().err
    assert "skipping checkpoint-8: incomplete (no trainer_state.json" in err and "resuming from" in err
    assert "checkpoint-4" in err.split("resuming from")[1].splitlines()[0]
    wa = load_file(str(Path(whole["output_dir"]) / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter_model.safetensors"))
    for name in wa:  # steps 5..8 retrained from checkpoint-4: the same adapter as the uninterrupted run
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name


def test_loss_curve_checks():
    from msrnn_train.trainer import TrainingFailed, check_loss_curve

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    hist = lambda losses: [{"step": i + 1, "loss": v, "lm_loss": v} for i, v in enumerate(losses)]  # noqa: E731
    check_loss_curve(hist([3.5, 3.2, 3.0, 2.9]), recipe, vocab_size=49152)  # learning: fine
    check_loss_curve(hist([5.56, 5.55, 5.56]), recipe, vocab_size=259)  # an untrained random model starts uniform
    with pytest.raises(TrainingFailed, match=r"rose from 3.500 \(first step\) to 12.000"):
        check_loss_curve(hist([3.5, 8.0, 12.0, 12.0, 12.0]), recipe)
    with pytest.raises(TrainingFailed, match=r"log\(vocabulary size 49152\): the model collapsed to uniform output"):
        check_loss_curve(hist([3.5, 9.0, 10.8, 10.8, 10.8]), recipe, vocab_size=49152)
    with pytest.raises(TrainingFailed, match="diverged"):
        check_loss_curve(hist([3.5, float("nan")]), recipe)


def test_a_key_added_after_a_run_counts_as_its_default_when_comparing_recipes():
    """A run folder written before a recipe key existed stays the same run (resume, rerun) while
    the key keeps its default; a non-default value is a difference, named."""
    from msrnn_train.recipe import load_recipe
    from msrnn_train.run_folder import recipe_differences

    recipe = load_recipe(None)
    saved = recipe.to_dict()
    del saved["budget"]["hybrid_probe_tasks"]  # as a run saved before the key existed
    assert recipe_differences(saved, recipe) == []
    changed = load_recipe(None, {"budget.hybrid_probe_tasks": ["kv"]})
    assert recipe_differences(saved, changed) == ["budget.hybrid_probe_tasks: '(absent)' -> ['kv']"]
