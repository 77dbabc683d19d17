"""In-context retrieval: the task where finite multi-state models are expected to fail.

Two synthetic tasks, generated deterministically from a seed:

* **associative recall** - a list of ``key: value`` lines (distinct words, distinct numbers),
  then one key again; the answer is its value. ``pairs`` sets the list length and
  ``distance`` how many pairs come after the queried one (0: the last pair).
* **needle in a haystack** - ``The secret number is 4721.`` placed in filler text (real
  Gutenberg prose when it is available, else the classic generated filler) with
  ``distance_words`` words of filler after it, then a question at the end.

Scoring is *teacher-forced*: an instance is solved when the answer's tokens are the argmax
of the model's logits at every answer position, given the prompt and the answer's earlier
tokens. That is exactly "greedy decoding starts with the answer", and, because a teacher-
forced forward of a budgeted model equals bounded-cache decoding (the fidelity contract),
exactly what a bounded cache would answer - for the price of one forward pass per batch
instead of a decoding loop.

Hybrids (one or more unbounded layers, the rest bounded) are specs whose budget is a
per-layer list with ``None`` for the full layers: see `hybrid_spec`.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .controller import budget_scope, full_state
from .retrieval_tasks import KEY_WORDS, Instance, make_task, token_counter
from .spec import BudgetSpec

# The passkey-retrieval filler (Mohtashami & Jaggi, 2023), used when no real text is at hand.
GENERATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NEEDLE = "The secret number is {number}."
NEEDLE_QUESTION = "\n\nWhat is the secret number? The secret number is "
RECALL_HEADER = "Remember the number that goes with each word.\n\n"


# ----------------------------------------------------------------------------- generators
def associative_recall(n: int, pairs: int = 8, distance: int | None = None, seed: int = 0,
                       value_digits: int = 2, demos: int = 2) -> list[Instance]:
    """``n`` associative-recall instances with ``pairs`` key-value lines each.

    Keys are distinct words of `KEY_WORDS`, values distinct ``value_digits``-digit numbers, so
    the queried key appears exactly once in the list and its value names exactly one line.
    ``distance`` = number of pairs listed after the queried pair (0 = the last one); None draws
    it uniformly per instance. After the list come ``demos`` answered queries of *other* keys
    (they show the task; none holds the answer), then the query in the list's own format,
    ``key: ``. Calibrated on SmolLM2-135M-Instruct (full state, 8-20 pairs): about 90% with two
    demos, under 60% without, about 30% for a question in words.
    """
    if not 1 <= pairs <= len(KEY_WORDS):
        raise ValueError(f"pairs must be in 1..{len(KEY_WORDS)}, got {pairs}")
    low, high = 10 ** (value_digits - 1), 10 ** value_digits - 1
    if value_digits < 1 or high - low + 1 < pairs:
        raise ValueError(f"value_digits={value_digits} cannot give {pairs} distinct values")
    if distance is not None and not 0 <= distance < pairs:
        raise ValueError(f"distance must be in 0..{pairs - 1}, got {distance}")
    rng = random.Random(f"recall-{seed}-{pairs}-{distance}-{value_digits}-{demos}")
    out = []
    for i in range(n):
        keys = rng.sample(KEY_WORDS, pairs)
        values = [str(v) for v in rng.sample(range(low, high + 1), pairs)]
        d = rng.randrange(pairs) if distance is None else distance
        index = pairs - 1 - d
        shown = rng.sample([j for j in range(pairs) if j != index], min(demos, pairs - 1))
        lines = "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
        asked = "".join(f"{keys[j]}: {values[j]}\n" for j in shown)
        prompt = f"{RECALL_HEADER}{lines}\n{asked}{keys[index]}: "
        out.append(Instance("recall", prompt, values[index],
                            {"pairs": pairs, "distance": d, "index": index, "key": keys[index], "seed": seed,
                             "item": i}))
    return out


def needle_in_haystack(n: int, context_words: int = 600, distance_words: int | None = None, seed: int = 0,
                       digits: int = 4, filler: str | None = None) -> list[Instance]:
    """``n`` needle-in-a-haystack instances: ``context_words`` words of filler with the needle
    sentence inserted so that ``distance_words`` filler words follow it (None: a random depth).

    ``filler``: a text to cut passages from; None uses the Gutenberg books when they can be
    loaded (real prose, passages drawn from a seeded random position) and otherwise the
    generated passkey filler. The needle goes between two sentences when one ends nearby.
    """
    if distance_words is not None and not 0 <= distance_words <= context_words:
        raise ValueError(f"distance_words must be in 0..{context_words}, got {distance_words}")
    source, words = _filler_words(filler)
    rng = random.Random(f"needle-{seed}-{context_words}-{distance_words}-{digits}")
    out = []
    for i in range(n):
        start = rng.randrange(max(1, len(words) - context_words))
        passage = [words[(start + j) % len(words)] for j in range(context_words)]
        d = rng.randrange(context_words + 1) if distance_words is None else distance_words
        cut = context_words - d
        # move the cut back to a sentence end (at most 30 words) so the needle reads as a sentence
        for back in range(min(cut, 30) + 1):
            if cut - back == 0 or passage[cut - back - 1].endswith((".", "!", "?")):
                cut -= back
                break
        number = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        needle = NEEDLE.format(number=number)
        text = " ".join(passage[:cut] + [needle] + passage[cut:])
        out.append(Instance("needle", text + NEEDLE_QUESTION, number,
                            {"context_words": context_words, "distance": context_words - cut,
                             "filler": source, "seed": seed, "item": i}))
    return out


def _filler_words(filler: str | None) -> tuple[str, list[str]]:
    if filler is None:
        try:
            from .data import gutenberg_books

            books = gutenberg_books()
            # Milton's Areopagitica: continuous prose (the plays are mostly short speeches)
            name = "areopagitica_gut" if "areopagitica_gut" in books else sorted(books)[0]
            return f"gutenberg:{name}", books[name].split()
        except Exception:  # noqa: BLE001 - no books here: the generated filler will do
            return "generated", GENERATED_FILLER.split()
    return "given", filler.split()


# ----------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    ids: list[int]  # prompt + answer, tokenized as one text
    answer_start: int  # index of the first answer token
    evidence_end: int  # index just after the pair/needle that holds the answer


def encode(instance: Instance, tokenizer, chat: bool = False) -> Encoded:
    """Tokenize prompt + answer as one text (the tokenizer's default settings) and locate the
    answer. ``chat`` wraps the prompt in the chat template (a user turn; the answer starts
    the assistant turn)."""
    prompt = instance.prompt
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt.rstrip()}], tokenize=False,
                                               add_generation_prompt=True)
    text = prompt + instance.answer
    evidence = _evidence(instance)
    evidence_char = prompt.index(evidence) + len(evidence) if evidence and evidence in prompt else len(prompt)
    special = not chat  # the chat template already holds its special tokens
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        # a token straddling the prompt/answer boundary counts as an answer token
        start = next(i for i, (a, b) in enumerate(offsets) if b > len(prompt) and b > a)
        evidence_end = next((i for i, (a, b) in enumerate(offsets) if b > evidence_char and b > a), len(ids))
    except (NotImplementedError, StopIteration, KeyError, TypeError, ValueError):  # slow tokenizers
        head = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        ids = list(head) + tokenizer(instance.answer, add_special_tokens=False)["input_ids"]
        start = len(head)
        evidence_end = len(tokenizer(prompt[:evidence_char], add_special_tokens=special)["input_ids"])
    if start >= len(ids):
        raise ValueError(f"the answer {instance.answer!r} has no tokens")
    return Encoded(ids, start, evidence_end)


def _evidence(inst: Instance) -> str | None:
    """The part of the prompt that holds the answer (None: not a known task)."""
    if "evidence" in inst.meta:
        return inst.meta["evidence"]
    if inst.task == "recall":
        return f"{inst.meta['key']}: {inst.answer}\n"
    if inst.task == "needle":
        return NEEDLE.format(number=inst.answer)
    return None


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def solved(model, tokenizer, instances: list[Instance], batch_size: int = 8, chat: bool = False,
           desc: str | None = None, progress: bool = True) -> list[bool]:
    """Whether the model's greedy continuation of each prompt starts with the answer
    (teacher-forced check of every answer token, right padding, one forward per batch)."""
    encoded = [encode(inst, tokenizer, chat) for inst in instances]
    return _solved(model, tokenizer, encoded, batch_size, desc, progress)


def _solved(model, tokenizer, encoded: list[Encoded], batch_size, desc, progress) -> list[bool]:
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))  # similar lengths together
    result = [False] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc or "retrieval", unit="batch", disable=not progress, leave=False):
        width = max(len(encoded[i].ids) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = encoded[i].ids
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        pred = logits.argmax(-1).cpu()  # pred[:, t] predicts token t + 1
        for row, i in enumerate(batch):
            seq, start = encoded[i].ids, encoded[i].answer_start
            result[i] = bool((pred[row, start - 1:len(seq) - 1] == torch.tensor(seq[start:])).all())
    return result


def accuracy(model, tokenizer, instances: list[Instance], batch_size: int = 8, chat: bool = False,
             desc: str | None = None, progress: bool = True) -> dict:
    """{"accuracy", "correct", "n", "tokens" (mean prompt+answer length), "distance_tokens"
    (mean number of tokens between the end of the pair/needle and the first answer token)}."""
    encoded = [encode(inst, tokenizer, chat) for inst in instances]
    ok = _solved(model, tokenizer, encoded, batch_size, desc, progress)
    n = max(len(encoded), 1)
    return {"accuracy": sum(ok) / n, "correct": sum(ok), "n": len(encoded),
            "tokens": sum(len(e.ids) for e in encoded) / n,
            "distance_tokens": sum(e.answer_start - e.evidence_end for e in encoded) / n}


# ----------------------------------------------------------------------------- grids
def hybrid_spec(policy: str, budget: int, n_layers: int, full_layers, **spec_kwargs) -> BudgetSpec:
    """A spec bounding every layer to ``budget`` except ``full_layers`` (indices, or the names
    "first", "middle", "last"), which stay unbounded."""
    layers = sorted({_layer_index(x, n_layers) for x in (full_layers if isinstance(full_layers, (list, tuple))
                                                           else [full_layers])})
    per_layer = [None if i in layers else budget for i in range(n_layers)]
    return BudgetSpec(policy=policy, budget=per_layer, **spec_kwargs)


def _layer_index(x, n_layers: int) -> int:
    names = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
    i = names[x] if x in names else int(x)
    i = i + n_layers if i < 0 else i
    if not 0 <= i < n_layers:
        raise ValueError(f"layer {x!r} out of range for a model with {n_layers} layers")
    return i


def evaluate_retrieval(model, tokenizer, tasks: dict[str, list[Instance]], specs: list[BudgetSpec],
                       batch_size: int = 8, chat: bool = False, progress: bool = True,
                       adapter_on: bool = True) -> list[dict]:
    """Accuracy of every task under every spec: records {"task", "policy", "budget", "label",
    "full_layers", "accuracy", "correct", "n", "tokens", "distance_tokens"}. The model's own
    budget spec (if any) is put back afterwards."""

    records = []
    for spec in specs:
        with budget_scope(model, spec, adapter_on):
            for task, instances in tasks.items():
                label = spec.label
                res = accuracy(model, tokenizer, instances, batch_size, chat, desc=f"{task} {label}",
                               progress=progress)
                b = spec.budget if spec.policy != "full" else None
                full_layers = ([i for i, k in enumerate(b) if k is None] if isinstance(b, (list, tuple)) else [])
                budget = (max(k for k in b if k is not None) if isinstance(b, (list, tuple)) else b)
                records.append({"task": task, "policy": spec.policy, "budget": budget, "label": label,
                                "full_layers": full_layers, **res})
    return records


def retrieval_table(records: list[dict]) -> str:
    """Markdown: one row per spec label, one column per task (accuracy in %)."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    labels = list(dict.fromkeys(r["label"] for r in records))
    cell = {(r["label"], r["task"]): r for r in records}
    head = "| spec | " + " | ".join(f"{t} acc (dist ≈{_mean_dist(records, t):.0f} tok)" for t in tasks) + " |"
    lines = [head, "|" + " --- |" * (len(tasks) + 1)]
    for label in labels:
        row = [f"{100 * cell[label, t]['accuracy']:.0f}% ({cell[label, t]['correct']}/{cell[label, t]['n']})"
               if (label, t) in cell else "" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _mean_dist(records, task):
    values = [r["distance_tokens"] for r in records if r["task"] == task]
    return sum(values) / max(len(values), 1)


# ----------------------------------------------------------------------------- which layers stay full
HYBRID_NAMES = ("none", "auto:N", "random:N", "first", "middle", "last", "<i>+<j>...")


def source_positions(instance: Instance, tokenizer) -> list[int]:
    """Token indices (of the prompt tokenized with the tokenizer's defaults) that overlap the
    answer's source span ``meta["source"]``."""
    a, b = instance.meta["source"]
    offsets = tokenizer(instance.prompt, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (s, e) in enumerate(offsets) if s < b and e > a and e > s]


@contextlib.contextmanager
def _eager_attention(model):
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
    with _eager_attention(model):
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

    per = max(1, n // len(tasks))
    return [inst for t in tasks for inst in make_task(t, per, length, seed=seed, tokenizer=tokenizer)]


def rank_layers(scores: torch.Tensor) -> list[int]:
    """Layers ordered by their best head's score (a layer with one retrieving head counts)."""
    best = scores.max(dim=1).values
    return sorted(range(len(best)), key=lambda i: (-float(best[i]), i))


def parse_hybrid(choice) -> tuple[str, object]:
    """("none" | "auto" | "random" | "fixed", N or [layers]) from a hybrid choice: None/"none",
    "auto:N", "random:N", "first"/"middle"/"last", an index, "3+17", or a list of those."""
    if choice is None or choice == "none" or choice == []:
        return "none", []
    if isinstance(choice, str) and re.fullmatch(r"(auto|random):\d+", choice):
        kind, n = choice.split(":")
        if int(n) < 1:
            raise ValueError(f"hybrid: {choice!r} needs N >= 1")
        return kind, int(n)
    items = choice if isinstance(choice, (list, tuple)) else (choice.split("+") if isinstance(choice, str)
                                                               else [choice])
    for x in items:
        if not (x in ("first", "middle", "last") or re.fullmatch(r"-?\d+", str(x))):
            raise ValueError(f"hybrid: {choice!r} is not a layer choice; allowed: {', '.join(HYBRID_NAMES)}")
    return "fixed", list(items)


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
    return sorted({_layer_index(x, n_layers) for x in arg})


# ----------------------------------------------------------------------------- the retrieval grid
def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96); [0, 1] when n = 0."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def retrieval_grid(model, tokenizer, tasks: dict[str, list[Instance]], budgets: list[int],
                   hybrids=("none",), policy: str = "tova", augment=(False, True), trained: bool = False,
                   adapter_on: bool = True, augment_tokens: int | None = None, batch_size: int = 4,
                   seed: int = 0, probe: list[Instance] | None = None, progress: bool = True,
                   full_state: bool = True, augment_hybrids: bool = True, on_record=None) -> list[dict]:
    """Accuracy of every task for K in ``budgets`` x hybrid choice x (without / with retrieval
    augmentation), plus the full-state model once (``full_state``). Records: {"task", "policy",
    "budget" (None: full state), "hybrid", "full_layers", "trained", "augmented", "accuracy",
    "correct", "n", "ci95" (Wilson), "tokens" (mean prompt length), "ratio" (tokens / K),
    "distance_tokens", "label"[, "hit" (share of augmented prompts holding the answer's source)]}.
    Augmentation re-inserts at most ``augment_tokens`` (default K) tokens before the question;
    ``augment_hybrids=False`` augments only the all-bounded model. ``on_record(records)`` is
    called after every cell (e.g. to save partial results of a long run)."""
    from .augment import augment as augment_instance

    n_layers = model.config.num_hidden_layers
    count = token_counter(tokenizer)
    with budget_scope(model, None, adapter_on):  # the probe reads the (adapted) full-state model
        layers = {h: choose_full_layers(h, model, tokenizer, probe, seed) for h in hybrids}
    configs = [(BudgetSpec(policy="full"), "none", False)] if full_state else []
    for k in budgets:
        for h in hybrids:
            spec = hybrid_spec(policy, k, n_layers, layers[h]) if layers[h] else BudgetSpec(policy=policy, budget=k)
            configs += [(spec, h, aug) for aug in augment if augment_hybrids or not layers[h] or not aug]
    augmented_cache: dict[tuple, list[Instance]] = {}
    records = []
    for spec, h, aug in configs:
        k = None if spec.policy == "full" else (spec.budget if isinstance(spec.budget, int)
                                                else max(b for b in spec.budget if b is not None))
        with budget_scope(model, spec, adapter_on):
            for task, instances in tasks.items():
                hit = None
                if aug:
                    key = (task, augment_tokens or k)
                    if key not in augmented_cache:
                        augmented_cache[key] = [augment_instance(i, augment_tokens or k, count) for i in instances]
                    instances = augmented_cache[key]
                    hit = sum(i.meta["hit"] for i in instances) / max(len(instances), 1)
                label = spec.label + (f" ({h})" if h not in ("none",) and spec.policy != "full" else "") \
                    + (" +retrieval" if aug else "")
                res = accuracy(model, tokenizer, instances, batch_size, desc=f"{task} {label}", progress=progress)
                rec = {"task": task, "policy": spec.policy, "budget": k, "hybrid": h if spec.policy != "full" else "none",
                       "full_layers": list(layers[h]) if spec.policy != "full" else list(range(n_layers)),
                       "trained": trained, "augmented": aug, **res,
                       "ci95": wilson(res["correct"], res["n"]),
                       "ratio": None if k is None else res["tokens"] / k, "label": label}
                if hit is not None:
                    rec["hit"] = hit
                records.append(rec)
                if on_record is not None:
                    on_record(records)
                lo, hi = rec["ci95"]
                tqdm.write(f"  {task:9} {label:34} {'trained' if trained else 'base':7} "
                           f"{100 * rec['accuracy']:5.1f}%  [{100 * lo:.0f}, {100 * hi:.0f}]  n={rec['n']}"
                           + ("" if hit is None else f"  (source retrieved: {100 * hit:.0f}%)"), file=sys.stderr)
    return records


def grid_table(records: list[dict]) -> str:
    """Markdown: one row per configuration, one column per task: accuracy % [95 % CI] (n)."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows: dict[tuple, dict] = {}
    for r in records:
        cfg = ("full state" if r["budget"] is None else f"{r['policy']}-{r['budget']}",
               "all" if r["budget"] is None else (r["hybrid"] if r["hybrid"] != "none" else "0")
               + ("" if r["budget"] is None or r["hybrid"] == "none" else f" {r['full_layers']}"),
               (f"trained ({r['arm']})" if r.get("arm") else "trained") if r["trained"] else "base", "yes" if r["augmented"] else "no")
        rows.setdefault(cfg, {})[r["task"]] = r
    lines = ["| state | full layers | model | augmented | " + " | ".join(tasks) + " |",
             "|" + " --- |" * (4 + len(tasks))]
    for cfg, cells in rows.items():
        out = []
        for t in tasks:
            r = cells.get(t)
            out.append("" if r is None else f"{100 * r['accuracy']:.0f}% [{100 * r['ci95'][0]:.0f}, "
                                            f"{100 * r['ci95'][1]:.0f}] ({r['n']})")
        lines.append("| " + " | ".join(cfg) + " | " + " | ".join(out) + " |")
    return "\n".join(lines)
