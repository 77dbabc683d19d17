"""Recipes: shipped files parse, bad recipes stop with one clear message before anything loads."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from msrnn_train.recipe import Recipe, RecipeError, RecipeWarning, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path, obj, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj))
    return path


def error_of(tmp_path, obj=None, overrides=None) -> str:
    path = write(tmp_path, obj or {})
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- shipped recipes
def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"mistral_tova512.yaml", "smollm2_gutenberg.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    # the resolved YAML is itself a recipe that resolves to the same thing
    again = load_recipe(write(tmp_path, yaml.safe_load(recipe.to_yaml())))
    assert again == recipe


def test_mistral_recipe_is_the_advertised_run():
    r = load_recipe(ROOT / "recipes" / "mistral_tova512.yaml")
    assert r.model.source == "mistralai/Mistral-7B-v0.1"
    assert (r.budget.policy, r.budget.budget) == ("tova", 512)
    assert set(r.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "pg19" in r.data.source
    assert r.training.bf16 and r.model.dtype == "bfloat16" and r.training.gradient_checkpointing
    assert r.deepspeed.endswith("recipes/deepspeed/zero2.json")
    assert r.wandb.project and not r.hub.push_to_hub


def test_embedded_default_is_the_smollm2_recipe():
    default = load_recipe(None)
    assert default == Recipe() == load_recipe(ROOT / "recipes" / "smollm2_gutenberg.yaml")
    assert default.model.source == "smollm2" and default.data.source == "gutenberg"
    assert default.data.seq_len >= 512 and default.budget.budget == default.data.seq_len // 8


# ----------------------------------------------------------------------------- clear errors
def test_unknown_top_level_key_names_it_and_suggests(tmp_path):
    msg = error_of(tmp_path, {"trainng": {"max_steps": 3}})
    assert msg.startswith("trainng: unknown key")
    assert "Did you mean 'training'" in msg and "model, data, budget" in msg


def test_unknown_nested_key_names_the_dotted_key(tmp_path):
    msg = error_of(tmp_path, {"training": {"learnig_rate": 1e-4}})
    assert msg.startswith("training.learnig_rate: unknown key")
    assert "'training.learning_rate'" in msg and "max_steps" in msg


def test_budget_temperature_is_not_a_recipe_key(tmp_path):
    msg = error_of(tmp_path, {"budget": {"temperature": 0.5}})
    assert "budget.temperature: unknown key" in msg


@pytest.mark.parametrize("section,key,value,expected", [
    ("training", "max_steps", "ten", "an integer"),
    ("training", "max_steps", 2.5, "an integer"),
    ("lora", "r", True, "an integer"),
    ("training", "bf16", "yes please", "true/false"),
    ("loss", "kl_weight", "lots", "a number"),
    ("lora", "target_modules", "q_proj", "a list of a string"),
    ("eval", "budgets", [64, "x"], "a list of an integer"),
])
def test_wrong_type_names_key_expected_and_got(tmp_path, section, key, value, expected):
    msg = error_of(tmp_path, {section: {key: value}})
    assert msg.startswith(f"{section}.{key}: expected {expected}")
    assert repr(value) in msg


def test_section_must_be_a_mapping(tmp_path):
    assert error_of(tmp_path, {"training": 5}).startswith("training: expected a section")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    recipe = load_recipe(write(tmp_path, {"training": {"learning_rate": "1e-4"}}))
    assert recipe.training.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("budget,fragment", [
    ({"budget": 0}, "budget.budget: a budget must be >= 1"),
    ({"budget": -4}, "budget.budget: a budget must be >= 1"),
    ({"policy": "lru"}, "budget.policy: unknown policy 'lru'; allowed: full, window, sinks, h2o, tova"),
    ({"policy": "h2o", "budget": 16, "recent": 32, "mode": "hard"}, "budget.recent: h2o's recent window r=32 exceeds"),
    ({"policy": "window", "mode": "soft"}, "budget.mode: 'soft' relaxes TOVA"),
    ({"mode": "fuzzy"}, "budget.mode: 'fuzzy' is not allowed"),
    ({"budget": [64, 0]}, "budget.budget[1]"),
])
def test_impossible_budget_stops(tmp_path, budget, fragment):
    assert fragment in error_of(tmp_path, {"budget": budget})


def test_budget_ramp_must_start_above_k(tmp_path):
    msg = error_of(tmp_path, {"budget": {"budget": 64, "ramp_start": 32}})
    assert msg.startswith("budget.ramp_start:") and "64" in msg
    assert error_of(tmp_path, {"budget": {"ramp_start": 128, "ramp_fraction": 0}}).startswith("budget.ramp_fraction")
    assert error_of(tmp_path, {"budget": {"ramp_start": 128, "train_budgets": [32, 64]}}).startswith(
        "budget.train_budgets: cannot be combined with budget.ramp_start")


def test_other_cross_field_rules(tmp_path):
    assert error_of(tmp_path, {"loss": {"bounded_lm_weight": 0, "kl_weight": 0, "full_lm_weight": 0}}).startswith(
        "loss: bounded_lm_weight, full_lm_weight and kl_weight are all 0")
    assert error_of(tmp_path, {"soft": {"tau_start": 0.1, "tau_end": 1.0}}).startswith("soft.tau_start/tau_end")
    assert error_of(tmp_path, {"hub": {"push_to_hub": True}}).startswith("hub.repo_id: required")
    assert error_of(tmp_path, {"training": {"lr_scheduler_type": "cosin"}}).startswith(
        "training.lr_scheduler_type: 'cosin' is not allowed. Did you mean 'cosine'?")
    assert error_of(tmp_path, {"eval": {"policies": ["tova", "nope"]}}).startswith("eval.policies[1]")
    assert error_of(tmp_path, {"model": {"dtype": "float64"}}).startswith("model.dtype")
    assert error_of(tmp_path, {"data": {"source": " "}}).startswith("data.source: empty; give 'gutenberg'")


def test_budget_that_never_evicts_warns(tmp_path):
    with pytest.warns(RecipeWarning, match=r"budget.budget: K=512 >= data.seq_len=512"):
        load_recipe(write(tmp_path, {"budget": {"budget": 512}, "data": {"seq_len": 512}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        load_recipe(write(tmp_path, {"budget": {"budget": 64}, "data": {"seq_len": 512}}))


# ----------------------------------------------------------------------------- overrides
def test_overrides_are_dotted_and_yaml_typed(tmp_path):
    path = write(tmp_path, {"training": {"max_steps": 3}})
    r = load_recipe(path, ["--budget.budget", "32", "--training.learning_rate=1e-4", "--eval.budgets", "[16, 32]",
                           "--wandb.name", "null", "--training.bf16", "true", "--deepspeed", "null"])
    assert r.budget.budget == 32 and r.training.learning_rate == pytest.approx(1e-4)
    assert r.eval.budgets == [16, 32] and r.wandb.name is None and r.training.bf16 is True
    assert r.training.max_steps == 3  # untouched keys keep the file's value


def test_override_errors_are_clear(tmp_path):
    path = write(tmp_path, {"training": {"max_steps": 5}})  # an empty recipe is refused (test_bad_inputs)
    with pytest.raises(RecipeError, match=r"training.max_stesp: unknown key. Did you mean 'training.max_steps'"):
        load_recipe(path, ["--training.max_stesp", "3"])
    with pytest.raises(RecipeError, match=r"--training.max_steps: needs a value"):
        parse_overrides(["--training.max_steps"])
    with pytest.raises(RecipeError, match=r"expected --key value"):
        parse_overrides(["max_steps", "3"])
    with pytest.raises(RecipeError, match=r"budget.budget: a budget must be >= 1"):
        load_recipe(path, {"budget.budget": 0})


# ----------------------------------------------------------------------------- the CLI
def test_main_stops_with_exit_2_before_loading_anything(tmp_path, capsys, monkeypatch):
    import msrnn_train.train as train_mod

    def forbidden(*a, **k):
        raise AssertionError("nothing may load for an invalid recipe")

    monkeypatch.setattr(train_mod, "train", forbidden)
    monkeypatch.setattr(train_mod, "load_base_model", forbidden)
    path = write(tmp_path, {"budget": {"policy": "tova", "budget": 0}})
    capsys.readouterr()  # whatever importing transformers printed
    assert train_mod.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert err.startswith("recipe error: budget.budget: a budget must be >= 1 state, got 0")


def test_validate_prints_the_resolved_recipe(tmp_path, capsys):
    from msrnn_train.train import main

    assert main([str(ROOT / "recipes" / "tiny.yaml"), "--validate", "--budget.budget", "4",
                 "--training.output_dir", str(tmp_path / "out")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["budget"]["budget"] == 4
    assert printed["training"]["max_steps"] == load_recipe(ROOT / "recipes" / "tiny.yaml").training.max_steps
    assert set(printed) == {f for f in Recipe.__dataclass_fields__}


def test_validate_reads_local_data_but_downloads_nothing(tmp_path, capsys, monkeypatch):
    """--validate reads a local data source (so an empty folder stops it, as it stops training) and
    skips one that would have to be downloaded (Gutenberg before its first fetch), saying so."""
    import msrnn_train.data as data_mod
    from msrnn_train.train import main

    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))  # Gutenberg not fetched yet

    def no_download():
        raise AssertionError("--validate downloaded the Gutenberg books")

    monkeypatch.setattr(data_mod, "gutenberg_dir", no_download)
    tiny = str(ROOT / "recipes" / "tiny.yaml")
    out = ["--training.output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert main([tiny, "--validate", *out]) == 0
    assert "data.source 'gutenberg': not read (it would be downloaded)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([tiny, "--validate", "--data.source", str(tmp_path / "empty"), *out]) == 2
    assert f"recipe error: data.source: {tmp_path / 'empty'}: a folder with no .txt files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_deepspeed_config_is_a_recipe_error(tmp_path):
    from msrnn_train.train import check_runtime

    recipe = load_recipe(write(tmp_path, {"deepspeed": "nowhere/zero2.json"}))
    with pytest.raises(RecipeError, match=r"deepspeed: config file not found: nowhere/zero2.json"):
        check_runtime(recipe)


def test_runs_as_script_path_and_as_module(tmp_path):
    """`accelerate launch msrnn_train/train.py` runs the file as a script; `python -m` as a module."""
    proc = subprocess.run([sys.executable, "msrnn_train/train.py", "recipes/tiny.yaml", "--validate",
                           "--training.output_dir", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["model"]["source"] == "random:tiny-llama"  # stdout is pure YAML
    bad = subprocess.run([sys.executable, "-m", "msrnn_train.train", "recipes/tiny.yaml", "--budget.policy", "lru"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "budget.policy: unknown policy 'lru'" in bad.stderr


# ----------------------------------------------------------------------------- renamed keys
RENAMES = [("soft", "budget_ramp_start", 128, "budget", "ramp_start"),
           ("soft", "ramp_fraction", 0.3, "budget", "ramp_fraction"),
           ("loss", "lm_weight", 0.5, "loss", "bounded_lm_weight")]


def test_every_renamed_key_is_tested():
    from msrnn_train.recipe import RENAMED

    assert RENAMED == {f"{s}.{k}": f"{ns}.{nk}" for s, k, _, ns, nk in RENAMES}


def renamed_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "is now" in str(w.message)]


@pytest.mark.parametrize("sec, key, value, new_sec, new_key", RENAMES, ids=lambda x: str(x))
def test_an_old_key_loads_under_its_new_name_with_one_warning(tmp_path, sec, key, value, new_sec, new_key):
    raw = {sec: {key: value}} if key != "ramp_fraction" else {"budget": {"ramp_start": 128}, sec: {key: value}}
    with pytest.warns(RecipeWarning) as record:
        recipe = load_recipe(write(tmp_path, raw))
    assert renamed_warnings(record) == [f"recipe: {sec}.{key} is now {new_sec}.{new_key}; read as such"]
    assert getattr(getattr(recipe, new_sec), new_key) == value
    assert key not in recipe.to_dict()[sec]  # saved under the new name only
    # as an override (CLI tokens or dotted keys): the same, and it overrides the file's new name
    new_raw = {new_sec: {new_key: value}} if key != "ramp_fraction" else {"budget": {"ramp_start": 128,
                                                                                     "ramp_fraction": value}}
    other = 0.75 if isinstance(value, float) else 256
    with pytest.warns(RecipeWarning) as record:
        overridden = load_recipe(write(tmp_path, new_raw), [f"--{sec}.{key}", str(other)])
    assert renamed_warnings(record) == [f"recipe: {sec}.{key} is now {new_sec}.{new_key}; read as such"]
    assert getattr(getattr(overridden, new_sec), new_key) == other


@pytest.mark.parametrize("sec, key, value, new_sec, new_key", RENAMES, ids=lambda x: str(x))
def test_an_old_and_a_new_name_of_one_key_together_are_one_error(tmp_path, sec, key, value, new_sec, new_key):
    both = {sec: {key: value}}
    both.setdefault(new_sec, {})[new_key] = value
    msg = error_of(tmp_path, both)
    assert msg == f"{sec}.{key}: set together with {new_sec}.{new_key}, its new name; keep only {new_sec}.{new_key}"
    with pytest.raises(RecipeError, match=f"^{sec}.{key}: set together with {new_sec}.{new_key}"):
        load_recipe(write(tmp_path, {"training": {"max_steps": 3}}), {f"{sec}.{key}": value,
                                                                      f"{new_sec}.{new_key}": value})


def old_layout(recipe: Recipe) -> dict:
    """`recipe` as a recipe.yaml saved before the renames (every key, the old names)."""
    raw = recipe.to_dict()
    raw["soft"]["budget_ramp_start"] = raw["budget"].pop("ramp_start")
    raw["soft"]["ramp_fraction"] = raw["budget"].pop("ramp_fraction")
    raw["loss"] = {("lm_weight" if k == "bounded_lm_weight" else k): v for k, v in raw["loss"].items()}
    return raw


def test_a_saved_run_of_an_older_version_loads_and_resumes(tmp_path):
    """recipe.yaml in an adapter or checkpoint folder written before the renames: it loads as the
    same recipe, and the output folder's checks (resume, claim) see no difference."""
    from msrnn_train.run_folder import _saved_recipe, recipe_differences

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    saved = write(tmp_path, old_layout(recipe), "recipe.yaml")
    with pytest.warns(RecipeWarning) as record:
        assert load_recipe(saved) == recipe
    assert len(renamed_warnings(record)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # the folder checks read it quietly
        assert recipe_differences(_saved_recipe(tmp_path), recipe) == []


def test_validate_reads_an_old_key_says_so_and_prints_the_new_one(tmp_path, capsys):
    from msrnn_train.train import main

    capsys.readouterr()
    assert main([str(ROOT / "recipes" / "tiny.yaml"), "--validate", "--soft.budget_ramp_start", "24",
                 "--training.output_dir", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["budget"]["ramp_start"] == 24
    assert "warning: recipe: soft.budget_ramp_start is now budget.ramp_start; read as such" in err


# ----------------------------------------------------------------------------- the normal form of a budget
@pytest.mark.parametrize("budget, per_layer, label", [
    (64, [64, 64, 64, 64], "tova-64"),
    ([64, None, 128, "full"], [64, None, 128, None], "tova-64/128+full[1, 3]"),
    ({"1": None, "default": 32}, [32, None, 32, 32], "tova-32+full[1]"),
    ({0: 16, "2": 8}, [16, None, 8, None], "tova-8/16+full[rest]"),
])
def test_a_budget_has_one_normal_form_and_one_label(budget, per_layer, label):
    from msrnn_train import BudgetSpec

    spec = BudgetSpec(policy="tova", budget=budget)
    assert spec.per_layer(4) == per_layer
    assert spec.label == label
    assert spec.bounded_budgets() == [k for k in (budget.values() if isinstance(budget, dict) else
                                                  budget if isinstance(budget, list) else [budget])
                                      if k not in (None, "full")]
    assert BudgetSpec(policy="full").per_layer(3) == [None] * 3 and BudgetSpec(policy="full").label == "full"


def test_a_budget_file_of_an_older_version_still_loads(tmp_path):
    """msrnn_budget.json once carried `temperature` (never read); such a file loads, the key ignored,
    while a key no version wrote is still refused."""
    import json

    from msrnn_train import BudgetError, BudgetSpec

    (tmp_path / "msrnn_budget.json").write_text(json.dumps({
        "policy": "tova", "budget": 64, "sinks": 4, "recent": None, "mode": "hard", "temperature": 1.0,
        "prefill_chunk": 128}))
    assert BudgetSpec.load(tmp_path) == BudgetSpec(policy="tova", budget=64)
    assert "temperature" not in BudgetSpec.load(tmp_path).to_dict()
    (tmp_path / "msrnn_budget.json").write_text(json.dumps({"policy": "tova", "budget": 64, "temprature": 1.0}))
    with pytest.raises(BudgetError, match="temprature"):
        BudgetSpec.load(tmp_path)


def test_a_budget_file_that_carries_mode_still_loads(tmp_path):
    """msrnn_budget.json once carried `mode` ("hard"; it changed no computation): such a file loads,
    the key ignored, and a spec has no mode any more (soft training is the recipe's budget.mode)."""
    import json

    from msrnn_train import BudgetSpec

    for mode in ("hard", "soft"):
        (tmp_path / "msrnn_budget.json").write_text(json.dumps({
            "policy": "h2o", "budget": 32, "sinks": 4, "recent": 8, "retention": "decay", "scorer_hidden": 0,
            "mode": mode, "prefill_chunk": 64}))
        spec = BudgetSpec.load(tmp_path)
        assert spec == BudgetSpec(policy="h2o", budget=32, recent=8, prefill_chunk=64)
        assert "mode" not in spec.to_dict() and not hasattr(spec, "mode")
    with pytest.raises(TypeError):
        BudgetSpec(policy="tova", budget=8, mode="soft")


def test_budget_mode_selects_soft_training_and_is_not_saved_with_the_spec(tmp_path):
    soft = load_recipe(write(tmp_path, {"budget": {"mode": "soft"}}))
    assert soft.budget.mode == "soft"
    assert soft.budget_spec() == load_recipe(None).budget_spec()  # the saved spec is the same either way
    assert "mode" not in soft.budget_spec().to_dict()


# ----------------------------------------------------------------------------- keys with no effect
@pytest.mark.parametrize("raw, message", [
    ({"loss": {"kl_weight": 0, "teacher": "base"}},
     "loss.teacher: has no effect with loss.kl_weight 0 (no distillation)"),
    ({"loss": {"kl_weight": 0, "teacher": "base", "kl_temperature": 2.0}},
     "loss.teacher, loss.kl_temperature: have no effect with loss.kl_weight 0 (no distillation)"),
    ({"soft": {"tau_end": 0.1}},
     "soft.tau_end: has no effect with budget.mode hard (only budget.mode soft anneals a relaxation)"),
    ({"soft": {"tau_start": 2.0, "hard_fraction": 0.5}},
     "soft.tau_start, soft.hard_fraction: have no effect with budget.mode hard (only budget.mode soft anneals "
     "a relaxation)"),
    ({"budget": {"ramp_fraction": 0.3}},
     "budget.ramp_fraction: has no effect without budget.ramp_start (no budget ramp)"),
    ({"budget": {"recent": 8}},
     "budget.recent: has no effect with budget.policy 'tova' (it is h2o's protected recent window)"),
    ({"budget": {"policy": "window", "sinks": 2}},
     "budget.sinks: has no effect with budget.policy 'window' and no policy that keeps sinks in eval.policies ("),
    ({"budget": {"scorer_hidden": 16}},
     "budget.scorer_hidden: has no effect with budget.policy 'tova' (they belong to a learned policy's scorer: "
     "learned or learned_head)"),
    ({"data": {"retrieval_tasks": ["mqar"]}},
     "data.retrieval_tasks: has no effect without retrieval rows (data.retrieval_fraction: 0) or a budget.hybrid "
     "auto:N probe"),
    ({"budget": {"policy": "learned"}, "learned": {"relaxation": "decay", "tau": 0.5}},
     "learned.tau: has no effect with learned.relaxation 'decay' (it is ste's temperature)"),
    ({"budget": {"policy": "learned"}, "learned": {"capacity_weight": 2.0}},
     "learned.capacity_weight: has no effect with learned.relaxation 'ste' (it weighs decay's capacity loss)"),
    ({"budget": {"policy": "learned"}, "learned": {"relaxation": "none", "hard_fraction": 0.5}},
     "learned.hard_fraction: has no effect with learned.relaxation 'none' (the exact process runs throughout)"),
])
def test_a_key_with_no_effect_is_warned_about_by_name(tmp_path, raw, message):
    with pytest.warns(RecipeWarning) as record:
        load_recipe(write(tmp_path, raw))
    assert any(str(w.message).startswith(message) for w in record), [str(w.message) for w in record]


@pytest.mark.parametrize("raw", [
    {"loss": {"kl_weight": 0.5, "teacher": "base", "kl_temperature": 2.0}},  # distillation on: both apply
    {"budget": {"mode": "soft"}, "soft": {"tau_start": 2.0, "tau_end": 0.1, "hard_fraction": 0.5}},
    {"budget": {"ramp_start": 128, "ramp_fraction": 0.3}},  # the ramp runs in hard mode too
    {"budget": {"policy": "h2o", "recent": 8}},
    {"budget": {"policy": "sinks", "sinks": 2}},
    {"budget": {"sinks": 2}, "eval": {"policies": ["tova", "sinks", "full"]}},  # the evaluated sinks use it
    {"data": {"retrieval_tasks": ["mqar"], "retrieval_fraction": 0.5}},
    {"data": {"retrieval_tasks": ["mqar"]}, "budget": {"hybrid": "auto:1"}},  # the probe set
    {"budget": {"policy": "learned", "scorer_hidden": 16}, "learned": {"tau": 0.5}},
    {"budget": {"policy": "learned"}, "learned": {"relaxation": "decay", "capacity_weight": 2.0}},
])
def test_a_key_that_applies_is_not_warned_about(tmp_path, raw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        load_recipe(write(tmp_path, raw))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_set_no_key_without_effect(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        load_recipe(path)


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name != "tiny.yaml"], ids=lambda p: p.name)
def test_shipped_recipes_are_short_and_list_only_changes(path):
    """A shipped recipe names what it changes from the built-in default (each with a comment on why),
    so it is read in one screen; tiny.yaml (the tests' run) is exempt."""
    lines = path.read_text().splitlines()
    assert len(lines) < 30, f"{path.name}: {len(lines)} lines"
    if path.name != "smollm2_gutenberg.yaml":  # the default itself names a few keys, equal to the defaults
        raw, default = yaml.safe_load(path.read_text()), Recipe().to_dict()
        same = [f"{s}.{k}" for s, sec in raw.items() if isinstance(sec, dict) for k, v in sec.items()
                if default[s][k] == v]
        assert not same, f"{path.name} repeats defaults: {same}"
