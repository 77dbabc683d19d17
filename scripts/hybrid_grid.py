"""Hybrids that hold up (issue 24, part 2): the trained one-full-layer hybrid against its controls,
over training seeds, K and prompt length, on the real model.

    python scripts/hybrid_grid.py --seeds 42,43,44 --work-dir runs/hybrid_grid --out results/hybrid_grid

Per training seed (``--training.seed``: LoRA initialisation, data order and the generated
retrieval rows, ``seed * 1_000_003 + j``; 42 is the recipe's default and far from the
evaluation's seed 0), three LoRA adapters on the same rows and steps
(`recipes/smollm2_retrieval.yaml`, the arms of `scripts/retrieval_hybrid.py`):

* ``hybrid``: trained under TOVA-32 with one full layer (``budget.hybrid auto:1``);
* ``bounded``: trained under TOVA-32 on every layer (control 1);
* ``plain``: plain LoRA at full state (control 2, `comparison.PLAIN_LORA`).

Each is evaluated with the hybrid arm's full layer(s) of the same seed and TOVA-K on the others,
K in ``--budgets`` (at the training length), at twice the length for ``--long-budget``, and at
full state (the controls: at the training length). MQAR, ``--n`` instances (evaluation seed 0).
``--families`` adds held-out task families (never trained on) to the hybrid arm, at full state and at
``--long-budget``.

Every adapter and every cell is cached in --work-dir (one JSON per seed and arm), so an
interrupted run resumes; ``--only report`` rewrites the tables and the plot from the cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_hybrid import ARMS, _load, _save, full_layers_of, train_arm, without_only  # noqa: E402

ARM_NAMES = {"hybrid": "trained under the hybrid", "bounded": "trained all-bounded (control)",
             "plain": "plain LoRA at full state (control)"}


def cell_key(r: dict) -> str:
    state = "full" if r["budget"] is None else f"K{r['budget']}"
    return f"{r['task']}|{r['length']}|{state}"


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """(arm, task, length, K or None) -> mean, spread (min..max over seeds) and the seeds' values."""
    cells: dict[tuple, list[float]] = {}
    for r in records:
        cells.setdefault((r["arm"], r["task"], r["length"], r["budget"]), []).append(100 * r["accuracy"])
    ci = {(r["arm"], r["task"], r["length"], r["budget"]): r["ci95"] for r in records}
    return {k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v),
                "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v, "ci95": ci[k]}
            for k, v in cells.items()}


def report(records: list[dict], out: Path, meta: dict) -> str:
    s = summarize(records)
    seeds = sorted({r["seed"] for r in records})
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = [f"training seeds {', '.join(map(str, seeds))}; cells: accuracy %, mean ± sd over seeds [min, max] (one seed: "
             f"[95 % Wilson interval]); "
             f"n = {meta['n']} instances per cell and seed", ""]

    def fmt(c):
        if c is None:
            return "—"
        if len(c["values"]) == 1:  # one seed: its 95 % Wilson interval
            lo, hi = c["ci95"]
            return f"{c['mean']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"
        return f"{c['mean']:.0f} ± {c['sd']:.0f} [{c['min']:.0f}, {c['max']:.0f}]"

    for task in tasks:
        cols = sorted({(r["length"], r["budget"]) for r in records if r["task"] == task},
                      key=lambda x: (x[0], x[1] is None, x[1] or 0))
        head = [f"K = {b} @ {n}" if b is not None else f"full state @ {n}" for n, b in cols]
        lines += [f"### {task}", "", "| adapter (full layers on the hybrid's layer) | " + " | ".join(head) + " |",
                  "|---|" + "---|" * len(cols)]
        for arm in ARM_NAMES:
            if not any(r["arm"] == arm and r["task"] == task for r in records):
                continue
            ns = len({r["seed"] for r in records if r["arm"] == arm and r["task"] == task})
            lines.append(f"| {ARM_NAMES[arm]} ({ns} seed{'s' if ns > 1 else ''}) | "
                         + " | ".join(fmt(s.get((arm, task, n, b))) for n, b in cols) + " |")
        # the hybrid against its own full state, per seed then averaged
        hyb = {(r["seed"], r["length"], r["budget"]): 100 * r["accuracy"] for r in records
               if r["arm"] == "hybrid" and r["task"] == task}
        ratios = []
        for n, b in cols:
            vals = [hyb[(sd, n, b)] / hyb[(sd, n, None)] for sd in seeds
                    if (sd, n, b) in hyb and hyb.get((sd, n, None))]
            ratios.append(f"{100 * statistics.fmean(vals):.0f} %" if vals and b is not None else "—")
        lines += [f"| hybrid as a share of its own full state | " + " | ".join(ratios) + " |", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _save(out.with_suffix(".json"), {**meta, "records": records,
                                     "summary": [{"arm": k[0], "task": k[1], "length": k[2], "budget": k[3], **v}
                                                 for k, v in s.items()]})
    plot(records, out.with_suffix(".png"), meta)
    return "\n".join(lines)


def plot(records: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(records)
    panels = sorted({(r["task"], r["length"]) for r in records if r["budget"] is not None},
                    key=lambda p: (p[0] != "mqar", p[0], p[1]))  # MQAR (trained) first, then held-out families
    ks = sorted({r["budget"] for r in records if r["budget"] is not None})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (task, length) in zip(axes[0], panels):
        for i, arm in enumerate(ARM_NAMES):
            pts = sorted((k[3], v) for k, v in s.items() if k[:3] == (arm, task, length) and k[3] is not None)
            if not pts:
                continue
            xs = [b * (1.04 ** (i - 1)) for b, _ in pts]
            ys = [v["mean"] for _, v in pts]
            err = [[v["mean"] - v["min"] for _, v in pts], [v["max"] - v["mean"] for _, v in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt="-o", capsize=3, color=f"C{i}", label=ARM_NAMES[arm])
            full = s.get((arm, task, length, None))
            if full is not None:
                ax.axhline(full["mean"], color=f"C{i}", ls=":", lw=1, label=f"{arm} at full state")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlim(ks[0] / 1.3, ks[-1] * 1.3)
        ax.set_xlabel("K (TOVA states on the bounded layers)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(f"{task} at ≈{length} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M: one full layer, mean and range over seeds {meta['seeds']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/hybrid_grid")
    ap.add_argument("--out", default="results/hybrid_grid")
    ap.add_argument("--seeds", default="42,43,44", help="training seeds (--training.seed)")
    ap.add_argument("--arms", default="hybrid,bounded,plain")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--budgets", default="16,32,64")
    ap.add_argument("--length", type=int, default=512, help="the training length")
    ap.add_argument("--long-budget", type=int, default=32, help="K evaluated at twice the length (0: none)")
    ap.add_argument("--families", default="", help="held-out task families, e.g. kv,needles")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", default=None, help="train, eval, report (default: all)")
    args = ap.parse_args(argv)
    stages = set(args.only.split(",")) if args.only else {"train", "eval", "report"}
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = args.arms.split(",")
    budgets = [int(x) for x in args.budgets.split(",")]
    families = [f for f in args.families.split(",") if f]
    work, out = Path(args.work_dir), Path(args.out)
    started = time.perf_counter()

    tasks_cache: dict = {}

    def tasks(task, length, tok):
        if (task, length) not in tasks_cache:
            from msrnn_train.retrieval_tasks import make_task

            n = args.n if task == "mqar" else max(args.n // 2, 1)
            tasks_cache[(task, length)] = {task: make_task(task, n, length, seed=0, tokenizer=tok)}
        return tasks_cache[(task, length)]

    for seed in seeds:
        sdir = work / f"seed{seed}"
        layers = None
        for arm in (["hybrid"] + [a for a in arms if a != "hybrid"]):
            adapter = sdir / arm
            if "train" in stages:
                train_arm(arm, adapter, args.steps, ARMS[arm] + ["--training.seed", str(seed)])
            if not (adapter / "adapter_config.json").is_file():
                continue
            path = sdir / f"grid_{arm}.json"
            recs = _load(path) or []
            done = {cell_key(r) for r in recs}
            from msrnn_train.hub import load_bounded
            from msrnn_train.retrieval import retrieval_grid

            if "eval" not in stages:
                if arm == "hybrid" and recs:
                    layers = recs[0]["hybrid_layers"]
                continue
            model, tok = load_bounded(adapter)
            if arm == "hybrid":
                layers = full_layers_of(model)
            if not layers:
                raise SystemExit(f"seed {seed}: the hybrid arm has no full layer (train it first)")
            h = "+".join(map(str, layers))
            # the controls' full state only at the training length; held-out families on the hybrid only
            plan = [("mqar", args.length, budgets, True)]
            if args.long_budget:
                plan.append(("mqar", 2 * args.length, [args.long_budget], arm == "hybrid"))
            if arm == "hybrid":
                plan += [(f, args.length, [args.long_budget or budgets[0]], True) for f in families]
            for task, length, ks, full in plan:
                todo = [k for k in ks if f"{task}|{length}|K{k}" not in done]
                want_full = full and f"{task}|{length}|full" not in done
                if not todo and not want_full:
                    continue
                new = retrieval_grid(model, tok, tasks(task, length, tok), todo, (h,), "tova", (False,),
                                     trained=True, adapter_on=True, batch_size=args.batch_size,
                                     full_state=want_full)
                for r in new:
                    r.update(arm=arm, seed=seed, length=length, hybrid_layers=layers)
                recs += new
                done |= {cell_key(r) for r in new}
                _save(path, recs)
            del model
        print(f"seed {seed} done ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)

    if "report" in stages:
        records = []
        for seed in sorted(int(p.name[4:]) for p in work.glob("seed*")):
            for arm in ARM_NAMES:
                records += _load(work / f"seed{seed}" / f"grid_{arm}.json") or []
        meta = {"model": "smollm2", "length": args.length, "n": args.n, "steps": args.steps,
                "seeds": sorted({r["seed"] for r in records}), "recipe": "recipes/smollm2_retrieval.yaml",
                "command": "python scripts/hybrid_grid.py " + " ".join(without_only(argv if argv is not None else sys.argv[1:]))}
        print(report(records, out, meta))
        print(f"\nwrote {out.with_suffix('.md')}, .json, .png ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
