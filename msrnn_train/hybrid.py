"""Hybrids: which layers stay unbounded while the others are bounded to one K.

One notation, parsed by `parse_hybrid`, read the same by the recipe (``budget.hybrid``) and the
command line (``python -m msrnn_train.evaluate --full-layers``, several choices joined by ``;``):

* ``null`` / ``"none"`` - no full layer (all bounded);
* ``"auto:N"`` - the N layers whose heads put the most attention on the answer's source over a
  probe set of generated retrieval prompts (`probe_instances`; the recipe's
  ``budget.hybrid_probe_tasks``);
* ``"random:N"`` - N layers drawn with a seed;
* ``"first"``, ``"middle"``, ``"last"``, an index (``3``, ``-1``), or several joined by ``+``
  (``"3+17"``, ``"0+last"``).

`choose_full_layers` turns a choice into layer indices for a model, `hybrid_spec` into the
per-layer `BudgetSpec` the rest of the toolkit runs (``None`` = an unbounded layer), and
`resolve_hybrid` does both for a training recipe.
"""

from __future__ import annotations

import contextlib
import random
import re

import torch
from tqdm.auto import tqdm

from .controller import full_state
from .retrieval_tasks import Instance, encode, make_task
from .spec import BudgetSpec

HYBRID_NAMES = ("none", "auto:N", "random:N", "first", "middle", "last", "<i>+<j>...")
LAYER_NAMES = ("first", "middle", "last")


# ----------------------------------------------------------------------------- the notation
def parse_hybrid(choice) -> tuple[str, object]:
    """("none" | "auto" | "random" | "fixed", N or [layers]) from one hybrid choice: None/"none",
    "auto:N", "random:N", "first"/"middle"/"last", an index, "3+17". Raises ValueError naming the
    allowed forms (callers prefix their key: ``budget.hybrid``, ``--full-layers``)."""
    if choice is None or choice == "none":
        return "none", []
    text = str(choice).strip()
    if re.fullmatch(r"(auto|random):\d+", text):
        kind, n = text.split(":")
        if int(n) < 1:
            raise ValueError(f"{choice!r} needs N >= 1 (e.g. {kind}:1)")
        return kind, int(n)
    items = [x.strip() for x in text.split("+")]
    for x in items:
        if not (x in LAYER_NAMES or re.fullmatch(r"-?\d+", x)):
            raise ValueError(f"{choice!r} is not a hybrid; allowed: {', '.join(HYBRID_NAMES)}")
    return "fixed", items


def layer_index(x, n_layers: int) -> int:
    """A layer named "first"/"middle"/"last" or by (possibly negative) index, as an index."""
    names = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
    i = names[x] if x in names else int(x)
    i = i + n_layers if i < 0 else i
    if not 0 <= i < n_layers:
        raise ValueError(f"layer {x!r} out of range for a model with {n_layers} layers")
    return i


def hybrid_spec(policy: str, budget: int, n_layers: int, full_layers, **spec_kwargs) -> BudgetSpec:
    """A spec bounding every layer to ``budget`` except ``full_layers`` (indices, or the names
    "first", "middle", "last"), which stay unbounded."""
    layers = sorted({layer_index(x, n_layers) for x in (full_layers if isinstance(full_layers, (list, tuple))
                                                          else [full_layers])})
    per_layer = [None if i in layers else budget for i in range(n_layers)]
    return BudgetSpec(policy=policy, budget=per_layer, **spec_kwargs)


# ----------------------------------------------------------------------------- auto:N, the probe
def source_positions(instance: Instance, tokenizer) -> list[int]:
    """Token indices (of the prompt tokenized with the tokenizer's defaults) that overlap the
    answer's source span ``meta["source"]``."""
    a, b = instance.meta["source"]
    offsets = tokenizer(instance.prompt, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (s, e) in enumerate(offsets) if s < b and e > a and e > s]


@contextlib.contextmanager
def eager_attention(model):
    """The full-state model with eager attention, so it can return its attention weights."""
    config = model.config
    with full_state(model):
        previous = config._attn_implementation
        config._attn_implementation_internal = "eager"
        try:
            yield model
        finally:
            config._attn_implementation_internal = previous


@torch.no_grad()
def retrieval_head_scores(model, tokenizer, instances: list[Instance], progress: bool = False) -> torch.Tensor:
    """(layers, heads): the mean attention mass that each query head puts on the tokens of the
    answer's source (`source_positions`) from the positions that predict the answer tokens,
    full state, averaged over the instances."""
    device = next(model.parameters()).device
    total = None
    was_training = model.training
    model.eval()
    with eager_attention(model):
        for inst in tqdm(instances, desc="probe", disable=not progress, leave=False):
            enc = encode(inst, tokenizer)
            src = source_positions(inst, tokenizer)
            if not src:
                raise ValueError(f"probe: the answer's source of a {inst.task!r} instance has no tokens")
            ids = torch.tensor([enc.ids], device=device)
            att = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
            queries = torch.arange(enc.answer_start - 1, len(enc.ids) - 1, device=device)
            src_t = torch.tensor(src, device=device)
            # per layer: (heads, answer positions, keys) -> mass on the source, mean over positions
            mass = torch.stack([a[0][:, queries][:, :, src_t].sum(-1).mean(-1).float().cpu() for a in att])
            total = mass if total is None else total + mass
    model.train(was_training)
    return total / max(len(instances), 1)


def probe_instances(tokenizer, n: int = 8, length: int = 256, tasks=("mqar", "kv", "needles", "vartrack"),
                    seed: int = 10_000) -> list[Instance]:
    """The probe set of `auto:N`: generated instances of every task, with a seed apart from the
    evaluation's (default 0)."""
    if not tasks:
        raise ValueError("probe: no task to probe with; name at least one retrieval task")
    per = max(1, n // len(tasks))
    return [inst for t in tasks for inst in make_task(t, per, length, seed=seed, tokenizer=tokenizer)]


def rank_layers(scores: torch.Tensor) -> list[int]:
    """Layers ordered by their best head's score (a layer with one retrieving head counts)."""
    best = scores.max(dim=1).values
    return sorted(range(len(best)), key=lambda i: (-float(best[i]), i))


def choose_full_layers(choice, model, tokenizer=None, probe: list[Instance] | None = None, seed: int = 0,
                       progress: bool = False) -> list[int]:
    """The layer indices a hybrid keeps unbounded: ``auto:N`` the N layers whose heads put the
    most attention mass on the answer's source over a probe set (`probe_instances` unless
    given), ``random:N`` N layers drawn with ``seed``, else the named/indexed layers."""
    n_layers = model.config.num_hidden_layers
    kind, arg = parse_hybrid(choice)
    if kind == "none":
        return []
    if kind in ("auto", "random") and arg > n_layers:
        raise ValueError(f"hybrid: {choice!r} asks for {arg} of {n_layers} layers")
    if kind == "random":
        return sorted(random.Random(f"hybrid-{seed}").sample(range(n_layers), arg))
    if kind == "auto":
        if tokenizer is None and probe is None:
            raise ValueError("hybrid: 'auto:N' needs the tokenizer (for its probe set)")
        scores = retrieval_head_scores(model, tokenizer, probe or probe_instances(tokenizer), progress)
        return sorted(rank_layers(scores)[:arg])
    return sorted({layer_index(x, n_layers) for x in arg})


# ----------------------------------------------------------------------------- a recipe's hybrid
def resolve_hybrid(recipe, model, tokenizer, spec: BudgetSpec) -> BudgetSpec:
    """The spec with ``budget.hybrid``'s layers unbounded (``auto:N`` probes the model on
    generated instances of ``budget.hybrid_probe_tasks``); the spec unchanged without a hybrid."""
    choice = recipe.budget.hybrid
    if choice is None:
        return spec
    probe = None
    if parse_hybrid(choice)[0] == "auto":
        probe = probe_instances(tokenizer, tasks=tuple(recipe.probe_tasks()), length=min(256, recipe.data.seq_len))
    layers = choose_full_layers(choice, model, tokenizer, probe=probe, seed=recipe.training.seed)
    if not layers:
        return spec
    hybrid = hybrid_spec(spec.policy, spec.budget, model.config.num_hidden_layers, layers)
    return BudgetSpec.from_dict({**spec.to_dict(), "budget": hybrid.budget})  # retention, scorer_hidden, ... kept
