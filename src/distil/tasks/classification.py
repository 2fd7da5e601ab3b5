"""Classification distillation: a teacher's class probabilities teach a small classifier.

Stages, as for causal LMs:
  generate  train the teacher on hard labels first when the recipe says so (cached by content),
            then store its logits for every train and held-out example in the teacher cache;
  train     the student on alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student) and,
            with train.baseline, the same student on hard labels alone;
  evaluate  accuracy, macro-F1, expected calibration error, agreement with the teacher,
            parameters and examples/s for each model; report.json and report.html (confusion matrices).

Data: `.npz` with arrays x (features or images) and y (int labels); `*-images-idx3-ubyte[.gz]`
with its `*-labels-idx1-ubyte[.gz]` beside it (MNIST / Fashion-MNIST); or JSONL / CSV / Parquet
rows with a text and a label column (text classification; the teacher's tokenizer is used).
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distil import files
from distil.config.tasks import ClassificationRecipe, ImageViews
from distil.data.examples import read_table
from distil.errors import DistilError
from distil.evaluation.metrics import metrics_block, paired_bootstrap
from distil.evaluation.report import write_report
from distil.models import sources
from distil.tasks import common, factory
from distil.tasks.losses import soft_label_kd


@dataclass
class Split:
    x: torch.Tensor | dict[str, torch.Tensor]  # images / features, or tokenized text
    y: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor):
        return self.x[idx] if isinstance(self.x, torch.Tensor) else {k: v[idx] for k, v in self.x.items()}

    def digest(self) -> str:
        xs = [self.x] if isinstance(self.x, torch.Tensor) else [self.x[k] for k in sorted(self.x)]
        return files.tensor_digest(*xs, self.y)


# ----------------------------------------------------------------------------- data

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in (2049, 2051):
        raise DistilError(f"not an IDX labels/images file (magic {magic})", file=str(path))
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if "-images-idx3-ubyte" in path.name:
        labels = path.with_name(path.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
        if not labels.exists():
            raise DistilError(f"labels file {labels.name} not found beside the images", file=str(path))
        return _read_idx(path)[:, None].astype(np.float32) / 255.0, _read_idx(labels).astype(np.int64)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x", "y") if k not in z]
        if missing:
            raise DistilError(f"npz file needs arrays x and y (missing {missing})", file=str(path))
        return z["x"].astype(np.float32), z["y"].astype(np.int64)


def load_split(recipe: ClassificationRecipe, which: str, tokenizer=None, classes: list[str] | None = None) -> Split:
    """The `data.train` or `data.eval` split, capped by data.max_train / data.max_eval."""
    d = recipe.data
    path = recipe.resolve(getattr(d, which))
    cap = d.max_train if which == "train" else d.max_eval
    if not path.exists():
        hint = " (install Debian's dataset-fashion-mnist package)" if "fashion-mnist" in str(path) else ""
        raise DistilError(f"data file not found{hint}", file=str(path), field=f"data.{which}")
    if path.suffix in (".npz", ".gz") or "-idx" in path.name:
        x, y = _load_arrays(path)
        x, y = torch.from_numpy(x[:cap]), torch.from_numpy(y[:cap])
        names = classes or d.classes or [str(i) for i in range(int(y.max()) + 1)]
        if int(y.min()) < 0 or int(y.max()) >= len(names):
            raise DistilError(f"labels must be in 0..{len(names) - 1}", file=str(path), field="y")
        return Split(x, y, names)
    rows = []
    for where, row in read_table(path)[:cap]:
        for field in (d.text_field, d.label_field):
            if field not in row:
                raise DistilError("missing column", file=str(path), field=field, **where)
        rows.append(row)
    labels = [str(r[d.label_field]) for r in rows]
    names = classes or d.classes or sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise DistilError(f"labels {unknown[:5]} are not in data.classes", file=str(path), field=d.label_field)
    if tokenizer is None:
        raise DistilError("text classification needs a Hugging Face teacher (its tokenizer)", field="teacher.model")
    enc = tokenizer([str(r[d.text_field]) for r in rows], padding="max_length", truncation=True,
                    max_length=d.max_length, return_tensors="pt")
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return Split(x, torch.tensor([names.index(lab) for lab in labels]), names)


def text_tokenizer(recipe: ClassificationRecipe):
    """The teacher's tokenizer for text data (students read the same token ids); None for arrays / images."""
    if recipe.teacher.model.startswith("factory:") or not _is_text(recipe):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(sources.resolve(recipe.teacher.model).directory)


def load_data(recipe: ClassificationRecipe) -> tuple[Split, Split]:
    tokenizer = text_tokenizer(recipe)
    train = load_split(recipe, "train", tokenizer)
    held_out = load_split(recipe, "eval", tokenizer, classes=train.classes)
    return train, held_out


def random_views(images: torch.Tensor, views: ImageViews, seed: int) -> torch.Tensor:
    """`images` (N, C, H, W), each shifted by up to views.shift pixels each way (zero fill) and, with
    views.flip, mirrored left-right with probability 0.5; the random numbers come from `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    s = views.shift
    if s:
        dy, dx = torch.randint(0, 2 * s + 1, (2, n, 1), generator=g).to(images.device)
        rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
        padded = F.pad(images, (s, s, s, s))
        images = padded[torch.arange(n, device=images.device)[:, None, None, None],
                        torch.arange(c, device=images.device)[None, :, None, None], rows, cols]
    if views.flip:
        mirrored = (torch.rand(n, generator=g) < 0.5).to(images.device)[:, None, None, None]
        images = torch.where(mirrored, images.flip(-1), images)
    return images


def _check_views(views: ImageViews | None, split: Split, field: str) -> None:
    if views is not None and (not isinstance(split.x, torch.Tensor) or split.x.dim() != 4):
        raise DistilError("random views need images (N, C, H, W); these examples are not", field=field)


def _inputs(split: Split, idx: torch.Tensor, device: torch.device, views: ImageViews | None, seed: int):
    """Examples idx of `split` on `device`: as stored, or with `views`, their random views drawn from `seed`."""
    x = common.to_device(split.take(idx), device)
    return x if views is None else random_views(x, views, seed)


def _is_text(recipe: ClassificationRecipe) -> bool:
    name = Path(recipe.data.train).name
    return not (name.endswith((".npz", ".gz")) or "-idx" in name)


# ----------------------------------------------------------------------------- models

def _auto_class(is_text: bool):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    return AutoModelForSequenceClassification if is_text else AutoModelForImageClassification


def build_model(model: str, args: dict, config: dict | None, num_classes: int, is_text: bool) -> torch.nn.Module:
    """A fresh (factory / from config) or pretrained (HF folder) classifier with `num_classes` outputs."""
    if model.startswith("factory:"):
        return factory.build(model, num_classes, args)
    from transformers import AutoConfig
    directory = sources.resolve(model).directory
    auto = _auto_class(is_text)
    if config is not None:
        cfg = AutoConfig.from_pretrained(directory)
        for k, v in config.items():
            if not hasattr(cfg, k):
                raise DistilError(f"the model config has no key '{k}'", field=f"student.config.{k}")
            setattr(cfg, k, v)
        cfg.num_labels = num_classes
        return auto.from_config(cfg)
    return auto.from_pretrained(directory, num_labels=num_classes, ignore_mismatched_sizes=True)


def save_model(model: torch.nn.Module, folder: Path, spec: str, args: dict, num_classes: int, extra: dict,
               tokenizer=None) -> None:
    """Save atomically: factory models as safetensors + distil_model.json, HF models with save_pretrained
    (and the tokenizer, for text, so the folder is self-contained)."""
    def write(tmp: Path):
        if spec.startswith("factory:"):
            factory.save(model, tmp, spec, num_classes, args)
        else:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        (tmp / "distil_train.json").write_text(json.dumps(extra, indent=2, default=str))
    files.write_atomic(folder, write)


def load_model(folder: Path, is_text: bool = False) -> torch.nn.Module:
    """Load a classifier saved by `save_model` (or any HF classifier folder)."""
    folder = Path(folder)
    if (folder / "distil_model.json").exists():
        return factory.load(folder)
    return _auto_class(is_text).from_pretrained(folder).eval()


def logits_of(model: torch.nn.Module, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else (model(x) if isinstance(model, torch.nn.Sequential)
                                                   else model(pixel_values=x))
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, batch_size: int) -> tuple[torch.Tensor, float]:
    """All logits of `split` (float32) and the examples/s of the pass."""
    model.eval()
    t0 = time.perf_counter()
    out = [logits_of(model, split.take(torch.arange(i, min(i + batch_size, len(split))))).float()
           for i in range(0, len(split), batch_size)]
    return torch.cat(out), len(split) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- teacher

def _teacher_folder(recipe: ClassificationRecipe, train: Split) -> Path:
    key = files.fingerprint("classifier-teacher", recipe.teacher.model_dump(), train.digest())
    return recipe.cache_dir / "classifiers" / key[:24]


def teacher_folder(recipe: ClassificationRecipe, train: Split) -> Path:
    """Where the teacher's weights are: its source folder, or the cached one distil trained."""
    return _teacher_folder(recipe, train) if recipe.teacher.train is not None else sources.resolve(recipe.teacher.model).directory


def teacher(recipe: ClassificationRecipe, train: Split) -> tuple[torch.nn.Module, str]:
    """The teacher and its identity; trained on hard labels first (once, cached) when teacher.train is set."""
    t = recipe.teacher
    is_text = isinstance(train.x, dict)
    if t.train is None:
        if t.model.startswith("factory:"):
            raise DistilError("a factory teacher starts untrained: give teacher.train", field="teacher.train")
        source = sources.resolve(t.model)
        return load_model(source.directory, is_text), source.identity
    folder = _teacher_folder(recipe, train)
    if (folder / "distil_train.json").exists():
        return load_model(folder, is_text), folder.name
    _check_views(t.train.augment, train, "teacher.train.augment")
    torch.manual_seed(t.train.seed)
    model = build_model(t.model, t.args, None, len(train.classes), is_text)

    def mean_loss(idx, device, view_seed):
        x = _inputs(train, idx, device, t.train.augment, view_seed)
        return F.cross_entropy(logits_of(model, x), train.y[idx].to(device))

    work = folder.with_name(f"{folder.name}.work")  # the loop's log and fingerprint; no checkpoints
    summary = common.train_examples(model, mean_loss, len(train), t.train, out_dir=work, name="teacher")
    save_model(model, folder, t.model, t.args, len(train.classes), {"summary": summary})
    shutil.rmtree(work, ignore_errors=True)
    return model, folder.name


def _soft_label_path(recipe: ClassificationRecipe, identity: str, train: Split, held_out: Split) -> Path:
    key = files.fingerprint("soft-labels", identity, train.digest(), held_out.digest())
    return recipe.cache_dir / "soft-labels" / f"{key[:32]}.safetensors"


def generate(recipe: ClassificationRecipe) -> dict:
    """Train (if asked) and run the teacher; cache its logits on both splits."""
    train_split, held_out = load_data(recipe)
    t0 = time.time()
    model, identity = teacher(recipe, train_split)
    path = _soft_label_path(recipe, identity, train_split, held_out)
    summary = {"teacher": identity, "rows": len(train_split) + len(held_out), "cache": str(path)}
    if path.exists():
        return {**summary, "cached_before": summary["rows"], "generated": 0}
    train_logits, _ = predict(model, train_split, recipe.eval.batch_size)
    eval_logits, _ = predict(model, held_out, recipe.eval.batch_size)
    common.save_tensors(path, {"train": train_logits, "eval": eval_logits})
    return {**summary, "cached_before": 0, "generated": summary["rows"], "seconds": round(time.time() - t0, 1)}


def _cached_logits(recipe: ClassificationRecipe, train: Split, held_out: Split) -> dict[str, torch.Tensor]:
    t = recipe.teacher
    identity = (_teacher_folder(recipe, train).name if t.train is not None else sources.resolve(t.model).identity)
    path = _soft_label_path(recipe, identity, train, held_out)
    if not path.exists():
        raise DistilError("the teacher's soft labels are not in the teacher cache; run `distil generate` first",
                          file=str(path.parent))
    return common.load_tensors(path)


# ----------------------------------------------------------------------------- train

def train(recipe: ClassificationRecipe, resume: bool = False) -> dict:
    """Train the student on soft + hard labels (and the hard-label baseline); save under <out>/.

    With train.augment every model sees random views, and the teacher scores each view the student
    sees (on the student's device, in eval mode) instead of its cached logits of the plain images."""
    train_split, held_out = load_data(recipe)
    soft = _cached_logits(recipe, train_split, held_out)["train"]
    s, cfg = recipe.student, recipe.train
    is_text = isinstance(train_split.x, dict)
    _check_views(cfg.augment, train_split, "train.augment")
    online = None
    runs = [("student", cfg.alpha)] + ([("baseline", 1.0)] if recipe.train.baseline else [])
    summaries = {}
    for name, alpha in runs:
        settings = cfg.model_dump(exclude={"checkpoint_every", "baseline"} | ({"alpha", "temperature"} if alpha == 1.0 else set()))
        key = files.fingerprint(s.model_dump(), settings, alpha, train_split.digest(),
                                 files.tensor_digest(soft) if alpha < 1.0 else None)
        folder = recipe.out_dir / name
        marker = folder / "distil_train.json"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == key:
            summaries[name] = {"skipped": True, **json.loads(marker.read_text())["summary"]}
            continue
        if cfg.augment is not None and alpha < 1.0:  # consistent teaching: the teacher scores the student's views
            online = teacher(recipe, train_split)[0]
        torch.manual_seed(cfg.seed)
        model = build_model(s.model, s.args, s.config, len(train_split.classes), is_text)

        def mean_loss(idx, device, view_seed, model=model, alpha=alpha):
            x = _inputs(train_split, idx, device, cfg.augment, view_seed)
            if cfg.augment is not None and alpha < 1.0:
                with torch.no_grad():
                    targets = logits_of(online.to(device), x).float()
            else:
                targets = soft[idx].to(device)
            return soft_label_kd(logits_of(model, x), targets, train_split.y[idx].to(device),
                                 temperature=cfg.temperature, alpha=alpha)

        n = min(cfg.examples or len(train_split), len(train_split))
        summary = common.train_examples(model, mean_loss, n, cfg, out_dir=recipe.out_dir, name=name,
                                        checkpoint_every=cfg.checkpoint_every, resume=resume, fingerprint=key)
        summary["alpha"] = alpha
        save_model(model, folder, s.model, s.args, len(train_split.classes), {"fingerprint": key, "summary": summary},
                   tokenizer=text_tokenizer(recipe) if is_text else None)
        summaries[name] = summary
    return summaries


# ----------------------------------------------------------------------------- evaluate

def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| * (bin share)."""
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.float().mean() * (correct[inside].mean() - conf[inside].mean()).abs())
    return ece


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                           bins: int = 15) -> dict:
    """accuracy, macro_f1, ece, and agreement (same argmax as the teacher) for one model's logits."""
    from sklearn.metrics import f1_score
    pred = logits.argmax(-1)
    out = {"accuracy": float((pred == labels).float().mean()),
           "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro")),
           "ece": expected_calibration_error(logits.softmax(-1), labels, bins)}
    if teacher_logits is not None:
        out["teacher_agreement"] = float((pred == teacher_logits.argmax(-1)).float().mean())
    return out


CLASSIFICATION_METRICS = {
    "accuracy": (True, "share of held-out examples classified correctly"),
    "macro_f1": (True, "F1 averaged over classes, each class counting the same"),
    "ece": (False, "expected calibration error: |accuracy - confidence| over equal-width confidence bins"),
    "teacher_agreement": (True, "share of held-out examples where the model's class is the teacher's"),
}


def evaluate(recipe: ClassificationRecipe) -> dict:
    """Score teacher, student and baseline on the held-out split; write report.json and report.html."""
    from sklearn.metrics import confusion_matrix

    train_split, held_out = load_data(recipe)
    is_text = isinstance(held_out.x, dict)
    model, identity = teacher(recipe, train_split)
    folders = {"teacher": teacher_folder(recipe, train_split)}
    roles = {"teacher": model}
    for name in ("student", "baseline"):
        if (recipe.out_dir / name / "distil_train.json").exists():
            roles[name] = load_model(recipe.out_dir / name, is_text)
            folders[name] = recipe.out_dir / name
    if "student" not in roles:
        raise DistilError("no trained student; run `distil train` first", file=str(recipe.out_dir / "student"))
    values, models, confusion, per_row = {}, {}, {}, {}
    teacher_logits = None
    for role, m in roles.items():
        logits, per_s = predict(m, held_out, recipe.eval.batch_size)
        teacher_logits = logits if role == "teacher" else teacher_logits
        pred, teacher_pred = logits.argmax(-1), teacher_logits.argmax(-1)
        values[role] = classification_metrics(logits, held_out.y, None if role == "teacher" else teacher_logits,
                                              recipe.eval.calibration_bins)
        values[role].setdefault("teacher_agreement", 1.0)
        per_row[role] = [{"n": 1, "correct": float(c), "agree": float(a)}
                         for c, a in zip(pred == held_out.y, pred == teacher_pred)]
        models[role] = {"name": identity if role == "teacher" else role, "path": str(folders[role]),
                        "params": common.parameter_count(m), "size_bytes": sources.folder_size(folders[role]),
                        "speed": {"value": round(per_s, 1), "unit": "examples/s"}, "peak_memory_bytes": None}
        confusion[role] = confusion_matrix(held_out.y.numpy(), pred.numpy(),
                                           labels=list(range(len(held_out.classes)))).tolist()
    intervals = (paired_bootstrap(per_row["student"], per_row["baseline"],
                                  {"accuracy": ("correct", None), "teacher_agreement": ("agree", None)})
                 if "baseline" in roles else None)
    metrics = metrics_block(values, CLASSIFICATION_METRICS, intervals)
    t, s = models["teacher"], models["student"]
    compression, speedup = t["params"] / s["params"], s["speed"]["value"] / t["speed"]["value"]
    acc = metrics["accuracy"]
    headline = (f"student keeps {100 * acc['retention']:.1f}% of the teacher's accuracy "
                f"({100 * acc['student']:.2f}% vs {100 * acc['teacher']:.2f}%) at {compression:.1f}x fewer parameters")
    if "baseline" in roles:
        headline += f"; hard labels alone: {100 * acc['baseline']:.2f}%"
    report = {"task": "classification", "headline": headline, "models": models, "metrics": metrics,
              "compression": compression, "speedup": speedup, "eval_rows": len(held_out),
              "classes": held_out.classes, "confusion": confusion,
              "settings": {"temperature": recipe.train.temperature, "alpha": recipe.train.alpha,
                           "epochs": recipe.train.epochs, "examples": recipe.train.examples or len(train_split),
                           "seed": recipe.train.seed}}
    return write_report(report, recipe.out_dir, recipe.eval.gates)


# ----------------------------------------------------------------------------- export

def export(recipe: ClassificationRecipe) -> dict:
    """Write export.formats from <out>/student into <out>/exports, load each back in its runtime and
    score it on the held-out split like the fp32 student; rows go into report.json / report.html."""
    from distil.deploy.scoring import add_to_report
    from distil.tasks.export import export_all, score_exports

    folder = recipe.out_dir / "student"
    if not (folder / "distil_train.json").exists():
        raise DistilError("no trained student; run `distil train` first", file=str(folder))
    train_split, held_out = load_data(recipe)
    teacher_logits = _cached_logits(recipe, train_split, held_out)["eval"]
    artifacts = export_all(folder, recipe.export.formats, recipe.out_dir / "exports")
    bs = recipe.eval.batch_size

    def score(runtime, reference_logits):
        t0 = time.perf_counter()
        logits = torch.cat([runtime.logits(held_out.take(torch.arange(i, min(i + bs, len(held_out))))).float()
                            for i in range(0, len(held_out), bs)])
        seconds = time.perf_counter() - t0
        m = classification_metrics(logits, held_out.y, teacher_logits, recipe.eval.calibration_bins)
        if reference_logits is not None:
            m["student_agreement"] = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
            m["max_abs_logit_diff"] = float((logits - reference_logits).abs().max())
        return m, {"value": round(len(held_out) / seconds, 1), "unit": "examples/s"}, logits

    exports = score_exports(folder, artifacts, score,
                            f"{len(held_out)} held-out examples, batch {bs}, {torch.get_num_threads()} torch threads; "
                            "student_agreement and max_abs_logit_diff compare with the fp32 student's logits.")
    add_to_report(recipe.out_dir, exports)
    return exports
