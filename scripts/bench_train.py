"""Training-step cost of the bounded simulation against plain LoRA, in one run.

    python scripts/bench_train.py                       # SmolLM2-135M shape, T=2048, K=256 (CUDA)
    python scripts/bench_train.py --shape mistral-7b    # 32 layers, hidden 4096, 32/8 heads, T=4096, K=512

Random-init weights built from a config (nothing downloaded), LoRA r=16 on all projections,
gradient checkpointing, bf16. Modes: (a) plain LoRA step with SDPA causal attention, (b) the same
under hard TOVA-K simulation, (c) under soft-TOVA. Median step time after warm-up, tokens/s,
peak memory, ratios against (a) of this run, and the eviction scan's share (timed in a
separate instrumented step). Writes results/bench_train.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, T=2048, K=256, B=2),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, T=4096, K=512, B=1),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, T=128, K=16, B=2),
}


def build(shape, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from msrnn_train.recipe import load_recipe
    from msrnn_train.train import add_lora

    cfg = {k: v for k, v in SHAPES[shape].items() if k not in ("T", "K", "B")}
    config = LlamaConfig(**cfg, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return add_lora(model, load_recipe(None)).train()  # the default recipe's LoRA: r=16 on all projections


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_train.json"))
    args = ap.parse_args(argv)

    from msrnn_train import BudgetSpec, apply_budget, remove_budget
    from msrnn_train.apply import get_controller
    from msrnn_train.soft import set_soft_temperature

    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = SHAPES[args.shape]
    T, K, B = s["T"], s["K"], s["B"]
    model = build(args.shape, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, s["vocab_size"], (B, T), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    for mode in ("plain", "hard", "soft"):
        remove_budget(model)
        if mode != "plain":
            apply_budget(model, BudgetSpec(policy="tova", budget=K))
            set_soft_temperature(model, 0.5 if mode == "soft" else None)
        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        r = {"step_s": statistics.median(times), "tokens_per_s": B * T / statistics.median(times), "peak_gib": peak}
        if mode != "plain":  # the scan's share, in one instrumented step
            from msrnn_train.schedule import default_scan

            ctrl = get_controller(model)
            fast, spent = default_scan(device), []

            def timed_scan(*a, **kw):
                sync()
                t = time.perf_counter()
                out = fast(*a, **kw)
                sync()
                spent.append(time.perf_counter() - t)
                return out

            for layer in ctrl.layers:
                layer.scan_fn = timed_scan
            step()
            for layer in ctrl.layers:
                layer.scan_fn = None
            r["scan_ms_per_layer"] = 1e3 * statistics.median(spent)
            r["scan_s_per_step"] = sum(spent)
        results[mode] = r
        print(f"{mode:6s} step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  peak {peak:6.2f} GiB"
              + (f"  scan {r['scan_ms_per_layer']:.2f} ms/layer ({r['scan_s_per_step'] * 1e3:.0f} ms/step)"
                 if "scan_ms_per_layer" in r else ""), flush=True)
    p = results["plain"]
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    doc = {"device": dev_name, "torch": torch.__version__, "shape": {"name": args.shape, **s},
           "lora_r": 16, "gradient_checkpointing": True, "dtype": "bfloat16", "modes": results,
           "step_time_ratio_hard": results["hard"]["step_s"] / p["step_s"],
           "step_time_ratio_soft": results["soft"]["step_s"] / p["step_s"],
           "peak_memory_ratio": results["hard"]["peak_gib"] / p["peak_gib"] if p["peak_gib"] == p["peak_gib"] else None,
           "peak_memory_ratio_soft": results["soft"]["peak_gib"] / p["peak_gib"] if p["peak_gib"] == p["peak_gib"] else None,
           "scan_ms_per_layer": results["hard"]["scan_ms_per_layer"]}
    lines = [f"Training step, {args.shape} shape (random init), B={B}, T={T}, TOVA K={K}, LoRA r=16, grad ckpt, "
             f"bf16, {dev_name}; median of {args.steps} after {args.warmup} warm-up", "",
             "| mode | step ms | tokens/s | peak GiB | ratio vs plain | scan ms/layer |", "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | "
                     f"{r['step_s'] / p['step_s']:.2f} | {r.get('scan_ms_per_layer', float('nan')):.2f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
