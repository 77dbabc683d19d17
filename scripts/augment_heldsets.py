"""Issue 24, part 1: does a bounded policy still hold the re-inserted (retrieval-augmented) chunk
when the question's last token is read?

Builds the augmented MQAR prompts exactly as the evaluation does (`retrieval_tasks.make_task` +
`augment.augment(instance, K, token_counter(tok))`, as `retrieval.retrieval_grid`), runs one
teacher-forced pass per prompt under each policy with `record_schedules`, and for the query of the
last prompt token (the step whose logits give the first answer token) reads from the schedule which
keys that query sees (key j visible to query t iff arrive_j <= t <= evict_j; `Schedule.visible`).
Per layer: chunk tokens visible, the chunk's copy of the answer pair (key and value tokens) visible,
and where the visible members lie. Accuracy: every answer token the argmax of the teacher-forced
logits (as `retrieval._solved`).

Also a prototype of the fix (not a shipped policy; defined here only): ``tova_pin`` = TOVA whose
re-inserted chunk tokens are not eligible for eviction (pinned, counted inside K) - the rest of K
runs TOVA as usual; ``tova_pinq`` pins the chunk and the question (up to the answer), which with
the evaluation's chunk (about K tokens) does not fit, hence a smaller augmentation for it.

    OMP_NUM_THREADS=1 python scripts/augment_heldsets.py --n 20 --out results/augment_heldsets
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from msrnn_train.augment import augment
from msrnn_train.controller import budget_scope, record_schedules
from msrnn_train.models import load_model
from msrnn_train.policies.base import register
from msrnn_train.policies.tova import TOVA
from msrnn_train.retrieval_tasks import encode, make_task, token_counter
from msrnn_train.spec import BudgetSpec

N_SINKS = 4  # "first tokens": the attention-sink candidates
# the evaluation's augmentation (at most K tokens, chunks of 6 words) under full / TOVA / window /
# TOVA with the chunk pinned; then a smaller augmentation (24 tokens, chunks of 4 words) so that
# chunk + question fit in K, under TOVA and under TOVA with chunk + question pinned
CONFIGS = ("full:0:6", "tova:0:6", "window:0:6", "tova_pin:0:6", "full:24:4", "tova:24:4", "window:24:4",
           "tova_pinq:24:4")
CATEGORIES = ("sinks (first 4)", "older prompt (list)", "original answer pair", "demo queries",
              "chunk: other", "chunk: answer pair", "question")


@register
class TOVAPinned(TOVA):
    """Prototype only: TOVA that never drops the tokens with order in [pin_lo, pin_hi) (the
    re-inserted chunk of the one sequence in the batch). Runs on the torch scan (no kernel)."""

    name = "tova_pin"
    kernel_code = None
    relaxable = False
    pin_lo, pin_hi = 0, 0

    def eligible(self, held, order):
        return held & ~((order >= TOVAPinned.pin_lo) & (order < TOVAPinned.pin_hi))


def regions(inst, orig_inst, tok):
    """Token ids (prompt + answer, as the evaluation encodes them), the answer start, and each
    token's category index (CATEGORIES) plus masks of the chunk and of its answer-pair copy."""
    enc = encode(inst, tok)
    text = inst.prompt + inst.answer
    offs = tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert len(offs) == len(enc.ids)
    prompt, question = inst.prompt, inst.meta["question"]
    # augment(): context.rstrip("\n") + "\n\n" + excerpt + "\n" + question
    ctx_end = len(orig_inst.prompt[:len(orig_inst.prompt) - len(question)].rstrip("\n"))
    assert prompt[:ctx_end] == orig_inst.prompt[:ctx_end] and prompt[ctx_end:ctx_end + 2] == "\n\n"
    q_start = len(prompt) - len(question) - 1  # the "\n" before the question counts as question
    ex_start, ex_end = ctx_end + 2, q_start
    excerpt = prompt[ex_start:ex_end]
    key, value = inst.meta["key"], inst.answer
    pair = f"{key}: {value}"
    i = excerpt.find(pair)
    copy = None if i < 0 else (ex_start + i, ex_start + i + len(pair))
    copy_value = None if i < 0 else (copy[1] - len(value), copy[1])
    v0, v1 = inst.meta["source"]
    orig = (v0 - len(key) - 2, v1)
    demos_start = prompt.rindex("\n\n", 0, ctx_end) + 2  # the list ends with a blank line, then demos

    def over(a, b, span):
        return span is not None and b > span[0] and a < span[1]

    cat, chunk, pair_m, val_m = [], [], [], []
    for t, (a, b) in enumerate(offs):
        if t < N_SINKS:
            c = 0
        elif a >= len(prompt) or over(a, b, (q_start, len(prompt))):
            c = 6
        elif over(a, b, copy):
            c = 5
        elif a >= ex_start - 2 and a < ex_end:  # the "\n\n" separator counts as chunk
            c = 4
        elif over(a, b, orig):
            c = 2
        elif a >= demos_start:
            c = 3
        else:
            c = 1
        cat.append(c)
        chunk.append(c in (4, 5) and a >= ex_start)
        pair_m.append(c == 5)
        val_m.append(over(a, b, copy_value))
    return enc, torch.tensor(cat), torch.tensor(chunk), torch.tensor(pair_m), torch.tensor(val_m)


def analyse(model, tok, insts, origs, spec, desc, pin=None):
    """Per prompt: correct, and per layer the counts of what query t = answer_start - 1 sees."""
    rows = []
    t0 = time.time()
    for n, (inst, orig_inst) in enumerate(zip(insts, origs)):
        enc, cat, chunk, pair_m, val_m = regions(inst, orig_inst, tok)
        pinned = 0
        if spec.policy == "tova_pin":
            idx = torch.nonzero(chunk).flatten()
            lo = int(idx[0])
            hi = enc.answer_start if pin == "chunk+question" else int(idx[-1]) + 1
            lo = max(lo, hi - (spec.budget - 1))  # at least one member of C_t stays eligible
            TOVAPinned.pin_lo, TOVAPinned.pin_hi = lo, hi
            pinned = hi - lo
        ids = torch.tensor([enc.ids])
        with budget_scope(model, spec), torch.no_grad():
            if spec.policy == "full":  # no controller: every earlier token is visible, in every layer
                rec = None
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            else:
                with record_schedules(model) as rec:
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                rec = dict(rec)
        start = enc.answer_start
        pred = logits[0].argmax(-1)
        ok = bool((pred[start - 1:len(enc.ids) - 1] == ids[0, start:]).all())
        q = start - 1  # the last prompt token's query: its logits give the first answer token
        n_chunk_end = int(torch.nonzero(chunk).flatten()[-1])  # last chunk token
        layers = []
        for layer in range(model.config.num_hidden_layers):
            if rec is None:
                vis = torch.arange(len(enc.ids)) <= q
                vis_end = torch.arange(len(enc.ids)) <= n_chunk_end
            else:
                assert len(rec[layer]) == 1, len(rec[layer])
                s = rec[layer][0]
                ev, ar = s.evict[0, 0], s.arrive  # one group (layer-wise policies)
                vis = (ar <= q) & (q <= ev)
                vis_end = (ar <= n_chunk_end) & (n_chunk_end <= ev)
            layers.append({
                "visible": int(vis.sum()),
                "chunk_visible": int((vis & chunk).sum()), "chunk_tokens": int(chunk.sum()),
                "chunk_visible_at_chunk_end": int((vis_end & chunk).sum()),
                "pair_visible": int((vis & pair_m).sum()), "pair_tokens": int(pair_m.sum()),
                "value_visible": int((vis & val_m).sum()), "value_tokens": int(val_m.sum()),
                "value_all_visible": bool((vis & val_m).sum() == val_m.sum() and val_m.sum() > 0),
                "by_category": [int((vis & (cat == c)).sum()) for c in range(len(CATEGORIES))],
            })
        rows.append({"item": inst.meta["item"], "correct": ok, "hit": inst.meta["hit"], "tokens": len(enc.ids),
                     "answer_start": start, "pinned": pinned, "layers": layers})
        print(f"  {desc} {n + 1}/{len(insts)} ok={ok} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return rows


def summary(rows, n_layers):
    """Mean over prompts per layer, then min/median/max over layers."""
    def per_layer(fn):
        vals = [statistics.fmean(fn(r["layers"][i]) for r in rows) for i in range(n_layers)]
        return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "per_layer": vals}

    return {
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "pinned": statistics.fmean(r["pinned"] for r in rows),
        "correct": sum(r["correct"] for r in rows), "n": len(rows),
        "hit": sum(r["hit"] for r in rows) / len(rows),
        "chunk_tokens": statistics.fmean(r["layers"][0]["chunk_tokens"] for r in rows),
        "pair_tokens": statistics.fmean(r["layers"][0]["pair_tokens"] for r in rows),
        "value_tokens": statistics.fmean(r["layers"][0]["value_tokens"] for r in rows),
        "visible": per_layer(lambda L: L["visible"]),
        "chunk_visible": per_layer(lambda L: L["chunk_visible"]),
        "chunk_visible_at_chunk_end": per_layer(lambda L: L["chunk_visible_at_chunk_end"]),
        "pair_visible": per_layer(lambda L: L["pair_visible"]),
        "value_visible": per_layer(lambda L: L["value_visible"]),
        "value_all_visible": per_layer(lambda L: float(L["value_all_visible"])),
        "by_category": {c: per_layer(lambda L, i=i: L["by_category"][i]) for i, c in enumerate(CATEGORIES)},
    }


def fmt(d, pct=False):
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.1f}")
    return f"{f(d['min'])} / {f(d['median'])} / {f(d['max'])}"


def table(results):
    lines = ["| policy, augmentation | accuracy | pinned | members the query sees | chunk tokens visible at the chunk's last "
             "token | chunk tokens visible at the question's last token | answer-pair copy tokens visible | "
             "answer-value copy fully visible (share of prompts) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {100 * s['accuracy']:.0f}% ({s['correct']}/{s['n']}) | {s['pinned']:.1f} | {fmt(s['visible'])} | "
                     f"{fmt(s['chunk_visible_at_chunk_end'])} of {s['chunk_tokens']:.1f} | "
                     f"{fmt(s['chunk_visible'])} of {s['chunk_tokens']:.1f} | "
                     f"{fmt(s['pair_visible'])} of {s['pair_tokens']:.1f} | {fmt(s['value_all_visible'], True)} |")
    lines += ["", "Where the members the question's last query sees lie (mean count per prompt; min / median / max "
              "over layers):", "",
              "| policy, augmentation | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for name, s in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(s["by_category"][c]) for c in CATEGORIES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma list of policy:augment_tokens:chunk_words; policy one of full, tova, window, "
                         "tova_pin (chunk pinned), tova_pinq (chunk + question pinned); augment_tokens 0: K")
    ap.add_argument("--out", default=None, help="write <out>.json (the summary)")
    ap.add_argument("--raw", action="store_true", help="also put every prompt's per-layer counts in the JSON (~2 MB)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    n_layers = model.config.num_hidden_layers
    insts = make_task("mqar", args.n, args.length, seed=args.seed, tokenizer=tok)
    count = token_counter(tok)
    augmented, results, raw = {}, {}, {}
    for cfg in args.configs.split(","):
        pol, tokens, words = cfg.split(":")
        tokens, words = int(tokens) or args.budget, int(words)
        if (tokens, words) not in augmented:  # as retrieval_grid: augment(instance, K, token_counter(tok))
            augmented[tokens, words] = [augment(i, tokens, count, chunk_words=words) for i in insts]
        aug = augmented[tokens, words]
        policy = "tova_pin" if pol == "tova_pinq" else pol
        spec = BudgetSpec(policy="full") if pol == "full" else BudgetSpec(policy=policy, budget=args.budget)
        name = "full state" if pol == "full" else f"{pol}-{args.budget}"
        label = f"{name}, aug ≤{tokens} tok" + ("" if words == 6 else f" (chunks of {words} words)")
        rows = analyse(model, tok, aug, insts, spec, label, pin="chunk+question" if pol == "tova_pinq" else "chunk")
        results[label] = summary(rows, n_layers)
        results[label]["config"] = {"policy": pol, "augment_tokens": tokens, "chunk_words": words,
                                    "hit": statistics.fmean(float(a.meta["hit"]) for a in aug),
                                    "retrieved_tokens": statistics.fmean(a.meta["retrieved_tokens"] for a in aug)}
        raw[label] = rows
    print(f"\nMQAR, prompts ≈{args.length} tokens, K = {args.budget}, n = {args.n}, seed {args.seed}. BM25 hit rate "
          + ", ".join(f"{100 * statistics.fmean(float(a.meta['hit']) for a in v):.0f}% at ≤{t} tokens "
                      f"(chunks of {w} words; {statistics.fmean(a.meta['retrieved_tokens'] for a in v):.1f} "
                      f"tokens re-inserted)" for (t, w), v in augmented.items())
          + f". Cells: mean over prompts, min / median / max over the {n_layers} layers.\n")
    print(table(results))
    if args.out:
        doc = {"args": vars(args), "summary": results, "categories": CATEGORIES, **({"prompts": raw} if args.raw else {})}
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
