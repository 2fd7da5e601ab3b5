"""One evaluator for every model folder, TRL's or distil's: distil's own metrics on the held-out split.

Per model, on the teacher's cached held-out answers (the same rows for every model):
top-1 agreement with the teacher, KL(teacher || model) over the cached top-k + tail buckets and
perplexity (`distil.evaluation.metrics.score_on_teacher_text`, what `distil eval` reports); also
KL over the full vocabulary, against the teacher's live logits at the same positions (TRL's
GKD trains on that one, so it is reported beside distil's); and on greedy answers, distinct
answers and token F1 against the references (`distil.evaluation.scoring`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distil.config.loading import load_recipe
from distil.data.batches import collate
from distil.data.splits import load_data
from distil.evaluation.metrics import score_on_teacher_text, summarize
from distil.evaluation.scoring import answer_metrics, generate_answers
from distil.generation.decoding import stop_token_ids
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources
from distil.training.losses import forward_kl


class Evaluator:
    """Holds the held-out rows and the teacher's full-vocabulary log-probs at their positions."""

    def __init__(self, work: Path, batch_size: int = 16):
        recipe = load_recipe(work / "recipe.yaml")
        _, self.examples = load_data(recipe)
        self.view = TeacherPrompts(recipe)
        self.rows = cached_rows(recipe, self.view.keys(self.examples), "held-out")
        self.pad_id = self.view.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_new_tokens = recipe.generate.max_new_tokens
        teacher = self.view.load_model()
        self.stop_ids = stop_token_ids(self.view.tokenizer, teacher)
        self.teacher_logits = self._target_logits(teacher)  # float32: ~0.2 MB per held-out token

    @torch.inference_mode()
    def _target_logits(self, model) -> list[torch.Tensor]:
        """Per batch of held-out rows, the model's logits at the positions that predict the teacher's tokens."""
        out = []
        for start in range(0, len(self.rows), self.batch_size):
            batch = collate(self.rows[start:start + self.batch_size], self.pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            out.append(logits.flatten(0, 1)[batch.target_pos].float())
        return out

    def full_vocab_kl(self, model) -> float:
        """Mean per-token KL(teacher || model) over all of the vocabulary."""
        total, n = 0.0, 0
        for teacher, student in zip(self.teacher_logits, self._target_logits(model)):
            total += forward_kl(student, teacher, reduction="sum").item()
            n += student.shape[0]
        return total / n

    def score(self, model_dir: Path) -> dict:
        model = sources.load_causal_lm(Path(model_dir), device="cpu")
        scores = summarize(score_on_teacher_text(model, self.rows, pad_id=self.pad_id, batch_size=self.batch_size))
        answers = generate_answers(model, self.view.tokenizer, self.rows, max_new_tokens=self.max_new_tokens,
                                   batch_size=self.batch_size, stop_ids=self.stop_ids)
        return {**scores, "full_vocab_kl": self.full_vocab_kl(model), "token_f1": None,
                **answer_metrics(answers, [ex.reference for ex in self.examples])}
