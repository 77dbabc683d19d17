"""The training objective of a bounded student and its terms.

* `bounded_objective`: the whole objective of one micro-batch (the one place it is assembled;
  `trainer.BoundedTrainer.compute_loss` and `scripts/bench_train.py` call it).
* `causal_lm_loss`: next-token cross-entropy of the student's logits (the bounded process).
* `distillation_kl`: KL(teacher || student) over the vocabulary at every position that has a
  next-token target, with a softmax temperature T (scaled by T^2 so its gradient does not
  shrink with T, as in Hinton et al.). The teacher is the same model with the adapter
  disabled and no budget: the full-state model the student should imitate.

Both are means over the scored positions, so `bounded_lm_weight * CE + kl_weight * KL` mixes
quantities of the same scale (nats per token).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> targets (B, T-1) for positions 0..T-2, and their mask of scored positions."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` are the input ids (-100 = not scored), unshifted."""
    targets, _ = next_token_targets(labels)
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over scored positions of KL(softmax(teacher/T) || softmax(student/T)) * T^2.

    Positions are those with a next-token target (as in `causal_lm_loss`); with `labels=None`
    every position but the last.
    """
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    log_p_student = F.log_softmax(s, dim=-1)
    log_p_teacher = F.log_softmax(t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (B, T-1)
    if labels is None:
        mask = torch.ones_like(kl, dtype=torch.bool)
    else:
        _, mask = next_token_targets(labels)
    n = mask.sum().clamp_min(1)
    return (kl * mask).sum() / n * temperature**2


def weighted_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss` with a weight per target token: ``weights[:, t]`` weighs the prediction of
    ``labels[:, t]`` (e.g. the answer tokens of a retrieval sequence). The weighted sum is divided
    by the number of scored tokens, so all-ones weights give `causal_lm_loss` exactly."""
    targets, mask = next_token_targets(labels)
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none").view_as(targets)
    w = weights[:, 1:].to(ce.dtype) * mask
    return (ce * w).sum() / mask.sum().clamp_min(1)


def bounded_objective(model, batch: Mapping[str, torch.Tensor], cfg,
                      teacher_fn: Callable[[torch.Tensor, torch.Tensor | None, bool], torch.Tensor],
                      full_state_ctx: Callable[[], ContextManager],
                      capacity_fn: Callable[[], torch.Tensor | None] | None = None, capacity_weight: float = 1.0):
    """The training objective of one micro-batch, summed in this order::

        bounded_lm_weight * CE(bounded student)  (weighted by batch["loss_weight"] when given)
      + capacity_weight * capacity               (a learned policy's decay relaxation; when capacity_fn gives one)
      + full_lm_weight * CE(full-state pass, adapter on, with gradients)   (when full_lm_weight > 0)
      + kl_weight * KL(full-state teacher || student)                      (when kl_weight > 0)

    * `model` - the adapted model with its budget on (may be a DDP wrapper: it is only called);
    * `batch` - ``input_ids`` LongTensor[B, T]; optional ``labels`` [B, T] (unshifted, -100 = not
      scored; default ``input_ids``), ``attention_mask`` [B, T], ``loss_weight`` FloatTensor[B, T]
      (the weight of the prediction of each label: retrieval rows' answer tokens);
    * `cfg` - the loss section (`recipe.LossConfig`): ``bounded_lm_weight``, ``full_lm_weight``,
      ``kl_weight``, ``kl_temperature``, ``teacher`` (``base`` | ``self``);
    * `teacher_fn(input_ids, attention_mask, adapter)` - full-state logits [B, T, V] without
      gradient, the adapter off (``adapter=False``, teacher ``base``) or on (``self``), e.g.
      `trainer.full_state_logits`; not called when the teacher is ``self`` and the full-state pass
      already ran (its logits, detached, are the teacher);
    * `full_state_ctx()` - a context manager inside which `model` runs with the full state, e.g.
      ``lambda: controller.full_state(bare_model)``;
    * `capacity_fn()` - called right after the bounded forward (before any other pass): a scalar
      tensor or None.

    Returns ``(loss, parts, outputs)``: the scalar loss; ``parts`` = {"lm_loss", "full_lm_loss",
    "kl_loss", "capacity_loss"}, each a scalar tensor with its graph or None when the term is off;
    and the bounded forward's output (``outputs.logits`` [B, T, V]).
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids)
    mask = batch.get("attention_mask")
    outputs = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    capacity = capacity_fn() if capacity_fn is not None else None
    lm = causal_lm_loss(outputs.logits, labels) if batch.get("loss_weight") is None else \
        weighted_causal_lm_loss(outputs.logits, labels, batch["loss_weight"])
    loss = cfg.bounded_lm_weight * lm
    if capacity is not None:
        loss = loss + capacity_weight * capacity
    full_lm = teacher = kl = None
    if cfg.full_lm_weight > 0:
        with full_state_ctx():
            full_logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        full_lm = causal_lm_loss(full_logits, labels)
        loss = loss + cfg.full_lm_weight * full_lm
        if cfg.teacher == "self":
            teacher = full_logits.detach()
    if cfg.kl_weight > 0:
        if teacher is None:
            teacher = teacher_fn(input_ids, mask, cfg.teacher == "self")
        kl = distillation_kl(outputs.logits, teacher, labels, cfg.kl_temperature)
        loss = loss + cfg.kl_weight * kl
    parts = {"lm_loss": lm, "full_lm_loss": full_lm, "kl_loss": kl, "capacity_loss": capacity}
    return loss, parts, outputs
