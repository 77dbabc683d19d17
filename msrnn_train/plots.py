"""Figures of the evaluation: perplexity vs budget, retrieval accuracy vs budget.

Matplotlib with the Agg backend (no display needed). Budgets on a log-2 x axis; the
full-state model is a dashed horizontal line; base model solid, adapted model dashed
(perplexity), configurations with their 95 % intervals (retrieval, `plot_recall_vs_budget`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator  # noqa: E402

POLICY_COLORS = {"tova": "tab:blue", "tova_head": "tab:cyan", "sinks": "tab:green", "h2o": "tab:orange",
                 "window": "tab:red", "oracle": "tab:pink"}


def _color(policy: str, i: int) -> str:
    return POLICY_COLORS.get(policy, f"C{(i + 5) % 10}")


def _lines(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """policy -> [(budget, ppl)] for records with an integer budget, sorted by budget."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["policy"] != "full" and isinstance(r["budget"], int):
            out.setdefault(r["policy"], []).append((r["budget"], r["ppl"]))
    return {p: sorted(v) for p, v in out.items()}


def _full(records: list[dict] | None) -> float | None:
    full = [r["ppl"] for r in records or [] if r["policy"] == "full"]
    return full[0] if full else None


def _accuracy_axis(ax, budgets: list[int], title: str) -> None:
    """One retrieval panel: budgets on the x axis, accuracy in percent, title, grid, legend."""
    if budgets:
        _budget_axis(ax, budgets)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _save(fig, path, suptitle: str | None = None) -> Path:
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _budget_axis(ax, budgets: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(budgets))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("budget K (states per layer)")


def plot_ppl_vs_budget(records_base: list[dict], records_adapted: list[dict] | None, path,
                       title: str | None = None, extra: dict[str, list[dict]] | None = None) -> Path:
    """Perplexity against budget, one line per policy: base model solid with round markers,
    adapted model dashed with square markers, full-state model(s) as horizontal lines. `extra`
    adds other models ({label: records}, e.g. the plain-LoRA control) dotted with triangles. The
    y axis is logarithmic when the values span more than a factor of 10 (e.g. `window`)."""
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    base, adapted = _lines(records_base), _lines(records_adapted or [])
    policies = list(dict.fromkeys(list(base) + list(adapted)))
    budgets = sorted({b for v in list(base.values()) + list(adapted.values()) for b, _ in v})
    values = [y for v in list(base.values()) + list(adapted.values()) for _, y in v]
    for i, policy in enumerate(policies):
        c = _color(policy, i)
        if policy in base:
            xs, ys = zip(*base[policy])
            ax.plot(xs, ys, "-o", color=c, lw=2, ms=6, label=f"{policy} (base)" if adapted else policy)
        if policy in adapted:
            xs, ys = zip(*adapted[policy])
            ax.plot(xs, ys, "--s", color=c, lw=2, ms=6, label=f"{policy} (adapted)")
    full_base, full_adapted = _full(records_base), _full(records_adapted)
    if full_base is not None:
        ax.axhline(full_base, color="black", ls="--", lw=1.3, label=f"full state{' (base)' if adapted else ''}"
                                                                     f" = {full_base:.2f}")
        values.append(full_base)
    if full_adapted is not None:
        ax.axhline(full_adapted, color="gray", ls=":", lw=1.3, label=f"full state (adapted) = {full_adapted:.2f}")
        values.append(full_adapted)
    for label, recs in (extra or {}).items():
        for i, (policy, pts) in enumerate(_lines(recs).items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, ":^", color=_color(policy, i), lw=1.6, ms=6, alpha=0.8, label=f"{policy} ({label})")
            values.extend(ys)
        full_extra = _full(recs)
        if full_extra is not None:
            ax.axhline(full_extra, color="tab:brown", ls="-.", lw=1.1, label=f"full state ({label}) = {full_extra:.2f}")
            values.append(full_extra)
    if budgets:
        _budget_axis(ax, budgets)
    if values and max(values) / max(min(values), 1e-9) > 10:
        ax.set_yscale("log")
        # plain numbers (30, 40, 60, 100, 200, ...) rather than 4x10^1: perplexities are read off the axis
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylabel("perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title or "Perplexity vs budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def lines_of(records: list[dict], role: str = "bar", suffix: str = "") -> list[dict]:
    """Evaluation records as `plot_comparison` lines: one per bounded policy ("<policy><suffix>")
    and the full state ("full state<suffix>")."""
    lines = [{"label": f"{policy}{suffix}", "policy": policy, "role": role, "points": pts}
             for policy, pts in _lines(records).items()]
    full = _full(records)
    return lines + ([{"label": f"full state{suffix}", "full": (full, None)}] if full is not None else [])


def plot_comparison(panels: dict[str, list[dict]], path, title: str | None = None,
                    ylabel: str = "perplexity") -> Path:
    """The adapter comparison's figure (the demo, ``evaluate --baseline-adapter``,
    scripts/headline.py): perplexity against K, one panel per set of starting weights,
    {panel title: [line, ...]}. A line is {"label", "points": [(K, ppl[, std])], "policy",
    "role"}: role "bar" (a training-free policy on the control: thin, the policy's colour),
    "method" (what is compared: thick; purple unless a training-free policy), "reference" (dashed); or {"label", "full": (ppl, std or
    None)}, a full state (a dashed horizontal line). Standard deviations are error bars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), dpi=120, squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        budgets, fulls = set(), 0
        for i, line in enumerate(lines):
            if "full" in line:
                ppl, std = line["full"]
                fulls += 1
                ax.axhline(ppl, color="black" if fulls == 1 else "gray", ls="--" if fulls == 1 else ":", lw=1,
                           label=f"{line['label']} ({ppl:.2f}" + ("" if std is None else f" ± {std:.2f}") + ")")
                continue
            pts = sorted(line["points"])
            method = line.get("role") == "method"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] if len(p) > 2 else 0.0 for p in pts],
                        marker="o" if method else ".", capsize=3, lw=2.6 if method else 1.2,
                        ls="--" if line.get("role") == "reference" else "-",
                        color="tab:purple" if method and line.get("policy") not in POLICY_COLORS
                        else _color(line.get("policy", ""), i), label=line["label"])
            budgets |= {p[0] for p in pts}
        if budgets:
            _budget_axis(ax, sorted(budgets))
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    return _save(fig, path, suptitle=title)


def _config_label(r: dict) -> str:
    parts = [r["policy"]]
    if r.get("hybrid", "none") != "none":
        parts.append(f"+ full {r['hybrid']} {r.get('full_layers')}")
    if r.get("augmented"):
        parts.append("+ retrieval")
    if r.get("trained"):
        parts.append(_trained_tag(r).strip())
    return " ".join(parts)


def _trained_tag(r: dict) -> str:
    return "" if not r.get("trained") else f" (trained{', ' + r['arm'] if r.get('arm') else ''})"


def plot_recall_vs_budget(records: list[dict], path, title: str | None = None) -> Path:
    """Retrieval accuracy against K, one panel per task, one line per configuration (policy,
    full layers, augmentation, trained) with its 95 % interval as error bars; the full-state
    accuracy as a horizontal line with its interval shaded. Records as `retrieval.retrieval_grid`
    writes them."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        recs = [r for r in records if r["task"] == task]
        lines: dict[str, list[dict]] = {}
        for r in recs:
            if r["budget"] is None:
                lo, hi = r["ci95"]
                style = dict(color="gray" if r.get("trained") else "black", ls=":" if r.get("trained") else "--")
                ax.axhline(100 * r["accuracy"], lw=1.5, label=f"full state{_trained_tag(r)}"
                                                              f" {100 * r['accuracy']:.0f}%", **style)
                ax.axhspan(100 * lo, 100 * hi, color=style["color"], alpha=0.08)
                continue
            lines.setdefault(_config_label(r), []).append(r)
        budgets = sorted({r["budget"] for v in lines.values() for r in v})
        for i, (label, pts) in enumerate(lines.items()):
            pts = sorted(pts, key=lambda r: r["budget"])
            xs = [r["budget"] * (1.03 ** (i - len(lines) / 2)) for r in pts]  # a small offset: bars stay apart
            ys = [100 * r["accuracy"] for r in pts]
            err = [[max(0.0, 100 * (r["accuracy"] - r["ci95"][0])) for r in pts],  # (rounding at 0 % / 100 %)
                   [max(0.0, 100 * (r["ci95"][1] - r["accuracy"])) for r in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt="-o" if not pts[0].get("augmented") else "--s", ms=5, lw=1.8,
                        capsize=3, label=label, color=f"C{i % 10}")
        tokens = sum(r["tokens"] for r in recs) / len(recs)
        _accuracy_axis(ax, budgets, f"{task} (prompts ≈{tokens:.0f} tokens)")
    return _save(fig, path, suptitle=title)
