"""Export a window-bounded hybrid as a plain transformers model folder: stock engines serve it with
per-layer sliding windows, and nothing of msrnn-train is needed at load time.

    from msrnn_train.export import export_servable
    export_servable("outputs/smollm2-window32", "servable/")      # an adapter folder (train.py)
    export_servable(model, "servable/", tokenizer=tokenizer)      # a model with apply_budget(...)

    python -m msrnn_train.export outputs/smollm2-window32 servable/
    python -m msrnn_train.export smollm2 servable/ --budget '{"default": 32, "18": null}'

    # later, anywhere (only transformers installed):
    AutoModelForCausalLM.from_pretrained("servable/")

What can be exported: the `window` policy (drop the oldest state) or `window_sink` (the same, with a
learned virtual sink key: a logit per head and a value per key/value head) on every bounded layer, one K for all of them, and any set of unbounded
(`full`) layers: a hybrid. Under the toolkit's
semantics (docs/semantics.md) query t of a window-K layer attends to positions t-K..t, i.e. a
window of W = K + 1 keys, its own included. transformers' sliding layers attend to
`kv_idx > q_idx - sliding_window` (masking_utils.sliding_window_overlay: W keys, its own
included) and their cache (`DynamicSlidingWindowLayer`) keeps the last `sliding_window - 1` = K
keys between steps, so the export writes `sliding_window = K + 1`. Every other policy (sinks,
h2o, tova, the head-wise ones) chooses states by content or keeps sinks, which no stock
engine's cache does: refused, naming the policy.

The target architecture (a Llama-family source: llama, mistral without a sliding window, qwen2):

* `qwen2` (default), `Qwen2ForCausalLM`: Llama's RMSNorm, SwiGLU MLP, rotary embedding (the same
  `rope_parameters` code) and head_dim**-0.5 scaling, plus q/k/v biases (written as zeros for a
  Llama source: exact) and per-layer `layer_types` ("sliding_attention" / "full_attention") with
  one `sliding_window`. `use_sliding_window` must be true (Qwen2Config sets `sliding_window` to
  None otherwise); `max_window_layers` is only read when `layer_types` is absent, and is written
  so that readers of the older rule (sliding iff layer >= max_window_layers) agree where the
  hybrid allows it (the provenance file says whether it does).
* `ministral`, `MinistralForCausalLM`: the same blocks, no biases (the Llama state dict loads
  name for name), `head_dim` and `layer_types`. Needs transformers with the Ministral model.
* `granite_swa`, `GraniteSWAForCausalLM` (the default for `window_sink`, the only target with a sink):
  Granite (Llama's blocks, no biases with attention_bias = mlp_bias = False, the Llama state dict
  name for name) with per-layer `layer_types` / `sliding_window` and a per-head `sinks` parameter
  in every layer: its eager attention multiplies softmax(l) @ V by sigmoid(logsumexp(l) - sink),
  which is softmax over [l, sink] restricted to l, i.e. the toolkit's virtual sink key with a zero
  value (sink.sink_attention). A trained sink value u (per key/value head) is written as biases:
  GraniteSWA with attention_bias = True, v_proj.bias = -u and o_proj.bias = W_o u (u repeated over
  each group's query heads) on the sink layers, zeros elsewhere and for q/k: since the sink's
  share and the held keys' shares add up to 1, softmax(l) @ (V - u) * keep + u is the sink key's
  value mixed in, exactly (sink.py); with every value 0 the folder has no biases at all. Granite's four multipliers reduce it to Llama exactly: embedding,
  residual and logits multipliers 1.0 (x * 1.0 and x / 1.0 are exact in floating point) and
  attention_multiplier = head_dim**-0.5 (the scaling Llama uses; GraniteSWA's `scaling` *is*
  that multiplier); `layer_rope_theta` is the source's rope_theta on every layer (Granite's
  per-layer RoPE then builds one rotary embedding, the source's). A bounded layer's sinks are its
  trained logits; a full layer (no sink in the toolkit) and every layer of a plain `window` export
  get the dtype's most negative finite number, for which sigmoid(lse - sink) is exactly 1.0 (and
  exp(sink - max) exactly 0 in engines that add the sink to the denominator). GraniteSWAConfig
  has no `head_dim`: the source must have head_dim = hidden_size / num_attention_heads.
  Exact in real arithmetic; in float32 GraniteSWA runs eager attention (it has no SDPA) where the
  toolkit's full layers run SDPA, so the logits differ by rounding: 3e-7 on the tests' tiny model,
  6.8e-5 on SmolLM2-135M over 512 tokens (window_sink-32 + full[18]); a plain `window` hybrid
  written as granite_swa differs by 4e-3 there (eager vs SDPA in every sliding layer), so qwen2
  (SDPA on both sides: 0.0) stays its default. GPT-OSS also has per-layer sliding windows and
  `sinks`, but its MLP is a mixture of experts with a clamped sigmoid-GLU ((up + 1) * gate *
  sigmoid(1.702 gate)) and biased projections: a dense SiLU MLP is no exact special case of it.

The folder gets the model (`save_pretrained`), the tokenizer when one is known, a generation
config without the toolkit's chunked prefill, and `msrnn_export.json` (provenance: source, budget,
per-layer K, the window written and the semantics).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from .spec import SPEC_FILENAME, BudgetError, BudgetSpec

PROVENANCE_FILENAME = "msrnn_export.json"
EXPORTABLE_POLICIES = ("window", "window_sink", "full")  # full: no bounded layer, plain full attention
SOURCE_TYPES = ("llama", "mistral", "qwen2")
TARGETS = ("qwen2", "ministral", "granite_swa")
SINK_TARGETS = ("granite_swa",)  # the targets with a per-head sink parameter


class ExportError(ValueError):
    """A model or budget that cannot be written as a stock sliding-window model; the message names
    the key and what is allowed."""


# ----------------------------------------------------------------------------- what gets written
def servable_layout(spec: BudgetSpec, n_layers: int, layer_budgets: list[int | None] | None = None) -> dict:
    """{"layer_types": [...], "sliding_window": W or None, "K": K or None} for a budget, or
    ExportError when stock per-layer sliding windows cannot express it.

    layer_budgets: the model's current per-layer K (a ramp may have changed them), else the spec's."""
    from .policies import POLICIES

    if spec.policy not in EXPORTABLE_POLICIES:
        what = "head-wise " if POLICIES.get(spec.policy) is not None and POLICIES[spec.policy].head_wise else ""
        raise ExportError(
            f"policy: {spec.policy!r} ({what}eviction by its own rule) cannot be served by a stock engine; allowed: "
            f"'window' (a plain sliding window: drop the oldest state) or 'window_sink' (the same with a learned "
            f"sink key) on the bounded layers, null/'full' for unbounded ones")
    if spec.policy != "full" and POLICIES[spec.policy].head_wise:  # pragma: no cover - window is layer-wise
        raise ExportError(f"policy: {spec.policy!r} is head-wise; allowed: 'window' (layer-wise)")
    budgets = list(layer_budgets) if layer_budgets is not None else spec.per_layer(n_layers)
    if len(budgets) != n_layers:
        raise ExportError(f"budget: {len(budgets)} layer budgets for a model of {n_layers} layers")
    ks = sorted({k for k in budgets if k is not None})
    if len(ks) > 1:
        raise ExportError(
            f"budget: the bounded layers have different K ({'/'.join(map(str, ks))}); a stock config has one "
            f"sliding_window for all its sliding layers; allowed: one K for every bounded layer, null/'full' "
            f"for unbounded ones")
    k = ks[0] if ks else None
    layer_types = ["full_attention" if b is None else "sliding_attention" for b in budgets]
    return {"layer_types": layer_types, "sliding_window": None if k is None else k + 1, "K": k,
            "budgets": budgets}


def _legacy_max_window_layers(layer_types: list[str]) -> tuple[int, bool]:
    """Qwen2's older rule: sliding iff layer >= max_window_layers. (value, whether it is exact)."""
    n = len(layer_types)
    first = next((i for i, t in enumerate(layer_types) if t == "sliding_attention"), n)
    exact = all(t == ("sliding_attention" if i >= first else "full_attention") for i, t in enumerate(layer_types))
    return first, exact


# ----------------------------------------------------------------------------- the source model
def _unwrap(model):
    """(plain transformers model, its budget spec or None, the per-layer budgets or None). A peft
    model is copied and merged (merge_and_unload); the caller's model is never changed. Its sink
    logits, if any, stay on the copy's attention modules (`msrnn_sink`: sink.py)."""
    from .controller import get_controller

    ctrl = get_controller(model)
    spec = None if ctrl is None else ctrl.spec
    budgets = None if ctrl is None else [lb.budget if lb.policy is not None else None for lb in ctrl.layers]
    groups = [] if ctrl is None else [lb.groups for lb in ctrl.layers]
    if any(g > 1 for g in groups):
        raise ExportError(f"policy: {spec.policy!r} keeps head-wise groups ({max(groups)} per layer); allowed: "
                          "'window' (layer-wise: every key/value head holds the same states)")
    if hasattr(model, "merge_and_unload"):  # peft
        model = copy.deepcopy(model).merge_and_unload()
    return model, spec, budgets


def _check_source(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SOURCE_TYPES:
        raise ExportError(f"model: model_type {mt!r} is not a Llama-family model the export maps exactly; allowed: "
                          f"{', '.join(SOURCE_TYPES)}")
    if getattr(config, "mlp_bias", False):
        raise ExportError("model: mlp_bias=True (biased MLP projections): not expressible in the target; allowed: "
                          "mlp_bias=False")
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in (getattr(config, "layer_types",
                                                                                              None) or []):
        raise ExportError(f"model: the source already has a sliding window ({config.sliding_window}); allowed: "
                          "a full-attention source (the budget decides the windows)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ExportError(f"model: pretraining_tp={config.pretraining_tp}; allowed: 1")


def default_target(spec: BudgetSpec | None) -> str:
    """granite_swa for a sink policy (the only target that holds its logits), else qwen2."""
    from .policies import POLICIES

    sink = spec is not None and spec.policy in POLICIES and POLICIES[spec.policy].attention_sink
    return "granite_swa" if sink else "qwen2"


def _target_config(config, layout: dict, target: str, attention_bias: bool = False):
    from transformers import AutoConfig

    n = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = copy.deepcopy(getattr(config, "rope_parameters", None))
    if rope is None:  # transformers < 5 style configs
        rope = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02), rms_norm_eps=config.rms_norm_eps,
        use_cache=True, tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=rope, attention_dropout=0.0, layer_types=list(layout["layer_types"]),
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    W = layout["sliding_window"]
    if target == "qwen2":
        mwl, _ = _legacy_max_window_layers(layout["layer_types"])
        return AutoConfig.for_model("qwen2", **common, use_sliding_window=W is not None,
                                    sliding_window=W, max_window_layers=mwl, head_dim=head_dim)
    if target == "ministral":
        try:
            return AutoConfig.for_model("ministral", **common, sliding_window=W, head_dim=head_dim)
        except ValueError as err:
            raise ExportError(f"target: this transformers has no Ministral model ({err}); use target='qwen2'") from None
    if target == "granite_swa":
        if head_dim * heads != config.hidden_size:
            raise ExportError(f"model: head_dim {head_dim} x {heads} heads != hidden_size {config.hidden_size}; "
                              "GraniteSWAConfig derives head_dim = hidden_size / heads; allowed: a source where "
                              "they agree (or target='qwen2' for a plain window)")
        try:
            return AutoConfig.for_model(
                "granite_swa", **common, sliding_window=W, attention_bias=attention_bias, mlp_bias=False,
                embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
                attention_multiplier=head_dim ** -0.5, layer_rope_theta=[rope["rope_theta"]] * n)
        except ValueError as err:
            raise ExportError(f"target: this transformers has no GraniteSWA model ({err}); a sink policy needs "
                              "it (transformers with models/granite_swa)") from None
    raise ExportError(f"target: unknown target {target!r}; allowed: {', '.join(TARGETS)}")


def sink_values(source, sink_layers) -> dict[int, torch.Tensor]:
    """{layer: (Hkv, D)} the trained sink values of `sink_layers` that are not all zero (a source without
    values, or with `budget.sink_value: false`, has none)."""
    sd = source.state_dict()
    out = {}
    for layer in sorted(sink_layers):
        u = sd.get(f"model.layers.{layer}.self_attn.msrnn_sink.value")
        if u is not None and bool(u.detach().ne(0).any()):
            out[layer] = u.detach()
    return out


def _target_state_dict(source, target_model, sink_layers=()) -> dict:
    """The source weights under the target's names; q/k/v(/o) biases the source lacks are zeros. A
    target's per-head `sinks`: the source's trained logits on `sink_layers`, "no sink" elsewhere; a
    trained sink value u becomes v_proj.bias = -u and o_proj.bias = W_o u (module docstring)."""
    sd = {k: v.detach() for k, v in source.state_dict().items()}
    want = target_model.state_dict()
    values = sink_values(source, sink_layers)
    out = {}
    used = {f"model.layers.{layer}.self_attn.msrnn_sink.value" for layer in sink_layers}  # zero, or biases
    for name, ref in want.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.endswith("self_attn.sinks"):
            trained = name.replace("self_attn.sinks", "self_attn.msrnn_sink.logit")
            if layer in sink_layers:
                if trained not in sd:
                    raise ExportError(f"model: layer {layer} has no sink logits ({trained}); allowed: a window_sink "
                                      "adapter folder, or a model bounded by apply_budget(model, 'window_sink', ...)")
                out[name] = sd[trained].to(ref.dtype)
                used.add(trained)
            else:  # no sink: exp(sink - anything finite) == 0, sigmoid(lse - sink) == 1 exactly
                dt = sd["model.embed_tokens.weight"].dtype  # the dtype the target is written in
                out[name] = torch.full(ref.shape, torch.finfo(dt).min, dtype=dt)
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias")):
            w = sd[name.replace(".bias", ".weight")]
            bias = sd[name] if name in sd else torch.zeros(ref.shape, dtype=w.dtype, device=w.device)
            if bias.shape != ref.shape:
                raise ExportError(f"model: weight {name} has shape {tuple(bias.shape)}, the target expects "
                                  f"{tuple(ref.shape)}")
            if layer in values and name.endswith(("v_proj.bias", "o_proj.bias")):
                u = values[layer].to(w.dtype)  # (Hkv, D)
                if name.endswith("v_proj.bias"):
                    bias = bias - u.reshape(-1)
                else:
                    rep = w.shape[1] // u.numel()  # query heads per key/value head
                    bias = bias + w @ u.repeat_interleave(rep, dim=0).reshape(-1)
            out[name] = bias
        elif name in sd:
            if sd[name].shape != ref.shape:
                raise ExportError(f"model: weight {name} has shape {tuple(sd[name].shape)}, the target expects "
                                  f"{tuple(ref.shape)}")
            out[name] = sd[name]
        elif name == "lm_head.weight" and target_model.config.tie_word_embeddings:
            out[name] = sd["model.embed_tokens.weight"]
        else:
            raise ExportError(f"model: the target needs {name}, which the source does not have")
    # a sink or scorer the current budget does not use (left attached by an earlier budget) changes nothing
    extra = [k for k in sd if k not in want and k not in used and not k.endswith("rotary_emb.inv_freq")
             and ".msrnn_scorer." not in k and not (".msrnn_sink." in k and int(k.split(".")[2]) not in sink_layers)]
    if extra:
        raise ExportError(f"model: the source has weights the target cannot hold: {extra[:4]}"
                          f"{' ...' if len(extra) > 4 else ''} (e.g. an o_proj bias); allowed: Llama weights")
    return out


# ----------------------------------------------------------------------------- export
def export_servable(model_or_adapter_dir, out_dir, *, spec: BudgetSpec | dict | None = None, tokenizer=None,
                    target: str | None = None, base_model=None, dtype: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write a window-bounded (hybrid) model as a standard transformers folder and return its path.

    model_or_adapter_dir: an adapter folder written by train.py (base + LoRA merged + msrnn_budget.json),
        a model source `msrnn_train.models.load_model` takes ("smollm2", a .gguf, a model folder:
        its msrnn_budget.json, if any, is the budget), or a loaded model (bounded by apply_budget,
        peft or not: a copy is merged; the model itself is not changed).
    spec: the budget, where the source has none (or to override a folder's).
    target: "qwen2", "ministral" or "granite_swa" (see the module docstring); None (default):
        granite_swa for `window_sink`, else qwen2.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"export: {out} exists and is not empty (overwrite=True / --overwrite replaces "
                              "its files)")
    if target is not None and target not in TARGETS:
        raise ExportError(f"target: unknown target {target!r}; allowed: {', '.join(TARGETS)}")
    if isinstance(spec, dict):
        spec = BudgetSpec.from_dict(spec)
    if spec is not None and spec.policy not in EXPORTABLE_POLICIES:
        servable_layout(spec, 0, [])  # refuse before any weights load
    source_name = None
    if isinstance(model_or_adapter_dir, torch.nn.Module):
        model = model_or_adapter_dir
    else:
        model, tok, source_name = _load_source(model_or_adapter_dir, base_model=base_model, dtype=dtype,
                                               need_spec=spec is None)
        tokenizer = tokenizer if tokenizer is not None else tok
    plain, model_spec, budgets = _unwrap(model)
    if spec is not None:
        budgets = None  # an explicit spec wins over the model's own
    spec = spec if spec is not None else model_spec
    if spec is None:
        raise ExportError("budget: the model has no budget (apply_budget, a msrnn_budget.json, or spec=); "
                          "allowed: BudgetSpec(policy='window', budget={...})")
    spec.validate_for(plain.config)
    layout = servable_layout(spec, plain.config.num_hidden_layers, budgets)
    _check_source(plain.config)
    target = target or default_target(spec)
    sink_layers = _sink_layers(spec, layout["budgets"])
    if sink_layers and target not in SINK_TARGETS:
        raise ExportError(f"target: {target!r} has no attention sink parameter, which policy {spec.policy!r} "
                          f"trained; allowed: {', '.join(repr(t) for t in SINK_TARGETS)}")

    values = sink_values(plain, sink_layers)  # trained sink values: written as v/o_proj biases
    config = _target_config(plain.config, layout, target, attention_bias=bool(values))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    state = _target_state_dict(plain, shell, sink_layers)
    weight_dtype = plain.model.embed_tokens.weight.dtype
    target_model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype)
    target_model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        target_model.tie_weights()
    target_model.eval()
    gc = getattr(plain, "generation_config", None)
    if gc is not None:
        gc = copy.deepcopy(gc)
        if hasattr(gc, "prefill_chunk_size"):
            gc.prefill_chunk_size = None  # the toolkit's chunked prefill for its BoundedCache
        target_model.generation_config = gc

    out.mkdir(parents=True, exist_ok=True)
    target_model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    _, legacy_exact = _legacy_max_window_layers(layout["layer_types"])
    import transformers

    provenance = {
        "format": "msrnn-train servable export v1",
        "source": source_name or getattr(plain.config, "_name_or_path", None) or type(plain).__name__,
        "source_model_type": plain.config.model_type,
        "target": type(target_model).__name__,
        "budget_spec": spec.to_dict(),
        "label": spec.label,
        "per_layer_K": layout["budgets"],
        "layer_types": layout["layer_types"],
        "sliding_window": layout["sliding_window"],
        "semantics": ("window-K layer: query t attends to positions t-K..t (K+1 keys, its own included); "
                      "transformers sliding_window = K+1 (kv_idx > q_idx - sliding_window), whose sliding "
                      "cache keeps K keys between steps"),
        "legacy_max_window_layers_exact": legacy_exact if target == "qwen2" else None,
        "zero_qkv_biases": target == "qwen2",
        "sink_layers": sorted(sink_layers),
        "sinks": ("per-head learned logits on the bounded layers (softmax over [logits, sink]); the other layers "
                  "the most negative finite number (no sink)") if target in SINK_TARGETS else None,
        "sink_values": ("per key/value head learned values on " + "+".join(map(str, sorted(values)))
                        + ": v_proj.bias = -u, o_proj.bias = W_o u (q/k biases and the other layers' zero)")
        if values else None,
        "transformers_version": transformers.__version__,
    }
    (out / PROVENANCE_FILENAME).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def _sink_layers(spec: BudgetSpec, budgets: list[int | None]) -> set[int]:
    """The bounded layers whose policy attends with a learned sink."""
    from .policies import POLICIES

    if spec.policy not in POLICIES or not POLICIES[spec.policy].attention_sink:
        return set()
    return {i for i, k in enumerate(budgets) if k is not None}


def _load_source(source, base_model=None, dtype=None, need_spec=True):
    """(model, tokenizer, source name) for an adapter folder or a model source."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from .hub import load_bounded

        model, tokenizer = load_bounded(str(path), base_model=base_model, dtype=dtype or "float32")
        return model, tokenizer, str(path)
    from .controller import apply_budget
    from .models import load_base_model

    model, tokenizer = load_base_model(str(source), dtype=dtype or "float32")
    if path.is_dir() and (path / SPEC_FILENAME).is_file():
        apply_budget(model, BudgetSpec.load(path))
    elif need_spec:
        raise ExportError(f"budget: {source} is a model without {SPEC_FILENAME}; pass a budget (--budget / spec=)")
    return model, tokenizer, str(source)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msrnn_train.export",
        description="Write a window-bounded (hybrid) model as a plain transformers folder with per-layer sliding "
                    "windows (AutoModelForCausalLM.from_pretrained serves it; msrnn-train is not needed there).")
    p.add_argument("source", help="an adapter folder (train.py), or a model source: smollm2, a .gguf, a model folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--budget", default=None,
                   help="the budget when the source has none (or to override it): an int K, or JSON such as "
                        "'{\"default\": 32, \"18\": null}' (null: a full layer) or a per-layer list")
    p.add_argument("--policy", default="window", help="policy of --budget ('window' or 'window_sink' export)")
    p.add_argument("--target", default=None, choices=TARGETS,
                   help="config class written (default: granite_swa for window_sink, else qwen2)")
    p.add_argument("--base-model", default=None, help="base model of an adapter folder (default: its recipe's)")
    p.add_argument("--dtype", default=None, help="float32 (default) / bfloat16 / float16")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    spec = None
    if args.budget is not None:
        try:
            budget = json.loads(args.budget)
        except ValueError:
            print(f"export: --budget {args.budget!r} is neither an int nor JSON", file=sys.stderr)
            return 2
        spec = {"policy": args.policy, "budget": budget}
    try:
        out = export_servable(args.source, args.out, spec=spec, target=args.target, base_model=args.base_model,
                              dtype=args.dtype, overwrite=args.overwrite)
    except (ExportError, BudgetError, FileExistsError, FileNotFoundError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    prov = json.loads((out / PROVENANCE_FILENAME).read_text())
    full = [i for i, t in enumerate(prov["layer_types"]) if t == "full_attention"]
    print(f"wrote {out}: {prov['target']}, {prov['label']}: {len(prov['layer_types']) - len(full)} sliding layers "
          f"(sliding_window={prov['sliding_window']}), full layers {full}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
