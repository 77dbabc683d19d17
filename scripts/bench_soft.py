"""Extra cost of soft-TOVA over hard TOVA in a training step (forward + backward), measured in
one run against the full-state step as baseline. Medians after warm-up; prints a table.

    python scripts/bench_soft.py --model smollm2 --seq-len 512 --budget 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from msrnn_train import BudgetSpec, apply_budget, remove_budget
from msrnn_train.models import load_model
from msrnn_train.soft import set_soft_temperature


def step_time(model, ids, repeats, warmup=1):
    times = []
    for i in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    model.train()
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    base, _ = step_time(model, ids, args.repeats)
    rows.append(("full (no budget)", base))
    apply_budget(model, BudgetSpec(policy="tova", budget=args.budget))
    hard, _ = step_time(model, ids, args.repeats)
    rows.append((f"hard TOVA-{args.budget}", hard))
    set_soft_temperature(model, args.tau)
    soft, _ = step_time(model, ids, args.repeats)
    rows.append((f"soft TOVA-{args.budget} (tau={args.tau})", soft))
    remove_budget(model)

    print(f"\n{args.model}, T={args.seq_len}, fwd+bwd step, median of {args.repeats} after warm-up, "
          f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}\n")
    print("| step | seconds | vs full | vs hard |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / base:.2f}x | {t / hard:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "seq_len": args.seq_len, "budget": args.budget, "tau": args.tau,
                       "seconds": {"full": base, "hard": hard, "soft": soft},
                       "soft_over_hard": soft / hard, "hard_over_full": hard / base}, f, indent=2)


if __name__ == "__main__":
    main()
