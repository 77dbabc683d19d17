"""Why the `window_sink` sink has a value (sink.py): perplexity of the untrained SmolLM2-135M under
window-K + one full layer with the sink logits, and values or not, calibrated by
`controller.calibrate_sinks` (what `budget.sink_init: calibrate` trains from), against `window`
(no sink) and `sinks` (window + the first 4 tokens, which no stock config expresses).

Calibrated on one training book, measured on another (a validation split: the held-out books are
not touched), so the shift is chosen where it is used: sink.CALIBRATION_SHIFT(_WITH_VALUE).

    python scripts/sink_value.py --out results/sink_value.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sink_init import hybrid_budget, hybrid_parser, reference_rows  # noqa: E402

from msrnn_train import BudgetSpec  # noqa: E402
from msrnn_train.controller import budget_scope, calibrate_sinks  # noqa: E402
from msrnn_train.data import heldout_windows  # noqa: E402
from msrnn_train.evaluate import evaluate_specs  # noqa: E402
from msrnn_train.models import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = hybrid_parser(__doc__)
    ap.add_argument("--calibration-book", default="romeo_and_juliet_gut")
    ap.add_argument("--validation-book", default="julius_caesar_gut")
    ap.add_argument("--shifts", default="-2,-1,0,1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    started = time.perf_counter()
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    calibration = heldout_windows(tok, args.seq_len, args.windows, books=[args.calibration_book])
    windows = heldout_windows(tok, args.seq_len, args.windows, books=[args.validation_book])
    budget = hybrid_budget(model, args)
    rows = reference_rows(model, windows, budget)
    spec = BudgetSpec(policy="window_sink", budget=budget)
    for value in (False, True):
        for shift in map(float, args.shifts.split(",")):
            with budget_scope(model, spec):  # the logits are set here; the values stay 0 until value=True
                calibrate_sinks(model, budget, calibration, value=value, shift=shift)
                ppl = evaluate_specs(model, windows, [spec])[0]["ppl"]
            rows.append((f"window_sink, calibrated logit {shift:+g}" + (" and value" if value else " only"), ppl))
    lines = [f"# The sink's value: untrained SmolLM2-135M, window-{args.budget} + full layer {args.full_layer}", "",
             f"Perplexity on {args.windows} windows of {args.seq_len} tokens of `{args.validation_book}`; sinks "
             f"calibrated on {args.windows} windows of `{args.calibration_book}` (`controller.calibrate_sinks`: "
             "logit = each head's mean logsumexp on the first 4 tokens under `sinks` + shift; value = the first "
             "tokens' values as the sink mixes them, per key/value head). `python scripts/sink_value.py`.", "",
             "| bounded layers | perplexity |", "| --- | --- |"]
    lines += [f"| {name} | {ppl:.2f} |" for name, ppl in rows]
    lines.append(f"\n({(time.perf_counter() - started) / 60:.1f} min, cpu)")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
