"""Gather issue 24's retrieval results into results/retrieval_hybrid.{json,png} beside issue 16's grid.

    python scripts/retrieval_summary.py

Reads what the three experiment scripts wrote (each reruns from its own cache):
results/hybrid_grid.json (scripts/hybrid_grid.py: the trained hybrid against its controls over
seeds, K and 2x length), results/augment_train.json (scripts/augment_train.py: training with
augmented prompts, no full layer) and results/sink_hybrid.json (scripts/sink_hybrid.py: servable
hybrids and their stock export). Adds them to results/retrieval_hybrid.json under "seeds_grid",
"augmentation_training" and "servable" (issue 16's records stay as they are) and redraws
results/retrieval_hybrid.png: recall against K per arm (mean and range over seeds, the 2x-length
cell beside it), the augmentation arms, and the servable hybrids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid_grid import ARM_NAMES, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    res = Path(args.results)
    target = res / "retrieval_hybrid.json"
    base = _load(target)
    if base is None:
        raise SystemExit(f"{target}: missing (scripts/retrieval_hybrid.py writes it)")
    grid, aug, sink = (_load(res / f) for f in ("hybrid_grid.json", "augment_train.json", "sink_hybrid.json"))
    if grid:
        base["seeds_grid"] = {k: grid[k] for k in ("command", "recipe", "seeds", "n", "length", "steps", "summary")}
    if aug:
        base["augmentation_training"] = aug
    if sink:
        base["servable"] = {k: sink[k] for k in sink if k != "command"} | {"command": sink["command"]}
    target.write_text(json.dumps(base, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), dpi=110, gridspec_kw={"width_ratios": [1.3, 1.1, 1.1]})
    ax = axes[0]
    if grid:
        s = summarize(grid["records"])
        length = grid["length"]
        for i, arm in enumerate(ARM_NAMES):
            for L, style, tag in ((length, "-o", ""), (2 * length, "--s", f" (at {2 * length})")):
                pts = sorted((k[3], v) for k, v in s.items() if k[:3] == (arm, "mqar", L) and k[3] is not None)
                if not pts:
                    continue
                xs = [b * (1.04 ** (i - 1)) for b, _ in pts]
                ax.errorbar(xs, [v["mean"] for _, v in pts], fmt=style, color=f"C{i}", capsize=3,
                            yerr=[[v["mean"] - v["min"] for _, v in pts], [v["max"] - v["mean"] for _, v in pts]],
                            label=ARM_NAMES[arm] + tag)
        full = s.get(("hybrid", "mqar", length, None))
        if full:
            ax.axhline(full["mean"], color="gray", ls=":", label=f"hybrid adapter at full state ({full['mean']:.0f}%)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (TOVA states on the 29 bounded layers)")
        ax.set_title(f"one full layer: MQAR at ≈{length} tokens, seeds {grid['seeds']}\n(mean, range over seeds)",
                     fontsize=9)
        ax.legend(fontsize=6.5)
    ax = axes[1]
    if aug:
        cells: dict = {}
        for r in aug["records"]:
            state = ("full" if r["budget"] is None else f"{r['policy']}-{r['budget']}") + (" +aug" if r["augmented"] else "")
            cells.setdefault((r["arm"], state), []).append(100 * r["accuracy"])
        states = [s for s in ("full", "full +aug", f"window-{aug['budget']} +aug", f"tova-{aug['budget']} +aug")
                  if any(k[1] == s for k in cells)]
        arms = [a for a in ("untrained", "plain", "window", "tova") if any(k[0] == a for k in cells)]
        w = 0.8 / max(len(arms), 1)
        for i, arm in enumerate(arms):
            vals = [cells.get((arm, s)) for s in states]
            means = [statistics.fmean(v) if v else 0 for v in vals]
            err = [[m - min(v) if v else 0 for m, v in zip(means, vals)], [max(v) - m if v else 0 for m, v in zip(means, vals)]]
            ax.bar([j + (i - (len(arms) - 1) / 2) * w for j in range(len(states))], means, w, yerr=err, capsize=2,
                   label={"untrained": "untrained", "plain": "plain LoRA (same rows)", "window": "trained under window",
                          "tova": "trained under TOVA"}[arm], color=f"C{i + 3}")
        ax.set_xticks(range(len(states)), states, fontsize=8)
        ax.set_title(f"augmentation, no full layer (K = {aug['budget']}, ≤{aug['augment_tokens']} tokens re-inserted)",
                     fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    if sink:  # per arm: mean over its training seeds, range over seeds (one seed: its Wilson interval)
        groups: dict = {}
        for name, r in sink["arms"].items():
            groups.setdefault(r.get("arm", name), []).append(r)
        bars = [(f"{arm}\n+full{'+'.join(map(str, rs[0]['full_layers']))}", [r["trained"] for r in rs],
                 "C2" if rs[0]["export"].get("exported") else "C7") for arm, rs in groups.items()]
        if sink.get("plain_control"):
            bars.append(("plain LoRA\n(window_sink cache)", list(sink["plain_control"].values()), "C1"))
        for i, (label, cells, color) in enumerate(bars):
            vals = [100 * c["mqar"] for c in cells]
            m = statistics.fmean(vals)
            lo, hi = (min(vals), max(vals)) if len(vals) > 1 else (100 * cells[0]["ci95"][0], 100 * cells[0]["ci95"][1])
            ax.bar(i, m, yerr=[[m - lo], [hi - m]], capsize=3, color=color)
            ax.text(i, min(m + 4, 96), f"{len(vals)} seed{'s' if len(vals) > 1 else ''}", ha="center", fontsize=6)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=6.5)
        ax.set_title("servable hybrids, trained (green: exported to a stock config; orange: the control)", fontsize=8)
    for ax in axes:
        ax.set_ylim(-3, 103)
        ax.set_ylabel("MQAR accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: retrieval under a finite state (issue 24)")
    fig.tight_layout()
    fig.savefig(res / "retrieval_hybrid.png")
    print(f"wrote {target} and {res / 'retrieval_hybrid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
