"""Teacher work done during training: on-policy rollouts scored by the teacher, and hidden states.

Used by `train.mode: on_policy` (GKD: the student writes a continuation, a local teacher
scores every token of it) and `train.hidden` (matching the teacher's hidden states). Both
need a local teacher model next to the student; the cached targets need none.
"""

from __future__ import annotations

import torch

from distil.teachers.local import generate_batch, topk_with_tail


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
        batch: a `distil.training.Batch`.
        top_k: when set, replace the batch's soft targets by the teacher's top-k log-probs and
            exact tail mass at the target positions (as `distil generate` would have stored them).
        hidden_layers: teacher hidden_states indices to keep at the target positions.
    """
    out = teacher.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             output_hidden_states=bool(hidden_layers))
    if top_k is not None:
        batch.topk_ids, batch.topk_logprobs, batch.tail_logprob = topk_with_tail(
            _target_log_probs(teacher, out.last_hidden_state, batch), top_k)
    if hidden_layers:
        batch.teacher_hidden = tuple(out.hidden_states[i].flatten(0, 1)[batch.target_pos].float()
                                     for i in hidden_layers)


def _target_log_probs(model, last_hidden: torch.Tensor, batch) -> torch.Tensor:
    hidden = last_hidden.flatten(0, 1)[batch.target_pos]
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)


@torch.no_grad()
def target_log_probs(model, batch) -> torch.Tensor:
    """The model's full next-token log-probs (float32) at the batch's target positions: (targets, vocab).

    How a teacher scores text it did not write (an ensemble member scoring the first teacher's answer).
    """
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return _target_log_probs(model, out.last_hidden_state, batch)
