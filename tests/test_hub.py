"""The saved adapter: one-call reload with the same logits, the model card, a failed push."""

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe, tiny_run_env
from msrnn_train import BudgetSpec, get_budget
from msrnn_train.hub import HubPushError, load_bounded, model_card, push_adapter
from msrnn_train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained adapter (6 steps, so its LoRA weights are not zero)."""
    from msrnn_train.train import train

    tmp = tmp_path_factory.mktemp("hubrun")
    with tiny_run_env(tmp / "cache"):
        recipe = tiny_recipe(tmp, corpus={"n_docs": 4, "words": 300}, **{
            "training.max_steps": 6, "training.save_steps": 3, "eval.max_windows": 2})
        summary = train(recipe)
    return recipe, summary


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- reload
def test_load_bounded_restores_the_trained_bounded_model(run):
    recipe, summary = run
    trained, tokenizer = summary["model"], summary["tokenizer"]
    ids = tokenizer("to be or not to be, that is the question: whether 'tis nobler in the mind to suffer "
                    "the slings and arrows", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 2 * recipe.budget.budget  # the budget evicts
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids, use_cache=False).logits

    model, tok = load_bounded(summary["output_dir"])  # one call: base + adapter + budget
    assert get_budget(model) == recipe.budget_spec()
    assert tok(["to be"])["input_ids"] == tokenizer(["to be"])["input_ids"]
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        assert torch.allclose(got, expected, atol=1e-5)
        # and it is the *bounded* adapted model: not the base, not the full state
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids, use_cache=False).logits, expected, atol=1e-4)
        from msrnn_train import full_state

        with full_state(model):
            assert not torch.allclose(model(input_ids=ids, use_cache=False).logits, expected, atol=1e-4)


def test_checkpoints_reload_bounded_too(run):
    _, summary = run
    ckpt = Path(summary["output_dir"]) / "checkpoint-3"
    model, tok = load_bounded(ckpt)
    assert get_budget(model).policy == "tova" and tok is not None


# ----------------------------------------------------------------------------- the card
def test_model_card_states_base_policy_budget_recipe_and_eval():
    recipe = load_recipe(ROOT / "recipes" / "smollm2_gutenberg.yaml")
    spec = recipe.budget_spec()
    before = [{"policy": "tova", "budget": 64, "ppl": 45.4}, {"policy": "full", "budget": None, "ppl": 39.0}]
    after = [{"policy": "tova", "budget": 64, "ppl": 41.25, "nll": 3.72, "tokens": 2044},
             {"policy": "full", "budget": None, "ppl": 37.5, "nll": 3.62, "tokens": 2044}]
    card = model_card(recipe, spec, after, "HuggingFaceTB/SmolLM2-135M-Instruct", baseline_records=before,
                      repo_id="me/smollm2-tova64")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert "tova" in meta["tags"] and "bounded-kv-cache" in meta["tags"]
    assert meta["msrnn"]["policy"] == "tova" and meta["msrnn"]["budget"] == 64
    assert meta["msrnn"]["eval"][0] == {"policy": "tova", "budget": 64, "ppl": 41.25, "ppl_before": 45.4,
                                        "tokens": 2044}
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {"type": "perplexity", "name": "perplexity (tova, K=64)", "value": 41.25} in metrics
    assert meta["model-index"][0]["name"] == "me/smollm2-tova64"
    body = card.split("---\n", 2)[2]
    assert "| tova | 64 | 45.400 | 41.250 |" in body and "| full | full | 39.000 | 37.500 |" in body
    assert "load_bounded('me/smollm2-tova64')" in body
    recipe_block = body.split("```yaml\n")[1].split("```")[0]
    assert Recipe.from_dict(yaml.safe_load(recipe_block)) == recipe


def test_the_run_writes_its_card(run):
    recipe, summary = run
    card = (Path(summary["output_dir"]) / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["msrnn"]["budget"] == recipe.budget.budget
    assert meta["msrnn"]["base_model_source"] == "random:tiny-llama" and "base_model" not in meta
    assert [r["policy"] for r in meta["msrnn"]["eval"]] == ["tova", "full"]


# ----------------------------------------------------------------------------- pushing
def test_push_offline_fails_clearly_and_leaves_the_folder(run):
    _, summary = run
    out = Path(summary["output_dir"])
    state = folder_state(out)
    with pytest.raises(HubPushError) as info:
        push_adapter(out, "someone/tiny", private=True)
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and f"The local folder {out.resolve()} is intact" in msg
    assert f"python -m msrnn_train.hub push {out.resolve()} someone/tiny" in msg and "hf upload" in msg
    assert folder_state(out) == state


def test_push_without_token_or_network_fails_clearly(run, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    _, summary = run
    out = Path(summary["output_dir"])
    state = folder_state(out)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        push_adapter(out, "someone/tiny")
    # a token but no reachable Hub: the real huggingface_hub calls fail, and say so
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubPushError, match=r"pushing to the Hub as 'someone/tiny' failed: .*is intact"):
        push_adapter(out, "someone/tiny", token="hf_not_a_real_token")
    assert folder_state(out) == state


def test_push_refuses_a_folder_without_adapter(tmp_path):
    with pytest.raises(HubPushError, match="holds no adapter"):
        push_adapter(tmp_path, "someone/tiny")


def test_budget_spec_round_trip_in_folder(tmp_path):
    spec = BudgetSpec(policy="tova", budget=64)
    spec.save(tmp_path)
    assert BudgetSpec.load(tmp_path) == spec
