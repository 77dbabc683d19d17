"""The two training losses of a bounded student.

* `causal_lm_loss`: next-token cross-entropy of the student's logits (the bounded process).
* `distillation_kl`: KL(teacher || student) over the vocabulary at every position that has a
  next-token target, with a softmax temperature T (scaled by T^2 so its gradient does not
  shrink with T, as in Hinton et al.). The teacher is the same model with the adapter
  disabled and no budget: the full-state model the student should imitate.

Both are means over the scored positions, so `lm_weight * CE + kl_weight * KL` mixes
quantities of the same scale (nats per token).
"""

from __future__ import annotations

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
