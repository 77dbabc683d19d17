"""Eviction-scan speed: the plain torch `scan` (reference) against the fast kernel of this device
(Triton on CUDA, numba on the CPU), on random bf16 queries/keys, one layer per call.

    python scripts/bench_scan.py                 # CUDA: SmolLM2 and Mistral-7B shapes
    python scripts/bench_scan.py --quick         # CPU-sized shapes

Prints a table (median after warm-up; the reference once, it is slow) and checks on every
shape that the fast schedule equals the reference one. Writes results/bench_scan.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from _bench import MISTRAL_7B, timed
from msrnn_train.policies import make_policy
from msrnn_train.kernels import default_scan
from msrnn_train.schedule import LogitRows, scan

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_scan.json"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = default_scan(device)
    if args.quick or device == "cpu":
        shapes = [("smollm2", 1, 9, 3, 64, 512, 64)]
    else:
        shapes = [("smollm2", 4, 9, 3, 64, 2048, 64), ("smollm2", 4, 9, 3, 64, 2048, 256),
                  ("mistral-7b", 1, MISTRAL_7B["num_attention_heads"], MISTRAL_7B["num_key_value_heads"],
                   MISTRAL_7B["hidden_size"] // MISTRAL_7B["num_attention_heads"], 4096, 512)]
    rows = []
    for name, B, Hq, Hkv, D, T, K in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, Hq, T, D, device=device, generator=g, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, device=device, generator=g, dtype=torch.bfloat16)
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
        order = torch.arange(T, device=device).expand(B, T)
        pos = torch.arange(T, device=device)
        for policy_name in ("tova", "tova_head", "h2o"):
            policy = make_policy(policy_name, K)
            groups = Hkv if policy.head_wise else 1

            def run(fn):
                return fn(policy, K, LogitRows(q, k, D ** -0.5), valid, order, pos, groups=groups)

            def logits_only():
                rows = LogitRows(q, k, D ** -0.5)
                for t0 in range(0, T, rows.block):
                    rows.block_rows(t0)

            sched, times = timed(lambda: run(fast), device, args.reps, warmup=1)  # the warm-up compiles
            _, lt = timed(logits_only, device, args.reps)
            ref, rt = timed(lambda: run(scan), device, 1)
            same = bool(torch.equal(ref.evict, sched.evict))
            row = {"shape": name, "B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "K": K, "policy": policy_name,
                   "fast": fast.__name__, "fast_ms": 1e3 * statistics.median(times),
                   "logits_ms": 1e3 * statistics.median(lt), "reference_ms": 1e3 * rt[0],
                   "speedup": rt[0] / statistics.median(times), "same_schedule": same}
            rows.append(row)
            print(f"{name:10s} B={B} T={T} K={K} {policy_name:9s} {fast.__name__}: {row['fast_ms']:8.1f} ms "
                  f"(logits {row['logits_ms']:.1f} ms)  torch scan: {row['reference_ms']:8.0f} ms  "
                  f"x{row['speedup']:.0f}  same schedule: {same}", flush=True)
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    lines = [f"Eviction scan, one layer, bf16 q/k (fp32 scores), {dev_name}; median of {args.reps} after warm-up",
             "", "| shape | B | T | K | policy | fast kernel | ms | of which logits | torch scan ms | speed-up | same |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['Hq']}q/{r['Hkv']}kv, d={r['D']}) | {r['B']} | {r['T']} | {r['K']} | "
                     f"{r['policy']} | {r['fast']} | {r['fast_ms']:.1f} | {r['logits_ms']:.1f} | "
                     f"{r['reference_ms']:.0f} | {r['speedup']:.0f}x | {'yes' if r['same_schedule'] else 'NO'} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
