"""The teacher's view of a recipe: formatted prompts, cache keys, generation settings, and the cached rows as the student reads them."""

from __future__ import annotations

from distil.config.recipe import Recipe
from distil.data.examples import Example, format_prompt
from distil.errors import DistilError
from distil.files import sha256_text
from distil.generation import explain
from distil.generation.cache import TeacherCache, row_key
from distil.generation.decoding import stop_token_ids
from distil.models import sources, students


def generation_settings(recipe: Recipe) -> dict:
    """The settings that change what the teacher writes: part of every cache key."""
    g = recipe.generate
    settings = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "top_k": g.top_k,
                "max_prompt_tokens": recipe.data.max_prompt_tokens}
    if recipe.teacher.type == "openai":
        settings.update(top_k=recipe.teacher.top_logprobs, endpoint=recipe.teacher.endpoint)
    elif recipe.teacher.dtype != "float32":  # a lower precision writes other text (float32 keys stay as they were)
        settings["dtype"] = recipe.teacher.dtype
    if g.do_sample:
        settings.update(temperature=g.temperature, top_p=g.top_p, seed=g.seed)
    return settings


class TeacherPrompts:
    """The teacher's view of a recipe's examples: formatted prompts and their cache keys.

    `student_tokenizer` is the tokenizer the student reads: the teacher's, or with
    train.cross_tokenizer the student's own (`student_rows` then re-expresses cache rows in it).
    """

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        t = recipe.teacher
        if t.type == "openai":
            self.source = _remote_source(recipe)
        else:
            self.source = sources.resolve(t.model, t.gguf_file, field="teacher.model")
        self.tokenizer = sources.load_tokenizer(self.source.directory, t.trust_remote_code)
        if t.chat_template is not None:  # e.g. a base model whose tokenizer has no template
            self.tokenizer.chat_template = t.chat_template
        self.settings = generation_settings(recipe)
        self.student_tokenizer = self.tokenizer
        own = students.student_tokenizer_source(recipe.student) if recipe.train.cross_tokenizer else None
        if own is not None:
            self.student_tokenizer = sources.load_tokenizer(own[0])

    def prompts(self, examples: list[Example]) -> list[str]:
        """What the teacher is asked (with generate.explain, its instruction added to the system prompt)."""
        return [format_prompt(self.tokenizer, *explain.teacher_chat(ex.messages, self.recipe)) for ex in examples]

    def student_rows(self, rows: list[dict], examples: list[Example]) -> list[dict]:
        """The cached rows as the student sees them: with generate.explain, after the plain prompt, not the
        teacher's (the student learns to reason without being told to); with train.cross_tokenizer, in
        the student's vocabulary after its own plain prompt (`_aligned`)."""
        if self.student_tokenizer is not self.tokenizer:
            return self._aligned(rows, examples)
        if not self.recipe.generate.explain:
            return rows
        plain = [format_prompt(self.tokenizer, ex.messages, self.recipe.data.system_prompt) for ex in examples]
        return explain.with_prompts(rows, plain, self.tokenizer, self.recipe.data.max_prompt_tokens)

    def keys(self, examples: list[Example]) -> list[str]:
        return [row_key(self.source.identity, p, self.settings) for p in self.prompts(examples)]

    def load_model(self):
        return sources.load_causal_lm(self.source.directory, self.recipe.teacher.dtype, self.recipe.teacher.trust_remote_code)

    def _aligned(self, rows: list[dict], examples: list[Example]) -> list[dict]:
        """Cache rows re-expressed in the student's vocabulary (distil.models.alignment), after its own chat template."""
        from distil.models.alignment import StudentAligner

        aligner = StudentAligner(self.tokenizer, self.student_tokenizer, _teacher_stop_ids(self),
                                 self.student_tokenizer.eos_token_id)
        tok, limit = self.student_tokenizer, self.recipe.data.max_prompt_tokens
        out = []
        for ex, row in zip(examples, rows):
            prompt = format_prompt(tok, ex.messages, self.recipe.data.system_prompt)
            ids = tok(prompt, add_special_tokens=not tok.chat_template)["input_ids"][-limit:]
            out.append(aligner.convert(row, ids))
        self.alignment = aligner.stats.as_dict()
        return out


def _teacher_stop_ids(view: TeacherPrompts) -> set[int]:
    """The teacher's stop tokens, read from its config files (no weights loaded)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(view.source.directory)
    except OSError:
        generation = GenerationConfig()
    config = AutoConfig.from_pretrained(view.source.directory)
    return stop_token_ids(view.tokenizer, SimpleNamespace(config=config, generation_config=generation))


def is_cross_tokenizer(view) -> bool:
    """Whether the student reads another tokenizer than the view's teacher (train.cross_tokenizer)."""
    return view.student_tokenizer is not view.tokenizer


def _remote_source(recipe: Recipe) -> sources.ResolvedModel:
    """An endpoint teacher stands on a local model for its tokenizer (and weights, for student.from_teacher)."""
    t = recipe.teacher
    local = t.local_model or recipe.student.model
    if local is None:
        raise DistilError("a type: openai teacher needs teacher.local_model (a local model with the served model's "
                          "tokenizer) unless the student is given as student.model", field="teacher.local_model")
    base = sources.resolve(local, field="teacher.local_model" if t.local_model else "student.model")
    identity = sha256_text(f"openai:{t.model}:{base.identity}")
    return sources.ResolvedModel(base.directory, identity, t.model)


def check_student(view: TeacherPrompts) -> None:
    """The student can learn from the view's teacher in the way its recipe asks (see students.check_pairing).

    With several teachers, from the first one (whose model builds the student and teaches online).
    """
    recipe = view.recipe
    local = recipe.teacher.type == "local"
    cross = recipe.train.cross_tokenizer
    if cross and not isinstance(view, TeacherPrompts):
        raise DistilError("train.cross_tokenizer takes one teacher (`teacher:`), not `teachers:`",
                          field="train.cross_tokenizer")
    if cross and not local:
        raise DistilError("train.cross_tokenizer needs a local teacher (an endpoint's tokens are mapped to the "
                          "student's by their bytes instead, docs/teachers.md)", field="train.cross_tokenizer")
    if cross and (recipe.train.mode == "on_policy" or recipe.train.hidden is not None):
        raise DistilError("train.cross_tokenizer works on cached teacher text (mode: supervised or sequence, "
                          "no train.hidden)", field="train.hidden" if recipe.train.hidden else "train.mode")
    loss = recipe.train.loss
    if cross in ("offsets", "both") and "reverse_kl" in ([loss] if isinstance(loss, str) else loss):
        raise DistilError("reverse_kl is infinite on cross-tokenizer targets (student ids the teacher gives no "
                          "mass); use forward_kl, jsd, skew_kl, skew_reverse_kl or tvd", field="train.loss")
    if not local and (recipe.train.mode == "on_policy" or recipe.train.hidden is not None):
        raise DistilError("needs a local teacher (an endpoint gives neither scores for the student's own text "
                          "nor hidden states)", field="train.hidden" if recipe.train.hidden else "train.mode")
    # An endpoint teacher's size is unknown: its local stand-in only lends the tokenizer.
    students.check_pairing(recipe.student, view.source.directory, view.tokenizer, compare_size=local,
                         cross_tokenizer=cross)


def cached_rows(recipe: Recipe, keys: list[str], split: str) -> list[dict]:
    rows = TeacherCache(recipe.cache_dir).read(set(keys))
    missing = sum(k not in rows for k in keys)
    if missing:
        raise DistilError(f"{missing} of {len(keys)} {split} rows are not in the teacher cache; run `distil generate` first",
                          file=str(recipe.cache_dir))
    return [rows[k] for k in keys]


