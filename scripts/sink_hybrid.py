"""The attention sink on a hybrid, several ways (issue 24, part 3: a bounded model stock engines run).

SmolLM2-135M trained with recipes/smollm2_retrieval.yaml --budget.hybrid auto:1 (one full layer,
the others bounded to K = 32) under these rules for the bounded layers (the arms):

* window_sink - a plain window plus a learned per-head sink logit (msrnn_train/sink.py; value 0:
                budget.sink_value false): the state is the K most recent keys; stock transformers
                serves it as GraniteSWAForCausalLM;
* sinks       - a window plus the first 4 tokens (window+4): no stock config expresses it;
* window      - a plain window: Qwen2ForCausalLM with layer_types serves it;
* window_sink_cal - window_sink from calibrated per-head sink logits (budget.sink_init calibrate) at a
                ten times larger sink learning rate (0.5);
* window_auto3 - a plain window with three full layers (auto:3);
* window_sink_value - window_sink with a learned value too (per key/value head), logits and values
                calibrated at the start (budget.sink_init calibrate), the default sink rate (0.05).

For each: the untrained and the trained model's MQAR accuracy at about T = 512 tokens (n per
cell, the evaluation seeds of scripts/retrieval_hybrid.py) and held-out perplexity (T = 512),
each under the arm's own hybrid (window_sink_value's adapters also at full state); then, for the
exportable arms, the servable export of the trained adapter (LoRA merged): its logits against the
toolkit's simulation on a held-out window, the exported folder's own MQAR accuracy in plain
transformers, and its own cache's KV bytes after an 8k-token prompt (chunked prefill) against the
full model. An arm trains once per training seed (--seeds, or ARM:S1+S2). With --plain-control,
the controls of window_sink_value: scripts/hybrid_grid.py's plain LoRA adapters (same rows and
steps, per seed) and the untrained model, each run with the same cache and sinks calibrated as
that arm starts.

    python scripts/sink_hybrid.py --arms window_sink,window_sink_cal,window_auto3,sinks,window_sink_value:42+43+44 \
        --plain-control runs/hybrid_grid --work-dir outputs/sink --out results/sink_hybrid

Every cell is cached in --work-dir (a finished one is never recomputed; a trained adapter is
never retrained), so an interrupted run resumes where it stopped; the JSON and Markdown are
rewritten from the cache at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_check import cache_bytes, mib, prefill  # noqa: E402  (the measurement, not a copy)
from retrieval_hybrid import RECIPE, _load, _save, train_arm  # noqa: E402

ARMS = {policy: ["--budget.policy", policy, "--budget.hybrid", "auto:1"] for policy in ("window_sink", "sinks",
                                                                                         "window")}
ARMS["window_sink"] += ["--budget.sink_value", "false"]  # as first measured: gpt-oss's logit-only sink
# the servable candidates tried after window_sink (1 full layer, sinks from 1.0 at lr 0.05) recalled 2 %:
# a calibrated start with a 10x sink rate, and more full layers (a plain window: Qwen2 layer_types)
ARMS["window_sink_cal"] = ARMS["window_sink"] + ["--budget.sink_init", "calibrate", "--budget.sink_learning_rate", "0.5"]
ARMS["window_auto3"] = ["--budget.policy", "window", "--budget.hybrid", "auto:3"]
# then the sink with a value (results/sink_value.md: the first tokens do not hold zero), calibrated logits
# and values, at the default sink rate; GraniteSWA serves the value as v_proj/o_proj biases
ARMS["window_sink_value"] = ["--budget.policy", "window_sink", "--budget.hybrid", "auto:1",
                             "--budget.sink_init", "calibrate"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/sink")
    ap.add_argument("--out", default="results/sink_hybrid")
    ap.add_argument("--arms", default="window_sink,sinks,window",
                    help=f"comma list of arms ({', '.join(ARMS)}), each ARM or ARM:S1+S2 (its own training seeds)")
    ap.add_argument("--seeds", default="42", help="training seeds (--training.seed; 42, the recipe's default, keeps "
                    "the arm's own name, another seed S trains ARM_sS)")
    ap.add_argument("--plain-control", default=None, help="scripts/hybrid_grid.py's work dir: its plain LoRA "
                    "adapters (SEED/plain) run with window_sink_value's cache, sinks calibrated as that arm starts")
    ap.add_argument("--plain-seeds", default="42,43,44")
    ap.add_argument("--full-state-arms", default="window_sink_value",
                    help="arms whose trained adapters are also measured at full state (MQAR)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--n", type=int, default=50, help="MQAR instances per cell")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--budget", type=int, default=32, help="K (the recipe's budget.budget)")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=8192, help="prompt of the KV-memory measurement")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk of the memory measurement")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)

    import copy

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from msrnn_train import BudgetSpec
    from msrnn_train.controller import apply_budget, budget_scope, get_budget
    from msrnn_train.data import DEFAULT_HELDOUT, gutenberg_books, heldout_windows, make_windows, tokenize_documents
    from msrnn_train.evaluate import evaluate_specs
    from msrnn_train.export import PROVENANCE_FILENAME, ExportError, export_servable
    from msrnn_train.hub import load_bounded
    from msrnn_train.models import load_model
    from msrnn_train.retrieval import accuracy, wilson
    from msrnn_train.retrieval_tasks import make_task

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    arms = [a.partition(":")[0] for a in args.arms.split(",")]  # ARM or ARM:S1+S2 (its own training seeds)
    own_seeds = {a.partition(":")[0]: a.partition(":")[2] for a in args.arms.split(",") if ":" in a}
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; allowed: {', '.join(ARMS)}")
    started = time.perf_counter()

    # 1. train (each arm and seed once; `train` resumes nothing: an unfinished arm is trained again)
    runs = {(arm if seed == 42 else f"{arm}_s{seed}"): (arm, seed) for arm in arms
            for seed in map(int, own_seeds.get(arm, args.seeds).replace("+", ",").split(","))}
    adapters = {name: train_arm(arm, work / name, args.steps, ARMS[arm] + ["--training.seed", str(seed)])
                for name, (arm, seed) in runs.items()}

    base, tok = load_model("smollm2", dtype="float32", device=device)
    mqar = make_task("mqar", args.n, args.length, seed=0, tokenizer=tok)
    windows = heldout_windows(tok, args.length, args.ppl_windows)

    def cell(name, compute):
        path = work / f"{name}.json"
        rec = _load(path)
        if rec is None:
            rec = compute()
            _save(path, rec)
        return rec

    def recall(model, desc):
        """MQAR accuracy of `model` as it is, with its Wilson interval."""
        with torch.no_grad():
            res = accuracy(model, tok, mqar, args.batch_size, desc=desc)
        return {"mqar": res["accuracy"], "correct": res["correct"], "n": res["n"],
                "ci95": wilson(res["correct"], res["n"]), "tokens": res["tokens"]}

    def measure(model, spec):
        ppl = evaluate_specs(model, windows, [spec], desc=f"ppl {spec.label}")[0]
        return {"label": spec.label, **recall(model, f"mqar {spec.label}"), "ppl": ppl["ppl"]}

    # 2. trained and untrained, each under the arm's own hybrid (auto:1 picks the same layer for every arm:
    #    it probes the base model, which a fresh LoRA does not change)
    rows = {}
    for arm in runs:  # an arm and seed: its folder's name
        def trained(arm=arm):
            model, _ = load_bounded(adapters[arm], device=device)
            spec = get_budget(model)
            with budget_scope(model, spec):
                return measure(model, spec)

        rows[arm] = {"arm": runs[arm][0], "seed": runs[arm][1], "trained": cell(f"trained_{arm}", trained)}
        spec = BudgetSpec.load(adapters[arm])  # the arm's own hybrid, for the base model too

        def untrained(spec=spec):
            with budget_scope(base, spec):
                return measure(base, spec)

        rows[arm]["untrained"] = cell(f"untrained_{arm}", untrained)
        if runs[arm][0] in args.full_state_arms.split(","):
            def full_state(arm=arm):  # the same adapter with every layer unbounded
                model, _ = load_bounded(adapters[arm], device=device)
                with budget_scope(model, BudgetSpec(policy="full")):
                    return recall(model, f"mqar full {arm}")

            rows[arm]["full_state"] = cell(f"full_state_{arm}", full_state)
        rows[arm]["full_layers"] = [i for i, k in enumerate(spec.budget) if k is None]
        rows[arm]["steps"] = yaml.safe_load((adapters[arm] / "recipe.yaml").read_text())["training"]["max_steps"]

    # 2b. the control: plain LoRA (the same rows and steps at full state; scripts/hybrid_grid.py, per training
    #     seed) run with the servable cache: window_sink + the same full layer, its sinks calibrated on the
    #     same 4 training windows as window_sink_value starts from (what that arm has before training)
    controls = {}
    if args.plain_control:
        from msrnn_train.controller import calibrate_sinks
        from msrnn_train.data import build_windows
        from msrnn_train.recipe import load_recipe

        calib = build_windows(load_recipe(RECIPE), tok)[0][:4].to(device)
        ref = next((r for r in rows.values() if r["arm"] == "window_sink_value"), None)
        full_layers = ref["full_layers"] if ref else [18]
        for seed in map(int, args.plain_seeds.split(",")):
            def control(folder=Path(args.plain_control) / f"seed{seed}" / "plain"):
                model, _ = load_bounded(folder, device=device)
                budget = [None if i in full_layers else args.budget for i in range(model.config.num_hidden_layers)]
                spec = BudgetSpec(policy="window_sink", budget=budget)
                with budget_scope(model, spec):
                    calibrate_sinks(model, budget, calib)
                    return {**measure(model, spec), "adapter": str(folder)}

            controls[seed] = cell(f"plain_control_s{seed}", control)

        def untrained_calibrated():  # no training at all: the base model with the calibrated servable cache
            budget = [None if i in full_layers else args.budget for i in range(base.config.num_hidden_layers)]
            spec = BudgetSpec(policy="window_sink", budget=budget)
            with budget_scope(base, spec):
                calibrate_sinks(base, budget, calib)
                return measure(base, spec)

        untrained_cal = cell("untrained_calibrated_window_sink_value", untrained_calibrated)

    # 3. export (LoRA merged) and serve with plain transformers: exactness and KV memory after a long prompt
    book = DEFAULT_HELDOUT[0]
    doc = tokenize_documents({book: gutenberg_books()[book]}, tok)
    long_prompt = make_windows(doc, args.prompt_len, max_windows=1).to(device)
    full = cell("full_kv", lambda: {"bytes": sum(cache_bytes(prefill(base, long_prompt, args.chunk))),
                                    "ppl": evaluate_specs(base, windows, [BudgetSpec(policy="full")])[0]["ppl"]})
    for arm in runs:
        def export(arm=arm):
            out = work / f"export_{arm}"
            try:
                export_servable(adapters[arm], out, overwrite=True)
            except ExportError as err:
                return {"exported": False, "why": str(err)}
            served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
            model, _ = load_bounded(adapters[arm], device=device)
            merged = apply_budget(copy.deepcopy(model).merge_and_unload(), get_budget(model))  # what export writes
            ids = windows[:1].to(device)
            with torch.no_grad():  # teacher forcing everywhere (no cache)
                sim, sim_merged = (m(ids, use_cache=False).logits for m in (model, merged))
                diff = (served(ids, use_cache=False).logits - sim_merged).abs().max()
            prov = _load(out / PROVENANCE_FILENAME)
            return {"exported": True, "target": prov["target"], "max_logit_diff": diff.item(),
                    "merge_diff": (sim_merged - sim).abs().max().item(),
                    "kv_bytes": sum(cache_bytes(prefill(served, long_prompt, args.chunk))),
                    "sliding_window": prov["sliding_window"], "folder": str(out)}

        rows[arm]["export"] = cell(f"export_{arm}", export)
        if rows[arm]["export"]["exported"]:
            def served_mqar(arm=arm):  # the exported folder itself, in plain transformers, on the same prompts
                served = AutoModelForCausalLM.from_pretrained(rows[arm]["export"]["folder"],
                                                              dtype=torch.float32).to(device).eval()
                return recall(served, f"mqar served {arm}")

            rows[arm]["served"] = cell(f"served_{arm}", served_mqar)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(out.with_suffix(".json"), {
        "model": "smollm2", "recipe": str(RECIPE.name), "train_steps": args.steps, "budget": args.budget,
        "mqar_length": args.length, "n": args.n, "ppl_windows": args.ppl_windows, "prompt_len": args.prompt_len,
        "device": device, "full_state": full, "arms": rows, "plain_control": controls,
        "untrained_calibrated": untrained_cal if args.plain_control else None,
        "command": "python scripts/sink_hybrid.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    lines = [f"# The attention sink on a hybrid: SmolLM2-135M, K = {args.budget}, full layers by auto:N", "",
             f"MQAR at ≈{args.length} tokens (n = {args.n}, 95% Wilson interval), held-out perplexity (T = "
             f"{args.length}, {args.ppl_windows} windows; full state {full['ppl']:.2f}); export: the trained "
             f"adapter (LoRA merged) as a stock transformers folder, its max |logit diff| against the toolkit's "
             f"simulation of the same merged weights on one held-out window (merging itself moves the toolkit's "
             f"logits by the 'merge' column: float32 rounding of W + BA), and its own cache's KV after a {args.prompt_len}-token prompt "
             f"(full model: {mib(full['bytes'])} MiB); 'MQAR served': the exported folder's own accuracy in plain "
             "transformers on the same prompts.", "",
             "| bounded layers | full layer | steps | MQAR untrained | MQAR trained | MQAR served | ppl untrained | "
             "ppl trained | exported as | logit diff | merge | KV MiB | vs full |", "|" + " --- |" * 13]
    for arm, r in rows.items():
        u, t, e = r["untrained"], r["trained"], r["export"]
        ci = "–".join(f"{x:.2f}" for x in t["ci95"])
        exp = ([e["target"], f"{e['max_logit_diff']:.1e}", f"{e['merge_diff']:.1e}", mib(e["kv_bytes"]),
                f"{full['bytes'] / e['kv_bytes']:.1f}×"] if e["exported"] else ["not exportable", "", "", "", ""])
        served = f"{r['served']['mqar']:.2f}" if "served" in r else ""
        lines.append(f"| {arm} | {'+'.join(map(str, r['full_layers']))} | {r['steps']} | {u['mqar']:.2f} | {t['mqar']:.2f} ({ci}) | "
                     f"{served} | {u['ppl']:.2f} | {t['ppl']:.2f} | " + " | ".join(exp) + " |")
    by_arm = {}
    for r in rows.values():
        by_arm.setdefault(r["arm"], []).append(r)
    for seed, c in controls.items():
        ci = "–".join(f"{x:.2f}" for x in c["ci95"])
        lines.append(f"| plain LoRA, seed {seed} (control: trained at full state, run with window_sink + calibrated "
                     f"sinks) | {'+'.join(map(str, full_layers))} | {args.steps} | — | {c['mqar']:.2f} ({ci}) | | — | "
                     f"{c['ppl']:.2f} | | | | | |")
    if args.plain_control:
        c = untrained_cal
        lines.append(f"| untrained SmolLM2 (control: window_sink + calibrated sinks, no training) | "
                     f"{'+'.join(map(str, full_layers))} | 0 | {c['mqar']:.2f} ({'–'.join(f'{x:.2f}' for x in c['ci95'])}) | — "
                     f"| | {c['ppl']:.2f} | — | | | | | |")
    if controls:
        by_arm["plain LoRA + window_sink cache (calibrated), the control"] = [
            {"seed": seed, "trained": c} for seed, c in controls.items()]
    if any(len(rs) > 1 for rs in by_arm.values()):  # over training seeds: mean ± sd [min, max], %
        import statistics

        def spread(vals):
            vals = [100 * v for v in vals]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.0f} ± {sd:.0f} [{min(vals):.0f}, {max(vals):.0f}]"

        lines += ["", "Over training seeds (MQAR %, mean ± sd [min, max]; perplexity mean):", "",
                  "| bounded layers | seeds | MQAR trained | MQAR served | MQAR, the adapter at full state | ppl trained |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for arm, rs in by_arm.items():
            served = [r["served"]["mqar"] for r in rs if "served" in r]
            fs = [r["full_state"]["mqar"] for r in rs if "full_state" in r]
            lines.append(f"| {arm} | {', '.join(str(r['seed']) for r in rs)} | {spread([r['trained']['mqar'] for r in rs])} | "
                         f"{spread(served) if len(served) == len(rs) else ''} | {spread(fs) if len(fs) == len(rs) else ''} | "
                         f"{sum(r['trained']['ppl'] for r in rs) / len(rs):.2f} |")
    lines.append(f"\n({(time.perf_counter() - started) / 60:.1f} min this run, {device})")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
