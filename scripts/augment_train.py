"""Retrieval augmentation that survives a finite state (issue 24, part 1): train on augmented
prompts under the budget, no full layer, and measure against plain LoRA trained on the same rows.

    python scripts/augment_train.py --seeds 42 --work-dir runs/augment --out results/augment_train

What results/augment_heldsets.md found: TOVA drops the re-inserted chunk before the question, and
even with the chunk held (window-K, or pinned) the untrained model answers only about half the
time, reading a fragment of the list without its header. So here the model is *trained* to read
it: `recipes/smollm2_retrieval.yaml` (half the rows MQAR, half Gutenberg, 80 steps) with every
retrieval row augmented (``data.augment_fraction 1``: at most ``--augment-tokens`` tokens of its
best BM25 chunks of ``--chunk-words`` words re-inserted before the question, exactly as the
evaluation does, leaving room for the question inside K), arms:

* ``window``: trained under window-K (recency keeps the tail: the chunk and the question);
* ``tova``: trained under TOVA-K;
* ``plain``: plain LoRA on the same rows at full state (the control, `comparison.PLAIN_LORA`).

Each adapter (and the untrained model) is evaluated on MQAR (``--n`` prompts of ≈16 K tokens,
evaluation seed 0, never trained on) at full state without and with augmentation, and with
window-K and TOVA-K with augmentation (without it too for the untrained model). Cached per seed and
arm in --work-dir.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_hybrid import RECIPE, _load, _save, train_arm, without_only  # noqa: E402

from msrnn_train.comparison import PLAIN_LORA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"window": ["--budget.policy", "window"], "tova": ["--budget.policy", "tova"],
        "plain": [t for key, value in PLAIN_LORA.items() for t in (f"--{key}", "null" if value is None else str(value))]}
NAMES = {"untrained": "untrained", "window": "trained augmented, window-K", "tova": "trained augmented, TOVA-K",
         "plain": "plain LoRA, same augmented rows (control)"}


def state_of(r: dict) -> str:
    s = "full state" if r["budget"] is None else f"{r['policy']}-{r['budget']}"
    return s + (" + augmentation" if r["augmented"] else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/augment")
    ap.add_argument("--out", default="results/augment_train")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--arms", default="window,tova,plain")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--augment-tokens", type=int, default=24, help="K - 8: room for the question inside K")
    ap.add_argument("--chunk-words", type=int, default=4)
    ap.add_argument("--augment-fraction", type=float, default=1.0)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", default=None, help="train, eval, report (default: all)")
    args = ap.parse_args(argv)
    stages = set(args.only.split(",")) if args.only else {"train", "eval", "report"}
    work, out, K = Path(args.work_dir), Path(args.out), args.budget
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    aug = ["--data.augment_fraction", str(args.augment_fraction), "--data.augment_tokens", str(args.augment_tokens),
           "--data.augment_chunk_words", str(args.chunk_words), "--budget.budget", str(K)]

    cache: dict = {}

    def evaluate(model, tok, path: Path, extra: dict):
        from msrnn_train.retrieval import retrieval_grid
        from msrnn_train.retrieval_tasks import make_task

        if "tasks" not in cache:
            cache["tasks"] = {"mqar": make_task("mqar", args.n, args.length, seed=0, tokenizer=tok)}
        recs = _load(path)
        if recs is not None or "eval" not in stages:
            return recs or []
        recs = []
        # the bounded states without augmentation fail by construction (0-2 %, results/retrieval_hybrid.md):
        # measured once, on the untrained model
        augs = (False, True) if extra["arm"] == "untrained" else (True,)
        for policy, full in (("window", True), ("tova", False)):
            new = retrieval_grid(model, tok, cache["tasks"], [K], ("none",), policy, augs,
                                 trained=extra["arm"] != "untrained", adapter_on=True, batch_size=args.batch_size,
                                 full_state=full, augment_tokens=args.augment_tokens,
                                 augment_chunk_words=args.chunk_words)
            recs += new
        # full state with augmentation (retrieval_grid augments only bounded states)
        from msrnn_train.augment import augment
        from msrnn_train.controller import budget_scope
        from msrnn_train.retrieval import accuracy, wilson
        from msrnn_train.retrieval_tasks import token_counter

        count = token_counter(tok)
        inst = [augment(i, args.augment_tokens, count, args.chunk_words) for i in cache["tasks"]["mqar"]]
        with budget_scope(model, None, True):
            res = accuracy(model, tok, inst, args.batch_size, desc="mqar full +retrieval")
        recs.append({"task": "mqar", "policy": "full", "budget": None, "augmented": True, **res,
                     "ci95": wilson(res["correct"], res["n"]),
                     "hit": sum(i.meta["hit"] for i in inst) / len(inst)})
        for r in recs:
            r.update(extra)
        _save(path, recs)
        return recs

    records = []
    from msrnn_train.models import load_model

    if "eval" in stages or (work / "untrained.json").is_file():
        if (work / "untrained.json").is_file():
            records += _load(work / "untrained.json")
        else:
            work.mkdir(parents=True, exist_ok=True)
            model, tok = load_model("smollm2", dtype="float32", device="cpu")
            records += evaluate(model, tok, work / "untrained.json", {"arm": "untrained", "seed": None})
            del model
    for seed in seeds:
        for arm in args.arms.split(","):
            adapter = work / f"seed{seed}" / arm
            if "train" in stages:
                train_arm(arm, adapter, args.steps, ["--training.seed", str(seed), *aug, *ARMS[arm]])
            path = work / f"seed{seed}" / f"eval_{arm}.json"
            if not path.is_file() and (adapter / "msrnn_budget.json").is_file() and "eval" in stages:
                from msrnn_train.hub import load_bounded

                model, tok = load_bounded(adapter)
                evaluate(model, tok, path, {"arm": arm, "seed": seed})
                del model
            records += _load(path) or []
        print(f"seed {seed} done ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)

    if "report" in stages and records:
        cells: dict = {}
        ci: dict = {}
        for r in records:
            cells.setdefault((r["arm"], state_of(r)), []).append(100 * r["accuracy"])
            ci[(r["arm"], state_of(r))] = r["ci95"]
        states = list(dict.fromkeys(state_of(r) for r in records))
        states = [s for s in states if s.startswith("full")] + [s for s in states if not s.startswith("full")]
        nseeds = {a: len({r["seed"] for r in records if r["arm"] == a}) for a in NAMES}

        def fmt(v, key):
            if v is None:
                return "—"
            if len(v) == 1:  # one seed: its 95 % Wilson interval
                return f"{v[0]:.0f} [{100 * ci[key][0]:.0f}, {100 * ci[key][1]:.0f}]"
            return f"{statistics.fmean(v):.0f} ± {statistics.stdev(v):.0f} [{min(v):.0f}, {max(v):.0f}]"

        lines = [f"MQAR at ≈{args.length} tokens (16 K), K = {K}, n = {args.n} per cell and seed; augmentation: at "
                 f"most {args.augment_tokens} tokens of {args.chunk_words}-word BM25 chunks re-inserted before the "
                 f"question; cells: accuracy % (one seed: [95 % Wilson interval]; several: mean ± sd [min, max] over seeds)", "",
                 "| model (seeds) | " + " | ".join(states) + " |", "|---|" + "---|" * len(states)]
        for arm in NAMES:
            if nseeds[arm]:
                lines.append(f"| {NAMES[arm]} ({nseeds[arm] if arm != 'untrained' else '-'}) | "
                             + " | ".join(fmt(cells.get((arm, s)), (arm, s)) for s in states) + " |")
        hits = [r["hit"] for r in records if r.get("hit") is not None]
        lines += ["", f"BM25 finds the answer's source in {100 * statistics.fmean(hits):.0f} % of augmented prompts."]
        text = "\n".join(lines) + "\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        _save(out.with_suffix(".json"), {"command": "python scripts/augment_train.py " + " ".join(
            without_only(argv if argv is not None else sys.argv[1:])), "recipe": str(RECIPE.relative_to(ROOT)), "budget": K,
            "augment_tokens": args.augment_tokens, "chunk_words": args.chunk_words, "n": args.n,
            "length": args.length, "records": records})
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
