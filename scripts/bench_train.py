"""Training-step cost of the bounded simulation against plain LoRA, in one run.

    python scripts/bench_train.py                       # SmolLM2-135M shape, T=2048, K=256 (CUDA)
    python scripts/bench_train.py --shape mistral-7b    # 32 layers, hidden 4096, 32/8 heads, T=4096, K=512
    python scripts/bench_train.py --shape tiny --out /tmp/bench_tiny.json   # a CPU smoke run
    python scripts/bench_train.py --seq-len 512 --budget 64 --batch 1 --no-b1 --warmup 1 --steps 3 \
        --out results/bench_train_cpu.json                 # SmolLM2 shape on a 2-core CPU

Random-init weights built from a config (nothing downloaded), LoRA r=16 on all projections,
gradient checkpointing (with the trainer's recompute context, as a run with a full-state term has
it), bf16 on CUDA (fp32 on a CPU). Modes: (a) plain LoRA step with SDPA causal attention, (b) the same under hard TOVA-K
simulation, (c) under soft-TOVA. Every mode runs the default recipe's objective through the
trainer's own function (`losses.bounded_objective`): CE of the bounded pass, CE of the full-state
pass with the adapter on, KL to the teacher the recipe names (`self`: the full-state pass's
logits, detached) -- the honest baseline -- and again with the bounded CE alone (the "LM-only"
ratios: `_lm_only`). Median step time after warm-up, tokens/s, peak memory, ratios against
(a) of this run, and the eviction scan's share (timed in a separate instrumented step), at the
batch size B (default 8: the scan runs a batch's sequences in one launch) and at B = 1 (`b1`).
Writes results/bench_train.json and .md (the .md holds the time split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from _bench import MISTRAL_7B, median_time, timed

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, T=2048, K=256, B=8),
    "mistral-7b": dict(MISTRAL_7B, T=4096, K=512, B=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, T=128, K=16, B=2),
}


DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # bf16 matmuls on a CPU measure the emulation, not the method


def build(shape, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from msrnn_train.controller import checkpoint_context_fn
    from msrnn_train.models import add_lora
    from msrnn_train.recipe import load_recipe
    from msrnn_train.trainer import enable_checkpointing

    cfg = {k: v for k, v in SHAPES[shape].items() if k not in ("T", "K", "B")}
    config = LlamaConfig(**cfg, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=DTYPE[device])
    model.enable_input_require_grads()
    model = add_lora(model, load_recipe(None)).train()  # the default recipe's LoRA: r=16 on all projections
    # as the trainer has it (CheckpointingCallback): each pass's recompute runs its own attention
    enable_checkpointing(model, {"use_reentrant": False, "context_fn": checkpoint_context_fn(model)})
    return model


def run_batch(model, shape, B, device, args, loss_cfg):
    """Every mode at batch size B: {mode: {step_s, tokens_per_s, peak_gib[, scan_*]}}."""
    from msrnn_train import BudgetSpec, apply_budget, remove_budget
    from msrnn_train.controller import full_state, get_controller, set_soft_temperature
    from msrnn_train.kernels import default_scan
    from msrnn_train.losses import bounded_objective
    from msrnn_train.trainer import full_state_logits

    s = SHAPES[shape]
    T, K = s["T"], s["K"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, s["vocab_size"], (B, T), device=device, generator=torch.Generator(device).manual_seed(B))

    def step(cfg):  # the trainer's objective (trainer.BoundedTrainer.compute_loss)
        loss, _, _ = bounded_objective(
            model, {"input_ids": ids}, cfg,
            teacher_fn=lambda i, m, adapter: full_state_logits(model, i, m, adapter=adapter),
            full_state_ctx=lambda: full_state(model))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    lm_only = dataclasses.replace(loss_cfg, kl_weight=0.0, full_lm_weight=0.0)
    objectives = [("", loss_cfg)]
    if (loss_cfg.kl_weight > 0 or loss_cfg.full_lm_weight > 0) and not args.no_lm_only:
        objectives.append(("_lm_only", lm_only))
    results = {}
    for suffix, cfg in objectives:
        for mode in ("plain", "hard", "soft"):
            name = mode + suffix
            remove_budget(model)
            if mode != "plain":
                apply_budget(model, BudgetSpec(policy="tova", budget=K))
                set_soft_temperature(model, 0.5 if mode == "soft" else None)
            if device == "cuda":
                torch.cuda.empty_cache()
            for _ in range(args.warmup):
                step(cfg)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # the peak of the timed steps
            _, med = median_time(lambda: step(cfg), device, args.steps, warmup=0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            r = {"step_s": med, "tokens_per_s": B * T / med, "peak_gib": peak}
            if mode != "plain" and not suffix:  # the scan's share, in one instrumented step
                ctrl = get_controller(model)
                spent = []

                def timed_scan(*a, **kw):
                    out, seconds = timed(lambda: default_scan(device)(*a, **kw), device, 1)
                    spent.extend(seconds)
                    return out

                for layer in ctrl.layers:
                    layer.scan_fn = timed_scan
                step(cfg)
                for layer in ctrl.layers:
                    layer.scan_fn = None
                r["scan_ms_per_layer_batch"] = 1e3 * statistics.median(spent)  # one launch: all B sequences
                r["scan_ms_per_layer"] = r["scan_ms_per_layer_batch"] / B  # per sequence
                r["scan_s_per_step"] = sum(spent)
            results[name] = r
            print(f"B={B} {name:13s} step {r['step_s'] * 1e3:9.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
                  f"peak {peak:6.2f} GiB" + (f"  scan {r['scan_ms_per_layer_batch']:.2f} ms/layer/launch "
                                             f"({r['scan_s_per_step'] * 1e3:.0f} ms/step)"
                                             if "scan_ms_per_layer" in r else ""), flush=True)
    remove_budget(model)
    del opt
    return results


def figures(results, B, shape, dev_name):
    """The issue's keys for one batch size."""
    p = results["plain"]

    def mem(mode):
        return results[mode]["peak_gib"] / p["peak_gib"] if p["peak_gib"] == p["peak_gib"] else None

    out = {"batch_size": B, "shape": shape, "device": dev_name,
           "step_time_ratio_hard": results["hard"]["step_s"] / p["step_s"],
           "step_time_ratio_soft": results["soft"]["step_s"] / p["step_s"],
           "peak_memory_ratio": mem("hard"), "peak_memory_ratio_soft": mem("soft"),
           "scan_ms_per_layer": results["hard"]["scan_ms_per_layer"],
           "scan_ms_per_layer_batch": results["hard"]["scan_ms_per_layer_batch"], "modes": results}
    if "plain_lm_only" in results:
        q = results["plain_lm_only"]
        out["step_time_ratio_hard_lm_only"] = results["hard_lm_only"]["step_s"] / q["step_s"]
        out["step_time_ratio_soft_lm_only"] = results["soft_lm_only"]["step_s"] / q["step_s"]
    return out


def table(fig, layers, steps, warmup):
    r = fig["modes"]
    p = r["plain"]
    B, sh = fig["batch_size"], fig["shape"]
    lines = [f"### B = {B}: {sh['name']} shape (random init), T={sh['T']}, TOVA K={sh['K']}, LoRA r=16, grad ckpt, "
             f"{'bf16' if fig['device'] != 'cpu' else 'fp32'}, {fig['device']}; median of {steps} after {warmup} warm-up", "",
             "| mode | step ms | tokens/s | peak GiB | ratio vs plain | scan ms/layer/sequence |", "|---|---|---|---|---|---|"]
    for mode, x in r.items():
        base = r["plain_lm_only"] if mode.endswith("_lm_only") else p
        lines.append(f"| {mode} | {x['step_s'] * 1e3:.1f} | {x['tokens_per_s']:.0f} | {x['peak_gib']:.2f} | "
                     f"{x['step_s'] / base['step_s']:.2f} | {x.get('scan_ms_per_layer', float('nan')):.2f} |")
    hard, soft = r["hard"], r["soft"]
    scan_ms = hard["scan_s_per_step"] * 1e3
    lines += ["", "Time split of the hard step (ms):", "", "| part | ms per step |", "|---|---|",
              f"| plain step (same loss terms) | {p['step_s'] * 1e3:.1f} |",
              f"| eviction scan: {layers} layers x {hard['scan_ms_per_layer_batch']:.2f} ms per launch "
              f"({B} sequences) | {scan_ms:.1f} |",
              f"| other hard-mode overhead | {(hard['step_s'] - p['step_s']) * 1e3 - scan_ms:.1f} |",
              f"| soft mode over hard | {(soft['step_s'] - hard['step_s']) * 1e3:.1f} |", ""]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=None, help="batch size of the main figures (default: the shape's, 8)")
    ap.add_argument("--no-b1", action="store_true", help="skip the B = 1 figures")
    ap.add_argument("--no-lm-only", "--no-kl-free", action="store_true",
                    help="skip the LM-only modes (the bounded CE alone; --no-kl-free: the former name)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the shape's T)")
    ap.add_argument("--budget", type=int, default=None, help="K of the bounded modes (default: the shape's K)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_train.json"))
    args = ap.parse_args(argv)

    from msrnn_train.recipe import load_recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    s = SHAPES[args.shape] = {**SHAPES[args.shape], "T": args.seq_len or SHAPES[args.shape]["T"],
                              "K": args.budget or SHAPES[args.shape]["K"]}
    B = args.batch or s["B"]
    loss_cfg = load_recipe(None).loss  # the default recipe's objective (see losses.bounded_objective)
    model = build(args.shape, device)
    shape = {"name": args.shape, **{k: v for k, v in s.items() if k != "B"}}
    doc = {"torch": torch.__version__, "lora_r": 16, "gradient_checkpointing": True,
           "dtype": str(DTYPE[device]).replace("torch.", ""),
           "loss": dataclasses.asdict(loss_cfg)}
    doc.update(figures(run_batch(model, args.shape, B, device, args, loss_cfg), B, shape, dev_name))
    lines = table(doc, s["num_hidden_layers"], args.steps, args.warmup)
    if not args.no_b1 and B != 1:
        doc["b1"] = figures(run_batch(model, args.shape, 1, device, args, loss_cfg), 1, shape, dev_name)
        lines += table(doc["b1"], s["num_hidden_layers"], args.steps, args.warmup)
    print("\n".join(lines))
    keys = ("step_time_ratio_hard", "step_time_ratio_soft", "peak_memory_ratio", "peak_memory_ratio_soft",
            "scan_ms_per_layer", "step_time_ratio_hard_lm_only", "step_time_ratio_soft_lm_only")
    for fig in [doc] + ([doc["b1"]] if "b1" in doc else []):
        print(f"B={fig['batch_size']}: " + ", ".join(f"{k}={fig[k]:.3f}" if isinstance(fig.get(k), float)
                                                     else f"{k}={fig.get(k)}" for k in keys))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
