"""Export a window-K hybrid of the real SmolLM2-135M (untrained, or a trained adapter folder with
--adapter: LoRA merged, a window_sink's sinks included) as a plain transformers folder and check it: logits of one held-out Gutenberg window against the toolkit's teacher-forced
simulation of the same budget, greedy continuations against the toolkit's bounded decoding, and
the KV-cache memory after an 8k-token prompt (the exported model's own DynamicCache, measured
from its tensors after a chunked prefill, and analytically) against the full model.

    python scripts/export_check.py --out results/export_check.md
    python scripts/export_check.py --adapter outputs/sink/window_sink_value --out results/export_check_sink_value.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache, remove_budget
from msrnn_train.data import DEFAULT_HELDOUT, gutenberg_books, make_windows, tokenize_documents
from msrnn_train.export import PROVENANCE_FILENAME, export_servable
from msrnn_train.models import load_model


def cache_bytes(cache) -> list[int]:
    """Bytes of keys + values each layer of a transformers cache holds."""
    out = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        out.append(sum(t.numel() * t.element_size() for t in (keys, values) if t is not None and t.numel()))
    return out


def prefill(model, ids, chunk):
    """Feed `ids` through `model` `chunk` tokens per forward into its own DynamicCache; returns it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, s:s + chunk], use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    return cache


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default='{"default": 32, "18": null}', help="window budget (JSON; null: full layer)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens of the logit comparison window")
    ap.add_argument("--prompt-len", type=int, default=8192, help="prompt of the KV-memory measurement")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk of the memory measurement")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens compared")
    ap.add_argument("--book", default=DEFAULT_HELDOUT[0])
    ap.add_argument("--target", default=None, help="default: granite_swa for window_sink, else qwen2")
    ap.add_argument("--adapter", default=None, help="a trained adapter folder (its budget; --budget is ignored)")
    ap.add_argument("--out", default=None, help="write the Markdown report here too")
    ap.add_argument("--keep", default=None, help="export into this folder (default: a temp folder)")
    args = ap.parse_args(argv)

    if args.adapter:
        from msrnn_train.controller import get_budget
        from msrnn_train.hub import load_bounded

        model, tok = load_bounded(args.adapter, device="cpu")
        spec = get_budget(model)
    else:
        spec = BudgetSpec(policy="window", budget=json.loads(args.budget))
        model, tok = load_model("smollm2", dtype="float32", device="cpu")
    cfg = model.config
    books = gutenberg_books()
    doc = tokenize_documents({args.book: books[args.book]}, tok)
    window = make_windows(doc, args.seq_len, max_windows=1)
    long_prompt = make_windows(doc, args.prompt_len, max_windows=1)
    assert window.shape[0] == 1 and long_prompt.shape[0] == 1, f"{args.book} is too short"

    apply_budget(model, spec)
    merge_diff = None
    if args.adapter:  # compare with the simulation of the merged weights (what the export writes); merging
        import copy  # itself moves float32 logits a little: reported apart

        with torch.no_grad():
            unmerged = model(input_ids=window, use_cache=False).logits
        model = apply_budget(copy.deepcopy(model).merge_and_unload(), spec)
        with torch.no_grad():
            merge_diff = (model(input_ids=window, use_cache=False).logits - unmerged).abs().max().item()
    out_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="msrnn-export-"))
    t0 = time.perf_counter()
    export_servable(model, out_dir, tokenizer=tok, target=args.target, overwrite=True)  # a merged copy
    t_export = time.perf_counter() - t0
    prov = json.loads((out_dir / PROVENANCE_FILENAME).read_text())

    from transformers import AutoModelForCausalLM  # the exported folder, read by plain transformers

    served = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()

    with torch.no_grad():
        sim = model(input_ids=window, use_cache=False).logits  # the toolkit's teacher-forced simulation
        got = served(input_ids=window, use_cache=False).logits
        with_full = None
        remove_budget(model)
        with_full = model(input_ids=window, use_cache=False).logits
        apply_budget(model, spec)
    diff = (got - sim).abs().max().item()
    diff_full = (with_full - sim).abs().max().item()
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[0, :-1], window[0, 1:]).exp().item()  # noqa: E731

    prompt = window[:, :200]
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, **cache_kwargs(make_cache(model)))
        gen = served.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    same_tokens = int((want[0, 200:] == gen[0, 200:]).sum())

    # KV memory after an 8k prompt: the exported model's DynamicCache vs the full model's
    remove_budget(model)
    t0 = time.perf_counter()
    c_served = cache_bytes(prefill(served, long_prompt, args.chunk))
    c_full = cache_bytes(prefill(model, long_prompt, args.chunk))
    t_prefill = time.perf_counter() - t0
    n, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or \
        cfg.hidden_size // cfg.num_attention_heads
    per_token_layer = 2 * kv * hd * 4  # keys + values, fp32
    ks = prov["per_layer_K"]
    analytic_served = sum(per_token_layer * (args.prompt_len if k is None else min(k, args.prompt_len)) for k in ks)
    analytic_full = per_token_layer * args.prompt_len * n

    lines = [
        f"# Export check: SmolLM2-135M-Instruct, {'trained (' + args.adapter + ')' if args.adapter else 'untrained'} "
        f"`{spec.label}` → `{prov['target']}`", "",
        f"Budget `{json.dumps(prov['per_layer_K']) if args.adapter else args.budget}` (policy {spec.policy}"
        f"{'; sink values as biases' if prov.get('sink_values') else ''}): {sum(k is not None for k in ks)} sliding layers with "
        f"K = {prov['sliding_window'] - 1} (transformers `sliding_window` = {prov['sliding_window']}), "
        f"full layers {[i for i, k in enumerate(ks) if k is None]}. Exported in {t_export:.1f} s to a folder that "
        f"`AutoModelForCausalLM.from_pretrained` loads as `{type(served).__name__}` (transformers "
        f"{prov['transformers_version']}, fp32, CPU).", "",
        f"## Logits on one held-out Gutenberg window ({args.book}, {args.seq_len} tokens)", "",
        "| compared | max abs logit diff | perplexity |", "| --- | --- | --- |",
        f"| exported model vs toolkit teacher-forced simulation | {diff:.3e} | {nll(got):.3f} vs {nll(sim):.3f} |",
        f"| (for scale) full-state model vs the simulation | {diff_full:.3e} | {nll(with_full):.3f} |",
        *([f"| (for scale) the adapter's simulation before vs after merging the LoRA (float32 rounding of W + BA) "
           f"| {merge_diff:.3e} | |"] if merge_diff is not None else []), "",
        f"Greedy continuation of the window's first 200 tokens, {args.new_tokens} new tokens: exported "
        f"`generate()` equals the toolkit's bounded decoding (`BoundedCache`) on {same_tokens}/{args.new_tokens} "
        "tokens.", "",
        f"## KV cache after a {args.prompt_len}-token prompt (fp32)", "",
        f"Measured: the bytes of the key/value tensors each cache holds after prefilling {args.prompt_len} tokens of "
        f"{args.book} in chunks of {args.chunk} (the exported model's own `DynamicCache(config=...)`, whose sliding "
        f"layers are `DynamicSlidingWindowLayer`; the full model's `DynamicCache`); analytic: "
        f"2 (K, V) × {kv} KV heads × {hd} dims × 4 bytes × held tokens, summed over {n} layers. Both prefills took "
        f"{t_prefill:.0f} s.", "",
        "| model | held tokens per layer | measured MiB | analytic MiB |", "| --- | --- | --- | --- |",
        f"| full (SmolLM2-135M) | {args.prompt_len} × {n} | {mib(sum(c_full))} | {mib(analytic_full)} |",
        f"| exported `{spec.label}` | {prov['sliding_window'] - 1} × {sum(k is not None for k in ks)} + "
        f"{args.prompt_len} × {sum(k is None for k in ks)} | {mib(sum(c_served))} | {mib(analytic_served)} |",
        f"| ratio | | {sum(c_full) / sum(c_served):.1f}× smaller | {analytic_full / analytic_served:.1f}× smaller |",
        "",
        "A one-shot prefill (no chunks) briefly materialises a sliding layer's keys for the whole prompt inside "
        "that forward (DynamicSlidingWindowLayer.update returns the concatenated states, then keeps K); chunked "
        "prefill (`generation_config.prefill_chunk_size`) bounds that peak too.", "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0 if diff <= 1e-4 and same_tokens == args.new_tokens else 1


if __name__ == "__main__":
    raise SystemExit(main())
