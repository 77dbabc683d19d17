"""Long greedy generation through the bounded cache vs the full state, with repetition and
degeneration statistics (`python -m msrnn_train.evaluate --tasks generation`)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .compat import cache_kwargs
from .controller import budget_scope, make_cache
from .spec import BudgetSpec


def ngrams(tokens: list[int], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def longest_repeat(tokens: list[int]) -> int:
    """Length of the longest token substring that occurs at least twice (overlaps allowed)."""
    n, best = len(tokens), 0
    prev = [0] * (n + 1)  # prev[j]: common suffix length of tokens[:i-1] and tokens[:j]
    for i in range(1, n + 1):
        cur = [0] * (n + 1)
        for j in range(i + 1, n + 1):
            if tokens[i - 1] == tokens[j - 1]:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def loop_period(tokens: list[int], tail: int = 64, max_period: int = 32) -> int | None:
    """Smallest period p <= max_period with which the last ``tail`` tokens repeat exactly
    (the generation is stuck in a loop), or None."""
    if len(tokens) < tail:
        return None
    end = tokens[-tail:]
    for p in range(1, max_period + 1):
        if all(end[i] == end[i + p] for i in range(tail - p)):
            return p
    return None


def generation_stats(tokens: list[int], eos_id: int | None = None) -> dict:
    """Degeneration statistics of one generated token sequence (cut at the first EOS):
    length, tokens until EOS (None if none), distinct-n (n = 1..4), repeated 4-gram rate
    (share of 4-grams seen earlier in the text), longest repeated substring, loop period."""
    until_eos = None
    if eos_id is not None and eos_id in tokens:
        until_eos = tokens.index(eos_id)
        tokens = tokens[:until_eos]
    stats = {"length": len(tokens), "tokens_until_eos": until_eos}
    for n in range(1, 5):
        grams = ngrams(tokens, n)
        stats[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    grams, seen, repeated = ngrams(tokens, 4), set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    stats["repeated_4gram_rate"] = repeated / len(grams) if grams else 0.0
    stats["longest_repeat"] = longest_repeat(tokens)
    stats["loop_period"] = loop_period(tokens)
    stats["stuck"] = stats["loop_period"] is not None
    return stats


@torch.no_grad()
def generate_greedy(model, tokenizer, prompt: str, max_new_tokens: int, bounded: bool) -> list[int]:
    """Greedy continuation of ``prompt``: through a BoundedCache when ``bounded``, else the
    ordinary cache."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if bounded:
        kwargs.update(cache_kwargs(make_cache(model)))
    out = model.generate(**enc, **kwargs)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def long_generation(model, tokenizer, prompts: list[str], specs: list[BudgetSpec], max_new_tokens: int = 128,
                    adapter_on: bool = True, progress: bool = True) -> list[dict]:
    """Per spec: mean degeneration statistics of greedy generations from ``prompts``, plus
    ``agree_with_full`` (mean length of the prefix identical to the full-state generation).
    Per-prompt results are under "per_prompt"."""
    full_spec = BudgetSpec(policy="full")
    specs = [full_spec] + [s for s in specs if s.policy != "full"]
    eos = tokenizer.eos_token_id
    outputs: dict[str, list[list[int]]] = {}
    records = []
    total = len(specs) * len(prompts)
    with tqdm(total=total, desc="generation", unit="gen", disable=not progress) as bar:
        for spec in specs:
            label = spec.label
            bar.set_postfix_str(label)
            gens = []
            with budget_scope(model, spec, adapter_on):
                for prompt in prompts:
                    gens.append(generate_greedy(model, tokenizer, prompt, max_new_tokens, spec.policy != "full"))
                    bar.update(1)
            outputs[label] = gens
            per = [generation_stats(g, eos) for g in gens]
            for g, f, st in zip(gens, outputs["full"], per):
                st["agree_with_full"] = next((i for i, (a, b) in enumerate(zip(g, f)) if a != b), min(len(g), len(f)))
            mean = {k: sum(float(s[k]) for s in per) / len(per)
                    for k in per[0] if k not in ("tokens_until_eos", "loop_period")}
            mean["eos_rate"] = sum(s["tokens_until_eos"] is not None for s in per) / len(per)
            records.append({"policy": spec.policy, "budget": None if spec.policy == "full" else spec.budget,
                            **mean, "per_prompt": per,
                            "samples": [tokenizer.decode(g[:200]) for g in gens]})
    return records


def generation_table(records: list[dict]) -> str:
    cols = ["length", "distinct_1", "distinct_2", "distinct_4", "repeated_4gram_rate", "longest_repeat",
            "stuck", "eos_rate", "agree_with_full"]
    lines = ["| spec | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in records:
        label = "full" if r["policy"] == "full" else f"{r['policy']}-{r['budget']}"
        lines.append(f"| {label} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


# The passkey-retrieval filler (Mohtashami & Jaggi, 2023): the prompts when no book is at hand.
GENERATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def default_prompts(n: int = 3, words: int = 120, seed: int = 0) -> list[str]:
    """``n`` passages of held-out Gutenberg text (``words`` words each) to continue; generated
    filler sentences when the books are not available."""
    import random

    try:
        from .data import DEFAULT_HELDOUT, gutenberg_books

        books = gutenberg_books()
        names = [b for b in DEFAULT_HELDOUT if b in books] or sorted(books)
    except Exception:  # noqa: BLE001
        return [" ".join((GENERATED_FILLER + " ").split() * 8)[: words * 6]] * n
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        text = books[names[i % len(names)]].split()
        start = rng.randrange(max(1, len(text) - words))
        prompts.append(" ".join(text[start:start + words]))
    return prompts
