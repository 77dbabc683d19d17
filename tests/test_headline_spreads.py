"""scripts/headline.py --eval-spreads: the held-out set grows by disjoint spreads of windows whose
perplexities are merged, so the merge must equal evaluating the union, and spreads must not overlap."""

import argparse
import importlib.util
from pathlib import Path

import torch

from conftest import tiny_model
from msrnn_train import BudgetSpec
from msrnn_train.evaluate import evaluate_specs

ROOT = Path(__file__).resolve().parents[1]


def _headline():
    spec = importlib.util.spec_from_file_location("headline", ROOT / "scripts" / "headline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merged_spreads_equal_the_perplexity_of_their_union():
    hl = _headline()
    model = tiny_model("llama", seed=3)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(3, 128, (3, 24), generator=g), torch.randint(3, 128, (2, 24), generator=g)
    specs = [BudgetSpec(policy="full"), BudgetSpec(policy="tova", budget=6)]
    ra, rb, both = (evaluate_specs(model, w, specs, progress=False) for w in (a, b, torch.cat([a, b])))
    for x, y, u in zip(ra, rb, both):
        merged = hl._merge_ppl([(x["ppl"], x["tokens"]), (y["ppl"], y["tokens"])])
        assert abs(merged - u["ppl"]) < 1e-9 * u["ppl"]
        assert x["tokens"] + y["tokens"] == u["tokens"]
    assert abs(ra[1]["ppl"] - rb[1]["ppl"]) > 1e-3  # the two sets differ, so the weighting is exercised


def test_spreads_are_disjoint_windows_of_the_held_out_books(monkeypatch):
    """Spread 1 takes the windows half a step after spread 0's (build_windows' even spread)."""
    hl = _headline()
    every = torch.arange(200).view(-1, 1).repeat(1, 4)  # 200 windows, row i is all i

    def fake_build_windows(recipe, tokenizer):
        held = every
        n = recipe.eval.max_windows
        if len(held) > n:
            held = held[torch.linspace(0, len(held) - 1, n).round().long()]
        return None, held

    monkeypatch.setattr("msrnn_train.data.build_windows", fake_build_windows)
    args = argparse.Namespace(recipe=str(ROOT / "recipes" / "smollm2_headline.yaml"), split="test", seq_len=4,
                              eval_windows=32, eval_spreads=2)
    w0, w1 = hl.eval_windows(args, None, 0), hl.eval_windows(args, None, 1)
    assert w0.shape == (32, 4) and w1.shape == (31, 4)
    assert not set(w0[:, 0].tolist()) & set(w1[:, 0].tolist())
    args.eval_spreads = 200  # finer than the books allow: refused, not silently overlapping
    try:
        hl.eval_windows(args, None, 1)
    except SystemExit as err:
        assert "too many spreads" in str(err)
    else:
        raise AssertionError("overlapping spreads were not refused")
