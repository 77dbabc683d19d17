"""A user's mistakes, one line each: the command (or API call), the exit code (or exception) and a
fragment of the one-line message it must print. A new case joins the table in one line.

Kinds:
  train     `msrnn_train.train.main`: the tiny recipe on a small corpus, then the case's tokens
            (a first token that is not `--...` replaces the recipe path);
  evaluate  `msrnn_train.eval_cli.main` on the tiny random model and the corpus, then the tokens;
  api       a Python call, `{name}` replaced by workspace paths; the code is the exception's name,
            or `warns` for a warning whose text holds the fragment.

`{name}` in a case is a path of the workspace fixture below. Unless the case sets `loads`, the
model must never be loaded: every refusal happens before weights load.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_corpus, tiny_peft, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes through any permission

# (kind, arguments, exit code, message fragment[, flags]); flags: "loads" (the model may load),
# "root-skip" (permissions mean nothing to root)
CASES = [
    # ---- recipes
    ("train", "{empty_yaml}", 2, "the recipe is empty"),
    ("train", "{binary_yaml}", 2, "not a text (UTF-8 YAML) file"),
    ("train", "{nul_yaml}", 2, "a binary file, not a YAML recipe"),
    ("train", "{unreadable_yaml}", 2, "cannot read the recipe", "root-skip"),
    ("train", "{nowhere}/recipe.yaml", 2, "recipe file not found"),
    ("train", "--training.max_stepz 3", 2, "Did you mean 'training.max_steps'"),
    # ---- files and folders
    ("train", "--training.output_dir {a_file}", 2, "training.output_dir: {a_file} is a file"),
    ("train", "--training.output_dir {a_file}/out", 2, "which is a file"),
    ("train", "--training.output_dir {readonly_dir}/out", 2, "is not writable", "root-skip"),
    ("train", "--model.source {nowhere}/model", 2, "model.source: no model folder at"),
    ("train", "--model.source ./missing.gguf", 2, "model.source: GGUF file not found"),
    ("train", "--model.source {empty_dir}", 2, "without config.json"),
    ("train", "--data.source {nowhere}/texts", 2, "data.source: no such file or folder"),
    ("train", "--data.source {empty_dir}", 2, "a folder with no .txt files"),
    ("train", "--data.source {empty_txt}", 2, "no text in it"),
    ("train", "--data.source {binary_txt}", 2, "no text in it (every document is empty or binary)"),
    ("train", "--data.source {binary_dir}", 2, "no text in it"),
    ("train", "--data.source {corpus} --data.heldout 9", 2, "data.heldout: cannot hold out 9 of 4 document(s)"),
    # ---- budgets against the model config (read without weights), in --validate too
    ("train", "--validate --budget.budget [8,null,8]", 2, "the model has 2 layers, the list has 3"),
    ("train", "--budget.budget [8,null,8]", 2, "the model has 2 layers, the list has 3"),
    ("train", '--validate --budget.budget {{"5":null,"default":8}}', 2, "layer index 5 out of range; allowed 0..1"),
    ("train", '--validate --budget.budget {{"0":8}}', 0, "has no 'default', so every layer it does not name"),
    ("train", "--validate --budget.budget 64", 0, "no state is ever evicted"),
    ("train", "--validate --budget.budget [8,null]", 0, ""),
    # ---- a run owns its output folder
    ("train", "--training.output_dir {other_run}", 2, "already holds another run (budget.budget: 4 -> 8)"),
    ("train", "--training.output_dir {other_run}", 2, "training.overwrite_output_dir: true"),
    ("train", "--training.output_dir {other_run} --training.resume_from_checkpoint true", 2,
     "was written by a different recipe; budget.budget: 4 -> 8"),
    ("train", "--training.resume_from_checkpoint {half_written}", 2, "is not a complete checkpoint"),
    ("train", "--training.resume_from_checkpoint {nowhere}/checkpoint-4", 2, "no checkpoint folder at"),
    # ---- a run that goes wrong is stopped, and saves nothing
    ("train", "--training.learning_rate 1e30 --training.max_grad_norm 0 --training.max_steps 4", 1,
     "stopped being finite", "loads"),
    # ---- evaluate: arguments, files, folders (before the model loads)
    ("evaluate", "--budgets abc", 2, "--budgets: 'abc' is not an integer"),
    ("evaluate", "--budgets 0", 2, "--budgets: 0 is not allowed; every value must be >= 1"),
    ("evaluate", "--policies full,tova --budgets 8,", 0, "| tova | ", "loads"),
    ("evaluate", "--policies foo", 2, "--policies: unknown policy 'foo'; allowed: full, window"),
    ("evaluate", "--tasks foo", 2, "--tasks: unknown task(s) ['foo']"),
    ("evaluate", "--seq-len 0", 2, "--seq-len: must be >= 2, got 0"),
    ("evaluate", "--seq-len 1", 2, "--seq-len: must be >= 2, got 1"),
    ("evaluate", "--seq-len abc", 2, "argument --seq-len: invalid int value: 'abc'"),
    ("evaluate", "--batch-size 0", 2, "--batch-size: must be >= 1, got 0"),
    ("evaluate", "--sinks -2", 2, "--sinks: must be >= 0, got -2"),
    ("evaluate", "--recent -1", 2, "--recent: must be >= 0, got -1"),
    ("evaluate", "--augment-chunk-words 1", 2, "--augment-chunk-words: must be >= 2, got 1"),
    ("evaluate", "--augment-tokens 0", 2, "--augment-tokens: must be >= 1, got 0"),
    ("evaluate", "--dtype float8", 2, "--dtype: 'float8' is not allowed"),
    ("evaluate", "--text {nowhere}/book.txt", 2, "book.txt: no such file or folder"),
    ("evaluate", "--text {empty_dir}", 2, "--text: {empty_dir}: a folder with no .txt files"),
    ("evaluate", "--text {binary_txt}", 2, "no text in it"),
    ("evaluate", "--model {nowhere}/model", 2, "--model: no model folder at"),
    ("evaluate", "--adapter {nowhere}/adapter", 2, "--adapter: no adapter folder at"),
    ("evaluate", "--adapter {empty_dir}", 2, "holds no adapter (no adapter_config.json)"),
    ("evaluate", "--adapter {corrupt_adapter}", 2, "msrnn_budget.json: not a readable budget file"),
    ("evaluate", "--json {a_file}/eval.json", 2, "--json: cannot write"),
    ("evaluate", "--json {empty_dir}", 2, "--json: {empty_dir} is a folder"),
    ("evaluate", "--plot {a_file}/p.png", 2, "--plot: cannot write"),
    ("evaluate", "--json {readonly_dir}/eval.json", 2, "permission denied", "root-skip"),
    # ---- evaluate: honest warnings (it runs, and says what the numbers mean)
    ("evaluate", "--policies tova --budgets 8,64", 0, "K=[64] >= --seq-len 32: no state is ever evicted", "loads"),
    ("evaluate", "--policies tova --seq-len 8 --budgets 4", 0, "--seq-len 8: windows this short", "loads"),
    ("evaluate", "--adapter {plain_adapter} --budgets 8", 0, "has no msrnn_budget.json", "loads"),
    ("evaluate", "--adapter {hybrid_adapter}", 0, "| policy | full | hybrid |", "loads"),
    # ---- the Python API
    ("api", "load_bounded('{nowhere}/adapter')", "FileNotFoundError", "no adapter folder at"),
    ("api", "load_bounded('{empty_dir}')", "FileNotFoundError", "holds no adapter"),
    ("api", "load_bounded('{plain_adapter}')", "warns", "has no msrnn_budget.json, so no budget is known", "loads"),
    ("api", "BudgetSpec.load('{corrupt_adapter}')", "BudgetError", "not a readable budget file"),
    ("api", "load_texts('{latin1_txt}')", "warns", "not valid UTF-8 (byte 0xe9 at offset 4); decoded as Latin-1"),
    ("api", "load_texts('{mixed_dir}')", "warns", "a binary file (NUL bytes), not text: skipped"),
]


def _ids():
    return [f"{c[0]}:{c[1][:60]}" for c in CASES]


# ----------------------------------------------------------------------------- the workspace
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Small files and folders every case may name; no training."""
    from msrnn_train import BudgetSpec
    from msrnn_train.models import random_model

    d = tmp_path_factory.mktemp("bad")
    p = {"root": d, "corpus": make_corpus(d / "corpus", n_docs=4, words=300), "nowhere": d / "nowhere"}
    p["empty_yaml"] = d / "empty.yaml"
    p["empty_yaml"].write_text("# nothing\n")
    p["binary_yaml"] = d / "binary.yaml"
    p["binary_yaml"].write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    p["nul_yaml"] = d / "nul.yaml"
    p["nul_yaml"].write_bytes(b"model:\x00\x00\n")
    p["unreadable_yaml"] = d / "unreadable.yaml"
    p["unreadable_yaml"].write_text("model: {source: random:tiny-llama}\n")
    p["unreadable_yaml"].chmod(0)
    p["a_file"] = d / "a_file"
    p["a_file"].write_text("x")
    p["readonly_dir"] = d / "readonly"
    p["readonly_dir"].mkdir()
    p["readonly_dir"].chmod(0o555)
    p["empty_dir"] = d / "empty_dir"
    p["empty_dir"].mkdir()
    p["empty_txt"] = d / "empty.txt"
    p["empty_txt"].write_text("  \n")
    p["binary_txt"] = d / "binary.txt"
    p["binary_txt"].write_bytes(bytes(range(256)) * 8)
    p["binary_dir"] = d / "binary_dir"
    p["binary_dir"].mkdir()
    (p["binary_dir"] / "a.txt").write_bytes(b"\x00\x01\x02" * 100)
    p["latin1_txt"] = d / "latin1.txt"
    p["latin1_txt"].write_bytes(b"The \xe9t\xe9 was long")
    p["mixed_dir"] = d / "mixed"
    p["mixed_dir"].mkdir()
    (p["mixed_dir"] / "good.txt").write_text("some words\n")
    (p["mixed_dir"] / "bad.txt").write_bytes(b"\x00\x00binary")

    # adapters without training: a random LoRA on the tiny model
    model, tok = random_model()
    peft_model = tiny_peft(model, r=2)
    for name, spec in (("plain_adapter", None), ("corrupt_adapter", "{not json"),
                       ("hybrid_adapter", BudgetSpec(policy="tova", budget=[8, None]))):
        folder = d / name
        peft_model.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "recipe.yaml").write_text("model: {source: 'random:tiny-llama'}\n")
        if isinstance(spec, str):
            (folder / "msrnn_budget.json").write_text(spec)
        elif spec is not None:
            spec.save(folder)
        p[name] = folder

    # the folder of another run (budget 4, on the corpus above), with a complete and a half-written checkpoint
    other = tiny_recipe(d, **{"budget.budget": 4, "budget.ramp_start": None})
    p["other_run"] = d / "other_run"
    ckpt = p["other_run"] / "checkpoint-4"
    peft_model.save_pretrained(ckpt)
    other.save(ckpt)
    other.budget_spec().save(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    other.save(p["other_run"])
    p["half_written"] = p["other_run"] / "checkpoint-8"
    peft_model.save_pretrained(p["half_written"])  # killed before trainer_state.json was written
    yield p
    p["readonly_dir"].chmod(0o755)
    p["unreadable_yaml"].chmod(0o644)


def _fill(text: str, ws: dict) -> str:
    return text.format(**{k: str(v) for k, v in ws.items()})


def _tokens(text: str, ws: dict) -> list[str]:
    return _fill(text, ws).split()


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_bad_input(case, ws, tmp_path, monkeypatch, capsys):
    kind, text, expected, fragment, *flags = case
    if "root-skip" in flags and ROOT_USER:
        pytest.skip("running as root: file permissions do not apply")
    fragment = _fill(fragment, ws)
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    import msrnn_train.train as train_mod

    if "loads" not in flags:
        def forbidden(*a, **k):
            raise AssertionError("the model was loaded before the bad input was refused")

        monkeypatch.setattr(train_mod, "load_base_model", forbidden)

    if kind == "api":
        from msrnn_train import BudgetSpec  # noqa: F401 - named by the cases
        from msrnn_train.data import load_texts  # noqa: F401
        from msrnn_train.hub import load_bounded  # noqa: F401

        call = _fill(text, ws)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                eval(call)
                raised = None
            except Exception as err:  # noqa: BLE001 - the table names the type
                raised = err
        if expected == "warns":
            assert raised is None, raised
            assert any(fragment in str(w.message) for w in caught), [str(w.message) for w in caught]
        else:
            assert type(raised).__name__ == expected and fragment in str(raised), repr(raised)
            assert "\n" not in str(raised)
        return

    tokens = _tokens(text, ws)
    capsys.readouterr()
    if kind == "train":
        recipe = str(ROOT / "recipes" / "tiny.yaml")
        if tokens and not tokens[0].startswith("--"):
            recipe = tokens.pop(0)
        argv = [recipe, "--data.source", str(ws["corpus"]), "--data.heldout", "1", "--budget.ramp_start",
                "null", "--eval.max_windows", "0", "--training.output_dir", str(tmp_path / "out"),
                "--wandb.mode", "disabled", *tokens]
        rc = train_mod.main(argv)
    else:
        from msrnn_train.eval_cli import main

        argv = ["--model", "random:tiny-llama", "--text", str(ws["corpus"]), "--seq-len", "32", "--max-windows",
                "2", "--no-progress", "--device", "cpu", *tokens]
        rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == expected, err[-2000:]
    assert "Traceback" not in err
    if expected != 0:
        errors = [line for line in re.split(r"[\r\n]", err)
                  if re.match(r"(recipe error|training failed|evaluate: error): ", line)]
        assert len(errors) == 1, err[-2000:]  # one line
        assert fragment in errors[0], errors[0]
    else:
        assert fragment in out + err, (out + err)[-2000:]
    if kind == "train" and rc != 0:  # a refused or failed run saves no adapter
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# Every refusal above that needs no weights is `--validate`'s too: the same exit code and line, and
# nothing trained (train() is never called: `preflight` is the one list of checks both run).
VALIDATE_CASES = [c for c in CASES if c[0] == "train" and c[2] == 2 and "loads" not in c[4:]
                  and "--validate" not in c[1]]


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=[f"validate:{c[1][:60]}" for c in VALIDATE_CASES])
def test_validate_refuses_what_training_refuses(case, ws, tmp_path, monkeypatch, capsys):
    import msrnn_train.train as train_mod

    def forbidden(*a, **k):
        raise AssertionError("--validate ran training")

    monkeypatch.setattr(train_mod, "train", forbidden)
    kind, text, expected, fragment, *flags = case
    test_bad_input((kind, f"{text} --validate", expected, fragment, *flags), ws, tmp_path, monkeypatch, capsys)
    assert not (tmp_path / "out").exists()  # nothing written


def test_validate_refusals_cover_the_run_folder_and_data():
    """The cases above include the data, the output folder and the resume checks (once only `train` made them)."""
    keys = {c[3].split(":")[0] for c in VALIDATE_CASES}
    assert {"data.source", "data.heldout", "training.output_dir"} <= keys, keys
    assert any("resume_from_checkpoint" in c[1] for c in VALIDATE_CASES)
