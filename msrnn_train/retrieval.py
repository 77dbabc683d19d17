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

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .spec import BudgetSpec

# Common English nouns: the keys of associative recall (all distinct, lower case).
KEY_WORDS = (
    "apple river chair horse cloud stone bread candle garden window mirror button forest "
    "pencil rabbit engine castle island ladder basket bottle camera carpet cheese coffee "
    "copper dragon feather finger flower guitar hammer helmet jacket kettle lemon magnet "
    "marble monkey needle orange pepper pillow planet pocket potato puzzle rocket saddle "
    "salmon silver spider spoon summer tiger tomato tunnel turtle velvet violin wallet "
    "wheel winter wizard yellow anchor banana barrel beetle blanket bridge cabbage canyon "
    "carrot cherry circle cotton desert dinner doctor falcon farmer glove harbor jungle "
    "lantern meadow mountain napkin ocean parrot pirate rainbow ribbon sailor shadow "
    "shovel sister soldier temple thunder ticket tower valley wagon whistle"
).split()

# The passkey-retrieval filler (Mohtashami & Jaggi, 2023), used when no real text is at hand.
GENERATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NEEDLE = "The secret number is {number}."
NEEDLE_QUESTION = "\n\nWhat is the secret number? The secret number is "
RECALL_HEADER = "Remember the number that goes with each word.\n\n"


@dataclass
class Instance:
    """One retrieval question: the model sees ``prompt`` and must continue with ``answer``."""

    task: str  # "recall" or "needle"
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


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


def spec_label(spec: BudgetSpec) -> str:
    """``full``, ``tova-128``, or ``tova-128+full[15]`` for a hybrid."""
    if spec.policy == "full":
        return "full"
    b = spec.budget
    if isinstance(b, (list, tuple)):
        full = [i for i, k in enumerate(b) if k is None or k in ("full", "inf")]
        ks = sorted({int(k) for k in b if k is not None and k not in ("full", "inf")})
        return f"{spec.policy}-{'/'.join(map(str, ks))}+full{full}"
    return spec.describe()


def evaluate_retrieval(model, tokenizer, tasks: dict[str, list[Instance]], specs: list[BudgetSpec],
                       batch_size: int = 8, chat: bool = False, progress: bool = True,
                       adapter_on: bool = True) -> list[dict]:
    """Accuracy of every task under every spec: records {"task", "policy", "budget", "label",
    "full_layers", "accuracy", "correct", "n", "tokens", "distance_tokens"}. The model's own
    budget spec (if any) is put back afterwards."""
    from .evaluate import with_spec

    records = []
    for spec in specs:
        with with_spec(model, spec, adapter_on):
            for task, instances in tasks.items():
                label = spec_label(spec)
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
