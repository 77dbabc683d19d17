"""Held-out perplexity of the untrained SmolLM2-135M under window-K + one full layer with the
`window_sink` logits set to constants, against `window` (no sink) and `sinks` (window+4): the
measurement behind sink.SINK_INIT. Also a data-calibrated per-head value (`controller.first_tokens_lse`,
what `budget.sink_init: calibrate` trains from): s_h = the mean, over the queries that no longer see them, of logsumexp of head h's logits
on the first 4 tokens, measured under `sinks` on other held-out windows, plus a shift.

    python scripts/sink_init.py --out results/sink_init.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from msrnn_train import BudgetSpec
from msrnn_train.controller import budget_scope, first_tokens_lse
from msrnn_train.data import heldout_windows
from msrnn_train.evaluate import evaluate_specs
from msrnn_train.models import load_model
from msrnn_train.sink import sinks


def hybrid_parser(doc: str) -> argparse.ArgumentParser:
    """The options of an untrained window-K + one-full-layer measurement (this script and sink_value.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--full-layer", type=int, default=18, help="the hybrid's full layer (auto:1 picks 18)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    return ap


def hybrid_budget(model, args) -> list:
    """K on every layer but --full-layer (None: unbounded)."""
    budget = [args.budget] * model.config.num_hidden_layers
    budget[args.full_layer] = None
    return budget


def reference_rows(model, windows, budget) -> list[tuple[str, float]]:
    """Perplexity under `window` (no sink) and `sinks` (window + the first 4 tokens) on the same hybrid."""
    return [(policy, evaluate_specs(model, windows, [BudgetSpec(policy=policy, budget=budget)])[0]["ppl"])
            for policy in ("window", "sinks")]


def main(argv=None) -> int:
    ap = hybrid_parser(__doc__)
    ap.add_argument("--values", default="-2,0,1,2,3,4,6")
    ap.add_argument("--calib-shifts", default="0,-1,-2,-3", help="shifts of the calibrated per-head values")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    both = heldout_windows(tok, args.seq_len, 2 * args.windows)
    windows, calibration = both[:args.windows], both[args.windows:]  # calibrated on other windows
    budget = hybrid_budget(model, args)
    rows = reference_rows(model, windows, budget)
    spec = BudgetSpec(policy="window_sink", budget=budget)
    for value in map(float, args.values.split(",")):
        with budget_scope(model, spec):
            with torch.no_grad():
                for s in sinks(model).values():
                    s.logit.fill_(value)
            ppl = evaluate_specs(model, windows, [spec])[0]["ppl"]  # the scope re-applies the same spec
        rows.append((f"window_sink, s = {value:g}", ppl))
    calibrated = first_tokens_lse(model, budget, calibration) if args.calib_shifts else {}
    for shift in map(float, args.calib_shifts.split(",")) if args.calib_shifts else []:
        with budget_scope(model, spec):
            with torch.no_grad():
                for layer, s in sinks(model).items():
                    s.logit.copy_(calibrated[layer] + shift)
            ppl = evaluate_specs(model, windows, [spec])[0]["ppl"]
        rows.append((f"window_sink, per-head calibrated {shift:+g}", ppl))
    lines = [f"# Sink logit initialisation: untrained SmolLM2-135M, window-{args.budget} + full layer "
             f"{args.full_layer}", "", f"Held-out perplexity, {args.windows} Gutenberg windows of {args.seq_len} "
             "tokens (`python scripts/sink_init.py`). Calibrated: s_h = mean over queries past the first 4 + K "
             "tokens of logsumexp of head h's logits on the first 4 tokens, under `sinks`, on the next "
             f"{args.windows} held-out windows; not used by training yet (sink.SINK_INIT is the constant).", "", "| bounded layers | perplexity |", "| --- | --- |"]
    lines += [f"| {name} | {ppl:.2f} |" for name, ppl in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
