"""Perplexity of one real window two ways: the teacher-forced simulation (what training and
evaluation use) and true token-by-token decoding through a physically bounded cache (what a
user gets). Prints a Markdown table with the difference, and the CPU scan time per layer.

    python scripts/fidelity_report.py --seq-len 2048 --budgets 64,128,256 --json results/fidelity_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from tqdm import tqdm

from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache, remove_budget
from msrnn_train.data import DEFAULT_HELDOUT, gutenberg_books, make_windows, tokenize_documents
from msrnn_train.models import load_model


def nll_teacher_forced(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()


def nll_decoded(model, ids, desc):
    cache = make_cache(model)
    total = 0.0
    with torch.no_grad():
        for t in tqdm(range(ids.shape[1] - 1), desc=desc, leave=False):
            logits = model(input_ids=ids[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0, -1:], ids[0, t + 1:t + 2], reduction="sum").item()
    return total, max(cache.state_sizes())


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
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--policies", default="tova,sinks,window,h2o")
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--book", default=DEFAULT_HELDOUT[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    books = gutenberg_books()
    ids = make_windows(tokenize_documents({args.book: books[args.book]}, tok), args.seq_len, max_windows=1)
    assert ids.shape[0] == 1, f"{args.book} has fewer than {args.seq_len} tokens"
    n = args.seq_len - 1
    rows = []
    t0 = time.perf_counter()
    full = nll_teacher_forced(model, ids)
    rows.append({"policy": "full", "budget": None, "ppl_simulated": math.exp(full / n)})
    for policy in args.policies.split(","):
        for budget in [int(b) for b in args.budgets.split(",")]:
            apply_budget(model, BudgetSpec(policy=policy, budget=budget))
            sim = nll_teacher_forced(model, ids)
            dec, held = nll_decoded(model, ids, f"{policy}-{budget} decode")
            rows.append({"policy": policy, "budget": budget, "ppl_simulated": math.exp(sim / n),
                         "ppl_decoded": math.exp(dec / n), "abs_diff": abs(math.exp(sim / n) - math.exp(dec / n)),
                         "max_states_held": held})
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
