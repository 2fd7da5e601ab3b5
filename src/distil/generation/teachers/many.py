"""Several teachers at once (`teachers:` in a recipe): routed by a data field, or an ensemble.

route: each example goes to the first teacher whose `when` matches its `category` /
`language` (the last teacher may have no `when`: it takes the rest). Each teacher answers its
share with the single-teacher code (`pipeline.generate_rows`) under the same cache keys a
recipe with only that teacher would use, so rows are shared with such runs. Rows of teachers
keeping different numbers of alternatives (a local top-32, an endpoint's top-20) are cut to
the narrowest when read, the rest of their mass joining the tail bucket.

ensemble (local teachers): the first teacher writes the text (its own rows, cached as usual);
then every teacher scores that text with one teacher-forced forward pass, and the per-token
distributions are averaged in probability space over the whole vocabulary,
p(v) = sum_i w_i p_i(v), before the top-k and the exact tail mass are kept. Those rows go to
the same cache under a key that hashes every member (and its dtype and weight).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time

import torch

from distil.data.batches import collate
from distil.data.examples import Example
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.files import sha256_text
from distil.generation.cache import TeacherCache, row_key
from distil.generation.decoding import target_log_probs, topk_with_tail
from distil.generation.storage import open_store
from distil.generation.teachers.one import generate_rows
from distil.generation.view import TeacherPrompts
from distil.progress import progress_bar

SCORE_ROWS = 16  # rows scored per forward pass: bounds the (tokens x vocabulary) log-prob tensors


def mix_log_probs(log_probs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log(sum_i w_i exp(log_probs[i])): the mixture of several distributions, in log space.

    Args:
        log_probs: one (..., V) tensor of normalised log-probs per teacher.
        weights: one share per teacher, summing to 1.
    Returns:
        The mixture's log-probs, (..., V); computed with logsumexp, so no probability underflows.

    Example:
        >>> mix_log_probs([a.log_softmax(-1), b.log_softmax(-1)], [0.5, 0.5])
    """
    stacked = torch.stack(log_probs)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).log()
    return torch.logsumexp(stacked + w.view(-1, *([1] * (stacked.dim() - 1))), dim=0)


class Teachers:
    """The teachers of a `teachers:` recipe, with the methods of `distil.generation.view.TeacherPrompts`.

    `recipe`, `source`, `tokenizer`, `student_tokenizer` and `load_model` are the first teacher's: it builds the student
    (student.from_teacher), teaches online (train.mode: on_policy, train.hidden) and stands for
    the teachers in the report's size and speed rows.
    """

    def __init__(self, recipe):
        self.full, self.mode = recipe, recipe.teachers_mode
        self.members, self.views = [], []
        for i, member in enumerate(recipe.teachers):
            single = recipe.member(i)
            try:
                view = TeacherPrompts(single)
            except DistilError as e:  # name the member's key, not the single-teacher one
                field = f"teachers.{i}.{e.field.removeprefix('teacher.')}" if e.field and e.field.startswith(
                    "teacher.") else e.field
                raise DistilError(e.message, file=e.file, line=e.line, row=e.row, field=field) from None
            view.source = dataclasses.replace(view.source, name=member.name)  # what rows record as their teacher
            self.members.append(single)
            self.views.append(view)
        self.recipe, self.tokenizer = self.members[0], self.views[0].tokenizer
        self.student_tokenizer = self.tokenizer  # several teachers and train.cross_tokenizer are refused together
        # The report's "teacher" column: every teacher's rows, the first one's model for size and speed.
        names = ", ".join(m.name for m in recipe.teachers)
        self.source = dataclasses.replace(self.views[0].source,
                                          name=f"{self.mode}: {names} (size, speed: {recipe.teachers[0].name})")
        vocab = self.tokenizer.get_vocab()
        for i, view in enumerate(self.views[1:], 1):
            if view.tokenizer.get_vocab() != vocab:
                key = "local_model" if recipe.teachers[i].type == "openai" else "model"
                raise DistilError(f"this teacher's tokenizer differs from the first teacher's ({len(view.tokenizer):,} vs "
                                  f"{len(self.tokenizer):,} tokens); several teachers must share one tokenizer",
                                  field=f"teachers.{i}.{key}")
        # Alternatives per token every row is cut to: what the stingiest teacher keeps (an endpoint keeps
        # top_logprobs, at least 1: a text-only row is one-hot).
        self.width = min(max(m.top_logprobs, 1) if m.type == "openai" else recipe.generate.top_k
                         for m in recipe.teachers)
        shares = [m.weight if m.weight is not None else 1.0 for m in recipe.teachers]
        self.weights = [w / sum(shares) for w in shares]
        self.name = "+".join(m.name for m in recipe.teachers)
        # An ensemble row depends on every member, its precision and its share.
        blob = json.dumps([[v.source.identity, m.teacher.dtype, w] for v, m, w in zip(self.views, self.members, self.weights)])
        self.identity = sha256_text(f"ensemble:{blob}")

    # --- which teacher answers which example ---------------------------------------------------

    def route(self, examples: list[Example]) -> list[int]:
        """Per example, the index of the teacher that writes its answer (always 0 in an ensemble)."""
        if self.mode == "ensemble":
            return [0] * len(examples)
        out = []
        for ex in examples:
            for i, member in enumerate(self.full.teachers):
                if member.when is None or all(_matches(getattr(ex, f), want) for f, want in member.when.items()):
                    out.append(i)
                    break
            else:
                labels = ", ".join(f"{f}={getattr(ex, f)!r}" for f in sorted({f for m in self.full.teachers
                                                                              for f in (m.when or {})}))
                raise DistilError(f"no teacher's `when` matches this row ({labels}); give the last teacher no `when` "
                                  "to answer every row the others do not take", field="teachers", **ex.location)
        return out

    def _split(self, examples: list[Example], per_view) -> list:
        """`per_view(view, its examples)` for each teacher's share, reassembled in example order."""
        routes, out = self.route(examples), [None] * len(examples)
        for i, view in enumerate(self.views):
            idx = [j for j, r in enumerate(routes) if r == i]
            for j, value in zip(idx, per_view(view, [examples[j] for j in idx]) if idx else []):
                out[j] = value
        return out

    # --- the TeacherPrompts methods ------------------------------------------------------------

    def prompts(self, examples: list[Example]) -> list[str]:
        """The prompt each example's writing teacher is asked."""
        return self._split(examples, lambda view, exs: view.prompts(exs))

    def keys(self, examples: list[Example]) -> list[str]:
        """Cache keys of the rows the student learns from: the routed teacher's own key, or the ensemble's."""
        if self.mode == "route":
            return self._split(examples, lambda view, exs: view.keys(exs))
        return [row_key(self.identity, p, self.views[0].settings) for p in self.views[0].prompts(examples)]

    def student_rows(self, rows: list[dict], examples: list[Example]) -> list[dict]:
        """Cached rows as the student sees them: one top-k width for all, then as the single-teacher view
        would (generate.explain's plain prompt).

        Teachers may keep different numbers of alternatives (a local top-32, an endpoint's top-20): wider
        rows keep their `width` most likely entries and add the rest to the tail, so every row keeps its
        mass and claims nothing its teacher did not say.
        """
        return self.views[0].student_rows([narrow_row(r, self.width) for r in rows], examples)

    def load_model(self):
        return self.views[0].load_model()

    # --- the report ---------------------------------------------------------------------------

    def report(self, eval_ex: list[Example], eval_rows: list[dict], student_scores: list[dict]) -> dict:
        """Per teacher: rows it wrote (train, held-out) and the student's top-1 agreement on its held-out rows;
        plus the teacher each held-out cache row records."""
        train_ex, _ = load_data(self.full)
        train_routes, eval_routes = collections.Counter(self.route(train_ex)), self.route(eval_ex)
        held = collections.Counter(eval_routes)
        entries = []
        for i, (member, view) in enumerate(zip(self.full.teachers, self.views)):
            mine = [s for s, r in zip(student_scores, eval_routes) if r == i]
            entry = {"name": member.name, "type": member.type, "model": member.model, "dtype": member.dtype}
            if self.mode == "route":
                entry.update(when=member.when, train_rows=train_routes[i], held_out_rows=held[i],
                             student_top1_agreement=(sum(s["agree"] for s in mine) / sum(s["n"] for s in mine)
                                                     if mine and sum(s["n"] for s in mine) else None))
            else:
                entry.update(role="writes the text and scores it" if i == 0 else "scores the first teacher's text",
                             weight=self.weights[i], train_rows=len(train_ex), held_out_rows=len(eval_ex))
            entries.append(entry)
        return {"mode": self.mode, "teachers": entries,
                "held_out_rows_by_recorded_teacher": dict(collections.Counter(r["teacher"] for r in eval_rows))}


def narrow_row(row: dict, k: int) -> dict:
    """`row` with only its k most likely alternatives per token; the mass of the others joins the tail."""
    if not row["topk_ids"] or len(row["topk_ids"][0]) <= k:
        return row
    ids = torch.tensor(row["topk_ids"])
    lps = torch.tensor(row["topk_logprobs"], dtype=torch.float64)
    order = lps.argsort(dim=-1, descending=True, stable=True)
    ids, lps = ids.gather(-1, order), lps.gather(-1, order)
    tail = torch.logsumexp(torch.cat([lps[:, k:], torch.tensor(row["tail_logprob"], dtype=torch.float64)[:, None]],
                                     dim=-1), dim=-1)
    return {**row, "topk_ids": ids[:, :k].tolist(), "topk_logprobs": lps[:, :k].float().tolist(),
            "tail_logprob": tail.float().tolist()}


def _matches(value: str | None, want: str | list[str]) -> bool:
    return value is not None and (value in want if isinstance(want, list) else value == want)


# --- the generate stage ------------------------------------------------------------------------


def generate_many(recipe, examples: list[Example]) -> dict:
    """The generate stage for `teachers:`: each teacher answers its share (route), or the first teacher
    writes and all score (ensemble). Returns the single-teacher summary per teacher, and totals."""
    teachers = Teachers(recipe)
    open_store(recipe.cache_dir).check_writable("cache")
    routes = teachers.route(examples)
    summary = {"mode": teachers.mode, "rows": 0, "cached_before": 0, "generated": 0, "tokens": 0, "seconds": 0.0,
               "cache": str(recipe.cache_dir), "teachers": {}}
    for i, (member, view) in enumerate(zip(teachers.members, teachers.views)):
        share = [ex for ex, r in zip(examples, routes) if r == i]
        if share:
            part = generate_rows(member, view, share)
        elif teachers.mode == "ensemble":
            part = {"rows": 0, "scores_every_row": True}
        else:
            part = {"rows": 0}
        summary["teachers"][view.source.name] = part
        for k in ("rows", "cached_before", "generated", "tokens", "seconds"):
            summary[k] = round(summary[k] + part.get(k, 0), 2)
    if teachers.mode == "ensemble":
        summary["ensemble"] = _score_ensemble(recipe, teachers, examples)
    return summary


def _score_ensemble(recipe, teachers: Teachers, examples: list[Example]) -> dict:
    """Every member scores the first teacher's cached text; the averaged distributions become cache rows."""
    cache = TeacherCache(recipe.cache_dir, compact=recipe.generate.cache_format == "compact")
    keys = teachers.keys(examples)
    writer_keys = teachers.views[0].keys(examples)
    done = cache.keys()
    todo = {k: w for k, w in zip(keys, writer_keys) if k not in done}
    result = {"rows": len(set(keys)), "cached_before": len(set(keys)) - len(todo), "scored": 0, "seconds": 0.0}
    if not todo:
        return result
    written = cache.read(set(todo.values()))
    items = [(k, written[w]) for k, w in todo.items()]
    models = []
    for i, view in enumerate(teachers.views):
        model = view.load_model()
        if i and model.config.vocab_size != models[0].config.vocab_size:
            raise DistilError(f"this teacher scores over {model.config.vocab_size:,} ids, the first over "
                              f"{models[0].config.vocab_size:,}", field=f"teachers.{i}.model")
        models.append(model)
    k, pad_id = recipe.generate.top_k, teachers.tokenizer.pad_token_id
    t0 = time.time()
    with progress_bar() as bar:
        task = bar.add_task("ensemble", total=len(items), status=f"{len(models)} teachers score")
        for start in range(0, len(items), SCORE_ROWS):
            chunk = items[start:start + SCORE_ROWS]
            batch = collate([row for _, row in chunk], pad_id)
            mixed = mix_log_probs([target_log_probs(m, batch.to(m.device)).cpu() for m in models], teachers.weights)
            ids, values, tail = topk_with_tail(mixed, k)
            chosen = mixed.gather(-1, batch.targets[:, None]).squeeze(-1)
            rows, offset = [], 0
            for key, row in chunk:
                sl = slice(offset, offset + len(row["token_ids"]))
                offset = sl.stop
                rows.append({**row, "key": key, "teacher": teachers.name, "token_logprobs": chosen[sl].tolist(),
                             "topk_ids": ids[sl].tolist(), "topk_logprobs": values[sl].tolist(),
                             "tail_logprob": tail[sl].tolist()})
            cache.write_shard(rows)
            result["scored"] += len(rows)
            bar.update(task, advance=len(rows))
    result["seconds"] = round(time.time() - t0, 2)
    return result
