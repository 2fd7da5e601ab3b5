"""Sentence-embedding distillation: a sentence-transformers teacher teaches a smaller encoder.

Stages, as for causal LMs:
  generate  the teacher's embedding of every train and held-out sentence, into the teacher cache;
  train     a student built from the teacher (some of its layers; optionally narrower, its
            weights projected onto the top principal directions of the teacher's word embeddings;
            or static: one vector per vocabulary token, from the teacher's output for that token)
            on MSE + (1 - cosine) to the teacher's embeddings + KL between in-batch similarity
            distributions; saved with `SentenceTransformer.save`, so `SentenceTransformer(path)` loads it;
  evaluate  retrieval recall@k and MRR (query -> its document), Spearman correlation of pair
            similarities with the teacher's (and with human scores, where given), kNN accuracy,
            parameters and sentences/s, for teacher and student; report.json and report.html.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from distil import files
from distil.config.tasks import EmbeddingRecipe, EmbeddingStudent
from distil.data.examples import read_table
from distil.errors import DistilError
from distil.evaluation.metrics import metrics_block
from distil.evaluation.report import write_report
from distil.models import sources
from distil.tasks import common
from distil.tasks.losses import embedding_cosine, embedding_mse, similarity_kl


def load_teacher(recipe: EmbeddingRecipe):
    """The teacher SentenceTransformer (CPU) and its identity (a fingerprint of its folder)."""
    from sentence_transformers import SentenceTransformer

    source = sources.resolve(recipe.teacher.model, field="teacher.model")
    directory = source.directory
    if not (directory / "modules.json").exists():
        raise DistilError(f"{directory} is not a sentence-transformers folder (no modules.json)", field="teacher.model")
    return SentenceTransformer(str(directory), device="cpu"), source.identity


# ----------------------------------------------------------------------------- data

def train_sentences(recipe: EmbeddingRecipe) -> list[str]:
    """Every non-empty value of data.text_fields in the train file, deduplicated, in file order."""
    path = recipe.resolve(recipe.data.train)
    seen: dict[str, None] = {}
    for where, row in read_table(path):
        for field in recipe.data.text_fields:
            value = row.get(field)
            if value is not None and not isinstance(value, str):
                raise DistilError("expected a string", file=str(path), field=field, **where)
            if value and value.strip():
                seen.setdefault(value.strip())
    if not seen:
        raise DistilError(f"no sentences in columns {recipe.data.text_fields}", file=str(path), field="data.text_fields")
    return list(seen)[: recipe.data.max_train]


def eval_rows(recipe: EmbeddingRecipe) -> list[dict]:
    """Held-out rows, checked for every column the recipe's eval names."""
    d = recipe.data
    path = recipe.resolve(d.eval)
    wanted = [f for f in (d.query_field, d.document_field, d.score_field, d.label_field) if f] + list(d.pair_fields or [])
    if not wanted:
        wanted = d.text_fields[:1]
    rows = []
    for where, row in read_table(path)[: d.max_eval]:
        for field in wanted:
            value = row.get(field)
            ok = isinstance(value, (int, float)) if field == d.score_field else isinstance(value, str) and value.strip()
            if not ok:
                raise DistilError(f"missing or empty ({'a number' if field == d.score_field else 'a string'} expected)",
                                  file=str(path), field=field, **where)
        rows.append(row)
    return rows


def eval_sentences(recipe: EmbeddingRecipe, rows: list[dict]) -> list[str]:
    d = recipe.data
    fields = [f for f in (d.query_field, d.document_field) if f] + list(d.pair_fields or []) + d.text_fields[:1]
    return list(dict.fromkeys(str(r[f]).strip() for r in rows for f in fields if isinstance(r.get(f), str)))


# ----------------------------------------------------------------------------- generate

def _cache_path(recipe: EmbeddingRecipe, identity: str, train: list[str], held_out: list[str]) -> Path:
    key = files.fingerprint("embeddings", identity, train, held_out, recipe.data.max_length)
    return recipe.cache_dir / "embeddings" / f"{key[:32]}.safetensors"


def _encode(model, sentences: list[str], batch_size: int) -> torch.Tensor:
    return model.encode(sentences, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float().cpu()


def _token_cache_path(recipe: EmbeddingRecipe, identity: str) -> Path:
    return recipe.cache_dir / "embeddings" / f"tokens-{files.fingerprint('token-embeddings', identity)[:32]}.safetensors"


def token_embeddings(teacher, batch_size: int = 512) -> torch.Tensor:
    """(vocabulary, width): the teacher encoder's mean output for each vocabulary token alone between
    the tokenizer's special tokens ([CLS] t [SEP] for BERT), model2vec's distillation input."""
    from distil.progress import progress_bar

    backend = teacher[0].tokenizer.backend_tokenizer
    encoder = teacher[0].auto_model.eval()
    with_specials, bare = backend.encode("x").ids, backend.encode("x", add_special_tokens=False).ids
    start = with_specials.index(bare[0])
    before, after = with_specials[:start], with_specials[start + len(bare):]
    vocabulary = encoder.get_input_embeddings().num_embeddings
    out = []
    with torch.inference_mode(), progress_bar() as bar:
        task = bar.add_task("teacher token embeddings", total=vocabulary, status="")
        for first in range(0, vocabulary, batch_size):
            ids = torch.tensor([before + [i] + after for i in range(first, min(vocabulary, first + batch_size))])
            hidden = encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                             token_type_ids=torch.zeros_like(ids)).last_hidden_state
            out.append(hidden.float().mean(1))
            bar.update(task, advance=len(ids))
    return torch.cat(out)


def generate(recipe: EmbeddingRecipe) -> dict:
    """Encode every train and held-out sentence with the teacher (and, for a static student, every
    vocabulary token); cache the embeddings."""
    from distil.progress import progress_bar

    train, held_out = train_sentences(recipe), eval_sentences(recipe, eval_rows(recipe))
    teacher, identity = load_teacher(recipe)
    teacher.max_seq_length = recipe.data.max_length
    if recipe.student.static and not _token_cache_path(recipe, identity).exists():
        common.save_tensors(_token_cache_path(recipe, identity), {"tokens": token_embeddings(teacher)})
    path = _cache_path(recipe, identity, train, held_out)
    summary = {"teacher": identity, "rows": len(train) + len(held_out), "cache": str(path)}
    if path.exists():
        return {**summary, "cached_before": summary["rows"], "generated": 0}
    t0, out = time.time(), []
    sentences, step = train + held_out, 256
    with progress_bar() as bar:
        task = bar.add_task("teacher embeddings", total=len(sentences), status="")
        for i in range(0, len(sentences), step):
            out.append(_encode(teacher, sentences[i: i + step], recipe.eval.batch_size))
            bar.update(task, advance=len(out[-1]), status=f"{(i + len(out[-1])) / (time.time() - t0):.0f} sentences/s")
    emb = torch.cat(out)
    common.save_tensors(path, {"train": emb[: len(train)], "eval": emb[len(train):]})
    return {**summary, "cached_before": 0, "generated": summary["rows"], "seconds": round(time.time() - t0, 1)}


def _cached(recipe: EmbeddingRecipe, identity: str, train: list[str], held_out: list[str]) -> dict[str, torch.Tensor]:
    paths = [_cache_path(recipe, identity, train, held_out)]
    if recipe.student.static:
        paths.append(_token_cache_path(recipe, identity))  # its "tokens" tensor joins "train" and "eval"
    for path in paths:
        if not path.exists():
            raise DistilError("the teacher's embeddings are not in the teacher cache; run `distil generate` first",
                              file=str(path))
    return {name: t for path in paths for name, t in common.load_tensors(path).items()}


# ----------------------------------------------------------------------------- student

def _principal_directions(weight: torch.Tensor, k: int) -> torch.Tensor:
    """(D, k): the top-k principal directions of the rows of `weight` (D columns)."""
    centred = weight.double() - weight.double().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return v[:k].T.float()


def _shrink(name: str, t: torch.Tensor, shape: torch.Size, proj: torch.Tensor | None, keep: torch.Tensor | None,
            width: int, inner: int) -> torch.Tensor:
    """A teacher tensor brought to the student's `shape`: hidden axes projected, MLP axes sliced."""
    if "LayerNorm.weight" in name and proj is not None:
        return (proj ** 2).T @ t  # a per-direction average of the teacher's scales
    for axis in range(t.dim()):
        if t.shape[axis] == shape[axis]:
            continue
        if t.shape[axis] == width and proj is not None:
            t = torch.movedim(torch.movedim(t, axis, -1) @ proj, -1, axis)
        elif t.shape[axis] == inner and keep is not None:
            t = t.index_select(axis, keep)
    if t.shape != shape:
        raise DistilError(f"cannot initialise {name} {tuple(shape)} from the teacher's {tuple(t.shape)}", field="student")
    return t


def build_student(teacher, spec: EmbeddingStudent):
    """A smaller SentenceTransformer made from the teacher (see the module docstring).

    Layers `spec.layers` of the teacher's encoder are kept; with `hidden_size` smaller than the
    teacher's, every weight is projected onto the top principal directions P of the teacher's
    word-embedding matrix (x_student = x_teacher @ P) and a Dense layer initialised to P (x @ P^T) maps the
    student's pooled output back into the teacher's embedding space; with `intermediate_size`
    smaller, each layer keeps the MLP neurons with the largest |w_in| * |w_out|.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    encoder = teacher[0].auto_model
    cfg = copy.deepcopy(encoder.config)
    width, inner, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    bad = [i for i in spec.layers if not 0 <= i < n_layers]
    if bad:
        raise DistilError(f"the teacher has layers 0..{n_layers - 1}; got {bad}", field="student.layers")
    h = spec.hidden_size or width
    if h > width:
        raise DistilError(f"hidden_size {h} is wider than the teacher's {width}", field="student.hidden_size")
    heads = spec.num_attention_heads or (cfg.num_attention_heads if h == width else max(1, h // (width // cfg.num_attention_heads)))
    if h % heads:
        raise DistilError(f"hidden_size {h} is not divisible by {heads} attention heads", field="student.num_attention_heads")
    cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads = len(spec.layers), h, heads
    cfg.intermediate_size = spec.intermediate_size or inner
    student_encoder = type(encoder)(cfg)
    t_state = encoder.state_dict()
    proj = _principal_directions(t_state["embeddings.word_embeddings.weight"], h) if h != width else None
    new_state = {}
    for name, param in student_encoder.state_dict().items():
        source = name
        if name.startswith("encoder.layer."):
            parts = name.split(".")
            parts[2] = str(spec.layers[int(parts[2])])
            source = ".".join(parts)
        if source not in t_state:
            new_state[name] = param
            continue
        keep = None
        if cfg.intermediate_size != inner and source.startswith("encoder.layer."):
            prefix = ".".join(source.split(".")[:3])
            w_in, w_out = t_state[f"{prefix}.intermediate.dense.weight"], t_state[f"{prefix}.output.dense.weight"]
            keep = (w_in.norm(dim=1) * w_out.norm(dim=0)).topk(cfg.intermediate_size).indices.sort().values
        new_state[name] = _shrink(name, t_state[source], param.shape, proj, keep, width, inner)
    student_encoder.load_state_dict(new_state)
    with tempfile.TemporaryDirectory() as tmp:
        student_encoder.save_pretrained(tmp)
        teacher[0].tokenizer.save_pretrained(tmp)
        first = Transformer(tmp, max_seq_length=teacher.max_seq_length)
    modules = [first, Pooling(h, "mean")]
    out_dim = teacher.get_embedding_dimension() if hasattr(teacher, "get_embedding_dimension") else width
    if h != out_dim:
        modules.append(Dense(h, out_dim, bias=True, activation_function=torch.nn.Identity(),
                             init_weight=proj.contiguous(), init_bias=torch.zeros(out_dim)))
    modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def build_static_student(teacher, tokens: torch.Tensor, spec: EmbeddingStudent, sentences: list[str]):
    """A static SentenceTransformer: StaticEmbedding (mean of token vectors) -> Dense -> Normalize.

    As model2vec distils: each token's vector is the teacher's output for it (`tokens`) projected
    onto their top `hidden_size` principal directions P, times the SIF weight a / (a + p(token)).
    Unlike model2vec, p is counted on the training sentences (add-one smoothed) instead of assumed
    from Zipf's law over the vocabulary's order (measured: better recall and kNN, docs/benchmarks.md).
    The Dense layer, initialised to P^T, maps back into the teacher's space: it keeps cosines
    (P's columns are orthonormal), and lets training fit the teacher's sentence embeddings.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(teacher[0].tokenizer.backend_tokenizer.to_str())  # a copy: StaticEmbedding edits it
    dims = spec.hidden_size or 256
    if dims > tokens.shape[1]:
        raise DistilError(f"hidden_size {dims} is wider than the teacher's {tokens.shape[1]}", field="student.hidden_size")
    centred = tokens.double() - tokens.double().mean(0)
    proj = _principal_directions(tokens, dims).double()
    vectors = centred @ proj
    if spec.sif_coefficient is not None:
        ids = [i for encoding in backend.encode_batch(sentences, add_special_tokens=False) for i in encoding.ids]
        counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(tokens)).double() + 1
        p = counts / counts.sum()
        vectors *= (spec.sif_coefficient / (spec.sif_coefficient + p))[:, None]
    out_dim = tokens.shape[1]
    modules = [StaticEmbedding(backend, embedding_weights=vectors.float()),
               Dense(dims, out_dim, bias=True, activation_function=torch.nn.Identity(),
                     init_weight=proj.float().contiguous(), init_bias=torch.zeros(out_dim)),
               Normalize()]
    return SentenceTransformer(modules=modules, device="cpu")


# ----------------------------------------------------------------------------- train

def embedding_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, cfg) -> torch.Tensor:
    """The recipe's weighted sum of MSE, 1 - cosine and in-batch similarity KL."""
    loss = student_emb.new_zeros((), dtype=torch.float32)
    if cfg.mse:
        loss = loss + cfg.mse * embedding_mse(student_emb, teacher_emb)
    if cfg.cosine:
        loss = loss + cfg.cosine * embedding_cosine(student_emb, teacher_emb)
    if cfg.similarity_kl:
        loss = loss + cfg.similarity_kl * similarity_kl(student_emb, teacher_emb, temperature=cfg.temperature)
    return loss


def train(recipe: EmbeddingRecipe, resume: bool = False) -> dict:
    """Build the student from the teacher and fit it to the cached teacher embeddings; save <out>/student."""
    sentences, held_out = train_sentences(recipe), eval_sentences(recipe, eval_rows(recipe))
    teacher, identity = load_teacher(recipe)
    teacher.max_seq_length = recipe.data.max_length
    cached = _cached(recipe, identity, sentences, held_out)
    target = cached["train"]
    cfg = recipe.train
    key = files.fingerprint(recipe.student.model_dump(), cfg.model_dump(exclude={"checkpoint_every"}), identity,
                             sentences, recipe.data.max_length)
    folder = recipe.out_dir / "student"
    marker = folder / "distil_train.json"
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == key:
        return {"student": {"skipped": True, **json.loads(marker.read_text())["summary"]}}
    torch.manual_seed(cfg.seed)
    student = (build_static_student(teacher, cached["tokens"], recipe.student, sentences) if recipe.student.static
               else build_student(teacher, recipe.student))
    del teacher

    def mean_loss(idx, device, _view_seed):  # sentences have no random views
        features = common.to_device(student.preprocess([sentences[i] for i in idx]), device)
        emb = student(features)["sentence_embedding"]
        return embedding_loss(emb, target[idx].to(device), cfg)

    summary = common.train_examples(student, mean_loss, len(sentences), cfg, out_dir=recipe.out_dir, name="student",
                                    checkpoint_every=cfg.checkpoint_every, resume=resume, fingerprint=key)

    def write(tmp: Path):
        student.save(str(tmp))
        (tmp / "distil_train.json").write_text(json.dumps({"fingerprint": key, "summary": summary}, indent=2))

    files.write_atomic(folder, write)
    return {"student": summary}


# ----------------------------------------------------------------------------- evaluate

def retrieval_metrics(queries: torch.Tensor, documents: torch.Tensor, gold: torch.Tensor, ks: list[int]) -> dict:
    """recall@k and MRR of ranking `documents` by cosine for each query; gold[i] is query i's document."""
    sims = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(documents, dim=-1).T
    gold_sim = sims.gather(1, gold[:, None])
    rank = (sims > gold_sim).sum(1) + 1  # 1-based; ties count in the query's favour
    out = {f"recall@{k}": float((rank <= k).float().mean()) for k in ks}
    out["mrr"] = float((1.0 / rank.float()).mean())
    return out


def knn_accuracy(emb: torch.Tensor, labels: list[str], k: int) -> float:
    """Leave-one-out k-nearest-neighbour classification accuracy (cosine, majority vote)."""
    e = torch.nn.functional.normalize(emb, dim=-1)
    sims = e @ e.T
    sims.fill_diagonal_(-float("inf"))
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    nearest = sims.topk(min(k, len(labels) - 1), dim=1).indices
    votes = torch.nn.functional.one_hot(y[nearest], len(names)).sum(1)
    return float((votes.argmax(1) == y).float().mean())


def sentences_per_s(model, sentences: list[str], batch_size: int) -> float:
    _encode(model, sentences[:batch_size], batch_size)  # warm-up
    t0 = time.perf_counter()
    _encode(model, sentences, batch_size)
    return len(sentences) / (time.perf_counter() - t0)


def _pairs(recipe: EmbeddingRecipe, rows: list[dict]) -> tuple[list[tuple[str, str]], list[float] | None]:
    """Scored pairs if given; otherwise each (query, its document) plus (query, another row's document)."""
    d = recipe.data
    if d.pair_fields:
        a, b = d.pair_fields
        return [(r[a], r[b]) for r in rows], ([float(r[d.score_field]) for r in rows] if d.score_field else None)
    if d.query_field and d.document_field:
        n = len(rows)
        g = torch.Generator().manual_seed(0)
        other = (torch.arange(n) + torch.randint(1, max(n, 2), (n,), generator=g)) % n
        return ([(r[d.query_field], r[d.document_field]) for r in rows]
                + [(rows[i][d.query_field], rows[int(j)][d.document_field]) for i, j in enumerate(other)]), None
    return [], None


EMBEDDING_METRICS = {
    "mrr": (True, "mean reciprocal rank of each query's document among all held-out documents (cosine)"),
    "spearman_score": (True, "Spearman correlation of pair cosines with the data's similarity scores"),
    "knn_accuracy": (True, "leave-one-out k-nearest-neighbour label accuracy on the held-out rows"),
    "spearman_teacher": (True, "Spearman correlation of the model's pair cosines with the teacher's"),
}


def score(recipe: EmbeddingRecipe, model, rows: list[dict]) -> tuple[dict, torch.Tensor | None]:
    """One model's held-out metrics (retrieval, human-scored pairs, kNN) and its pair cosines."""
    from scipy.stats import spearmanr

    d, e = recipe.data, recipe.eval
    pairs, scores = _pairs(recipe, rows)
    m: dict = {}
    if d.query_field and d.document_field:
        docs = list(dict.fromkeys(r[d.document_field] for r in rows))
        gold = torch.tensor([docs.index(r[d.document_field]) for r in rows])
        m.update(retrieval_metrics(_encode(model, [r[d.query_field] for r in rows], e.batch_size),
                                   _encode(model, docs, e.batch_size), gold, e.recall_at))
    pair_sims = None
    if pairs:
        a = _encode(model, [p[0] for p in pairs], e.batch_size)
        b = _encode(model, [p[1] for p in pairs], e.batch_size)
        pair_sims = torch.nn.functional.cosine_similarity(a, b)
        if scores is not None:
            m["spearman_score"] = float(spearmanr(pair_sims.numpy(), scores).statistic)
    if d.label_field:
        m["knn_accuracy"] = knn_accuracy(_encode(model, [r[d.query_field or d.text_fields[0]] for r in rows], e.batch_size),
                                         [str(r[d.label_field]) for r in rows], e.knn)
    return m, pair_sims


def speed_sentences(recipe: EmbeddingRecipe, rows: list[dict]) -> list[str]:
    """eval.speed_sentences held-out sentences (repeated as needed), the text every speed is timed on."""
    text = eval_sentences(recipe, rows)
    return (text * (recipe.eval.speed_sentences // max(len(text), 1) + 1))[: recipe.eval.speed_sentences]


def evaluate(recipe: EmbeddingRecipe) -> dict:
    """Score teacher and student on the held-out rows; write report.json and report.html."""
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    d, e = recipe.data, recipe.eval
    rows = eval_rows(recipe)
    teacher, identity = load_teacher(recipe)
    teacher.max_seq_length = d.max_length
    folder = recipe.out_dir / "student"
    if not (folder / "modules.json").exists():
        raise DistilError("no trained student; run `distil train` first", file=str(folder))
    roles = {"teacher": teacher, "student": SentenceTransformer(str(folder), device="cpu")}
    folders = {"teacher": sources.resolve(recipe.teacher.model, field="teacher.model").directory, "student": folder}
    pairs, _ = _pairs(recipe, rows)
    results, models, pair_sims = {}, {}, {}
    speed_text = speed_sentences(recipe, rows)
    for role, model in roles.items():
        results[role], pair_sims[role] = score(recipe, model, rows)
        models[role] = {"name": identity if role == "teacher" else role, "path": str(folders[role]),
                        "params": common.parameter_count(model), "size_bytes": sources.folder_size(folders[role]),
                        "speed": {"value": round(sentences_per_s(model, speed_text, e.batch_size), 1),
                                  "unit": "sentences/s"}, "peak_memory_bytes": None}
    if pairs:
        results["teacher"]["spearman_teacher"] = 1.0
        results["student"]["spearman_teacher"] = float(spearmanr(pair_sims["student"].numpy(),
                                                                 pair_sims["teacher"].numpy()).statistic)
    metrics = metrics_block(results, {**{f"recall@{k}": (True, f"share of queries whose document ranks in the top {k}")
                                         for k in e.recall_at}, **EMBEDDING_METRICS})
    t, s = models["teacher"], models["student"]
    compression, speedup = t["params"] / s["params"], s["speed"]["value"] / t["speed"]["value"]
    headline = (f"student: {compression:.1f}x fewer parameters, {speedup:.1f}x the sentences/s; "
                + ", ".join(f"{k} {100 * m['retention']:.0f}%" for k, m in metrics.items()
                            if k != "spearman_teacher" and m["retention"] is not None) + " of the teacher's")
    if "spearman_teacher" in metrics:
        headline += f"; Spearman with the teacher's pair similarities {metrics['spearman_teacher']['student']:.3f}"
    report = {"task": "embedding", "headline": headline, "models": models, "metrics": metrics,
              "compression": compression, "speedup": speedup, "eval_rows": len(rows), "pairs": len(pairs),
              "settings": {**recipe.student.model_dump(), "epochs": recipe.train.epochs,
                           "threads": torch.get_num_threads()}}
    return write_report(report, recipe.out_dir, recipe.eval.gates)


# ----------------------------------------------------------------------------- export

def export(recipe: EmbeddingRecipe) -> dict:
    """Write export.formats from <out>/student into <out>/exports, load each back in its runtime and
    score it on the held-out rows like the fp32 student (retrieval, kNN, cosine to the fp32
    student's embeddings, sentences/s); rows go into report.json / report.html."""
    from distil.deploy.scoring import add_to_report
    from distil.tasks.export import export_all, score_exports

    d, e = recipe.data, recipe.eval
    folder = recipe.out_dir / "student"
    if not (folder / "modules.json").exists():
        raise DistilError("no trained student; run `distil train` first", file=str(folder))
    rows = eval_rows(recipe)
    sentences = eval_sentences(recipe, rows)
    artifacts = export_all(folder, recipe.export.formats, recipe.out_dir / "exports")

    def score(runtime, reference_emb):
        t0 = time.perf_counter()
        emb = runtime.encode(sentences, e.batch_size)
        speed = {"value": round(len(sentences) / (time.perf_counter() - t0), 1), "unit": "sentences/s"}
        m = {}
        index = {s: i for i, s in enumerate(sentences)}
        if d.query_field and d.document_field:
            docs = list(dict.fromkeys(r[d.document_field].strip() for r in rows))
            gold = torch.tensor([docs.index(r[d.document_field].strip()) for r in rows])
            m.update(retrieval_metrics(emb[[index[r[d.query_field].strip()] for r in rows]],
                                       emb[[index[s] for s in docs]], gold, e.recall_at))
        if d.label_field:
            field = d.query_field or d.text_fields[0]
            m["knn_accuracy"] = knn_accuracy(emb[[index[str(r[field]).strip()] for r in rows]],
                                             [str(r[d.label_field]) for r in rows], e.knn)
        if reference_emb is not None:
            m["cosine_to_student"] = float(torch.nn.functional.cosine_similarity(emb, reference_emb).mean())
            m["max_abs_diff"] = float((emb - reference_emb).abs().max())
        return m, speed, emb

    exports = score_exports(folder, artifacts, score,
                            f"{len(sentences)} held-out sentences, batch {e.batch_size}, {torch.get_num_threads()} "
                            "torch threads, tokenized by each artifact's own tokenizer; cosine_to_student and "
                            "max_abs_diff compare with the fp32 student's embeddings of the same sentences.")
    add_to_report(recipe.out_dir, exports)
    return exports
