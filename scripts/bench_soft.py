"""Extra cost of soft-TOVA over hard TOVA in a training step (forward + backward), measured in
one run against the full-state step as baseline. Medians after warm-up; prints a table.

    python scripts/bench_soft.py --model smollm2 --seq-len 512 --budget 64 --repeats 5

`--layer`: one attention layer's soft keep-logits (forward + backward), the sparse path
(soft_keep_sparse: scan outputs + gathered products) against the dense reference
(soft_keep_logits), each in a fresh process so that its peak memory is its own (CUDA: peak
allocated; CPU: growth of the peak resident set over the process after setup). SmolLM2 layer
shape by default (9 query / 3 key-value heads, d = 64):

    python scripts/bench_soft.py --layer --seq-len 1024 --budget 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from _bench import median_time, sync
from msrnn_train import BudgetSpec, apply_budget, remove_budget
from msrnn_train.models import load_model
from msrnn_train.controller import set_soft_temperature


def step_time(model, ids, repeats, warmup=1):
    """(median seconds of a forward + backward step after warm-up, the last loss)."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    loss, seconds = median_time(step, next(model.parameters()).device, repeats, warmup)
    return seconds, loss.item()


def layer_child(cfg: dict) -> dict:
    """Time and peak memory of one path's keep-logits, forward + backward, in this process."""
    from msrnn_train.policies import make_policy
    from msrnn_train.kernels import default_scan
    from msrnn_train.schedule import LogitRows
    from msrnn_train.soft import soft_keep_logits, soft_keep_sparse

    torch.set_num_threads(cfg["threads"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, Hq, Hkv, T, D, K = (cfg[x] for x in ("batch", "heads", "kv_heads", "seq_len", "head_dim", "budget"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, T, D, generator=g).to(dev)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dev)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    policy = make_policy("tova", K)
    sched = default_scan(dev)(policy, K, LogitRows(q, k, D ** -0.5), valid, valid.long().cumsum(-1) - 1,
                              torch.arange(T, device=dev), soft_rows=True)

    def run():
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        if cfg["path"] == "dense":
            keep = soft_keep_logits(qq, kk, D ** -0.5, sched, valid, 1, cfg["tau"])
        else:
            keep = soft_keep_sparse(qq, kk, D ** -0.5, sched, 1, cfg["tau"], K)
        torch.where(torch.isfinite(keep), keep, 0.0).sum().backward()
        return qq.grad

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()  # warm-up; on the CPU, its growth of the peak resident set is this path's peak memory
    sync(dev)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _, seconds = median_time(run, dev, cfg["repeats"], warmup=0)
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    return {"seconds": seconds, "peak_mib": peak / 2**20, "device": dev}


def layer_bench(args) -> None:
    rows = {}
    for path in ("dense", "sparse"):
        cfg = {"path": path, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
               "seq_len": args.seq_len, "head_dim": args.head_dim, "budget": args.budget, "tau": args.tau,
               "repeats": args.repeats, "threads": torch.get_num_threads()}
        out = subprocess.run([sys.executable, __file__, "--layer-child", json.dumps(cfg)], capture_output=True,
                             text=True, check=True)
        rows[path] = json.loads(out.stdout.strip().splitlines()[-1])
    d, s = rows["dense"], rows["sparse"]
    print(f"\nsoft keep-logits, one layer, forward + backward: B={args.batch}, T={args.seq_len}, K={args.budget}, "
          f"{args.heads}/{args.kv_heads} heads, d={args.head_dim}, {d['device']}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after warm-up\n")
    print("| path | ms | peak MiB | vs dense (time) | vs dense (memory) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['peak_mib']:.1f} | {r['seconds'] / d['seconds']:.3f}x | "
              f"{r['peak_mib'] / max(d['peak_mib'], 1e-9):.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "paths": rows}, f, indent=2)


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--layer-child":
        cfg = json.loads(sys.argv[2])
        print(json.dumps(layer_child(cfg)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--layer", action="store_true", help="one layer's keep-logits: sparse vs dense path")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)
    if args.layer:
        layer_bench(args)
        return

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
