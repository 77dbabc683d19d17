"""Evaluation against the full-state baseline: what a budget costs, what fine-tuning buys back.

The library of evaluation:

* `perplexity(model, windows)` - exp(mean NLL) over every predicted token of the windows,
  one teacher-forced forward per batch (for a budgeted model that *is* the bounded-cache
  perplexity, by the fidelity contract);
* `grid_specs(policies, budgets, own)` - the one builder of "which specs to evaluate" (the CLI,
  the trainer's evaluation and its callback all call it); `evaluate_grid(model, windows,
  policies, budgets)` measures them (``full`` once), the model's own spec put back afterwards;
  `markdown_table`, `write_json`, `plots.plot_ppl_vs_budget`;
* elsewhere: generation statistics in `generation.py`, the same evaluation as a TrainerCallback
  (`BoundedEvalCallback`) in `trainer.py`, in-context retrieval in `retrieval.py`, and the
  command line in `eval_cli.py` (run as `python -m msrnn_train.evaluate`).

    python -m msrnn_train.evaluate --model smollm2 --text gutenberg --seq-len 2048 --max-windows 4 \\
        --policies full,tova,sinks,window,h2o --budgets 64,128,256 --json eval.json --plot eval.png
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .controller import budget_scope, hard
from .spec import BudgetSpec, budget_key, budget_label

DEFAULT_POLICIES = ["full", "tova", "sinks", "window", "h2o"]
DEFAULT_BUDGETS = [64, 128, 256]


# ----------------------------------------------------------------------------- perplexity
def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32 logits, returned as a float64 number) of ids [B, T] under
    logits [B, T or T - 1, V] (position t predicts ids[:, t + 1]; a last position is unused), and
    the number of predicted tokens, B * (T - 1)."""
    labels = ids[:, 1:]
    nll = F.cross_entropy(logits[:, :ids.shape[1] - 1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          reduction="sum")
    return float(nll.double()), labels.numel()


@torch.no_grad()
def _nll_sum(model, windows: torch.Tensor, batch_size: int, bar=None) -> tuple[float, int]:
    """Summed NLL (fp32 logits, float64 accumulation) over every predicted token of the windows
    (seq_len - 1 per window) and the number of those tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll, n = nll_sum(logits, ids)
        total += nll
        count += n
        del logits
        if bar is not None:
            bar.update(ids.shape[0])
    return total, count


def _as_result(total: float, count: int) -> dict:
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str | None = None,
               progress: bool = True) -> dict:
    """{"nll": mean NLL, "ppl": exp(mean NLL), "tokens": predicted tokens} of the model as it is
    (apply a budget first to measure a bounded model). One forward pass per batch."""
    with tqdm(total=windows.shape[0], desc=desc or "perplexity", unit="win", disable=not progress,
              leave=False) as bar:
        return _as_result(*_nll_sum(model, windows, batch_size, bar))


def grid_specs(policies, budgets=None, own: BudgetSpec | None = None, own_first: bool = False,
               **spec_kwargs) -> list[BudgetSpec]:
    """The one builder of an evaluation grid: the specs to measure, in order, without repeats.

    Each of ``policies``: ``full`` once; any other policy at every K of ``budgets`` (None: the
    defaults, `DEFAULT_BUDGETS`; ``[]``: none). ``spec_kwargs`` (sinks, recent) go into every
    bounded spec. ``own`` is a trained model's own spec: its policy keeps the spec's other fields
    (sinks, recent, the learned scorer's form; ``spec_kwargs`` still win, and an h2o ``recent``
    larger than a K falls back to K/2 there) and, with ``budgets`` None, is that spec exactly
    (per-layer budgets included). ``own_first`` puts ``own`` first whatever ``policies`` name (a
    run's training spec: what training measures first)."""
    def key(spec: BudgetSpec) -> str:
        return "full" if spec.policy == "full" else json.dumps(spec.to_dict(), sort_keys=True)

    def at(policy: str, k: int) -> BudgetSpec:
        if own is None or policy != own.policy:
            return BudgetSpec(policy=policy, budget=k, **spec_kwargs).validate()
        fields = {**own.to_dict(), "budget": k, **spec_kwargs}
        if fields["recent"] is not None and fields["recent"] > k and "recent" not in spec_kwargs:
            fields["recent"] = None
        return BudgetSpec.from_dict(fields)

    specs: dict[str, BudgetSpec] = {}
    if own is not None and own_first and own.policy != "full":
        specs[key(own)] = hard(own)
    for policy in policies:
        if policy == "full":
            found = [BudgetSpec(policy="full")]
        elif own is not None and policy == own.policy and budgets is None:
            found = [hard(own)]
        else:
            found = [at(policy, k) for k in (DEFAULT_BUDGETS if budgets is None else budgets)]
        for spec in found:
            specs.setdefault(key(spec), spec)
    return list(specs.values())


def _record(spec: BudgetSpec, result: dict, adapted: bool | None) -> dict:
    rec = {"policy": spec.policy, "budget": None if spec.policy == "full" else spec.budget,
           "ppl": result["ppl"], "nll": result["nll"], "tokens": result["tokens"]}
    if adapted is not None:
        rec["adapted"] = adapted
    return rec


def evaluate_specs(model, windows: torch.Tensor, specs: list[BudgetSpec], batch_size: int = 1,
                   adapter_on: bool = True, adapted: bool | None = None, progress: bool = True,
                   desc: str = "eval") -> list[dict]:
    """One record {"policy", "budget", "ppl", "nll", "tokens"[, "adapted"]} per spec, in order.
    ``adapted`` (True/False) adds the field; None leaves it out (no adapter in play)."""
    records = []
    with tqdm(total=len(specs) * windows.shape[0], desc=desc, unit="win", disable=not progress) as bar:
        for spec in specs:
            bar.set_postfix_str(spec.label)
            start = time.perf_counter()
            with budget_scope(model, spec, adapter_on):
                rec = _record(spec, _as_result(*_nll_sum(model, windows, batch_size, bar)), adapted)
            rec_time = time.perf_counter() - start
            bar.write(f"  {spec.label:>16}{' (adapted)' if adapted else '':10}  ppl {rec['ppl']:10.3f}"
                      f"   ({rec_time:.1f} s)")
            records.append(rec)
    return records


def evaluate_grid(model, windows: torch.Tensor, policies=DEFAULT_POLICIES, budgets=DEFAULT_BUDGETS,
                  batch_size: int = 1, adapter_on: bool = True, adapted: bool | None = None,
                  progress: bool = True, own: BudgetSpec | None = None, own_first: bool = False,
                  **spec_kwargs) -> list[dict]:
    """Perplexity of every spec of `grid_specs(policies, budgets, own, own_first, **spec_kwargs)`
    (``full`` once, budget None); the model's own budget spec and mode are restored afterwards."""
    specs = grid_specs(policies, budgets, own, own_first, **spec_kwargs)
    desc = "eval (adapted)" if adapted else "eval (base)" if adapted is False else "eval"
    return evaluate_specs(model, windows, specs, batch_size, adapter_on, adapted, progress, desc)


# ----------------------------------------------------------------------------- reports
def record_key(record: dict) -> tuple[str, str]:
    """(policy, budget) of an evaluation record, hashable for per-layer lists and maps too."""
    return record["policy"], budget_key(record["budget"])


def full_ppl_of(records: list[dict]) -> float | None:
    """Perplexity of the full-state base model (the un-adapted one when both are present)."""
    full = [r for r in records if r["policy"] == "full"]
    base = [r for r in full if not r.get("adapted", False)]
    return (base or full or [{"ppl": None}])[0]["ppl"]


def _column(budget) -> str:
    return "full" if budget is None else f"K={budget_label(budget)}"


def markdown_table(records: list[dict], full_ppl: float | None = None) -> str:
    """Policy x budget table of perplexities, each with its difference to the full-state base
    model (``full_ppl``; taken from the records when not given)."""
    full_ppl = full_ppl_of(records) if full_ppl is None else full_ppl
    ints = sorted({r["budget"] for r in records if isinstance(r["budget"], int)})
    cols = (["full"] if any(r["budget"] is None for r in records) else []) + [f"K={k}" for k in ints]
    if any(r["budget"] is not None and not isinstance(r["budget"], int) for r in records):
        cols.append("hybrid")
    rows: dict[str, dict[str, str]] = {}
    for r in records:
        label = r["policy"] + (" (adapted)" if r.get("adapted") else "")
        delta = "" if full_ppl is None or (r["policy"] == "full" and not r.get("adapted")) \
            else f" ({r['ppl'] - full_ppl:+.2f})"
        rows.setdefault(label, {})[_column(r["budget"])] = f"{r['ppl']:.2f}{delta}"
    lines = ["| policy | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    if full_ppl is not None:
        lines.append(f"\nPerplexity (difference to the full-state base model, ppl {full_ppl:.2f}).")
    return "\n".join(lines)


def write_json(path, model: str, adapter: str | None, text: str, seq_len: int, results: list[dict],
               **extra) -> Path:
    """{"model", "adapter", "text", "seq_len", "results": [records]} (+ e.g. "retrieval",
    "generation" when those ran)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": model, "adapter": adapter, "text": text, "seq_len": seq_len, "results": results, **extra}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


if __name__ == "__main__":  # `python -m msrnn_train.evaluate ...`: the command line lives in eval_cli.py
    # handed over by module name (runpy), not imported: eval_cli imports this module, never the reverse
    import runpy

    runpy.run_module("msrnn_train.eval_cli", run_name="__main__", alter_sys=True)
