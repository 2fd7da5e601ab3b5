"""Losses for classification and embedding distillation: pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.training.losses import forward_kl


def soft_label_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, *,
                  temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.'s classification KD: alpha * CE(labels) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T).

    The T^2 factor keeps the soft term's gradient scale independent of T. Mean over the batch.

    Args:
        student_logits, teacher_logits: (N, C).
        labels: (N,) class ids; None (or alpha == 0) for soft labels alone.
        temperature: T, softening both distributions.
        alpha: weight of the hard-label cross-entropy, in [0, 1].

    Example:
        >>> z = torch.randn(4, 3)
        >>> float(soft_label_kd(z, z, None, temperature=2.0, alpha=0.0)) < 1e-6
        True
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha < 1.0:
        loss = loss + (1 - alpha) * temperature ** 2 * forward_kl(student_logits, teacher_logits, temperature=temperature)
    if alpha > 0.0 and labels is not None:
        loss = loss + alpha * F.cross_entropy(student_logits.float(), labels)
    return loss


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error per dimension between (N, D) embeddings."""
    return F.mse_loss(student.float(), teacher.float())


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student_i, teacher_i)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def similarity_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 0.05) -> torch.Tensor:
    """KL between in-batch similarity distributions, row by row: mean_i KL(q_t[i] || q_s[i]).

    q[i] = softmax_j(cos(e_i, e_j) / temperature) over the other rows of the batch (the diagonal,
    always the largest, is left out), so the student learns the teacher's neighbourhood structure.

    Args:
        student, teacher: (N, D_s) and (N, D_t) embeddings of the same N sentences; widths may differ.
        temperature: scale of the cosine similarities.
    """
    n = student.shape[0]
    if n < 3:
        return student.new_zeros((), dtype=torch.float32)

    def sims(e):
        e = F.normalize(e.float(), dim=-1)
        s = e @ e.T / temperature
        off = ~torch.eye(n, dtype=torch.bool, device=e.device)
        return s[off].view(n, n - 1)

    return forward_kl(sims(student), sims(teacher).detach())
