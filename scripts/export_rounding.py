"""Is a window_sink export exact, or only close? Per layer, in float64.

The float32 comparison of an exported sink hybrid with the toolkit's simulation (sink_hybrid.py,
export_check.py --adapter) mixes two things: whether the mapping is exact (GraniteSWA's sinks,
and a learned sink value written as v_proj/o_proj biases) and how much the model amplifies
float32 rounding. This script separates them: the adapter merged and its export both in float64,
GraniteSWA's eager attention without its forced float32 softmax and sink scale (a copy of
transformers' function with those two casts removed), and the max |difference| of every
layer's attention output (o_proj) on one held-out window, then of the logits. An exact mapping
agrees to ~1e-14 in the first layers; a wrong one differs by O(1) at the first sink layer. For
scale, the simulation alone with one layer's attention output multiplied by (1 + eps N(0, 1))
(--perturb-layer, --perturb-eps): how far this model carries a rounding-sized change.

    python scripts/export_rounding.py outputs/sink/window_sink_value [more adapter folders]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import torch.nn.functional as F


def eager_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' granite_swa eager_attention_forward without its float32 casts."""
    from transformers.models.granite_swa.modeling_granite_swa import repeat_kv

    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    keep = (torch.logsumexp(logits, -1) - module.sinks.view(1, -1, 1)).sigmoid()
    weights = F.softmax(logits, -1)
    return (torch.matmul(weights, v) * keep.unsqueeze(-1)).transpose(1, 2).contiguous(), weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapters", nargs="+")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--perturb-layer", type=int, default=1)
    ap.add_argument("--perturb-eps", type=float, default=1e-12)
    args = ap.parse_args(argv)

    import transformers.models.granite_swa.modeling_granite_swa as granite
    from transformers import AutoModelForCausalLM

    from msrnn_train import apply_budget
    from msrnn_train.controller import get_budget
    from msrnn_train.data import heldout_windows
    from msrnn_train.export import export_servable
    from msrnn_train.hub import load_bounded
    from msrnn_train.sink import sinks

    granite.eager_attention_forward = eager_float64  # looked up by name at call time
    for adapter in args.adapters:
        model, tok = load_bounded(adapter, dtype=torch.float64)
        merged = apply_budget(copy.deepcopy(model).merge_and_unload(), get_budget(model))
        for s in sinks(merged).values():
            s.double()
        folder = export_servable(merged, tempfile.mkdtemp(prefix="msrnn-rounding-"), tokenizer=tok, overwrite=True)
        served = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
        ids = heldout_windows(tok, args.seq_len, 1)
        outs: dict = {}
        hooks = [m.model.layers[i].self_attn.o_proj.register_forward_hook(
            lambda mod, a, o, key=(side, i): outs.__setitem__(key, o.detach()))
            for side, m in (("sim", merged), ("served", served)) for i in range(len(m.model.layers))]
        with torch.no_grad():
            outs["logits"] = merged(ids, use_cache=False).logits
            diff = (served(ids, use_cache=False).logits - outs["logits"]).abs().max().item()
        for h in hooks:
            h.remove()
        per_layer = [(outs[("sim", i)] - outs[("served", i)]).abs().max().item() for i in range(len(merged.model.layers))]
        print(f"## {adapter} ({get_budget(model).label}), float64, {args.seq_len} tokens\n")
        print("| layer | " + " | ".join(map(str, range(len(per_layer)))) + " | logits |")
        print("|" + " --- |" * (len(per_layer) + 2))
        print("| max abs diff | " + " | ".join(f"{d:.0e}" for d in per_layer) + f" | {diff:.1e} |\n")
        g = torch.Generator().manual_seed(0)
        hook = merged.model.layers[args.perturb_layer].self_attn.o_proj.register_forward_hook(
            lambda mod, a, o: o * (1 + args.perturb_eps * torch.randn(o.shape, generator=g, dtype=o.dtype)))
        with torch.no_grad():
            moved = (merged(ids, use_cache=False).logits - outs["logits"]).abs().max().item()
        hook.remove()
        print(f"For scale: the simulation alone, layer {args.perturb_layer}'s attention output x (1 + "
              f"{args.perturb_eps:g} N(0, 1)): max |logit change| {moved:.1e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
