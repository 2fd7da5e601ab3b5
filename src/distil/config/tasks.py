"""Recipe models for `task: classification` and `task: embedding`.

`distil.config.loading.load_recipe` picks the model from the recipe's `task` key, so these share its
YAML loading, overrides and error messages (file:line, field, closest valid key).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distil.config.recipe import ADAM_BETAS_HELP, OUT_HELP, AdamBetas, GatedEval, Recipe, Section


class TaskExport(Section):
    """Artifacts written from <out>/student by `distil export` / at the end of `distil run`, each
    loaded back in its runtime and scored with the task's metrics into the report."""
    formats: list[Literal["hf", "onnx", "int8"]] = Field(default_factory=list,
                                                         description="formats to export (none by default)")


class _TaskRecipe(Section):
    export: TaskExport = Field(TaskExport(), description="artifacts exported and scored at the end of "
                                                         "`distil run`")
    out: str = Field("runs/task", description=OUT_HELP)
    cache: str | None = Field(None, description="teacher cache directory (default: $DISTIL_HOME/teacher-cache)")
    source: str | None = Field(None, exclude=True, description="not a YAML key: the recipe file, so relative "
                                                               "data paths resolve against its folder")

    resolve = Recipe.resolve
    out_dir = Recipe.out_dir
    cache_dir = Recipe.cache_dir

    @field_validator("cache")
    @classmethod
    def _local_cache(cls, value):
        if value is not None and "://" in value:
            raise ValueError("classification and embedding recipes keep their cache in a local folder (a URL "
                             "cache is for task: causal_lm)")
        return value


# ----------------------------------------------------------------------------- classification

class ImageViews(Section):
    """Random views of each training image, drawn anew for every micro-batch (from the seed, the step and the
    micro-batch, so a resumed run draws the same)."""
    shift: int = Field(2, ge=0, description="translate by up to this many pixels each way (zero fill)")
    flip: bool = Field(True, description="mirror left-right with probability 0.5")


class FitConfig(Section):
    """How a classifier is trained (the teacher on hard labels, the student on soft + hard labels)."""
    epochs: int = Field(5, gt=0, description="passes over the training set")
    batch_size: int = Field(128, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches of batch_size accumulated per step (per process)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    adam_betas: AdamBetas = Field((0.9, 0.999), description=ADAM_BETAS_HELP)
    warmup: int = Field(50, ge=0, description="linear warmup steps (at most half the steps), then cosine decay to 0")
    max_grad_norm: float | None = Field(5.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    seed: int = Field(0, description="random seed: initialisation and batch order")
    augment: ImageViews | None = Field(None, description="train on random views of the images (images only). "
                                       "For the student, the teacher scores each view it sees, online, instead "
                                       "of its cached logits of the plain images (consistent teaching)")


class ClassifierTeacher(Section):
    model: str = Field(description="factory:NAME (see distil.tasks.factory), an HF classifier folder, or pypi:")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    train: FitConfig | None = Field(None, description="train the teacher on hard labels first (needed for factory:)")


class ClassifierStudent(Section):
    model: str = Field(description="factory:NAME or an HF classifier folder")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    config: dict[str, Any] | None = Field(None, description="HF config overrides: build from config, random init")


class ClassificationData(Section):
    train: str = Field(description=".npz (x, y), *-images-idx3-ubyte[.gz] (labels file beside it), or .jsonl; "
                                   "a relative path resolves against "
                                  "the recipe file's folder, not the working directory")
    eval: str = Field(description="held-out examples, in the same formats; a relative path resolves against "
                                  "the recipe file's folder, not the working directory")
    text_field: str = Field("text", description=".jsonl: the column holding the text")
    label_field: str = Field("label", description=".jsonl: the column holding the label (an index or a "
                                                  "class name)")
    classes: list[str] | None = Field(None, description="class names, in label order")
    max_train: int | None = Field(None, gt=0, description="use at most this many training examples")
    max_eval: int | None = Field(None, gt=0, description="use at most this many held-out examples")
    max_length: int = Field(128, gt=0, description="tokens per text (text classification)")


class ClassificationTrain(FitConfig):
    temperature: float = Field(4.0, gt=0, description="softens teacher and student probabilities in the KL")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of hard-label cross-entropy; 1 - alpha goes to T^2 * KL")
    examples: int | None = Field(None, gt=0, description="train the student on the first N training examples only "
                                                          "(the teacher still learns from all of them)")
    checkpoint_every: int = Field(200, ge=0, description="save model, optimizer, scheduler and RNG every N steps "
                                                           "for `--resume` (0: never); not part of the fingerprint")
    baseline: bool = Field(True, description="also train the student on hard labels alone, for comparison")


class ClassificationEval(GatedEval):
    batch_size: int = Field(256, gt=0, description="examples scored together")
    calibration_bins: int = Field(15, gt=0, description="confidence bins of the expected calibration error")


class ClassificationRecipe(_TaskRecipe):
    """A recipe for `task: classification`: distil an image or text classifier on soft labels."""
    task: Literal["classification"] = Field(description="must be given: it picks this schema")
    teacher: ClassifierTeacher = Field(description="the classifier to distil from")
    student: ClassifierStudent = Field(description="the smaller classifier")
    data: ClassificationData = Field(description="the labelled examples")
    train: ClassificationTrain = Field(ClassificationTrain(), description="how the student is trained")
    eval: ClassificationEval = Field(ClassificationEval(), description="how the models are scored")


# ----------------------------------------------------------------------------- embedding

class EmbeddingStudent(Section):
    """A smaller encoder made from the teacher: some of its layers (a transformer), or `static`."""
    layers: list[int] | None = Field(None, min_length=1, description="teacher layers to start from, in order "
                                                                      "(a transformer student; not with static)")
    static: bool = Field(False, description="a static token-embedding student (model2vec's method): the "
                                            "teacher's output for each vocabulary token alone, reduced by PCA to "
                                            "hidden_size dimensions and weighted by token frequency; a sentence "
                                            "is the mean of its tokens' vectors; then trained on the teacher's "
                                            "sentence embeddings like any student")
    hidden_size: int | None = Field(None, gt=0, description="narrower width: teacher weights projected onto "
                                                              "the top principal directions of its embeddings "
                                                              "(static: the vectors' dimensions, default 256)")
    intermediate_size: int | None = Field(None, gt=0, description="keep this many MLP neurons per layer")
    num_attention_heads: int | None = Field(None, gt=0, description="fewer attention heads (default: the "
                                                                    "teacher's)")
    sif_coefficient: float | None = Field(1e-4, gt=0, lt=1, description="static: a token's vector is scaled by "
                                          "a / (a + p), p its frequency in the training sentences (add-one "
                                          "smoothed); null: no weighting")

    @model_validator(mode="after")
    def _one_kind(self):
        if self.static and (self.layers or self.intermediate_size or self.num_attention_heads):
            raise ValueError("a static student has no layers, MLP or attention heads: drop student.layers, "
                             "intermediate_size and num_attention_heads, or student.static")
        if not self.static and not self.layers:
            raise ValueError("student.layers is required (the teacher layers to keep), unless student.static: true")
        return self


class EmbeddingData(Section):
    train: str = Field(description="JSONL, CSV or Parquet; every text_fields value is a training sentence; "
                                   "a relative path resolves against "
                                  "the recipe file's folder, not the working directory")
    eval: str = Field(description="held-out rows (JSONL, CSV or Parquet); a relative path resolves against "
                                  "the recipe file's folder, not the working directory")
    text_fields: list[str] = Field(["text"], min_length=1, description="columns whose texts are training sentences")
    query_field: str | None = Field(None, description="eval: retrieval query column (its document: document_field)")
    document_field: str | None = Field(None, description="eval: retrieval document column (the query's match)")
    pair_fields: list[str] | None = Field(None, min_length=2, max_length=2, description="eval: a scored pair's two columns")
    score_field: str | None = Field(None, description="eval: the pair's human score (Spearman against it)")
    label_field: str | None = Field(None, description="eval: class column for kNN accuracy "
                                                                 "(of query_field's text, else text_fields[0]'s)")
    max_train: int | None = Field(None, gt=0, description="use at most this many training rows")
    max_eval: int | None = Field(None, gt=0, description="use at most this many held-out rows")
    max_length: int = Field(128, gt=0, description="tokens per sentence")


class EmbeddingTrain(Section):
    epochs: int = Field(10, gt=0, description="passes over the training sentences")
    batch_size: int = Field(64, gt=0, description="sentences per micro-batch (also the in-batch similarity KL's batch)")
    grad_accum: int = Field(1, gt=0, description="micro-batches of batch_size accumulated per step (per process)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay")
    adam_betas: AdamBetas = Field((0.9, 0.999), description=ADAM_BETAS_HELP)
    warmup: int = Field(50, ge=0, description="linear warmup steps (at most half the steps), then cosine decay to 0")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    mse: float = Field(1.0, ge=0, description="weight of MSE between student and teacher embeddings")
    cosine: float = Field(1.0, ge=0, description="weight of 1 - cosine(student, teacher)")
    similarity_kl: float = Field(1.0, ge=0, description="weight of KL between in-batch similarity distributions")
    temperature: float = Field(0.05, gt=0, description="scale of cosine similarities in the similarity KL")
    seed: int = Field(0, description="random seed: initialisation and batch order")
    checkpoint_every: int = Field(200, ge=0, description="save model, optimizer, scheduler and RNG every N steps "
                                                           "for `--resume` (0: never); not part of the fingerprint")


class EmbeddingEval(GatedEval):
    batch_size: int = Field(64, gt=0, description="sentences encoded together")
    recall_at: list[int] = Field([1, 5, 10], min_length=1, description="retrieval: the k of each recall@k reported")
    knn: int = Field(5, gt=0, description="neighbours voting in kNN classification accuracy")
    speed_sentences: int = Field(512, gt=0, description="sentences encoded to time sentences/s")


class EmbeddingTeacher(Section):
    model: str = Field(description="a sentence-transformers folder or pypi:WHEEL==VERSION holding one")


class EmbeddingRecipe(_TaskRecipe):
    """A recipe for `task: embedding`: distil a sentence-embedding encoder."""
    task: Literal["embedding"] = Field(description="must be given: it picks this schema")
    teacher: EmbeddingTeacher = Field(description="the sentence encoder to distil from")
    student: EmbeddingStudent = Field(description="the smaller encoder, built from the teacher")
    data: EmbeddingData = Field(description="the sentences")
    train: EmbeddingTrain = Field(EmbeddingTrain(), description="how the student is trained")
    eval: EmbeddingEval = Field(EmbeddingEval(), description="how the models are scored")

    @model_validator(mode="after")
    def _static_exports(self):
        other = [f for f in self.export.formats if f != "hf"]
        if self.student.static and other:
            raise ValueError(f"a static student exports as hf only (a sentence-transformers folder, already a "
                             f"lookup table); drop {other} from export.formats")
        return self


TASK_RECIPES = {"classification": ClassificationRecipe, "embedding": EmbeddingRecipe}
