"""In-context retrieval under a finite state, on the real model (issue 16): untrained and
trained, all-bounded TOVA-K vs one full layer vs retrieval augmentation, against full state.

    python scripts/retrieval_hybrid.py --work-dir runs/retrieval --out results/retrieval_hybrid

1. The untrained grid (SmolLM2-135M): MQAR at about T = 512 tokens, K = 32 = T/16, full state,
   all-bounded TOVA-K without / with retrieval augmentation (BM25, at most K re-inserted tokens),
   and TOVA-K with one full layer chosen by ``auto:1``, ``middle`` and ``random:1``.
2. Two LoRA adapters trained under the budget (recipes/smollm2_retrieval.yaml: half the rows
   generated MQAR prompts, the other half Gutenberg windows): all bounded, and the hybrid
   ``budget.hybrid: auto:1``. The training prompts use seeds far from the evaluation's.
3. The trained grid: each adapter under its own spec (the bounded one also with augmentation),
   and the hybrid adapter's own full state.
4. Held-out perplexity (the four held-out books, T = 512) of full state, all-bounded TOVA-K and
   the hybrid, untrained and trained. Augmentation only edits prompts that end in a question, so
   on plain text it is the all-bounded model.

Every stage is cached in --work-dir (a finished cell is never recomputed), so an interrupted run
resumes; the JSON/MD/plot are rewritten from the cache at the end. ``--base-json`` reuses the
records of an earlier ``python -m msrnn_train.evaluate --retrieval ... --json`` run for stage 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from msrnn_train.comparison import PLAIN_LORA

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_retrieval.yaml"
# plain: ordinary LoRA on the same rows and steps (the control, comparison.PLAIN_LORA)
ARMS = {"bounded": [], "hybrid": ["--budget.hybrid", "auto:1"],
        "plain": [t for key, value in PLAIN_LORA.items() for t in (f"--{key}", "null" if value is None else str(value))]}


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def without_only(argv: list[str]) -> list[str]:
    """A command line without its ``--only`` stage selection: the command that computes the cells
    (a later ``--only report`` just rereads them), as the experiment scripts record it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--only":
            skip = True
        elif not a.startswith("--only="):
            out.append(a)
    return out


def _suite_records(obj) -> list[dict] | None:
    if obj is None or isinstance(obj, list):
        return obj
    return obj.get("retrieval_suite") or obj.get("records")


def train_arm(arm: str, out: Path, steps: int, overrides: list[str] | None = None) -> Path:
    """The arm's adapter folder, trained (RECIPE + the arm's overrides) unless it is there already."""
    if (out / "adapter_config.json").is_file() and (out / "msrnn_budget.json").is_file():
        return out
    cmd = [sys.executable, "-m", "msrnn_train.train", str(RECIPE), "--training.output_dir", str(out),
           "--training.max_steps", str(steps), "--training.overwrite_output_dir", "true",
           *(ARMS[arm] if overrides is None else overrides)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def full_layers_of(model) -> list[int]:
    from msrnn_train.controller import get_budget

    spec = get_budget(model)
    if spec is None or isinstance(spec.budget, int):
        return []
    return [i for i, b in enumerate(spec.budget) if b is None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/retrieval")
    ap.add_argument("--out", default="results/retrieval_hybrid")
    ap.add_argument("--base-json", default=None, help="records of the untrained grid from an evaluate --retrieval run")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--n", type=int, default=100, help="instances per cell")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", default=None, help="comma list of stages to compute: base, train, trained, cross, ppl "
                    "(default: all; what is cached is always reported)")
    args = ap.parse_args(argv)

    import torch

    from msrnn_train.data import heldout_windows
    from msrnn_train.evaluate import evaluate_specs
    from msrnn_train.hub import load_bounded
    from msrnn_train.models import load_model
    from msrnn_train.hybrid import hybrid_spec, probe_instances
    from msrnn_train.retrieval import grid_table, retrieval_grid
    from msrnn_train.retrieval_tasks import make_task
    from msrnn_train.spec import BudgetSpec

    torch.manual_seed(0)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    K, started = args.budget, time.perf_counter()

    stages = set(args.only.split(",")) if args.only else {"base", "train", "trained", "cross", "ppl"}
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    tasks = {"mqar": make_task("mqar", args.n, args.length, seed=0, tokenizer=tok)}
    n_layers = model.config.num_hidden_layers

    # 1. the untrained grid, one cached file per part: TOVA-K all bounded (+ augmentation) and full
    #    state; TOVA-K with one full layer chosen three ways; window-K (a recency policy) without and
    #    with augmentation
    def part(name, **kw):
        path = work / f"grid_{name}.json"
        recs = _load(path)
        if recs is None and name == "base" and args.base_json:
            recs = _suite_records(_load(Path(args.base_json)))  # an evaluate --retrieval run, maybe partial
            recs = recs if recs and len(recs) >= 3 else None
        if recs is None and "base" in stages:
            recs = retrieval_grid(model, tok, tasks, [K], trained=False, adapter_on=True,
                                  batch_size=args.batch_size, **kw)
        if recs is not None:
            _save(path, recs)
        return recs or []

    base = part("base", hybrids=("none",), policy="tova", augment=(False, True))
    base += part("hybrids", hybrids=("auto:1", "middle", "random:1"), policy="tova", augment=(False,),
                 full_state=False, probe=probe_instances(tok, tasks=("mqar",), length=min(256, args.length)))
    window = part("window", hybrids=("none",), policy="window", augment=(False, True), full_state=False)

    # 2.-3. the trained adapters and their grid
    trained = []
    adapters = {}
    for arm in ARMS:
        if "train" in stages:
            adapters[arm] = train_arm(arm, work / arm, args.steps)
        elif (work / arm / "adapter_config.json").is_file():
            adapters[arm] = work / arm
        path = work / f"grid_{arm}.json"
        recs = _load(path)
        if recs is None and "trained" in stages and arm in adapters:
            amodel, atok = load_bounded(adapters[arm])
            layers = full_layers_of(amodel)
            recs = retrieval_grid(amodel, atok, tasks, [K], ("+".join(map(str, layers)) if layers else "none",),
                                  "tova", (False, True) if not layers else (False,), trained=True,
                                  adapter_on=True, batch_size=args.batch_size, full_state=bool(layers))
            for r in recs:
                r["arm"] = arm
            _save(path, recs)
            del amodel
        trained += recs or []

    # 3b. the controls: the adapters trained all-bounded and at full state (plain LoRA), evaluated
    #     with the hybrid's full layer(s) (is it training under the hybrid that restores recall?)
    hybrid_layers = sorted({x for r in trained for x in r["full_layers"]
                            if r.get("arm") == "hybrid" and r["budget"] is not None})
    for arm in [a for a in ARMS if a != "hybrid"]:
        cross_path = work / ("grid_cross.json" if arm == "bounded" else f"grid_cross_{arm}.json")
        cross = _load(cross_path)
        if cross is None and "cross" in stages and hybrid_layers and arm in adapters:
            amodel, atok = load_bounded(adapters[arm])
            cross = retrieval_grid(amodel, atok, tasks, [K], ("+".join(map(str, hybrid_layers)),), "tova", (False,),
                                   trained=True, adapter_on=True, batch_size=args.batch_size, full_state=False)
            for r in cross:
                r["arm"] = arm
            _save(cross_path, cross)
            del amodel
        trained += cross or []

    # 4. held-out perplexity
    ppl_path = work / "ppl.json"
    ppl = _load(ppl_path) or []
    if "ppl" in stages and not ppl and {"bounded", "hybrid"} <= set(adapters):
        windows = heldout_windows(tok, args.length, args.ppl_windows)
        specs = [BudgetSpec(policy="full"), BudgetSpec(policy="tova", budget=K),
                 hybrid_spec("tova", K, n_layers, hybrid_layers)]
        names = ["full state", f"TOVA-{K}", f"TOVA-{K} + full layer {'+'.join(map(str, hybrid_layers))}"]
        for arm, m in [("untrained", model)] + [(a, None) for a in ARMS if a in adapters]:
            mm = m if m is not None else load_bounded(adapters[arm])[0]
            for name, rec in zip(names, evaluate_specs(mm, windows, specs, 1, desc=f"ppl {arm}")):
                ppl.append({"model": arm, "state": name, "ppl": rec["ppl"], "tokens": rec["tokens"]})
        _save(ppl_path, ppl)

    records = (base or []) + (window or []) + trained
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(out.with_suffix(".json"), {
        "model": "smollm2", "retrieval_length": args.length, "budget": K, "n": args.n, "train_steps": args.steps,
        "recipe": str(RECIPE.relative_to(ROOT)), "command": "python " + " ".join([Path(__file__).name] + (argv or sys.argv[1:])),
        "records": records, "perplexity": ppl,
    })
    table = grid_table(records)
    lines = [table, "", "| model | state | held-out ppl (T = %d) |" % args.length, "|---|---|---|"]
    lines += [f"| {p['model']} | {p['state']} | {p['ppl']:.2f} |" for p in ppl]
    out.with_suffix(".table.md").write_text("\n".join(lines) + "\n")
    from msrnn_train.plots import plot_recall_vs_budget

    plot_recall_vs_budget(records, out.with_suffix(".png"),
                          title=f"SmolLM2-135M: MQAR at ≈{args.length} tokens, K = {K} (untrained and trained)")
    print("\n".join(lines))
    print(f"\nwrote {out.with_suffix('.json')}, {out.with_suffix('.table.md')}, {out.with_suffix('.png')} "
          f"({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
