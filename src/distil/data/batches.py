"""Teacher-cache rows as padded tensor batches: the one layout training, scoring and teachers share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, L) right-padded prompt + teacher text (last token dropped)
    attention_mask: torch.Tensor  # (B, L)
    target_pos: torch.Tensor      # (N,) flat positions in (B*L) that predict a teacher token
    targets: torch.Tensor         # (N,) the teacher's tokens (or, on policy, the student's)
    topk_ids: torch.Tensor        # (N, k)
    topk_logprobs: torch.Tensor   # (N, k)
    tail_logprob: torch.Tensor    # (N,)
    teacher_hidden: tuple[torch.Tensor, ...] = ()  # per matched layer, (N, D_teacher)
    on_policy: bool = False       # the student wrote the text: divergence only, no cross-entropy
    # Cross-tokenizer rows (distil.models.alignment): the teacher's own top-k log-probs and tail at the
    # aligned teacher position, and 1 where a student position has one (for ULD).
    uld_logprobs: torch.Tensor | None = None  # (N, k)
    uld_tail: torch.Tensor | None = None      # (N,)
    uld_mask: torch.Tensor | None = None      # (N,)

    def to(self, device) -> "Batch":
        fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        fields["teacher_hidden"] = tuple(h.to(device) for h in self.teacher_hidden)
        return Batch(**fields)


def collate(rows: list[dict], pad_id: int) -> Batch:
    """Cache rows -> one right-padded batch with the flat positions of the teacher's tokens.

    Rows without soft targets (on-policy rollouts, before the teacher scores them) get
    empty (N, 0) top-k tensors.
    """
    seqs = [(r["prompt_ids"] + r["token_ids"])[:-1] for r in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions, targets, topk_ids, topk_lp, tail, uld_lp, uld_tail, uld_mask = [], [], [], [], [], [], [], []
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        start = len(row["prompt_ids"]) - 1
        positions.extend(i * width + start + j for j in range(len(row["token_ids"])))
        targets.extend(row["token_ids"])
        n = len(row["token_ids"])
        topk_ids.extend(row.get("topk_ids") or [[]] * n)
        topk_lp.extend(row.get("topk_logprobs") or [[]] * n)
        tail.extend(row.get("tail_logprob") or [0.0] * n)
        if "uld_logprobs" in row:
            uld_lp.extend(row["uld_logprobs"])
            uld_tail.extend(row["uld_tail"])
            uld_mask.extend(row["uld_mask"])
    batch = Batch(input_ids, mask, torch.tensor(positions), torch.tensor(targets),
                  torch.tensor(topk_ids, dtype=torch.long).reshape(len(targets), -1),
                  torch.tensor(topk_lp, dtype=torch.float32).reshape(len(targets), -1),
                  torch.tensor(tail, dtype=torch.float32))
    if uld_mask and len(uld_mask) == len(targets):
        batch.uld_logprobs = torch.tensor(uld_lp, dtype=torch.float32)
        batch.uld_tail = torch.tensor(uld_tail, dtype=torch.float32)
        batch.uld_mask = torch.tensor(uld_mask, dtype=torch.float32)
    return batch


