"""In-context retrieval beyond the state: the scorer and the grid.

The tasks are `retrieval_tasks.py` (seeded generators, `make_task`), the hybrids - which layers
stay unbounded - `hybrid.py`, retrieval augmentation `augment.py`. Here:

* the scorer is *teacher-forced*: an instance is solved when the answer's tokens are the argmax
  of the model's logits at every answer position, given the prompt and the answer's earlier
  tokens. That is exactly "greedy decoding starts with the answer", and, because a teacher-
  forced forward of a budgeted model equals bounded-cache decoding (the fidelity contract),
  exactly what a bounded cache would answer - for the price of one forward pass per batch
  instead of a decoding loop (`solved`, `accuracy`);
* `retrieval_grid` measures every task for K x hybrid x (without / with augmentation), with
  95 % Wilson intervals (`wilson`); `grid_table` is its Markdown table and
  `plots.plot_recall_vs_budget` its figure. `python -m msrnn_train.evaluate --retrieval` and
  `scripts/retrieval_hybrid.py` are its callers.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm.auto import tqdm

from .controller import budget_scope
from .hybrid import choose_full_layers, hybrid_spec
from .retrieval_tasks import Encoded, Instance, encode, token_counter
from .spec import BudgetSpec


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def solved(model, tokenizer, instances: list[Instance], batch_size: int = 8, desc: str | None = None,
           progress: bool = True) -> list[bool]:
    """Whether the model's greedy continuation of each prompt starts with the answer
    (teacher-forced check of every answer token, right padding, one forward per batch)."""
    encoded = [encode(inst, tokenizer) for inst in instances]
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


def accuracy(model, tokenizer, instances: list[Instance], batch_size: int = 8, desc: str | None = None,
             progress: bool = True) -> dict:
    """{"accuracy", "correct", "n", "tokens" (mean prompt+answer length), "distance_tokens"
    (mean number of tokens between the end of the answer's statement and the first answer token)}."""
    encoded = [encode(inst, tokenizer) for inst in instances]
    ok = _solved(model, tokenizer, encoded, batch_size, desc, progress)
    n = max(len(encoded), 1)
    return {"accuracy": sum(ok) / n, "correct": sum(ok), "n": len(encoded),
            "tokens": sum(len(e.ids) for e in encoded) / n,
            "distance_tokens": sum(e.answer_start - e.evidence_end for e in encoded) / n}


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
                   full_state: bool = True, augment_hybrids: bool = True, on_record=None,
                   augment_chunk_words: int = 6) -> list[dict]:
    """Accuracy of every task for K in ``budgets`` x hybrid choice x (without / with retrieval
    augmentation), plus the full-state model once (``full_state``). Records: {"task", "policy",
    "budget" (None: full state), "hybrid", "full_layers", "trained", "augmented", "accuracy",
    "correct", "n", "ci95" (Wilson), "tokens" (mean prompt length), "ratio" (tokens / K),
    "distance_tokens", "label"[, "hit" (share of augmented prompts holding the answer's source)]}.
    Augmentation re-inserts at most ``augment_tokens`` (default K) tokens of BM25 chunks of
    ``augment_chunk_words`` words before the question (a recipe's ``data.augment_*`` keys train on
    the same augmentation);
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
                        augmented_cache[key] = [augment_instance(i, augment_tokens or k, count, augment_chunk_words)
                                                for i in instances]
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
