"""The budget of a model, in one place: putting it on, its state, and scoping it.

The state of a budgeted model (its spec, each layer's policy and K, the soft temperature while
training, the attention backend) lives in one `Controller` attached to the decoder;
`snapshot()`/`restore()` save and put back all of it, and `budget_scope(model, spec)` runs a
block under another budget (or the full state) and puts the model's own back afterwards.

`apply_budget(model, spec)` registers the `msrnn` attention (and its mask function) with
transformers' AttentionInterface, switches the model to it, and attaches to every attention
module its layer's policy and K. Two forward pre-hooks connect the pieces:

* on the decoder: starts a new forward (schedules are computed once per forward and reused by
  gradient checkpointing's recomputation) and, when a cache is wanted, swaps an empty default
  cache for a BoundedCache so `generate()` works unchanged;
* on each attention module: nothing but the layer index lookup into the active cache.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTN_NAME, msrnn_attention_forward, padding_mask
from .cache import BoundedCache
from .compat import CACHE_KWARG, take_cache
from .policies import Policy, make_policy
from .retention import attach_scorers, load_scorers, save_scorers
from .sink import CALIBRATION_SHIFT, CALIBRATION_SHIFT_WITH_VALUE, attach_sinks, load_sinks, save_sinks, sinks
from .spec import BudgetError, BudgetSpec

AttentionInterface.register(ATTN_NAME, msrnn_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, padding_mask)


@dataclass
class LayerBudget:
    layer_idx: int
    policy: Policy | None  # None: unbounded layer
    budget: int | None
    groups: int  # 1 (layer-wise) or the number of key/value heads (head-wise)
    controller: "Controller"
    scan_fn: object = None  # None: kernels.default_scan for the device
    hidden: object = None  # a learned policy: the attention input of the current call (retention.py's hook)


def _backend_from_env() -> str:
    value = os.environ.get("MSRNN_ATTN", "auto").strip().lower() or "auto"
    if value not in ("auto", "dense", "flex"):
        raise BudgetError(f"MSRNN_ATTN={value!r}: use one of auto, dense, flex")
    return value


SOFT_PATHS = ("sparse", "dense")


def soft_path_from_env() -> str:
    """`$MSRNN_SOFT`: sparse (default; the dense reference where sparse does not apply) or dense."""
    value = os.environ.get("MSRNN_SOFT", "sparse").strip().lower() or "sparse"
    if value not in SOFT_PATHS:
        raise BudgetError(f"MSRNN_SOFT={value!r}: use one of {', '.join(SOFT_PATHS)}")
    return value


@dataclass
class Controller:
    """Model-level state of a budgeted model."""

    spec: BudgetSpec
    original_attn: str
    layers: list[LayerBudget] = field(default_factory=list)
    enabled: bool = True
    cache: object = None  # the BoundedCache of the current forward, if any
    # "auto" (flex on CUDA, dense elsewhere), "dense", "flex"; $MSRNN_ATTN sets the default
    backend: str = field(default_factory=lambda: _backend_from_env())
    soft_temperature: float | None = None  # set while training in soft mode
    # soft keep-logits: "sparse" (from the scan's outputs, where it applies) or "dense" (the reference); $MSRNN_SOFT
    soft_path: str = field(default_factory=soft_path_from_env)
    recording: dict | None = None  # layer -> [Schedule], for tests and diagnostics
    # a learned policy while training: how gradients reach its scorer (retention.RELAXATIONS; None: hard)
    relaxation: str | None = None
    relax_tau: float = 1.0  # the straight-through keep probability's temperature
    aux_losses: list = field(default_factory=list)  # the decay relaxation's capacity terms of the last forward
    scans: int = 0  # number of scans run (diagnostics: checkpointing must not add any)
    hooks: list = field(default_factory=list)
    chunked_configs: list = field(default_factory=list)  # generation configs whose prefill_chunk_size we set
    _store: dict = field(default_factory=dict)

    def cache_layer(self, layer_idx: int):
        return None if self.cache is None else self.cache.layers[layer_idx]

    # a schedule is computed once per forward; gradient checkpointing's recomputation of a
    # layer finds it here instead of scanning again (teacher forcing only)
    def stored_schedule(self, layer_idx, teacher_forced, T):
        if not teacher_forced or not torch.is_grad_enabled():
            return None
        sched = self._store.get(layer_idx)
        return sched if sched is not None and sched.arrive.numel() == T else None

    def store_schedule(self, layer_idx, teacher_forced, sched):
        if teacher_forced and torch.is_grad_enabled():
            self._store[layer_idx] = sched

    def new_forward(self):
        self._store.clear()
        self.aux_losses.clear()


def _decoder(model):
    if hasattr(model, "layers"):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    dec = base.get_decoder() if hasattr(base, "get_decoder") else base
    if not hasattr(dec, "layers"):
        raise BudgetError(f"{type(model).__name__}: could not find the decoder layers (model.get_decoder().layers)")
    return dec


def _attention_modules(model):
    dec = _decoder(model)
    mods = []
    for i, layer in enumerate(dec.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise BudgetError(f"layer {i} of {type(dec).__name__} has no self_attn with a layer_idx: model not supported")
        mods.append(attn)
    return dec, mods


def get_controller(model) -> Controller | None:
    try:
        dec = _decoder(model)
    except BudgetError:
        return None
    return getattr(dec, "_msrnn_controller", None)


def get_budget(model) -> BudgetSpec | None:
    ctrl = get_controller(model)
    return None if ctrl is None else ctrl.spec


def apply_budget(model, spec: BudgetSpec | dict | str, **overrides):
    """Bound `model` in place and return it.

    `spec` is a BudgetSpec, a dict of its fields, or a policy name (then `budget=` etc. go in
    overrides): `apply_budget(model, "tova", budget=512)`.
    """
    if isinstance(spec, str):
        spec = BudgetSpec(policy=spec, **overrides)
    elif isinstance(spec, dict):
        spec = BudgetSpec.from_dict({**spec, **overrides})
    elif overrides:
        spec = BudgetSpec.from_dict({**spec.to_dict(), **overrides})
    config = model.config
    spec.validate_for(config)
    if get_controller(model) is not None:
        remove_budget(model)
    dec, modules = _attention_modules(model)
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    original = config._attn_implementation or "sdpa"
    ctrl = Controller(spec=spec, original_attn=original)
    for i, mod in enumerate(modules):
        k = spec.layer_budget(i)
        policy = None if k is None else make_policy(spec.policy, k, spec.sinks, spec.recent, spec.retention)
        groups = hkv if (policy is not None and policy.head_wise) else 1
        lb = LayerBudget(layer_idx=mod.layer_idx, policy=policy, budget=k, groups=groups, controller=ctrl)
        mod._msrnn = lb
        ctrl.layers.append(lb)
    dec._msrnn_controller = ctrl
    # a learned policy: a retention scorer per bounded layer (kept across remove/apply: it holds trained weights)
    ctrl.hooks.extend(attach_scorers(modules, ctrl.layers, config.hidden_size, spec.scorer_hidden))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
    attach_sinks(modules, ctrl.layers, hq, hkv, head_dim)  # a sink policy: a sink per bounded layer (kept likewise)
    # generate() feeds the prompt c tokens per forward (its own chunked prefill), unless the
    # user chose a chunk size already
    for gc in _generation_configs(model):
        if getattr(gc, "prefill_chunk_size", None) is None:
            gc.prefill_chunk_size = spec.prefill_chunk
            ctrl.chunked_configs.append(gc)
    ctrl.hooks.append(dec.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True))
    ctrl.hooks.append(dec.register_forward_hook(_decoder_post_hook))
    config._attn_implementation_internal = ATTN_NAME
    return model


def remove_budget(model):
    """Undo apply_budget: the model is the unmodified full-state model again."""
    dec = _decoder(model)
    ctrl = getattr(dec, "_msrnn_controller", None)
    if ctrl is None:
        return model
    for h in ctrl.hooks:
        h.remove()
    for gc in ctrl.chunked_configs:
        gc.prefill_chunk_size = None
    for layer in dec.layers:
        if hasattr(layer.self_attn, "_msrnn"):
            del layer.self_attn._msrnn
    del dec._msrnn_controller
    model.config._attn_implementation_internal = ctrl.original_attn
    return model


@contextlib.contextmanager
def full_state(model):
    """Temporarily the unbounded model (original attention): the distillation teacher."""
    ctrl = get_controller(model)
    if ctrl is None:
        yield model
        return
    previous = (ctrl.enabled, model.config._attn_implementation)
    ctrl.enabled = False
    model.config._attn_implementation_internal = ctrl.original_attn
    try:
        yield model
    finally:
        ctrl.enabled = previous[0]
        model.config._attn_implementation_internal = previous[1]


def checkpoint_context_fn(model):
    """`context_fn` for torch.utils.checkpoint (non-reentrant): the recompute of a checkpointed
    layer runs the attention that layer ran in the forward - bounded, or the full state inside
    `full_state()` - whatever is active when the backward pass comes. Without it, a full-state
    pass recomputed after `full_state()` exits would be recomputed bounded."""
    config = model.config

    def context_fn():
        ran = config._attn_implementation_internal

        @contextlib.contextmanager
        def recompute():
            now = config._attn_implementation_internal
            config._attn_implementation_internal = ran
            try:
                yield
            finally:
                config._attn_implementation_internal = now

        return contextlib.nullcontext(), recompute()

    return context_fn


@contextlib.contextmanager
def record_schedules(model):
    """Collect every layer's schedules of the forwards inside the block: {layer: [Schedule]}."""
    ctrl = get_controller(model)
    ctrl.recording = {}
    try:
        yield ctrl.recording
    finally:
        ctrl.recording = None


def set_layer_budget(model, budget: int) -> None:
    """Change K of every bounded layer in place (the training-time budget ramp; a policy's
    parameters that default from K follow it)."""
    ctrl = get_controller(model)
    for lb in ctrl.layers:
        if lb.policy is not None:
            lb.budget = lb.policy.budget = int(budget)


def set_soft_temperature(model, tau: float | None) -> None:
    """Switch a budgeted model to soft mode at temperature tau (None: hard, as at inference)."""
    ctrl = get_controller(model)
    if ctrl is None:
        raise ValueError("set_soft_temperature: the model has no budget (apply_budget first)")
    ctrl.soft_temperature = None if tau is None else float(tau)


def make_cache(model, prefill_chunk: int | None = None, decode_buffer: bool = True) -> BoundedCache:
    """The bounded inference cache matching the model's budget (`prefill_chunk`: tokens per
    prefill chunk, default the spec's)."""
    ctrl = get_controller(model)
    if ctrl is None:
        raise ValueError("BoundedCache needs a model with a budget: call apply_budget(model, spec) first")
    return BoundedCache([lb.budget if lb.policy is not None else None for lb in ctrl.layers],
                        [lb.groups for lb in ctrl.layers], prefill_chunk=prefill_chunk or ctrl.spec.prefill_chunk,
                        decode_buffer=decode_buffer)


def _generation_configs(model) -> list:
    """The generation configs generate() may read: the model's and, under peft, the base model's."""
    out = []
    for m in (model, model.get_base_model() if hasattr(model, "get_base_model") else None):
        gc = getattr(m, "generation_config", None)
        if gc is not None and all(gc is not o for o in out):
            out.append(gc)
    return out


def _decoder_pre_hook(module, args, kwargs):
    ctrl: Controller = module._msrnn_controller
    if not ctrl.enabled:
        return None
    ctrl.new_forward()
    pkv = take_cache(kwargs)  # `cache` (transformers >= 5.24) or `past_key_values`
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False) and not module.training
    if pkv is None and use_cache:
        pkv = kwargs[CACHE_KWARG] = make_cache(module)
    elif isinstance(pkv, Cache) and not isinstance(pkv, BoundedCache):
        if pkv.get_seq_length() > 0:
            raise ValueError(
                "a budgeted model was given a non-empty "
                f"{type(pkv).__name__}; bounded decoding needs msrnn_train.make_cache(model)"
            )
        pkv = kwargs[CACHE_KWARG] = make_cache(module)
    ctrl.cache = pkv if isinstance(pkv, BoundedCache) else None
    return args, kwargs


def _decoder_post_hook(module, args, output):
    module._msrnn_controller.cache = None
    return None


# ----------------------------------------------------------------------------- scoping
def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def snapshot(model) -> dict | None:
    """Everything of the model's budget that a scope may change (spec, ramped layer budgets,
    soft temperature, backend), to be put back by `restore`. None: the model has no budget."""
    ctrl = get_controller(model)
    if ctrl is None:
        return None
    return {"ctrl": ctrl, "spec": ctrl.spec, "soft": ctrl.soft_temperature, "backend": ctrl.backend,
            "enabled": ctrl.enabled,
            "layers": [lb.budget for lb in ctrl.layers]}


def restore(model, snap: dict | None) -> None:
    """Put back the budget `snapshot` saved (None: no budget at all)."""
    ctrl = get_controller(model)
    if snap is None:
        if ctrl is not None:
            remove_budget(model)
        return
    if ctrl is snap["ctrl"]:
        return  # untouched (e.g. only the full state was evaluated)
    apply_budget(model, snap["spec"])
    ctrl = get_controller(model)
    ctrl.soft_temperature, ctrl.backend, ctrl.enabled = snap["soft"], snap["backend"], snap["enabled"]
    for lb, budget in zip(ctrl.layers, snap["layers"]):
        if lb.policy is not None:
            lb.budget = lb.policy.budget = budget  # a policy's parameters that default from K follow it


def hard(spec: BudgetSpec) -> BudgetSpec:
    """The inference version of a spec (hard mode): what evaluation must measure."""
    return BudgetSpec.from_dict({**spec.to_dict(), "mode": "hard"})


@contextlib.contextmanager
def budget_scope(model, spec: BudgetSpec | None, adapter_on: bool = True):
    """The model in eval mode under ``spec`` (None or policy ``full``: the unmodified full-state
    model), with its peft adapter disabled when ``adapter_on`` is False. On exit the model's
    own budget (spec, ramped budgets, soft temperature) and train/eval mode are put back."""
    snap = snapshot(model)
    was_training = model.training
    model.eval()
    adapter = contextlib.nullcontext() if adapter_on or not _is_peft(model) else model.disable_adapter()
    try:
        with adapter:
            if spec is None or spec.policy == "full":
                with full_state(model):
                    yield model
            else:
                apply_budget(model, hard(spec))
                yield model
    finally:
        restore(model, snap)
        model.train(was_training)


def save_budget_modules(model, directory) -> None:
    """Write the budget's trained modules beside an adapter: a learned policy's scorers
    (retention.SCORER_FILENAME) and a sink policy's logits and values (sink.SINK_FILENAME), whichever exist."""
    save_scorers(model, directory)
    save_sinks(model, directory)


def load_budget_modules(model, directory) -> bool:
    """Restore what `save_budget_modules` wrote into a model whose budget is applied; True when
    anything was restored."""
    scored = load_scorers(model, directory)
    sunk = load_sinks(model, directory)
    return scored or sunk


# ----------------------------------------------------------------------------- sink calibration


def first_tokens_sink(model, budget, windows, first: int = 4) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (lse (Hq,), value (Hkv, D))} of every bounded layer, with the model under `sinks` (window +
    the first tokens) and ``budget`` (an int or a per-layer list), over the queries t >= first + K (those
    a window no longer shows the first tokens):

    * lse[h]: the mean of logsumexp_{j < first} q_t k_j * scale, the logit one virtual sink key would
      need on average;
    * value[g]: the first tokens' values as head h's softmax over them mixes them, averaged over those
      queries with weight exp(lse_t) (the unnormalised mass the first tokens take), then over the
      query heads h of key/value head g (which a v_proj bias can hold)."""
    found: dict[int, list] = {}
    mixed: dict[int, list] = {}
    original = msrnn_attention_forward

    def spy(module, query, key, value, attention_mask, scaling=None, **kwargs):
        lb = module._msrnn
        if lb.policy is not None:
            rep = query.shape[1] // key.shape[1]
            k = key[:, :, :first].repeat_interleave(rep, 1)
            v = value[:, :, :first].repeat_interleave(rep, 1).double()
            logits = (query @ k.transpose(-1, -2)).double() * (scaling or query.shape[-1] ** -0.5)
            logits = logits[:, :, first + lb.budget:]  # (B, Hq, t, first)
            lse = torch.logsumexp(logits, -1)
            found.setdefault(lb.layer_idx, []).append(lse.mean((0, 2)).float())
            w = lse.exp()  # (B, Hq, t)
            num = (w.unsqueeze(-1) * (logits.softmax(-1) @ v)).sum((0, 2))  # (Hq, D)
            acc = mixed.setdefault(lb.layer_idx, [0, 0, rep])
            acc[0], acc[1] = acc[0] + num, acc[1] + w.sum((0, 2))
        return original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(ATTN_NAME, spy)
    try:
        with budget_scope(model, BudgetSpec(policy="sinks", budget=budget, sinks=first)), torch.no_grad():
            for i in range(windows.shape[0]):
                model(windows[i:i + 1], use_cache=False)
    finally:
        AttentionInterface.register(ATTN_NAME, original)
    out = {}
    for layer, v in found.items():
        num, den, rep = mixed[layer]
        per_head = num / den.unsqueeze(-1)  # (Hq, D)
        out[layer] = (torch.stack(v).mean(0), per_head.view(-1, rep, per_head.shape[-1]).mean(1).float())
    return out


def first_tokens_lse(model, budget, windows, first: int = 4) -> dict[int, torch.Tensor]:
    """{layer: (Hq,)} the logit part of `first_tokens_sink`."""
    return {layer: lse for layer, (lse, _) in first_tokens_sink(model, budget, windows, first).items()}


def calibrate_sinks(model, budget, windows, first: int = 4, shift: float | None = None,
                    value: bool = True) -> dict[int, torch.Tensor]:
    """Set every sink of a model under a sink policy (sinks attached) from `first_tokens_sink` on
    ``windows`` (B, T): each head's logit to its lse plus ``shift`` (None: CALIBRATION_SHIFT_WITH_VALUE
    with ``value``, else CALIBRATION_SHIFT), and with ``value`` each key/value head's sink value to its
    value (else the values are left as they are). Returns the logits set. The windows must be longer
    than ``first`` + K."""
    if shift is None:
        shift = CALIBRATION_SHIFT_WITH_VALUE if value else CALIBRATION_SHIFT
    measured = first_tokens_sink(model, budget, windows, first)
    found = sinks(model)
    if not found:
        raise ValueError("calibrate_sinks: the model has no sink logits (apply a sink policy's budget first)")
    with torch.no_grad():
        for layer, s in found.items():
            if layer not in measured:
                raise ValueError(f"calibrate_sinks: no query of layer {layer} passed the first {first} + K tokens; "
                                 f"use windows longer than {first} + K")
            lse, u = measured[layer]
            s.logit.copy_(lse.to(s.logit) + shift)
            if value:
                s.value.copy_(u.to(s.value))
    return {layer: s.logit.detach().clone() for layer, s in found.items()}
