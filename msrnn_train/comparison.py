"""Against the control: what training under a budget (or a learned policy) buys over plain LoRA.

Every claim of the project is a comparison with the *control*, ordinary LoRA on the same data,
steps and learning rate (`PLAIN_LORA`: the recipe overrides that make a run that). At a budget K
the *bar* (the control, or the strongest of its training-free policies) pays a penalty,
bar(K) - bar(full); the *budget benefit* is the share of that penalty a method removes, and a
method at K "beats double the state" when it is no worse than the bar at 2K.

* `PLAIN_LORA` - the control's recipe overrides (the demo, scripts/headline.py, scripts/retrieval_hybrid.py);
* `budget_benefit`, `against_bar`, `strongest` - the arithmetic;
* `compare_adapters` (two adapters' records, policy by policy: ``--baseline-adapter``) and
  `against_strongest` (a method against the control's strongest training-free policy at each K:
  the demo) - rows of `against_bar`;
* `comparison_markdown(rows, columns)` - the table of any such rows (also scripts/headline.py's);
  `plots.plot_comparison` draws them.
"""

from __future__ import annotations

import math

from .spec import budget_label

# The control every claim is made against: ordinary LoRA (full state, the exact process, one K,
# no budget ramp, LM loss only). Every key is spelled out, so the control means the same whatever
# the recipe's defaults; everything else (data, steps, learning rate, seed) stays the recipe's.
PLAIN_LORA = {"budget.policy": "full", "budget.mode": "hard", "budget.train_budgets": None,
              "budget.ramp_start": None, "loss.bounded_lm_weight": 1.0, "loss.kl_weight": 0.0,
              "loss.full_lm_weight": 0.0}


def budget_benefit(ppl_bar_k: float, ppl_tuned_k: float, ppl_bar_full: float) -> float:
    """The share of the bar's bounded penalty that the tuned model removes:
    (ppl_bar(K) - ppl_tuned(K)) / (ppl_bar(K) - ppl_bar(full)). 1 = the tuned model at K is as good
    as the bar with the full state; 0 = no better than the bar at K; NaN when the bar pays no
    penalty at K."""
    penalty = ppl_bar_k - ppl_bar_full
    return (ppl_bar_k - ppl_tuned_k) / penalty if penalty > 0 else float("nan")


def against_bar(ppl_k: float, bar_k: float, bar_full: float, bar_2k: float | None = None,
                ppl_full: float | None = None) -> dict:
    """One comparison at a budget K: {"penalty": bar(K) - bar(full), "diff": ppl(K) - bar(K),
    "budget_benefit"} and, when given, "le_bar_2k" (ppl(K) <= bar(2K)) and "full_vs_bar"
    (ppl(full) / bar(full) - 1: what the method costs at the full state)."""
    row = {"penalty": bar_k - bar_full, "diff": ppl_k - bar_k, "budget_benefit": budget_benefit(bar_k, ppl_k, bar_full)}
    if bar_2k is not None:
        row["le_bar_2k"] = ppl_k <= bar_2k
    if ppl_full is not None:
        row["full_vs_bar"] = ppl_full / bar_full - 1
    return row


def strongest(ppl_by_name: dict) -> str:
    """The bar among candidates {name: ppl at K}: the lowest perplexity (the first of equals)."""
    return min(ppl_by_name, key=ppl_by_name.get)


def _by_key(records: list[dict]) -> dict:
    return {(r["policy"], r["budget"]): r["ppl"] for r in records}


def compare_adapters(tuned: list[dict], baseline: list[dict]) -> list[dict]:
    """Two adapters' evaluation records side by side, per (policy, K) that both have: {"policy",
    "budget", "ppl", "ppl_baseline", "diff"}, plus for bounded rows `against_bar` with the baseline
    as the bar (its own policy at K, its full state; needs `full` in the baseline)."""
    base = _by_key(baseline)
    full = base.get(("full", None))
    rows = []
    for r in tuned:
        key = (r["policy"], r["budget"])
        if key not in base:
            continue
        row = {"policy": r["policy"], "budget": r["budget"], "ppl": r["ppl"], "ppl_baseline": base[key],
               "diff": r["ppl"] - base[key]}
        if r["policy"] != "full" and full is not None:
            row.update(against_bar(r["ppl"], base[key], full))
        rows.append(row)
    return rows


def against_strongest(control: list[dict], method: list[dict], policies, method_policy: str) -> list[dict]:
    """Per K of the method's `method_policy` records: the control's training-free `policies` at K
    ("ppl_<policy>") and full state ("ppl_full"), the strongest of those policies ("bar"), the
    method's perplexity ("ppl") and `against_bar` (the bar's full state is the control's)."""
    by, mine = _by_key(control), _by_key(method)
    rows = []
    for k in sorted(b for p, b in mine if p == method_policy):
        heur = {p: by[(p, k)] for p in policies if (p, k) in by}
        bar = strongest(heur)
        rows.append({"budget": k, **{f"ppl_{p}": v for p, v in heur.items()}, "ppl_full": by[("full", None)],
                     "ppl": mine[(method_policy, k)], "bar": bar,
                     **against_bar(mine[(method_policy, k)], heur[bar], by[("full", None)])})
    return rows


# ----------------------------------------------------------------------------- the table
def _cell(value, kind: str) -> str:
    if value is None:
        return ""
    if kind == "K":
        return budget_label(value)
    if kind == "yes/no":
        return "yes" if value else "no"
    if kind in ("%", "+%"):
        return "n/a" if math.isnan(value) else f"{100 * value:.0f}%" if kind == "%" else f"{100 * value:+.1f}%"
    if kind == "text":
        return str(value)
    return format(value, kind)  # a format spec: ".2f", "+.2f", ".3f", ...


def comparison_markdown(rows: list[dict], columns: list[tuple]) -> str:
    """A Markdown table of comparison rows. ``columns``: (header, key, kind) each; ``key`` is a
    row key, or a pair (mean key, std key) shown as "mean ± std"; ``kind`` is "text", "K" (a
    budget), "%" (a share, NaN: "n/a"), "+%" (a signed change), "yes/no", or a format spec
    (".2f", "+.2f"). A missing value is an empty cell."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, kind in columns:
            if isinstance(key, tuple):
                mean, std = r.get(key[0]), r.get(key[1])
                cells.append("" if mean is None else f"{_cell(mean, kind)} ± {_cell(std, kind)}")
            else:
                cells.append(_cell(r.get(key), kind))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adapter_columns(name: str = "adapter", baseline: str = "baseline") -> list[tuple]:
    """The columns of `compare_adapters` rows (``python -m msrnn_train.evaluate --baseline-adapter``)."""
    return [("policy", "policy", "text"), ("K", "budget", "K"), (baseline, "ppl_baseline", ".3f"),
            (name, "ppl", ".3f"), ("difference", "diff", "+.3f"), ("budget benefit", "budget_benefit", "%")]
