"""Training for retrieval: generated retrieval sequences mixed into the language-model data.

A recipe with ``data.retrieval_fraction: f`` trains on LM windows plus generated retrieval
prompts (`retrieval_tasks`, tasks ``data.retrieval_tasks``, each about ``data.seq_len`` tokens
with its answer at the end) making up the fraction ``f`` of all rows. Every row carries a
per-token ``loss_weight``: 1, except the answer tokens of a retrieval row, which weigh
``loss.answer_weight`` (the trainer's loss is then `losses.weighted_causal_lm_loss`). The
retrieval rows are drawn lazily, one seed per row, so a dataset of any size costs nothing up
front and is the same in every run.
"""

from __future__ import annotations

import math

import torch

from .augment import augment
from .losses import IGNORE_INDEX
from .retrieval_tasks import encode, make_task, token_counter


def retrieval_row(task: str, seed: int, seq_len: int, tokenizer, answer_weight: float = 1.0,
                  filler: str | None = None, augment_tokens: int | None = None,
                  augment_chunk_words: int = 4) -> dict[str, torch.Tensor]:
    """One generated instance as a training row of exactly ``seq_len`` tokens: prompt + answer
    (padded on the right with unscored tokens), labels, and loss weights (``answer_weight`` on
    the answer tokens). ``augment_tokens``: the prompt is augmented first (`augment.augment`: at
    most that many tokens of its best BM25 chunks re-inserted before the question), exactly as
    the evaluation augments it."""
    length = seq_len - 4 - (augment_tokens or 0)
    while True:
        inst = make_task(task, 1, max(length, 16), seed=seed, tokenizer=tokenizer, filler=filler)[0]
        if augment_tokens:
            inst = augment(inst, augment_tokens, token_counter(tokenizer), chunk_words=augment_chunk_words)
        enc = encode(inst, tokenizer)
        over = len(enc.ids) - seq_len
        if over <= 0 or length <= 16:
            break
        length -= over + 4
    ids = enc.ids[-seq_len:]  # (never cut in practice: the loop above shortens the prompt)
    start = enc.answer_start - (len(enc.ids) - len(ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((seq_len,), pad, dtype=torch.long)
    input_ids[:len(ids)] = torch.tensor(ids)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    labels[:len(ids)] = input_ids[:len(ids)]
    weight = torch.ones(seq_len)
    weight[start:len(ids)] = answer_weight
    return {"input_ids": input_ids, "labels": labels, "loss_weight": weight}


class RetrievalMixDataset(torch.utils.data.Dataset):
    """LM windows (rows 0..N-1) followed by generated retrieval rows, ``fraction`` of the whole;
    rows ``{"input_ids", "labels", "loss_weight"}``. Row N+j is task ``tasks[j % len(tasks)]``
    with seed ``seed * 1_000_003 + j``; it is augmented (``augment_tokens``) when
    ``floor((j + 1) * augment_fraction) > floor(j * augment_fraction)``: exactly that share of the
    retrieval rows, spread evenly."""

    def __init__(self, windows: torch.Tensor, tokenizer, fraction: float, tasks: list[str],
                 answer_weight: float = 1.0, seed: int = 0, filler: str | None = None,
                 augment_fraction: float = 0.0, augment_tokens: int | None = None, augment_chunk_words: int = 4):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        if not 0.0 <= augment_fraction <= 1.0:
            raise ValueError(f"augment_fraction must be in [0, 1], got {augment_fraction}")
        if augment_fraction > 0 and not augment_tokens:
            raise ValueError("augment_fraction > 0 needs augment_tokens")
        self.windows, self.tokenizer, self.tasks = windows, tokenizer, list(tasks)
        self.answer_weight, self.seed, self.filler = answer_weight, seed, filler
        self.augment_fraction, self.augment_tokens, self.augment_chunk_words = \
            augment_fraction, augment_tokens, augment_chunk_words
        self.n_lm = windows.shape[0]
        self.n_retrieval = round(fraction / (1.0 - fraction) * self.n_lm) if fraction > 0 else 0

    def __len__(self) -> int:
        return self.n_lm + self.n_retrieval

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < self.n_lm:
            w = self.windows[i]
            return {"input_ids": w, "labels": w.clone(), "loss_weight": torch.ones(w.shape[0])}
        j = i - self.n_lm
        if j >= self.n_retrieval:
            raise IndexError(i)
        return retrieval_row(self.tasks[j % len(self.tasks)], self.seed * 1_000_003 + j, self.windows.shape[1],
                             self.tokenizer, self.answer_weight, self.filler,
                             self.augment_tokens if self.augmented(j) else None, self.augment_chunk_words)

    def augmented(self, j: int) -> bool:
        """Whether retrieval row j (0-based among the retrieval rows) is augmented."""
        f = self.augment_fraction
        return math.floor((j + 1) * f) > math.floor(j * f)


def training_dataset(recipe, windows: torch.Tensor, tokenizer):
    """The training rows of a recipe: the LM windows, mixed with retrieval rows when
    ``data.retrieval_fraction`` > 0 (or weighted when ``loss.answer_weight`` != 1)."""
    from .data import WindowDataset

    d = recipe.data
    if d.retrieval_fraction <= 0:
        return WindowDataset(windows)
    return RetrievalMixDataset(windows, tokenizer, d.retrieval_fraction, d.retrieval_tasks,
                               recipe.loss.answer_weight, seed=recipe.training.seed,
                               augment_fraction=d.augment_fraction, augment_tokens=recipe.augment_max_tokens(),
                               augment_chunk_words=d.augment_chunk_words)
