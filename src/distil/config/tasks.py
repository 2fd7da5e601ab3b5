"""Recipe models for `task: classification` and `task: embedding`.

`distil.config.loading.load_recipe` picks the model from the recipe's `task` key, so these share its
YAML loading, overrides and error messages (file:line, field, closest valid key).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from distil.config.recipe import Recipe, Section


class TaskExport(Section):
    """Artifacts written from <out>/student by `distil export` / at the end of `distil run`, each
    loaded back in its runtime and scored with the task's metrics into the report."""
    formats: list[Literal["hf", "onnx", "int8"]] = Field(default_factory=list,
                                                         description="formats to export (none by default)")


class _TaskRecipe(Section):
    export: TaskExport = TaskExport()
    out: str = "runs/task"
    cache: str | None = Field(None, description="teacher cache directory (default: $DISTIL_HOME/teacher-cache)")
    source: str | None = Field(None, exclude=True)

    resolve = Recipe.resolve
    out_dir = Recipe.out_dir
    cache_dir = Recipe.cache_dir


# ----------------------------------------------------------------------------- classification

class FitConfig(Section):
    """How a classifier is trained (the teacher on hard labels, the student on soft + hard labels)."""
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(128, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches of batch_size accumulated per step (per process)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(50, ge=0, description="linear warmup steps (at most half the steps), then cosine decay to 0")
    max_grad_norm: float | None = Field(5.0, gt=0)
    seed: int = 0


class ClassifierTeacher(Section):
    model: str = Field(description="factory:NAME (see distil.tasks.factory), an HF classifier folder, or pypi:")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    train: FitConfig | None = Field(None, description="train the teacher on hard labels first (needed for factory:)")


class ClassifierStudent(Section):
    model: str = Field(description="factory:NAME or an HF classifier folder")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    config: dict[str, Any] | None = Field(None, description="HF config overrides: build from config, random init")


class ClassificationData(Section):
    train: str = Field(description=".npz (x, y), *-images-idx3-ubyte[.gz] (labels file beside it), or .jsonl")
    eval: str
    text_field: str = "text"
    label_field: str = "label"
    classes: list[str] | None = Field(None, description="class names, in label order")
    max_train: int | None = Field(None, gt=0)
    max_eval: int | None = Field(None, gt=0)
    max_length: int = Field(128, gt=0, description="tokens per text (text classification)")


class ClassificationTrain(FitConfig):
    temperature: float = Field(4.0, gt=0, description="softens teacher and student probabilities in the KL")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of hard-label cross-entropy; 1 - alpha goes to T^2 * KL")
    examples: int | None = Field(None, gt=0, description="train the student on the first N training examples only "
                                                          "(the teacher still learns from all of them)")
    checkpoint_every: int = Field(200, ge=0, description="save model, optimizer, scheduler and RNG every N steps "
                                                           "for `--resume` (0: never); not part of the fingerprint")


class ClassificationEval(Section):
    baseline: bool = Field(True, description="also train the student on hard labels alone, for comparison")
    batch_size: int = Field(256, gt=0)
    calibration_bins: int = Field(15, gt=0)


class ClassificationRecipe(_TaskRecipe):
    task: Literal["classification"]
    teacher: ClassifierTeacher
    student: ClassifierStudent
    data: ClassificationData
    train: ClassificationTrain = ClassificationTrain()
    eval: ClassificationEval = ClassificationEval()


# ----------------------------------------------------------------------------- embedding

class EmbeddingStudent(Section):
    """A smaller BERT-style encoder; weights come from the teacher where shapes allow."""
    layers: list[int] = Field(description="teacher layers to start from, in order", min_length=1)
    hidden_size: int | None = Field(None, gt=0, description="narrower width: teacher weights projected onto "
                                                              "the top principal directions of its embeddings")
    intermediate_size: int | None = Field(None, gt=0, description="keep this many MLP neurons per layer")
    num_attention_heads: int | None = Field(None, gt=0)


class EmbeddingData(Section):
    train: str = Field(description="JSONL, CSV or Parquet; every text_fields value is a training sentence")
    eval: str
    text_fields: list[str] = Field(["text"], min_length=1)
    query_field: str | None = Field(None, description="eval: retrieval query column (its document: document_field)")
    document_field: str | None = None
    pair_fields: list[str] | None = Field(None, min_length=2, max_length=2, description="eval: a scored pair's two columns")
    score_field: str | None = Field(None, description="eval: the pair's human score (Spearman against it)")
    label_field: str | None = Field(None, description="eval: class column for kNN accuracy "
                                                                 "(of query_field's text, else text_fields[0]'s)")
    max_train: int | None = Field(None, gt=0)
    max_eval: int | None = Field(None, gt=0)
    max_length: int = Field(128, gt=0)


class EmbeddingTrain(Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0, description="sentences per micro-batch (also the in-batch similarity KL's batch)")
    grad_accum: int = Field(1, gt=0, description="micro-batches of batch_size accumulated per step (per process)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int = Field(50, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mse: float = Field(1.0, ge=0, description="weight of MSE between student and teacher embeddings")
    cosine: float = Field(1.0, ge=0, description="weight of 1 - cosine(student, teacher)")
    similarity_kl: float = Field(1.0, ge=0, description="weight of KL between in-batch similarity distributions")
    temperature: float = Field(0.05, gt=0, description="scale of cosine similarities in the similarity KL")
    seed: int = 0
    checkpoint_every: int = Field(200, ge=0, description="save model, optimizer, scheduler and RNG every N steps "
                                                           "for `--resume` (0: never); not part of the fingerprint")


class EmbeddingEval(Section):
    batch_size: int = Field(64, gt=0)
    recall_at: list[int] = Field([1, 5, 10], min_length=1)
    knn: int = Field(5, gt=0)
    speed_sentences: int = Field(512, gt=0, description="sentences encoded to time sentences/s")


class EmbeddingTeacher(Section):
    model: str = Field(description="a sentence-transformers folder or pypi:WHEEL==VERSION holding one")


class EmbeddingRecipe(_TaskRecipe):
    task: Literal["embedding"]
    teacher: EmbeddingTeacher
    student: EmbeddingStudent
    data: EmbeddingData
    train: EmbeddingTrain = EmbeddingTrain()
    eval: EmbeddingEval = EmbeddingEval()


TASK_RECIPES = {"classification": ClassificationRecipe, "embedding": EmbeddingRecipe}
