"""The distillation objective: student + loss in one module, summed over target tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distil.data.batches import Batch
from distil.training.losses import sparse_divergence_from_log_probs, sparse_uld


class DistillationObjective(nn.Module):
    """Student + loss in one module, so DDP sees a single forward.

    The student's logits are computed only at positions that predict a teacher token, in
    chunks of `chunk_tokens`; when there are several chunks each is recomputed in backward
    (activation checkpointing), so the batch's full logits never exist at once.

    Returns per call the *sums* over target tokens of (loss, cross-entropy, divergence, hidden),
    where loss = alpha * CE + (1 - alpha) * temperature**2 * D(teacher, student) + w * H, D the
    recipe's `train.loss` (forward KL by default, or a weighted sum of divergences) over the cached
    top-k + tail buckets and H the hidden-state loss (`train.hidden`). On-policy batches (the
    student wrote the text) use D alone.
    With `cross_tokenizer` (rows from distil.models.alignment), D is: "offsets", the divergence to the
    teacher's top-k mapped to student ids; "uld", `sparse_uld` at aligned positions (its
    temperature**2 factor dropped); "both", their sum with ULD weighted by `uld_weight`.

    With `hidden_pairs`, each pair (student index, teacher index) of hidden_states is compared
    per token after a learned linear projection where the widths differ. The projections belong
    to this module (trained, checkpointed), not to the student, so they are not saved with it.
    """

    def __init__(self, student: nn.Module, *, alpha: float, temperature: float, chunk_tokens: int = 2048,
                 loss: str | dict[str, float] = "forward_kl", loss_params: dict[str, dict] | None = None,
                 hidden_pairs: list[tuple[int, int]] = (), hidden_loss: str = "mse", hidden_weight: float = 1.0,
                 teacher_width: int | None = None, cross_tokenizer: str | None = None, uld_weight: float = 1.0):
        super().__init__()
        self.use_kd = cross_tokenizer in (None, "offsets", "both")
        self.use_uld = cross_tokenizer in ("uld", "both")
        self.uld_weight = uld_weight if cross_tokenizer == "both" else 1.0
        self.student, self.alpha, self.temperature, self.chunk_tokens = student, alpha, temperature, chunk_tokens
        # What FSDP's TRANSFORMER_BASED_WRAP shards one by one (the student's decoder layers).
        self._no_split_modules = getattr(student, "_no_split_modules", None)
        # D = sum of weight * divergence over `loss` (one name: weight 1), each with its `loss_params[name]`.
        terms = {loss: 1.0} if isinstance(loss, str) else dict(loss)
        self.terms = [(name, weight, (loss_params or {}).get(name, {})) for name, weight in terms.items()]
        self.hidden_pairs, self.hidden_loss, self.hidden_weight = list(hidden_pairs), hidden_loss, hidden_weight
        width = student.config.hidden_size
        teacher_width = teacher_width or width
        self.projections = nn.ModuleList(
            nn.Linear(width, teacher_width, bias=False) if width != teacher_width else nn.Identity()
            for _ in self.hidden_pairs)

    def _chunk(self, hidden, targets, topk_ids, topk_logprobs, tail, alpha, uld_lp=None, uld_tail=None, uld_mask=None):
        logits = self.student.get_output_embeddings()(hidden).float()
        # One log_softmax serves cross-entropy and (at T = 1) the divergence: on a
        # (tokens x vocabulary) tensor every extra pass costs as much as the small model's layers.
        log_probs = torch.log_softmax(logits, dim=-1)
        ce = -log_probs.gather(-1, targets.unsqueeze(-1)).sum()
        if alpha == 1.0:
            return ce, ce, torch.zeros_like(ce)
        kd = torch.zeros_like(ce)
        if self.use_uld:
            kd = kd + self.uld_weight * sparse_uld(logits, uld_lp, uld_tail, temperature=self.temperature,
                                                   mask=uld_mask, reduction="sum") / self.temperature ** 2
        if self.use_kd:
            tempered = log_probs if self.temperature == 1.0 else torch.log_softmax(logits / self.temperature, dim=-1)
            for name, weight, params in self.terms:
                kd = kd + weight * sparse_divergence_from_log_probs(
                    name, tempered, topk_ids, topk_logprobs, tail, temperature=self.temperature, reduction="sum",
                    **params)
        return alpha * ce + (1 - alpha) * self.temperature ** 2 * kd, ce, kd

    def _hidden_loss(self, student_states, teacher_states) -> torch.Tensor:
        """Sum over tokens of the per-token hidden-state loss, averaged over the matched pairs."""
        total = 0.0
        for proj, (s, _), target in zip(self.projections, self.hidden_pairs, teacher_states):
            pred = proj(student_states[s])
            if self.hidden_loss == "mse":
                total = total + (pred.float() - target).pow(2).mean(-1).sum()
            else:
                total = total + (1 - torch.cosine_similarity(pred.float(), target, dim=-1)).sum()
        return total / len(self.hidden_pairs)

    def forward(self, batch: Batch):
        out = self.student.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      output_hidden_states=bool(self.hidden_pairs), use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)[batch.target_pos]
        alpha = 0.0 if batch.on_policy else self.alpha
        n = hidden.shape[0]
        parts = []
        for s in range(0, n, self.chunk_tokens):
            args = (hidden[s:s + self.chunk_tokens], batch.targets[s:s + self.chunk_tokens],
                    batch.topk_ids[s:s + self.chunk_tokens], batch.topk_logprobs[s:s + self.chunk_tokens],
                    batch.tail_logprob[s:s + self.chunk_tokens], alpha)
            if self.use_uld:
                args += tuple(t[s:s + self.chunk_tokens] for t in (batch.uld_logprobs, batch.uld_tail, batch.uld_mask))
            parts.append(checkpoint(self._chunk, *args, use_reentrant=False) if n > self.chunk_tokens else self._chunk(*args))
        loss, ce, kd = (torch.stack(p).sum() for p in zip(*parts))
        hid = torch.zeros_like(loss)
        if self.hidden_pairs:
            states = {s: out.hidden_states[s].flatten(0, 1)[batch.target_pos] for s, _ in self.hidden_pairs}
            hid = self._hidden_loss(states, batch.teacher_hidden)
            loss = loss + self.hidden_weight * hid
        return loss, ce, kd, hid


