"""Deployable artifacts of a classification or embedding student, loaded back and scored.

Formats (a folder each, with `distil_export.json` saying format and model kind):
  hf    the model as saved for its own library: a factory folder (safetensors + distil_model.json),
        a Hugging Face classifier folder (with its tokenizer), or a sentence-transformers folder
        (`SentenceTransformer(path)` loads it);
  onnx  model.onnx from `torch.onnx.export(dynamo=True)`, batch and sequence length dynamic:
        inputs `pixel_values` (images / features) or `input_ids` + `attention_mask` (text);
        output `logits` (classifiers) or `sentence_embedding` (pooled, projected, normalised);
  int8  torch dynamic int8 quantization of every Linear layer (`distil.deploy.export`'s plain-tensor
        format: int8 weights, per-channel scales and zero points in model.int8.safetensors; no
        pickle). A sentence-transformers export keeps the module folders, so `SentenceTransformer`
        can build the skeleton: its encoder's model.safetensors holds only the tensors that are
        not int8 Linear weights (a Dense module keeps its small float32 file as well).

`TaskRuntime` loads any of them (and the fp32 source) behind one interface: `logits(x)` for
classifiers, `encode(sentences)` for embedders, so the task modules' `export` stage scores every
artifact and the fp32 student with the same metric code (`score_exports`, `add_to_report`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from distil import files
from distil.deploy.export import (
    INT8_WEIGHTS,
    MARKER,
    Exported,
    copy_float_tensors,
    int8_linear_tensors,
    quantize_dynamic,
    set_int8_linears,
)
from distil.errors import DistilError, require
from distil.models.sources import folder_size

TASK_FORMATS = ("hf", "onnx", "int8")
PROBE_TEXTS = ["Tell me about the stars and the moon.", "What is the best way to learn a new language?"]


# ----------------------------------------------------------------------------- source models

def model_kind(folder: Path | str) -> str | None:
    """"factory", "sequence" (text classifier), "image" (image classifier) or "sentence"
    (sentence-transformers) for a task model folder; None for anything else (e.g. a causal LM)."""
    folder = Path(folder)
    marker = folder / MARKER
    kind = json.loads(marker.read_text()).get("kind") if marker.exists() else None
    if kind:
        return kind
    if (folder / "distil_model.json").exists():
        return "factory"
    if (folder / "modules.json").exists():
        return "sentence"
    if (folder / "config.json").exists():
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return "sequence"
        if any(a.endswith("ForImageClassification") for a in architectures):
            return "image"
    return None


def load_source(folder: Path | str):
    """(fp32 model in eval mode, kind) of a trained task student folder."""
    from distil.tasks import factory

    folder = Path(folder)
    kind = model_kind(folder)
    if kind is None:
        raise DistilError("not a classification or embedding model folder (no distil_model.json, modules.json "
                          "or *ForSequenceClassification / *ForImageClassification config)", file=str(folder), field="model")
    if kind == "factory":
        return factory.load(folder), kind
    if kind == "sentence":
        from sentence_transformers import SentenceTransformer
        return SentenceTransformer(str(folder), device="cpu").eval(), kind
    return _auto_class(kind).from_pretrained(folder, dtype=torch.float32).eval(), kind


def _auto_class(kind: str):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    return AutoModelForSequenceClassification if kind == "sequence" else AutoModelForImageClassification


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- export

class _Embedder(torch.nn.Module):
    """A SentenceTransformer as a tensor -> tensor module (for the ONNX exporter)."""

    def __init__(self, st):
        super().__init__()
        self.st = st

    def forward(self, input_ids, attention_mask):
        return self.st({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]


class _ImageClassifier(torch.nn.Module):
    """A factory or HF image classifier's logits from `pixel_values` (for the ONNX exporter)."""

    def __init__(self, model, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, pixel_values):
        return self.model(pixel_values) if self.kind == "factory" else self.model(pixel_values=pixel_values).logits


class _TextClassifier(torch.nn.Module):
    """A HF text classifier's logits from token ids and mask (for the ONNX exporter)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def probe_inputs(model, kind: str, folder: Path, batch: int = 2):
    """A fixed example input: tokenized probe sentences for text models, seeded noise of the model's
    input shape for image / feature classifiers."""
    if kind in ("sequence", "sentence"):
        tokenizer = _tokenizer(folder / _encoder_path_from_disk(folder) if kind == "sentence" else folder)
        enc = tokenizer(PROBE_TEXTS[:batch], padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        c = model.config
        return torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g)
    meta = json.loads((folder / "distil_model.json").read_text())
    args = meta["args"]
    if meta["factory"] == "mlp":
        return torch.randn(batch, args.get("in_features", 784), generator=g)
    size = args.get("image_size", 28)
    return torch.randn(batch, args.get("in_channels", 1), size, size, generator=g)


def _write_onnx(model, kind: str, source: Path, tmp: Path) -> None:
    require("onnxscript", "onnx")
    example = probe_inputs(model, kind, source)
    if isinstance(example, dict):
        args = (example["input_ids"], example["attention_mask"])
        names = ["input_ids", "attention_mask"]
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    else:
        args, names = (example,), ["pixel_values"]
        dynamic = ({0: torch.export.Dim("batch")},)
    wrapper = {"sentence": _Embedder, "sequence": _TextClassifier}.get(kind, lambda m: _ImageClassifier(m, kind))(model)
    output = "sentence_embedding" if kind == "sentence" else "logits"
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper.eval(), args, str(tmp / "model.onnx"), dynamo=True, input_names=names,
                          output_names=[output], dynamic_shapes=dynamic, external_data=False, verbose=False)
    _copy_side_files(source, tmp)


def _copy_side_files(source: Path, tmp: Path) -> None:
    """Everything of the source folder but its weights: configs, tokenizer, module folders."""
    for item in source.iterdir():
        if item.name in ("distil_train.json", MARKER) or item.suffix in (".safetensors", ".bin", ".pt", ".onnx"):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        else:
            shutil.copy2(item, tmp / item.name)


def _write_int8(model, kind: str, source: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    quantized = quantize_dynamic(model)
    tensors, linear_names = int8_linear_tensors(quantized)
    floats = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()
              if name.rsplit(".", 1)[0] not in linear_names}
    tmp.mkdir(parents=True)
    if kind == "sentence":
        # SentenceTransformer(tmp) builds the skeleton: the module folders stay as saved, but the
        # encoder's weights file keeps only its tensors that are not int8 Linears (see INT8_WEIGHTS).
        model.save(str(tmp))
        modules = json.loads((tmp / "modules.json").read_text())
        index = next(i for i, m in enumerate(modules) if m["type"].endswith("Transformer"))
        encoder = model[index]
        inner = next(n for n, child in encoder.named_children() if child is encoder.auto_model)
        prefix = f"{index}.{inner}."
        save_file({n[len(prefix):]: t for n, t in floats.items() if n.startswith(prefix)},
                  str(tmp / modules[index]["path"] / "model.safetensors"))
        floats = {}
    else:
        _copy_side_files(source, tmp)
    save_file({**tensors, **floats}, str(tmp / INT8_WEIGHTS), metadata={"format": "distil-int8-dynamic"})


def export_task_model(folder: Path | str, fmt: str, out: Path | str) -> Exported:
    """Export the task student in `folder` as `fmt` ("hf", "onnx" or "int8") into the folder `out`."""
    if fmt not in TASK_FORMATS:
        raise DistilError(f"format '{fmt}' is not available for classification / embedding models; "
                          f"choose one of {', '.join(TASK_FORMATS)}", field="format")
    folder, out = Path(folder), Path(out)
    model, kind = load_source(folder)
    if kind == "sentence" and fmt != "hf" and _encoder_path_from_disk(folder) is None:
        raise DistilError(f"a static sentence model exports as hf only, not {fmt}", file=str(folder), field="format")

    def write(tmp: Path) -> None:
        if fmt == "hf":
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("distil_train.json"))
        elif fmt == "onnx":
            _write_onnx(model, kind, folder, tmp)
        else:
            _write_int8(model, kind, folder, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": fmt, "kind": kind, "source": str(folder)}, indent=2))

    files.write_atomic(out, write)
    return Exported(fmt, out, None, folder_size(out))


# ----------------------------------------------------------------------------- runtimes

class TaskRuntime:
    """One artifact (or the fp32 source) behind `logits(x)` / `encode(sentences, batch_size)`."""

    def __init__(self, path: Path | str):
        path = Path(path)
        marker = json.loads((path / MARKER).read_text()) if (path / MARKER).exists() else {"format": "hf"}
        self.path, self.format = path, marker["format"]
        self.kind = model_kind(path)
        self.session = self.model = None
        if self.format == "onnx":
            require("onnxruntime", "onnx")
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # timed against torch on the same threads
            self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()]
        elif self.format == "int8":
            self.model = load_int8_task(path)
        else:
            self.model, _ = load_source(path)
        self.runtime = {"onnx": "onnxruntime", "int8": "torch int8 dynamic"}.get(self.format, "torch")
        self.tokenizer = None  # a static sentence model tokenizes inside its first module
        if self.kind == "sequence" or (self.kind == "sentence" and _encoder_path_from_disk(path) is not None):
            sub = path / _encoder_path_from_disk(path) if self.kind == "sentence" else path
            self.tokenizer = _tokenizer(sub)
            self.max_length = _max_seq_length(path) if self.kind == "sentence" else None

    @torch.inference_mode()
    def _run(self, inputs) -> torch.Tensor:
        if self.session is not None:
            feeds = ({k: v.numpy() for k, v in inputs.items() if k in self.names} if isinstance(inputs, dict)
                     else {"pixel_values": inputs.numpy()})
            return torch.from_numpy(self.session.run(None, feeds)[0])
        if self.kind == "sentence":
            return self.model(dict(inputs))["sentence_embedding"].float()
        if self.kind == "factory":
            return self.model(inputs).float()
        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(pixel_values=inputs)
        return out.logits.float()

    def logits(self, x) -> torch.Tensor:
        return self._run(x)

    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        if self.tokenizer is None:
            return self.model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                                     show_progress_bar=False).float().cpu()
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = self.tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out.append(self._run({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
        return torch.cat(out)


def _encoder_path_from_disk(folder: Path) -> str | None:
    """The Transformer module's folder of a sentence-transformers model; None for a static one."""
    modules = json.loads((folder / "modules.json").read_text())
    return next((m["path"] for m in modules if m["type"].endswith("Transformer")), None)


def _max_seq_length(folder: Path) -> int | None:
    config = folder / _encoder_path_from_disk(folder) / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length") if config.exists() else None


def load_int8_task(folder: Path | str):
    """Rebuild an int8 task export: the fp32 skeleton, dynamic quantization, then the stored tensors."""
    from safetensors.torch import load_file

    from distil.tasks import factory

    folder = Path(folder)
    weights = folder / INT8_WEIGHTS
    if not weights.exists():
        raise DistilError(f"not an int8 export (no {INT8_WEIGHTS})", file=str(folder), field="model")
    kind = model_kind(folder)
    if kind == "factory":
        meta = json.loads((folder / "distil_model.json").read_text())
        skeleton = factory.build(meta["factory"], meta["num_classes"], meta["args"])
    elif kind == "sentence":
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the encoder's int8 Linear weights are not in its own file: expected
        try:
            skeleton = SentenceTransformer(str(folder), device="cpu")
        finally:
            hf_logging.set_verbosity(level)
    else:
        from transformers import AutoConfig
        skeleton = _auto_class(kind).from_config(AutoConfig.from_pretrained(folder))
    model = quantize_dynamic(skeleton.eval())
    tensors = load_file(str(weights))
    set_int8_linears(model, tensors, weights)
    copy_float_tensors(model, tensors, weights)
    return model.eval()


# ----------------------------------------------------------------------------- checks and scores

def compare_with_source(source: Path | str, artifact: Path | str) -> dict:
    """The artifact's output against the fp32 source on a fixed probe input: largest absolute
    difference (logits or embedding components), argmax agreement / cosine."""
    source, artifact = Path(source), Path(artifact)
    ref, out = TaskRuntime(source), TaskRuntime(artifact)
    if ref.kind == "sentence":
        a, b = ref.encode(PROBE_TEXTS), out.encode(PROBE_TEXTS)
        return {"kind": ref.kind, "max_abs_diff": (a - b).abs().max().item(),
                "min_cosine": torch.nn.functional.cosine_similarity(a, b).min().item()}
    x = probe_inputs(ref.model, ref.kind, source, batch=2)
    a, b = ref.logits(x), out.logits(x)
    return {"kind": ref.kind, "max_abs_diff": (a - b).abs().max().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def export_all(student_dir: Path, formats: list[str], out_dir: Path) -> list[Exported]:
    """`export_task_model` for each format, into <out_dir>/student-<format>."""
    return [export_task_model(student_dir, fmt, out_dir / f"student-{fmt}") for fmt in formats]


def score_exports(folder: Path, artifacts: list[Exported], score, note: str) -> dict:
    """The "exports" block of a task report: the fp32 student's metrics and one row per artifact.

    Args:
        folder: the trained fp32 student.
        artifacts: what `export_all` wrote.
        score: `score(runtime, reference_outputs) -> (metrics, speed, outputs)`, speed as
            {"value", "unit"}; called first for the student with reference_outputs None, then for
            each artifact with the student's outputs.
        note: how the rows were measured, for the report.
    Returns:
        {"reference": the student's row, "rows": one per artifact with each metric's "change" against
        the student, "note": note}.
    """
    student = TaskRuntime(folder)
    metrics, speed, outputs = score(student, None)
    reference = {"label": "student (fp32)", "format": "hf", "runtime": student.runtime, "path": str(folder),
                 "size_bytes": folder_size(folder), "speed": speed, "metrics": metrics}
    rows = []
    for artifact in artifacts:
        runtime = TaskRuntime(artifact.path)
        m, speed, _ = score(runtime, outputs)
        rows.append({"label": artifact.label, "format": artifact.format, "runtime": runtime.runtime,
                     "path": str(artifact.path), "size_bytes": artifact.size_bytes, "speed": speed, "metrics": m,
                     "change": {k: m[k] - metrics[k] for k in m if isinstance(metrics.get(k), float)}})
    return {"reference": reference, "rows": rows, "note": note}
