"""Evaluation: perplexity definition, grid bookkeeping, JSON/CLI schema, plots, generation
statistics and the training hook (tiny random models; the real model only in slow tests)."""

import json
import math
import time

import pytest
import torch
from conftest import tiny_model, tiny_peft

from msrnn_train.compat import cache_kwargs
from msrnn_train import BudgetSpec, apply_budget, get_budget, make_cache, remove_budget
from msrnn_train.controller import budget_scope, get_controller, set_layer_budget, set_soft_temperature
from msrnn_train.eval_cli import main
from msrnn_train.evaluate import evaluate_grid, markdown_table, perplexity
from msrnn_train.generation import generation_stats, long_generation, longest_repeat, loop_period
from msrnn_train.trainer import BoundedEvalCallback

WORDS = ("the a of and to in is was he she it that his her with for as on at by king queen lord "
         "night day sword crown love death blood heart").split()


def tiny_tokenizer():
    """A word-level fast tokenizer (words above, digits one by one, punctuation) with offsets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<eos>"] + WORDS + [str(i) for i in range(10)] + [":", ".", "?", ","]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_text(n_words=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())


def windows_of(n=3, T=16, seed=0):
    return torch.randint(3, 128, (n, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- perplexity
def test_full_perplexity_is_exp_of_hand_computed_cross_entropy():
    model = tiny_model()
    win = windows_of(3, 16)
    with torch.no_grad():
        logits = model(win).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, win[:, 1:, None]).squeeze(-1)
    nll = float(-logp.mean())
    for bs in (1, 2, 3):
        res = perplexity(model, win, batch_size=bs, progress=False)
        assert res["tokens"] == 3 * 15
        assert res["nll"] == pytest.approx(nll, abs=1e-5)
        assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_grid_budget_at_least_seq_len_equals_full_and_small_budget_differs():
    model = tiny_model()
    win = windows_of(2, 16)
    recs = evaluate_grid(model, win, ["full", "tova", "sinks", "window", "h2o"], [4, 16], progress=False)
    assert [(r["policy"], r["budget"]) for r in recs] == [
        ("full", None), ("tova", 4), ("tova", 16), ("sinks", 4), ("sinks", 16), ("window", 4), ("window", 16),
        ("h2o", 4), ("h2o", 16)]
    full = recs[0]["ppl"]
    for r in recs[1:]:
        assert r["tokens"] == 30
        if r["budget"] == 16:
            assert r["ppl"] == pytest.approx(full, rel=1e-5)
        else:
            assert abs(r["ppl"] - full) > 1e-3 * full, r  # a budget of 4 states must change something
    assert get_budget(model) is None  # nothing left behind


def test_bounded_perplexity_equals_token_by_token_decoding_with_bounded_cache():
    """The evaluator's number is the inference number: decode one token at a time through a
    BoundedCache of K states and sum the NLL."""
    model = tiny_model()
    win = windows_of(1, 20, seed=3)
    for policy in ("tova", "h2o", "sinks"):
        rec = evaluate_grid(model, win, [policy], [5], progress=False)[0]
        apply_budget(model, BudgetSpec(policy=policy, budget=5))
        cache, nll = make_cache(model), 0.0
        with torch.no_grad():
            for t in range(19):
                logits = model(win[:, t:t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[win[0, t + 1]])
                assert max(cache.state_sizes()) <= 5
        assert rec["nll"] == pytest.approx(nll / 19, abs=1e-4), policy
        remove_budget(model)


def test_nll_sum_scores_teacher_forced_and_decoded_logits_alike():
    """evaluate.nll_sum (perplexity's reduction) on the logits of fidelity.decode_token_by_token
    fed all but the last token (scripts/fidelity_report.py) gives the bounded perplexity."""
    from msrnn_train.evaluate import nll_sum
    from msrnn_train.fidelity import decode_token_by_token

    model = tiny_model()
    win = windows_of(1, 20, seed=4)
    with torch.no_grad():
        full = model(win).logits
    total, n = nll_sum(full, win)
    assert n == 19 and (total, n) == nll_sum(full[:, :-1], win)  # a last position is unused
    assert perplexity(model, win, progress=False)["nll"] == pytest.approx(total / n, rel=1e-6)
    apply_budget(model, BudgetSpec(policy="tova", budget=5))
    logits, _, cache = decode_token_by_token(model, win[:, :-1], track_held=False)
    total, n = nll_sum(logits, win)
    assert logits.shape[1] == 19 and max(cache.state_sizes()) == 5
    assert perplexity(model, win, progress=False)["nll"] == pytest.approx(total / n, abs=1e-5)
    remove_budget(model)


def test_grid_restores_training_spec_ramp_soft_temperature_and_mode():
    model = tiny_model()
    spec = BudgetSpec(policy="tova", budget=8)
    apply_budget(model, spec)
    set_layer_budget(model, 12)  # the budget ramp is at 12 now
    set_soft_temperature(model, 0.25)
    model.train()
    win = windows_of(2, 16)
    recs = evaluate_grid(model, win, ["full", "sinks"], [4], progress=False)
    ctrl = get_controller(model)
    assert ctrl.spec == spec
    assert ctrl.soft_temperature == 0.25
    assert [lb.budget for lb in ctrl.layers] == [12, 12, 12]
    assert model.training
    # and the evaluation itself ran hard and unbounded/bounded as asked
    model.eval()
    training_ppl = perplexity(model, win, progress=False)  # soft at tau 0.25, ramped K = 12: not "full"
    assert recs[0]["ppl"] != pytest.approx(training_ppl["ppl"], rel=1e-6)
    with budget_scope(model, None):
        assert perplexity(model, win, progress=False)["ppl"] == pytest.approx(recs[0]["ppl"], rel=1e-6)


# ----------------------------------------------------------------------------- reports
def test_markdown_table_cells_and_differences():
    recs = [{"policy": "full", "budget": None, "ppl": 10.0, "nll": math.log(10), "tokens": 9},
            {"policy": "tova", "budget": 64, "ppl": 12.5, "nll": 0.0, "tokens": 9},
            {"policy": "tova", "budget": 128, "ppl": 11.0, "nll": 0.0, "tokens": 9},
            {"policy": "sinks", "budget": 128, "ppl": 13.25, "nll": 0.0, "tokens": 9}]
    table = markdown_table(recs)
    lines = table.splitlines()
    assert lines[0] == "| policy | full | K=64 | K=128 |"
    assert "| full | 10.00 |  |  |" in lines
    assert "| tova |  | 12.50 (+2.50) | 11.00 (+1.00) |" in lines
    assert "| sinks |  |  | 13.25 (+3.25) |" in lines
    adapted = recs + [{**r, "adapted": True, "ppl": r["ppl"] - 0.5} for r in recs]
    for r in adapted[:4]:
        r["adapted"] = False
    lines = markdown_table(adapted).splitlines()
    assert "| tova (adapted) |  | 12.00 (+2.00) | 10.50 (+0.50) |" in lines
    assert "| full (adapted) | 9.50 (-0.50) |  |  |" in lines


def _tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    d = tmp_path / "tiny-model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    text = tmp_path / "book.txt"
    text.write_text(tiny_text(200))
    return d, text


def test_cli_json_schema_table_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    model_dir, text = _tiny_model_dir(tmp_path)
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    rc = main(["--model", str(model_dir), "--text", str(text), "--seq-len", "16", "--max-windows", "3",
               "--policies", "full,tova,sinks", "--budgets", "4,8", "--json", str(out), "--plot", str(png),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"model", "adapter", "text", "seq_len", "results"}
    assert doc["model"] == str(model_dir) and doc["adapter"] is None and doc["text"] == str(text)
    assert doc["seq_len"] == 16
    assert [(r["policy"], r["budget"]) for r in doc["results"]] == [
        ("full", None), ("tova", 4), ("tova", 8), ("sinks", 4), ("sinks", 8)]
    for r in doc["results"]:
        assert set(r) == {"policy", "budget", "ppl", "nll", "tokens"}
        assert isinstance(r["policy"], str) and isinstance(r["ppl"], float) and isinstance(r["nll"], float)
        assert r["budget"] is None or (isinstance(r["budget"], int) and not isinstance(r["budget"], bool))
        assert isinstance(r["tokens"], int) and r["tokens"] == 3 * 15
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]), rel=1e-9)
    printed = capsys.readouterr().out
    assert "| policy | full | K=4 | K=8 |" in printed and "| tova |" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_adapter_default_policy_and_adapted_field(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    model_dir, text = _tiny_model_dir(tmp_path)
    peft_model = tiny_peft(AutoModelForCausalLM.from_pretrained(model_dir), scale=0.5)  # not the identity
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    BudgetSpec(policy="h2o", budget=6, recent=2).save(adapter)
    out = tmp_path / "eval.json"
    main(["--model", str(model_dir), "--adapter", str(adapter), "--text", str(text), "--seq-len", "16",
          "--max-windows", "2", "--json", str(out), "--plot", str(tmp_path / "p.png"), "--no-progress"])
    doc = json.loads(out.read_text())
    assert doc["adapter"] == str(adapter)
    got = [(r["policy"], r["budget"], r["adapted"]) for r in doc["results"]]
    assert got == [("full", None, False), ("h2o", 6, False), ("full", None, True), ("h2o", 6, True)]
    base, adapted = doc["results"][:2], doc["results"][2:]
    for b, a in zip(base, adapted):
        assert set(a) == {"policy", "budget", "ppl", "nll", "tokens", "adapted"}
        assert abs(a["ppl"] - b["ppl"]) > 1e-3  # the adapter was really on, then really off
    # the base numbers are the plain model's
    win = torch.tensor([tiny_tokenizer()(text.read_text())["input_ids"][:32]]).view(2, 16)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert base[0]["ppl"] == pytest.approx(perplexity(plain, win, progress=False)["ppl"], rel=1e-5)


def test_grid_specs_is_the_one_grid():
    """The CLI, the run's evaluation and the callback all build their grid here: full once, every
    other policy at every K, no repeats; a trained spec's own policy keeps its form (K changed)."""
    from msrnn_train.evaluate import DEFAULT_BUDGETS, grid_specs

    def names(specs):
        return [s.label for s in specs]

    assert names(grid_specs(["tova", "full", "sinks", "full"], [4, 8])) == \
        ["tova-4", "tova-8", "full", "sinks-4", "sinks-8"]
    assert names(grid_specs(["h2o"], None)) == [f"h2o-{k}" for k in DEFAULT_BUDGETS]
    own = BudgetSpec("learned", 32, sinks=2, retention="logit", scorer_hidden=8)
    specs = grid_specs(["tova", "learned", "full"], [16, 32], own=own, own_first=True, sinks=2)
    assert names(specs) == ["learned-32", "tova-16", "tova-32", "learned-16", "full"]  # learned-32 once, first
    assert specs[0].to_dict() == own.to_dict()
    assert (specs[3].retention, specs[3].scorer_hidden, specs[3].sinks) == ("logit", 8, 2)
    assert grid_specs(["learned"], [16], own=own, sinks=0)[0].sinks == 0  # spec_kwargs win
    # no budgets given: the saved spec exactly (a per-layer budget too); other policies the defaults
    hybrid = BudgetSpec("tova", [8, None])
    assert [s.to_dict() for s in grid_specs(["full", "tova"], None, own=hybrid)] == \
        [BudgetSpec("full").to_dict(), hybrid.to_dict()]
    # an h2o recent window wider than a grid K falls back to K/2 there
    assert [s.recent for s in grid_specs(["h2o"], [8, 64], own=BudgetSpec("h2o", 64, recent=16))] == [None, 16]


def test_budget_benefit_by_hand():
    from msrnn_train.comparison import budget_benefit

    # plain: full 30, K 40 (penalty 10); tuned at K 34 removes 6 of the 10
    assert budget_benefit(40.0, 34.0, 30.0) == pytest.approx(0.6)
    assert budget_benefit(40.0, 30.0, 30.0) == pytest.approx(1.0)
    assert budget_benefit(40.0, 42.0, 30.0) == pytest.approx(-0.2)  # worse than plain at K
    assert math.isnan(budget_benefit(30.0, 29.0, 30.0))  # no penalty to remove


def test_comparison_against_the_strongest_bar_by_hand():
    """The demo's comparison (and headline's arithmetic): per K the bar is the control's strongest
    training-free policy; penalty, difference, budget benefit and "at K <= the bar at 2K"."""
    from msrnn_train.comparison import against_bar, against_strongest, comparison_markdown

    plain = [{"policy": "full", "budget": None, "ppl": 30.0}, {"policy": "tova", "budget": 16, "ppl": 40.0},
             {"policy": "h2o", "budget": 16, "ppl": 38.0}, {"policy": "tova", "budget": 32, "ppl": 35.0},
             {"policy": "h2o", "budget": 32, "ppl": 36.0}]
    learned = [{"policy": "full", "budget": None, "ppl": 30.0}, {"policy": "learned", "budget": 32, "ppl": 33.0},
               {"policy": "learned", "budget": 16, "ppl": 36.0}]
    rows = against_strongest(plain, learned, ["tova", "h2o"], "learned")
    assert [(r["budget"], r["bar"], r["penalty"], r["diff"]) for r in rows] == [(16, "h2o", 8.0, -2.0),
                                                                                (32, "tova", 5.0, -2.0)]
    assert [r["budget_benefit"] for r in rows] == pytest.approx([0.25, 0.4])
    assert against_bar(36.0, 38.0, 30.0, bar_2k=35.0, ppl_full=31.5) == pytest.approx(
        {"penalty": 8.0, "diff": -2.0, "budget_benefit": 0.25, "le_bar_2k": False, "full_vs_bar": 0.05})
    table = comparison_markdown(rows + [{"budget": 64, "budget_benefit": float("nan")}],
                                [("K", "budget", "K"), ("bar", "bar", "text"), ("penalty", "penalty", "+.2f"),
                                 ("benefit", "budget_benefit", "%"), ("tova", ("ppl_tova", "ppl_h2o"), ".1f")])
    assert table.splitlines()[2:] == ["| 16 | h2o | +8.00 | 25% | 40.0 ± 38.0 |", "| 32 | tova | +5.00 | 40% | 35.0 ± 36.0 |",
                                      "| 64 |  |  | n/a |  |"]


def test_cli_baseline_adapter_side_by_side(tmp_path, monkeypatch):
    """--baseline-adapter: the second adapter's numbers are its own (equal to loading it alone),
    on the same windows and specs, with the budget benefit computed from both."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from msrnn_train.comparison import budget_benefit
    from msrnn_train.evaluate import evaluate_specs

    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    model_dir, text = _tiny_model_dir(tmp_path)
    folders = []
    for i, name in enumerate(("tuned", "plain")):
        peft_model = tiny_peft(AutoModelForCausalLM.from_pretrained(model_dir), scale=0.5, seed=10 + i)
        peft_model.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    BudgetSpec(policy="tova", budget=6).save(folders[0])
    out = tmp_path / "eval.json"
    main(["--model", str(model_dir), "--adapter", str(folders[0]), "--baseline-adapter", str(folders[1]),
          "--text", str(text), "--seq-len", "16", "--max-windows", "2", "--budgets", "4,6", "--policies",
          "full,tova", "--json", str(out), "--plot", str(tmp_path / "vs_baseline.png"), "--no-progress"])
    doc = json.loads(out.read_text())
    assert (tmp_path / "vs_baseline.png").stat().st_size > 10_000  # the comparison's figure (plots.plot_comparison)
    base = {(r["policy"], r["budget"]): r["ppl"] for r in doc["baseline"]}
    assert set(base) == {("full", None), ("tova", 4), ("tova", 6)}
    # the baseline's numbers are those of the plain adapter loaded on its own
    win = torch.tensor([tiny_tokenizer()(text.read_text())["input_ids"][:32]]).view(2, 16)
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folders[1]).eval()
    ref = evaluate_specs(alone, win, [BudgetSpec("full"), BudgetSpec("tova", 4)], progress=False)
    assert base[("full", None)] == pytest.approx(ref[0]["ppl"], rel=1e-5)
    assert base[("tova", 4)] == pytest.approx(ref[1]["ppl"], rel=1e-5)
    tuned = {(r["policy"], r["budget"]): r["ppl"] for r in doc["results"] if r["adapted"]}
    assert abs(tuned[("full", None)] - base[("full", None)]) > 1e-3  # two different adapters
    rows = {(r["policy"], r["budget"]): r for r in doc["comparison"]}
    assert rows[("tova", 4)]["budget_benefit"] == pytest.approx(
        budget_benefit(base[("tova", 4)], tuned[("tova", 4)], base[("full", None)]), nan_ok=True)
    assert "budget_benefit" not in rows[("full", None)]


def test_plot_with_adapted_records(tmp_path):
    from msrnn_train.plots import plot_ppl_vs_budget

    base = [{"policy": "full", "budget": None, "ppl": 10.0}] + [
        {"policy": p, "budget": k, "ppl": 10 + 100 / k * (i + 1)} for i, p in enumerate(["tova", "window"])
        for k in (64, 128, 256)]
    adapted = [{**r, "ppl": r["ppl"] * 0.9, "adapted": True} for r in base]
    path = plot_ppl_vs_budget(base, adapted, tmp_path / "sub" / "p.png", title="test")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- generation
def test_generation_statistics_by_hand():
    loop = [1, 2, 3] * 30
    st = generation_stats(loop + [9, 9], eos_id=9)
    assert st["length"] == 90 and st["tokens_until_eos"] == 90
    assert st["distinct_1"] == pytest.approx(3 / 90) and st["distinct_2"] == pytest.approx(3 / 89)
    assert st["repeated_4gram_rate"] == pytest.approx((87 - 3) / 87)
    assert st["longest_repeat"] == 87 and st["loop_period"] == 3 and st["stuck"]
    fresh = list(range(100))
    st = generation_stats(fresh, eos_id=None)
    assert st["tokens_until_eos"] is None and st["distinct_4"] == 1.0 and st["repeated_4gram_rate"] == 0.0
    assert st["longest_repeat"] == 0 and not st["stuck"]
    assert longest_repeat([5, 1, 2, 3, 7, 1, 2, 3, 8]) == 3
    assert loop_period([4, 5] * 40, tail=64) == 2 and loop_period(list(range(80))) is None


def test_long_generation_large_budget_agrees_with_full_and_small_budget_is_bounded():
    model = tiny_model()
    tok = tiny_tokenizer()
    model.resize_token_embeddings(len(tok))
    model.generation_config.eos_token_id = None  # a random model: generate all tokens
    prompts = [tiny_text(20, seed=1), tiny_text(25, seed=2)]
    recs = long_generation(model, tok, prompts, [BudgetSpec(policy="tova", budget=64),
                                                 BudgetSpec(policy="window", budget=4)],
                           max_new_tokens=24, progress=False)
    full, big, small = recs
    assert (full["policy"], big["budget"], small["budget"]) == ("full", 64, 4)
    assert full["length"] == 24 and full["agree_with_full"] == 24
    assert big["agree_with_full"] == 24  # K >= prompt + generation: identical to the full state
    assert small["agree_with_full"] < 24  # 4 states: it diverges
    assert get_budget(model) is None


# ----------------------------------------------------------------------------- training hook
def _peft_budgeted_model():
    model = tiny_peft(lora_dropout=0.0)
    apply_budget(model, BudgetSpec(policy="tova", budget=6))
    set_soft_temperature(model, 0.5)
    return model


def test_callback_in_a_tiny_training_run(tmp_path):
    from transformers import Trainer, TrainingArguments

    from msrnn_train.data import WindowDataset

    model = _peft_budgeted_model()
    train_windows = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    cb = BoundedEvalCallback(windows_of(2, 16), policies=["sinks"], budgets=[4], every_n_steps=2, batch_size=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=WindowDataset(train_windows))
    cb.attach(trainer)
    calls = []
    original = cb._base

    def counting_base(m):
        calls.append(cb.base_records is None)
        return original(m)

    cb._base = counting_base
    trainer.train()

    logged = [h for h in trainer.state.log_history if "eval_bounded/tova_6_ppl" in h]
    assert [h["step"] for h in logged] == [2, 4]  # every 2 steps; the end (step 4) is not repeated
    for h in logged:
        for key in ("eval_bounded/sinks_4_ppl", "eval_bounded/base_full_ppl", "eval_bounded/base_tova_6_ppl"):
            assert math.isfinite(h[key]), key
    # the base model was measured once (before training) and reused
    assert sum(calls) == 1
    assert logged[0]["eval_bounded/base_full_ppl"] == logged[1]["eval_bounded/base_full_ppl"]
    # training moved the adapted numbers; the base ones are frozen
    assert logged[0]["eval_bounded/tova_6_ppl"] != logged[1]["eval_bounded/tova_6_ppl"]
    final = cb.final_records
    assert [(r["policy"], r["budget"], r["adapted"]) for r in final] == [
        ("full", None, False), ("tova", 6, False), ("tova", 6, True), ("sinks", 4, True)]
    assert "| tova (adapted) |" in cb.final_table()
    # the model is back in its training state
    ctrl = get_controller(model)
    assert ctrl.spec.policy == "tova" and ctrl.spec.budget == 6 and ctrl.soft_temperature == 0.5


def test_callback_restores_state_and_logs_without_trainer():
    from transformers import TrainerState

    model = _peft_budgeted_model()
    set_layer_budget(model, 10)
    model.train()
    cb = BoundedEvalCallback(windows_of(2, 16), policies=["full", "window"], budgets=[4], every_n_steps=1)
    state = TrainerState()
    state.global_step = 7
    records = cb.evaluate(model, state)
    assert model.training
    ctrl = get_controller(model)
    assert ctrl.soft_temperature == 0.5 and [lb.budget for lb in ctrl.layers] == [10, 10, 10]
    assert state.log_history[-1]["step"] == 7
    assert {"eval_bounded/full_ppl", "eval_bounded/window_4_ppl", "eval_bounded/base_full_ppl"} <= set(
        state.log_history[-1])
    # base full (adapter disabled) equals the adapted full state while LoRA B is still zero
    full = {(r["policy"], r["adapted"]): r["ppl"] for r in records}
    assert full["full", False] == pytest.approx(full["full", True], rel=1e-6)


def test_callback_logs_metrics_and_table_to_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    model = _peft_budgeted_model()
    cb = BoundedEvalCallback(windows_of(1, 16), policies=["sinks"], budgets=[4], every_n_steps=1)
    run = wandb.init(project="msrnn-test", dir=str(tmp_path), mode="offline")
    try:
        cb.evaluate(model)
        summary = dict(run.summary)
    finally:
        wandb.finish()
    assert summary["eval_bounded/tova_6_ppl"] == pytest.approx(cb.history[-1][1][2]["ppl"])
    assert summary["eval_bounded/table"]["_type"] == "table-file"
    assert summary["eval_bounded/table"]["nrows"] == 4  # base full, base tova-6, tova-6, sinks-4


def test_callback_recovered_metric():
    model = _peft_budgeted_model()  # trained under tova-6
    cb = BoundedEvalCallback(windows_of(1, 16), policies=["sinks"], budgets=[6])
    recs = [{"policy": "full", "budget": None, "ppl": 10.0, "adapted": False},
            {"policy": "tova", "budget": 6, "ppl": 14.0, "adapted": False},
            {"policy": "tova", "budget": 6, "ppl": 11.0, "adapted": True},
            {"policy": "sinks", "budget": 6, "ppl": 15.0, "adapted": True}]
    assert cb.metrics(recs, model) == {
        "eval_bounded/base_full_ppl": 10.0, "eval_bounded/base_tova_6_ppl": 14.0, "eval_bounded/tova_6_ppl": 11.0,
        "eval_bounded/sinks_6_ppl": 15.0, "eval_bounded/recovered": pytest.approx(0.75)}


def test_callback_from_texts_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        BoundedEvalCallback("some text", every_n_steps=1)
    cb = BoundedEvalCallback(tiny_text(100), every_n_steps=1, tokenizer=tiny_tokenizer(), seq_len=16, max_windows=3)
    assert cb.windows.shape == (3, 16)


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_cli_on_gutenberg(tmp_path, capsys):
    """The acceptance run, shortened: SmolLM2-135M, held-out Gutenberg text."""
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    start = time.perf_counter()
    main(["--model", "smollm2", "--text", "gutenberg", "--seq-len", "256", "--max-windows", "1",
          "--policies", "full,tova,window", "--budgets", "32", "--json", str(out), "--plot", str(png),
          "--no-progress"])
    assert time.perf_counter() - start < 600
    doc = json.loads(out.read_text())
    ppl = {r["policy"]: r["ppl"] for r in doc["results"]}
    assert 5 < ppl["full"] < 100  # a real language model on English text
    assert ppl["full"] < ppl["tova"] < ppl["window"]  # what the TOVA paper reports, in order
    assert png.stat().st_size > 10_000 and "| tova |" in capsys.readouterr().out
