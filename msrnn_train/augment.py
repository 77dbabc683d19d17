"""Retrieval augmentation: the second way to give a finite state in-context retrieval.

"RNNs are not Transformers (Yet)" (arXiv 2402.18510) shows that a finite-state model cannot
recall what it no longer holds, and that retrieving the relevant text and showing it again
restores retrieval. Here the bounded model's *input* is augmented, nothing in it changes:

* `ChunkStore.read(text)` keeps the text read so far, cut into overlapping chunks of
  ``chunk_words`` words (stride ``chunk_words // 2``, so every span of up to half a chunk lies
  whole inside some chunk); a chunk is shown again with the half chunk after it;
* at question time `ChunkStore.retrieve(question, max_tokens)` ranks the chunks by BM25
  (``rank_bm25.BM25Okapi`` over lower-cased word tokens) and returns the best ``top_k`` whose
  merged text fits in ``max_tokens`` (the budget: a bounded model of K states can hold about K
  re-read tokens), in reading order;
* `augment(instance, max_tokens, ...)` re-inserts them just before the question.

The model then reads context + retrieved chunks + question through its bounded state, exactly
as at inference, so the ordinary teacher-forced scorer measures it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from .retrieval_tasks import Instance

_WORD = re.compile(r"\S+")
_TERM = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    """BM25's tokens: lower-cased runs of word characters."""
    return [t.lower() for t in _TERM.findall(text)]


class ChunkStore:
    """The text a bounded model has read, kept as overlapping word chunks for BM25 retrieval."""

    def __init__(self, chunk_words: int = 6):
        if chunk_words < 2:
            raise ValueError(f"chunk_words must be >= 2, got {chunk_words}")
        self.chunk_words, self.stride = chunk_words, chunk_words // 2
        self.text = ""
        self.spans: list[tuple[int, int]] = []  # character spans of the chunks in self.text (scored)
        self.shown: list[tuple[int, int]] = []  # ... and what is re-inserted: the chunk + the next half chunk

    def read(self, text: str) -> None:
        """Append ``text`` (what the model just read) and re-cut the chunks."""
        self.text += text
        bounds = [m.span() for m in _WORD.finditer(self.text)]
        starts = range(0, max(len(bounds) - self.stride, 1), self.stride) if bounds else []
        self.spans = [(bounds[i][0], bounds[min(i + self.chunk_words, len(bounds)) - 1][1]) for i in starts]
        # a key is often followed by what it names ("key: value", "... for key is value."): a matched
        # chunk is shown with the words after it
        self.shown = [(bounds[i][0], bounds[min(i + self.chunk_words + self.stride, len(bounds)) - 1][1])
                      for i in starts]

    def retrieve(self, query: str, max_tokens: int, count: Callable[[str], int], top_k: int = 2) \
            -> list[tuple[int, int]]:
        """Character spans (merged where they overlap or touch, in reading order) of the best
        ``top_k`` chunks for ``query``, each with the half chunk after it, whose merged text counts
        at most ``max_tokens``."""
        if not self.spans:
            return []
        from rank_bm25 import BM25Okapi

        bm25 = BM25Okapi([terms(self.text[a:b]) or ["\0"] for a, b in self.spans])
        scores = bm25.get_scores(terms(query))
        ranked = sorted(range(len(self.spans)), key=lambda i: (-scores[i], i))
        chosen: list[tuple[int, int]] = []
        taken = 0
        for i in ranked:
            if taken == top_k or scores[i] <= 0:
                break
            merged = _merge(chosen + [self.shown[i]])
            if sum(count(self.text[a:b]) for a, b in merged) > max_tokens:
                continue
            chosen, taken = merged, taken + 1
        return chosen

    def excerpt(self, spans: list[tuple[int, int]]) -> str:
        return "\n".join(self.text[a:b] for a, b in spans)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def augment(instance: Instance, max_tokens: int, count: Callable[[str], int] | None = None, chunk_words: int = 6,
            top_k: int = 2) -> Instance:
    """The instance with the best-matching chunks of its context re-inserted just before its
    question (``meta["question"]``), at most ``max_tokens`` (in ``count`` units; default words).
    meta gains "augmented" (True), "retrieved_tokens" and "hit" (whether the answer's source
    was among the retrieved text)."""
    count = count or (lambda s: len(s.split()))
    question = instance.meta.get("question")
    if not question or not instance.prompt.endswith(question):
        raise ValueError(f"augment: instance of task {instance.task!r} has no meta['question'] ending its prompt")
    context = instance.prompt[:len(instance.prompt) - len(question)]
    store = ChunkStore(chunk_words)
    store.read(context)
    spans = store.retrieve(question, max_tokens, count, top_k)
    excerpt = store.excerpt(spans)
    src = instance.meta.get("source")
    hit = bool(src) and any(a <= src[0] and src[1] <= b for a, b in spans)
    prompt = context.rstrip("\n") + ("\n\n" + excerpt if excerpt else "") + ("\n" if question[0] != "\n" else "") \
        + question
    meta = {**instance.meta, "augmented": True, "retrieved_tokens": count(excerpt) if excerpt else 0, "hit": hit}
    return replace(instance, prompt=prompt, meta=meta)
