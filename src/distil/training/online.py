"""Teacher work done during training: on-policy rollouts scored by the teacher, and hidden states.

Used by `train.mode: on_policy` (GKD: the student writes a continuation, a local teacher
scores every token of it) and `train.hidden` (matching the teacher's hidden states). Both
need a local teacher model next to the student; the cached targets need none.
"""

from __future__ import annotations

import torch

from distil.generation.decoding import generate_batch, target_log_probs, topk_with_tail


def rollout(student, rows: list[dict], *, pad_id: int, stop_ids: set[int], max_new_tokens: int,
            generator: torch.Generator) -> list[dict]:
    """The student's own sampled continuations (temperature 1) of the rows' prompts.

    Returns rows with `prompt_ids` and `token_ids` only; `teacher_forward` adds the targets.
    """
    was_training = student.training
    student.eval()
    gens = generate_batch(student, [r["prompt_ids"] for r in rows], pad_id=pad_id, stop_ids=stop_ids,
                          max_new_tokens=max_new_tokens, top_k=1, do_sample=True, generator=generator)
    student.train(was_training)
    return [{"prompt_ids": g.prompt_ids, "token_ids": g.token_ids} for g in gens]


@torch.no_grad()
def teacher_forward(teacher, batch, *, top_k: int | None = None, hidden_layers: tuple[int, ...] = ()) -> None:
    """Fill `batch` in place from one teacher forward pass over the same tokens.

    Args:
        teacher: a local causal LM (frozen, in eval mode) sharing the student's tokenizer.
        batch: a `distil.data.batches.Batch`.
        top_k: when set, replace the batch's soft targets by the teacher's top-k log-probs and
            exact tail mass at the target positions (as `distil generate` would have stored them).
        hidden_layers: teacher hidden_states indices to keep at the target positions.
    """
    out = teacher.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             output_hidden_states=bool(hidden_layers))
    if top_k is not None:
        batch.topk_ids, batch.topk_logprobs, batch.tail_logprob = topk_with_tail(
            target_log_probs(teacher, batch, out.last_hidden_state), top_k)
    if hidden_layers:
        batch.teacher_hidden = tuple(out.hidden_states[i].flatten(0, 1)[batch.target_pos].float()
                                     for i in hidden_layers)




