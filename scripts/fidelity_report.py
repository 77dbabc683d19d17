"""Perplexity of one real window two ways: the teacher-forced simulation (what training and
evaluation use: `evaluate.perplexity`) and true token-by-token decoding through a physically
bounded cache (what a user gets: `fidelity.decode_token_by_token`, scored by `evaluate.nll_sum`).
Prints a Markdown table with the difference, and the CPU scan time per layer.

    python scripts/fidelity_report.py --seq-len 2048 --budgets 64,128,256 --json results/fidelity_smollm2.json
    python scripts/fidelity_report.py --model random:tiny-llama --seq-len 64 --budgets 16   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from msrnn_train import BudgetSpec, apply_budget, remove_budget
from msrnn_train.data import DEFAULT_HELDOUT, heldout_windows
from msrnn_train.evaluate import nll_sum, perplexity
from msrnn_train.fidelity import decode_token_by_token
from msrnn_train.models import load_base_model


def ppl_decoded(model, ids, desc):
    """Perplexity of `ids` [1, T] fed one token per forward through a BoundedCache (the last token
    is not fed: nothing scores its prediction) and the most states any layer holds at the end."""
    logits, _, cache = decode_token_by_token(model, ids[:, :-1], track_held=False, desc=desc)
    total, n = nll_sum(logits, ids)
    return math.exp(total / n), max(cache.state_sizes())


def scan_time(model, ids, policy, budget, layer=0, repeats=3):
    """Wall time of one layer's eviction scan at this length (CPU fast path and torch reference)."""
    from msrnn_train.policies import make_policy
    from msrnn_train.kernels import default_scan
    from msrnn_train.schedule import LogitRows, scan

    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    attn = model.model.layers[layer].self_attn
    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    hs = captured["hidden"]
    B, T, _ = hs.shape
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = attn.q_proj(hs).view(B, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(hs).view(B, T, -1, hd).transpose(1, 2)
    valid = torch.ones(B, T, dtype=torch.bool)
    order = valid.long().cumsum(-1) - 1
    pos = torch.arange(T)
    pol = make_policy(policy, budget)
    out = {}
    for name, fn in (("fast", default_scan("cpu")), ("torch", scan)):
        times = []
        for _ in range(repeats if name == "fast" else 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(pol, budget, LogitRows(q, k, attn.scaling), valid, order, pos)
            times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[len(times) // 2]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a model source (models.load_base_model), random:tiny-llama too")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--policies", default="tova,sinks,window,h2o")
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--book", default=DEFAULT_HELDOUT[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_base_model(args.model)
    ids = heldout_windows(tok, args.seq_len, max_windows=1, books=[args.book])
    assert ids.shape[0] == 1, f"{args.book} has fewer than {args.seq_len} tokens"
    n = args.seq_len - 1
    rows = []
    t0 = time.perf_counter()
    rows.append({"policy": "full", "budget": None, "ppl_simulated": perplexity(model, ids, progress=False)["ppl"]})
    for policy in args.policies.split(","):
        for budget in [int(b) for b in args.budgets.split(",")]:
            apply_budget(model, BudgetSpec(policy=policy, budget=budget))
            sim = perplexity(model, ids, progress=False)["ppl"]
            dec, held = ppl_decoded(model, ids, f"{policy}-{budget} decode")
            rows.append({"policy": policy, "budget": budget, "ppl_simulated": sim, "ppl_decoded": dec,
                         "abs_diff": abs(sim - dec), "max_states_held": held})
            print(rows[-1], flush=True)
            remove_budget(model)
    scan_times = {f"{p}-{b}": scan_time(model, ids, p, b) for p in ("tova", "h2o") for b in (64, 256)}
    wall = time.perf_counter() - t0

    print(f"\n{args.model}, book {args.book}, one window of {args.seq_len} tokens ({n} predicted)\n")
    print("| policy | K | ppl (simulation) | ppl (token-by-token, bounded cache) | |diff| | max states held |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["policy"] == "full":
            print(f"| full | - | {r['ppl_simulated']:.4f} | | | |")
        else:
            print(f"| {r['policy']} | {r['budget']} | {r['ppl_simulated']:.4f} | {r['ppl_decoded']:.4f} | "
                  f"{r['abs_diff']:.2e} | {r['max_states_held']} |")
    print(f"\nscan time for one layer at T={args.seq_len} (median, s): "
          + ", ".join(f"{k}: fast {v['fast']:.3f} / torch reference {v['torch']:.3f}" for k, v in scan_times.items()))
    print(f"wall time {wall:.0f} s, torch threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "book": args.book, "seq_len": args.seq_len, "rows": rows,
                       "scan_seconds_per_layer": scan_times, "wall_s": wall}, f, indent=2)


if __name__ == "__main__":
    main()
