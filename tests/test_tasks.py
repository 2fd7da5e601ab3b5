"""Classification and embedding distillation on tiny models and tiny synthetic data (offline).

Recipe validation for `task:`, the task losses against float64 references, and each task's
generate -> train -> evaluate with its students saved and reloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_valid_report, die_after_checkpoint

from distil.config.loading import load_recipe
from distil.config.recipe import Recipe
from distil.config.tasks import ClassificationRecipe, EmbeddingRecipe
from distil.errors import DistilError
from distil.tasks.losses import embedding_cosine, embedding_mse, similarity_kl, soft_label_kd

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the cat dog bird fish sat ran on a mat log tree sky blue red green big small happy sad "
         "what is how are you why where who today good bad day night music song").split()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- recipes

def _cls_dict(root: Path) -> dict:
    return {"task": "classification",
            "teacher": {"model": "factory:cnn", "args": {"channels": [4], "hidden": 16, "image_size": 8},
                        "train": {"epochs": 3, "batch_size": 32, "lr": 1e-2, "warmup": 0}},
            "student": {"model": "factory:mlp", "args": {"in_features": 64, "hidden": [8]}},
            "data": {"train": str(root / "train.npz"), "eval": str(root / "eval.npz")},
            "train": {"epochs": 2, "batch_size": 32, "lr": 1e-2, "warmup": 0, "temperature": 2.0, "alpha": 0.5},
            "out": str(root / "out"), "cache": str(root / "cache")}


def test_shipped_recipes_validate_as_their_task():
    assert type(load_recipe(REPO / "recipes/quickstart.yaml")) is Recipe
    assert load_recipe(REPO / "recipes/quickstart.yaml").task == "causal_lm"
    fm = load_recipe(REPO / "recipes/fashion_mnist.yaml")
    assert isinstance(fm, ClassificationRecipe) and fm.train.temperature == 4.0
    ml = load_recipe(REPO / "recipes/minilm.yaml", ["train.epochs=1"])
    assert isinstance(ml, EmbeddingRecipe) and ml.train.epochs == 1 and ml.student.hidden_size == 128


def test_task_recipe_errors_name_file_line_and_field(tmp_path):
    data = _cls_dict(tmp_path)
    data["train"]["tempreature"] = 3.0
    path = _write(tmp_path / "r.yaml", data)
    with pytest.raises(DistilError) as e:
        load_recipe(path)
    assert e.value.file == str(path) and e.value.field == "train.tempreature" and "temperature" in e.value.message
    assert e.value.line == path.read_text().splitlines().index("  tempreature: 3.0") + 1

    with pytest.raises(DistilError) as e:
        load_recipe(_write(tmp_path / "r.yaml", _cls_dict(tmp_path)), ["train.alpha=2"])
    assert e.value.file == "command line" and e.value.field == "train.alpha"

    with pytest.raises(DistilError) as e:
        load_recipe(_write(tmp_path / "r.yaml", {**_cls_dict(tmp_path), "task": "clasification"}))
    assert e.value.field == "task"

    with pytest.raises(DistilError) as e:  # GGUF is for causal LMs only
        load_recipe(_write(tmp_path / "r.yaml", {**_cls_dict(tmp_path), "export": {"formats": ["onnx", "gguf"]}}))
    assert e.value.field == "export.formats.1" and e.value.line is not None
    assert load_recipe(_write(tmp_path / "r.yaml", _cls_dict(tmp_path)), ["export.formats=[hf,int8]"]).export.formats == ["hf", "int8"]
    with pytest.raises(DistilError) as e:
        load_recipe(_write(tmp_path / "r.yaml", _cls_dict(tmp_path)), ["train.checkpoint_every=-1"])
    assert e.value.field == "train.checkpoint_every"

    emb = {"task": "embedding", "teacher": {"model": "x"}, "student": {"hidden_size": 8}, "data": {"train": "a", "eval": "b"}}
    with pytest.raises(DistilError) as e:
        load_recipe(_write(tmp_path / "e.yaml", emb))
    assert e.value.field == "student" and "student.layers is required" in e.value.message
    with pytest.raises(DistilError) as e:
        load_recipe(_write(tmp_path / "e.yaml", {**emb, "student": {"static": True, "layers": [0]}}))
    assert e.value.field == "student" and "drop student.layers" in e.value.message
    with pytest.raises(DistilError) as e:
        load_recipe(_write(tmp_path / "e.yaml", {**emb, "student": {"static": True}, "export": {"formats": ["onnx"]}}))
    assert "exports as hf only" in e.value.message
    with pytest.raises(DistilError) as e:  # a causal-LM key is unknown to an embedding recipe
        load_recipe(_write(tmp_path / "e.yaml", {**emb, "student": {"layers": [0]}}), ["generate.top_k=3"])
    assert e.value.field == "generate"


# ----------------------------------------------------------------------------- losses vs float64

def test_soft_label_kd_matches_float64_reference():
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 7) * 3, torch.randn(16, 7) * 3, torch.randint(0, 7, (16,))
    T, alpha = 3.0, 0.3
    s64, t64 = s.double(), t.double()
    p_t = torch.softmax(t64 / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s64 / T, -1))).sum(-1).mean()
    ce = -torch.log_softmax(s64, -1).gather(1, y[:, None]).mean()
    ref = alpha * ce + (1 - alpha) * T ** 2 * kl
    assert torch.allclose(soft_label_kd(s, t, y, temperature=T, alpha=alpha).double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(soft_label_kd(s, t, y, temperature=T, alpha=1.0).double(), ce, rtol=1e-5)


def test_embedding_losses_match_float64_references():
    torch.manual_seed(1)
    s, t = torch.randn(9, 6), torch.randn(9, 10)
    s2 = torch.randn(9, 10)
    assert torch.allclose(embedding_mse(s2, t).double(), ((s2.double() - t.double()) ** 2).mean(), rtol=1e-5)
    cos = (s2.double() * t.double()).sum(-1) / (s2.double().norm(dim=-1) * t.double().norm(dim=-1))
    assert torch.allclose(embedding_cosine(s2, t).double(), (1 - cos).mean(), rtol=1e-5)

    tau = 0.1

    def rows(e):
        e = e.double() / e.double().norm(dim=-1, keepdim=True)
        sims = e @ e.T / tau
        return [torch.log_softmax(torch.cat([sims[i, :i], sims[i, i + 1:]]), 0) for i in range(len(e))]

    ref = torch.stack([(ls_t.exp() * (ls_t - ls_s)).sum() for ls_s, ls_t in zip(rows(s), rows(t))]).mean()
    assert torch.allclose(similarity_kl(s, t, temperature=tau).double(), ref, rtol=1e-5, atol=1e-7)
    assert float(similarity_kl(t, t, temperature=tau)) < 1e-6


# ----------------------------------------------------------------------------- classification

def _images(n: int, seed: int):
    """Three classes of 8x8 images: a bright row, a bright column, or a bright diagonal, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        k = rng.integers(0, 8)
        if c == 0:
            x[i, 0, k, :] += 1
        elif c == 1:
            x[i, 0, :, k] += 1
        else:
            x[i, 0][np.eye(8, dtype=bool)] += 1
    return x, y


def test_classification_end_to_end_save_and_reload(tmp_path):
    from distil import pipeline
    from distil.tasks.classification import load_model, load_split, predict

    for name, n, seed in (("train", 240, 0), ("eval", 90, 1)):
        x, y = _images(n, seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    recipe = load_recipe(_write(tmp_path / "r.yaml", _cls_dict(tmp_path)))
    gen = pipeline.generate(recipe)
    assert gen["generated"] == 330 and pipeline.generate(recipe)["generated"] == 0  # cached
    trained = pipeline.train(recipe)
    assert set(trained) == {"student", "baseline"} and trained["baseline"]["alpha"] == 1.0
    assert pipeline.train(recipe)["student"]["skipped"]
    report = pipeline.evaluate(recipe)
    assert_valid_report(report)
    metrics = report["metrics"]
    for role in ("teacher", "student", "baseline"):
        assert 0 <= metrics["accuracy"][role] <= 1 and 0 <= metrics["macro_f1"][role] <= 1
        assert 0 <= metrics["ece"][role] <= 1
        assert report["models"][role]["speed"]["unit"] == "examples/s" and report["models"][role]["size_bytes"] > 0
    assert metrics["accuracy"]["teacher"] > 0.6  # the teacher really learned the three shapes
    assert metrics["accuracy"]["retention"] == pytest.approx(metrics["accuracy"]["student"] / metrics["accuracy"]["teacher"])
    gap = metrics["accuracy"]["student_minus_baseline"]  # paired bootstrap over held-out examples
    assert gap["value"] == pytest.approx(metrics["accuracy"]["student"] - metrics["accuracy"]["baseline"])
    assert gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]
    assert metrics["teacher_agreement"]["teacher"] == 1.0 and report["compression"] > 1
    assert np.array(report["confusion"]["student"]).sum() == 90
    html = (tmp_path / "out/report.html").read_text()
    # one confusion matrix per model, one bar chart per metric and the loss curves, as on every report card
    assert "Confusion matrices" in html and "<h2>Training</h2>" in html
    assert html.count("data:image/png;base64") == 3 + len(metrics) + 1
    assert json.loads((tmp_path / "out/report.json").read_text())["task"] == "classification"

    # a saved student reloads (safetensors, no pickle) and gives the same logits
    held_out = load_split(recipe, "eval")
    reloaded = load_model(tmp_path / "out/student")
    first, _ = predict(reloaded, held_out, 64)
    again, _ = predict(load_model(tmp_path / "out/student"), held_out, 64)
    assert torch.equal(first, again)
    acc = float((first.argmax(-1) == held_out.y).float().mean())
    assert acc == pytest.approx(report["metrics"]["accuracy"]["student"])
    teacher_logits, _ = predict(load_model(report["models"]["teacher"]["path"]), held_out, 64)
    agreement = float((first.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
    assert agreement == pytest.approx(report["metrics"]["teacher_agreement"]["student"])
    gap = report["metrics"]["teacher_agreement"]["student_minus_baseline"]
    assert gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]


def test_random_views_shift_and_mirror_each_image_from_the_seed_alone():
    from distil.config.tasks import ImageViews
    from distil.tasks.classification import random_views

    images = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6) + 1  # no zero pixel
    assert torch.equal(random_views(images, ImageViews(shift=0, flip=False), 7), images)
    views = ImageViews(shift=2, flip=True)
    batch = images.repeat(20, 1, 1, 1)
    out = random_views(batch, views, 7)
    assert torch.equal(out, random_views(batch, views, 7)) and not torch.equal(out, random_views(batch, views, 8))
    # each view is the image moved by (dy, dx) in [-2, 2]^2 with zeros shifted in, perhaps mirrored
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    seen = set()
    for i in range(len(batch)):
        matches = [(dy, dx, m) for dy in range(5) for dx in range(5) for m in (False, True)
                   if torch.equal(out[i], (lambda v: v.flip(-1) if m else v)(padded[i, :, dy:dy + 5, dx:dx + 6]))]
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert len(seen) > 10  # the 40 views are not all the same shift


def test_consistent_teaching_the_teacher_scores_the_view_the_student_sees(tmp_path, monkeypatch):
    """train.augment: the first logged KD loss equals the loss of the initial student against the
    teacher on the same random views (not the teacher's cached logits of the plain images)."""
    from distil import pipeline
    from distil.config.tasks import ImageViews
    from distil.tasks import classification, common
    from distil.training.loop import micro_batch_order

    for name, n, seed in (("train", 240, 0), ("eval", 30, 1)):
        x, y = _images(n, seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    data = _cls_dict(tmp_path)
    data["teacher"]["train"]["augment"] = {"shift": 1}
    data["train"].update(augment={"shift": 2, "flip": True}, epochs=1, baseline=False, seed=3)
    recipe = load_recipe(_write(tmp_path / "r.yaml", data))
    pipeline.generate(recipe)
    monkeypatch.setattr(common, "LOG_EVERY", 1)
    pipeline.train(recipe)
    first = json.loads((tmp_path / "out/logs/student.jsonl").read_text().splitlines()[0])

    train_split, held_out = classification.load_data(recipe)
    teacher, _ = classification.teacher(recipe, train_split)
    idx = torch.tensor(micro_batch_order(240, 32, 3, 0, 1, drop_last=False)[0])
    views = classification.random_views(train_split.x[idx], ImageViews(shift=2, flip=True), common.view_seed(3, 0, 0))
    torch.manual_seed(3)
    student = classification.build_model("factory:mlp", {"in_features": 64, "hidden": [8]}, None, 3, False)
    with torch.no_grad():
        online = teacher(views)
        expected = soft_label_kd(student(views).double(), online.double(), train_split.y[idx], temperature=2.0, alpha=0.5)
        cached = classification._cached_logits(recipe, train_split, held_out)["train"][idx]
        stale = soft_label_kd(student(views).double(), cached.double(), train_split.y[idx], temperature=2.0, alpha=0.5)
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(stale) - float(expected)) > 1e-3  # the cached targets would give another loss


def test_random_views_need_images(tmp_path):
    from distil import pipeline

    rng = np.random.default_rng(0)
    for name in ("train", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(size=(40, 64)).astype(np.float32), y=rng.integers(0, 3, 40))
    data = _cls_dict(tmp_path)
    data["teacher"] = {"model": "factory:mlp", "args": {"in_features": 64, "hidden": [8]},
                       "train": {"epochs": 1, "augment": {}}}
    with pytest.raises(DistilError, match="random views need images") as e:
        pipeline.generate(load_recipe(_write(tmp_path / "r.yaml", data)))
    assert e.value.field == "teacher.train.augment"


def test_classification_with_hugging_face_image_classifiers(tmp_path):
    """An AutoModelForImageClassification teacher (fine-tuned first) and a narrower one built from its config."""
    from transformers import ViTConfig, ViTForImageClassification

    from distil import pipeline
    from distil.tasks.classification import load_model, load_split, predict

    torch.manual_seed(0)
    vit = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32, num_labels=3)).save_pretrained(vit)
    for name, n, seed in (("train", 64, 0), ("eval", 32, 1)):
        x, y = _images(n, seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    data = _cls_dict(tmp_path)
    data["teacher"] = {"model": str(vit), "train": {"epochs": 1, "batch_size": 32, "warmup": 0}}
    data["student"] = {"model": str(vit), "config": {"hidden_size": 8, "intermediate_size": 16}}
    data["train"] = {"epochs": 1, "batch_size": 32, "warmup": 0, "examples": 32}
    recipe = load_recipe(_write(tmp_path / "r.yaml", data))
    pipeline.generate(recipe)
    assert pipeline.train(recipe)["student"]["steps"] == 1  # train.examples: 32 images, one batch
    report = pipeline.evaluate(recipe)
    assert report["models"]["student"]["params"] < report["models"]["teacher"]["params"]
    assert (tmp_path / "out/student/config.json").exists()  # a plain Hugging Face folder
    held_out = load_split(recipe, "eval")
    logits, _ = predict(load_model(tmp_path / "out/student"), held_out, 16)
    assert float((logits.argmax(-1) == held_out.y).float().mean()) == pytest.approx(report["metrics"]["accuracy"]["student"])
    # exports of an AutoModelForImageClassification student load back in onnxruntime / torch int8
    exports = pipeline.export(recipe.model_copy(update={"export": recipe.export.model_copy(
        update={"formats": ["hf", "onnx", "int8"]})}))
    _assert_exports(tmp_path / "out/student", exports, held_out.x[:4], lambda rt, p: rt.logits(p),
                    lambda rt, p: rt.logits(p))

    data["student"]["config"] = {"hidden_sise": 8}
    recipe = load_recipe(_write(tmp_path / "r.yaml", data))
    with pytest.raises(DistilError) as e:
        pipeline.train(recipe)
    assert e.value.field == "student.config.hidden_sise"


def test_classification_data_errors(tmp_path):
    from distil import pipeline

    np.savez(tmp_path / "train.npz", x=np.zeros((4, 1, 8, 8), np.float32))  # no y
    recipe = load_recipe(_write(tmp_path / "r.yaml", _cls_dict(tmp_path)))
    with pytest.raises(DistilError, match="x and y"):
        pipeline.generate(recipe)
    recipe = load_recipe(_write(tmp_path / "r.yaml", {**_cls_dict(tmp_path), "data": {"train": "nope.npz", "eval": "x"}}))
    with pytest.raises(DistilError) as e:
        pipeline.generate(recipe)
    assert e.value.field == "data.train"
    recipe = load_recipe(_write(tmp_path / "r.yaml", _cls_dict(tmp_path)), ["student.model=factory:resnet"])
    x, y = _images(8, 0)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    pipeline.generate(recipe)
    with pytest.raises(DistilError, match="unknown factory"):
        pipeline.train(recipe)


# ----------------------------------------------------------------------------- embedding

@pytest.fixture(scope="module")
def tiny_sentence_transformer(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary, mean pooling and normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_st")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "."] + WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    enc = root / "encoder"
    BertModel(cfg).save_pretrained(enc)
    tokenizer.save_pretrained(enc)
    model = SentenceTransformer(modules=[Transformer(str(enc), max_seq_length=32), Pooling(32, "mean"), Normalize()],
                                device="cpu")
    model.save(str(root / "st"))
    return root / "st"


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 8))) for _ in range(n)]


def test_embedding_end_to_end_save_and_reload(tmp_path, tiny_sentence_transformer):
    from sentence_transformers import SentenceTransformer

    from distil import pipeline

    train = [{"text": s} for s in _sentences(120, 0)]
    queries, docs = _sentences(30, 1), _sentences(30, 2)
    held = [{"q": q, "d": d, "label": ["x", "y", "z"][i % 3]} for i, (q, d) in enumerate(zip(queries, docs))]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(_write(tmp_path / "e.yaml", {
        "task": "embedding", "teacher": {"model": str(tiny_sentence_transformer)},
        "student": {"layers": [1], "hidden_size": 16, "intermediate_size": 32},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "query_field": "q", "document_field": "d",
                 "label_field": "label", "text_fields": ["text"]},
        "train": {"epochs": 2, "batch_size": 16, "warmup": 0}, "eval": {"speed_sentences": 32, "recall_at": [1, 5]},
        "out": str(tmp_path / "out"), "cache": str(tmp_path / "cache")}))
    assert pipeline.generate(recipe)["generated"] > 0
    log = pipeline.train(recipe)["student"]
    assert log["steps"] == 16 and np.isfinite(log["final"]["loss"])
    report = pipeline.evaluate(recipe)
    assert_valid_report(report)
    assert report["models"]["student"]["params"] < report["models"]["teacher"]["params"]
    assert report["models"]["student"]["speed"]["unit"] == "sentences/s"
    s = {name: m["student"] for name, m in report["metrics"].items()}
    t = {name: m["teacher"] for name, m in report["metrics"].items()}
    for key in ("recall@1", "recall@5", "mrr", "knn_accuracy"):
        assert key in s and key in t
    assert -1 <= s["spearman_teacher"] <= 1 and report["pairs"] == 60
    assert t["recall@1"] <= t["recall@5"] <= 1

    # the saved student is a plain sentence-transformers folder, in the teacher's 32-d space
    loaded = SentenceTransformer(str(tmp_path / "out/student"), device="cpu")
    a = loaded.encode(queries[:4], convert_to_tensor=True)
    b = SentenceTransformer(str(tmp_path / "out/student"), device="cpu").encode(queries[:4], convert_to_tensor=True)
    assert a.shape == (4, 32) and torch.allclose(a, b, atol=1e-6)


def test_embedding_student_keeps_teacher_layers_when_width_is_kept(tiny_sentence_transformer):
    from sentence_transformers import SentenceTransformer

    from distil.config.tasks import EmbeddingStudent
    from distil.tasks.embedding import build_student

    teacher = SentenceTransformer(str(tiny_sentence_transformer), device="cpu")
    student = build_student(teacher, EmbeddingStudent(layers=[1]))
    t_state, s_state = teacher[0].auto_model.state_dict(), student[0].auto_model.state_dict()
    assert torch.equal(s_state["encoder.layer.0.attention.self.query.weight"], t_state["encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(s_state["embeddings.word_embeddings.weight"], t_state["embeddings.word_embeddings.weight"])
    with pytest.raises(DistilError) as e:
        build_student(teacher, EmbeddingStudent(layers=[5]))
    assert e.value.field == "student.layers"


def test_static_student_is_the_teachers_token_outputs_pca_and_frequency_weights(tiny_sentence_transformer):
    """Each token's vector: the teacher's mean output over [CLS] t [SEP], centred, on the top principal
    directions, times a / (a + p(t)); a sentence: the normalised mean of its tokens' vectors mapped
    back by P^T. Checked against a float64 reference computed here from the teacher itself."""
    from sentence_transformers import SentenceTransformer

    from distil.config.tasks import EmbeddingStudent
    from distil.tasks.embedding import build_static_student, token_embeddings

    teacher = SentenceTransformer(str(tiny_sentence_transformer), device="cpu")
    tokens = token_embeddings(teacher, batch_size=7)
    tok, encoder = teacher[0].tokenizer, teacher[0].auto_model.eval()
    cat = tok.convert_tokens_to_ids("cat")
    with torch.no_grad():
        ids = torch.tensor([[tok.cls_token_id, cat, tok.sep_token_id]])
        alone = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)[0]
    assert torch.allclose(tokens[cat], alone, atol=1e-6) and tokens.shape == (len(tok), 32)

    corpus = ["the cat sat on the mat", "the dog ran"]
    student = build_static_student(teacher, tokens, EmbeddingStudent(static=True, hidden_size=8, sif_coefficient=0.05),
                                   corpus)
    t = tokens.double()
    _, _, v = torch.linalg.svd(t - t.mean(0), full_matrices=False)
    p_dirs = v[:8].T
    counts = torch.ones(len(tok), dtype=torch.float64)
    for sentence in corpus:
        for i in tok(sentence, add_special_tokens=False).input_ids:
            counts[i] += 1
    weight = 0.05 / (0.05 + counts / counts.sum())
    sentence_ids = tok("the cat ran", add_special_tokens=False).input_ids
    table = ((t - t.mean(0)) @ p_dirs) * weight[:, None]
    expected = torch.nn.functional.normalize(table[sentence_ids].mean(0) @ p_dirs.T, dim=0)
    got = student.encode(["the cat ran"], convert_to_tensor=True)[0].double()
    # the sign of each principal direction is arbitrary, but it cancels through P and P^T
    assert torch.allclose(got, expected, atol=1e-5)


def test_static_embedding_student_end_to_end_and_its_hf_export(tmp_path, tiny_sentence_transformer):
    from sentence_transformers import SentenceTransformer

    from distil import pipeline
    from distil.tasks.embedding import build_static_student

    train = [{"text": s} for s in _sentences(120, 0)]
    held = [{"q": q, "d": d, "label": "xyz"[i % 3]} for i, (q, d) in enumerate(zip(_sentences(30, 1), _sentences(30, 2)))]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(_write(tmp_path / "e.yaml", {
        "task": "embedding", "teacher": {"model": str(tiny_sentence_transformer)},
        "student": {"static": True, "hidden_size": 16},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "query_field": "q", "document_field": "d",
                 "label_field": "label"},
        "train": {"epochs": 3, "batch_size": 16, "warmup": 0, "lr": 1e-2},
        "eval": {"speed_sentences": 32, "recall_at": [1, 5]}, "export": {"formats": ["hf"]},
        "out": str(tmp_path / "out"), "cache": str(tmp_path / "cache")}))
    with pytest.raises(DistilError) as e:  # the token outputs are teacher work: generate first
        pipeline.train(recipe)
    assert "distil generate" in e.value.message
    result = pipeline.run(recipe)
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert_valid_report(report)
    vocabulary = 7 + len(WORDS)  # the fixture's specials and punctuation, then its words
    assert report["models"]["student"]["params"] == vocabulary * 16 + 16 * 32 + 32  # table, Dense weight and bias
    log = _log(tmp_path / "out", "student")
    assert log[-1]["loss"] < log[0]["loss"]  # training moved it toward the teacher's sentence embeddings

    # trained: closer to the teacher's embeddings of held-out sentences than the untrained table
    from distil.tasks.embedding import _cached, eval_rows, eval_sentences, load_teacher, train_sentences
    teacher, identity = load_teacher(recipe)
    sentences, held_out = train_sentences(recipe), eval_sentences(recipe, eval_rows(recipe))
    cached = _cached(recipe, identity, sentences, held_out)
    untrained = build_static_student(teacher, cached["tokens"], recipe.student, sentences)
    trained = SentenceTransformer(str(tmp_path / "out/student"), device="cpu")
    def cosine(model):
        emb = model.encode(held_out, convert_to_tensor=True)
        return float(torch.nn.functional.cosine_similarity(emb, cached["eval"]).mean())
    assert cosine(trained) > cosine(untrained) + 0.01

    # its hf export loads back, is scored like the student, and encodes as it does
    row = result["exports"]["rows"][0]
    assert row["format"] == "hf"
    assert row["metrics"]["cosine_to_student"] > 0.99999
    assert report["exports"]["reference"]["metrics"]["recall@1"] == pytest.approx(report["metrics"]["recall@1"]["student"])
    with pytest.raises(DistilError) as e:
        __import__("distil.tasks.export", fromlist=["x"]).export_task_model(tmp_path / "out/student", "onnx",
                                                                            tmp_path / "onnx")
    assert "hf only" in e.value.message


# ----------------------------------------------------------------------------- resume

def _killed_then_resumed(recipe, monkeypatch, kill_at: int) -> dict:
    """Train until the checkpoint of step `kill_at` is written, die there, then train again with resume."""
    import distil.training.loop as loop
    from distil import pipeline

    die_after_checkpoint(monkeypatch, loop, kill_at, lambda: pipeline.train(recipe))
    assert not (recipe.out_dir / "student").exists()
    return pipeline.train(recipe, resume=True)


def _log(out: Path, name: str) -> list[dict]:
    """The run's metrics log, without the timings."""
    rows = [json.loads(line) for line in (out / "logs" / f"{name}.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("augment", [None, {"shift": 2}], ids=["plain", "random-views"])
def test_classification_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, augment):
    from distil import pipeline
    from distil.tasks.classification import load_model

    for name, n, seed in (("train", 240, 0), ("eval", 30, 1)):
        x, y = _images(n, seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    data = _cls_dict(tmp_path)
    data["student"]["args"]["dropout"] = 0.3  # the RNG state must be restored too
    data["train"]["augment"] = augment  # the views too, and the online teacher's scores of them
    data["train"]["checkpoint_every"] = 3
    data["train"]["baseline"] = False
    runs = {}
    for name in ("A", "B"):
        runs[name] = load_recipe(_write(tmp_path / f"{name}.yaml", {**data, "out": str(tmp_path / name)}))
    pipeline.generate(runs["A"])
    full = pipeline.train(runs["A"])["student"]
    assert full["steps"] == 16 and full["resumed_from"] == 0
    resumed = _killed_then_resumed(runs["B"], monkeypatch, kill_at=9)["student"]  # epoch 2, mid-way
    assert resumed["resumed_from"] == 9 and resumed["final"]["loss"] == full["final"]["loss"]
    _assert_same_state(load_model(tmp_path / "A/student"), load_model(tmp_path / "B/student"))
    log_a, log_b = (_log(tmp_path / n, "student") for n in "AB")
    assert [r["step"] for r in log_b] == [16]  # logged every 20 steps and at the end
    assert log_a == log_b  # each logged step once, with the same losses


def test_embedding_resumed_run_equals_uninterrupted(tmp_path, tiny_sentence_transformer, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from distil import pipeline

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(80, 0)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(10, 1)))
    data = {"task": "embedding", "teacher": {"model": str(tiny_sentence_transformer)},
            "student": {"layers": [0], "hidden_size": 16},
            "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
            "train": {"epochs": 2, "batch_size": 16, "warmup": 2, "checkpoint_every": 2},
            "cache": str(tmp_path / "cache")}
    runs = {name: load_recipe(_write(tmp_path / f"{name}.yaml", {**data, "out": str(tmp_path / name)})) for name in "AB"}
    pipeline.generate(runs["A"])
    full = pipeline.train(runs["A"])["student"]
    assert full["steps"] == 10
    resumed = _killed_then_resumed(runs["B"], monkeypatch, kill_at=6)["student"]
    assert resumed["resumed_from"] == 6 and resumed["final"]["loss"] == full["final"]["loss"]
    _assert_same_state(SentenceTransformer(str(tmp_path / "A/student"), device="cpu"),
                       SentenceTransformer(str(tmp_path / "B/student"), device="cpu"))
    # without --resume, a fresh run starts over (and still ends the same)
    assert pipeline.train(runs["B"].model_copy(update={"out": str(tmp_path / "C")}))["student"]["resumed_from"] == 0


# ----------------------------------------------------------------------------- export
# Tolerances: hf is the same float32 model (identical outputs); ONNX runs the same float32 graph
# in onnxruntime (operator order differs: < 1e-4 on logits of order 1-10, < 1e-5 on unit-norm
# embeddings); int8 from disk reproduces the in-memory `quantize_dynamic` model exactly, and stays
# within a loose bound of float32 (weights and activations rounded to 8 bits).

def _assert_exports(source: Path, exports: dict, probe, run_source, run_artifact) -> None:
    """Each artifact against the fp32 source on `probe` (see the tolerances above)."""
    from distil.deploy.export import quantize_dynamic
    from distil.tasks.export import TaskRuntime, load_int8_task, load_source

    ref = run_source(TaskRuntime(source), probe)
    labels = [r["label"] for r in exports["rows"]]
    assert labels == ["hf", "onnx", "int8"]
    for row in exports["rows"]:
        got = run_artifact(TaskRuntime(row["path"]), probe)
        if row["format"] == "hf":
            assert torch.equal(got, ref)
        elif row["format"] == "onnx":
            assert (got - ref).abs().max() < 1e-4
        else:
            in_memory = TaskRuntime(source)
            in_memory.model = quantize_dynamic(load_source(source)[0])
            assert torch.equal(got, run_source(in_memory, probe))
            assert isinstance(load_int8_task(row["path"]), torch.nn.Module)
        assert row["size_bytes"] > 0 and set(row["metrics"]) >= set(exports["reference"]["metrics"])


def test_classification_export_formats_load_back_and_join_the_report(tmp_path):
    from distil import pipeline

    for name, n, seed in (("train", 120, 0), ("eval", 40, 1)):
        x, y = _images(n, seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    data = {**_cls_dict(tmp_path), "export": {"formats": ["hf", "onnx", "int8"]}}
    data["train"]["baseline"] = False
    data["student"] = {"model": "factory:cnn", "args": {"channels": [4], "hidden": 8, "image_size": 8}}
    result = pipeline.run(load_recipe(_write(tmp_path / "r.yaml", data)))
    exports = result["exports"]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert_valid_report(report)
    assert report["exports"]["reference"]["metrics"]["accuracy"] == pytest.approx(report["metrics"]["accuracy"]["student"])
    hf = exports["rows"][0]["metrics"]
    assert hf["student_agreement"] == 1.0 and hf["max_abs_logit_diff"] == 0.0
    assert exports["rows"][1]["metrics"]["student_agreement"] == 1.0  # onnx
    assert "Exports" in (tmp_path / "out/report.html").read_text()
    x, _ = _images(5, 7)
    _assert_exports(tmp_path / "out/student", exports, torch.from_numpy(x),
                    lambda rt, p: rt.logits(p), lambda rt, p: rt.logits(p))
    with pytest.raises(DistilError) as e:
        from distil.tasks.export import export_task_model
        export_task_model(tmp_path / "out/student", "gguf", tmp_path / "x")
    assert e.value.field == "format"


@pytest.mark.slow
def test_embedding_export_formats_load_back_and_join_the_report(tmp_path, tiny_sentence_transformer):
    from conftest import run_cli
    from sentence_transformers import SentenceTransformer

    from distil import pipeline

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(48, 0)))
    held = [{"q": q, "d": d, "label": "xyz"[i % 3]} for i, (q, d) in enumerate(zip(_sentences(12, 1), _sentences(12, 2)))]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    recipe = load_recipe(_write(tmp_path / "e.yaml", {
        "task": "embedding", "teacher": {"model": str(tiny_sentence_transformer)},
        "student": {"layers": [1], "hidden_size": 16},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "query_field": "q", "document_field": "d",
                 "label_field": "label"},
        "train": {"epochs": 1, "batch_size": 16, "warmup": 0}, "eval": {"speed_sentences": 16, "recall_at": [1, 5]},
        "export": {"formats": ["hf", "onnx", "int8"]},
        "out": str(tmp_path / "out"), "cache": str(tmp_path / "cache")}))
    exports = pipeline.run(recipe)["exports"]
    student = tmp_path / "out/student"
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert_valid_report(report)
    assert report["exports"]["reference"]["metrics"]["recall@1"] == pytest.approx(report["metrics"]["recall@1"]["student"])
    onnx, int8 = exports["rows"][1]["metrics"], exports["rows"][2]["metrics"]
    assert onnx["cosine_to_student"] > 0.99999 and int8["cosine_to_student"] > 0.9
    probe = _sentences(6, 9)
    _assert_exports(student, exports, probe, lambda rt, p: rt.encode(p), lambda rt, p: rt.encode(p))
    # the hf export is a plain sentence-transformers folder, and the runtime tokenizes as it does
    loaded = SentenceTransformer(exports["rows"][0]["path"], device="cpu").encode(probe, convert_to_tensor=True)
    onnx_emb = __import__("distil.tasks.export", fromlist=["x"]).TaskRuntime(exports["rows"][1]["path"]).encode(probe)
    assert (loaded - onnx_emb).abs().max() < 1e-5

    # `distil export` on a task student: written, loaded back in onnxruntime, compared with the source
    proc = run_cli("export", "--model", str(student), "--format", "onnx", "--out", str(tmp_path / "cli-onnx"),
                   env_extra={"PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    check = json.loads(proc.stdout)["check"]
    assert check["kind"] == "sentence" and check["max_abs_diff"] < 1e-5 and check["min_cosine"] > 0.99999


# ----------------------------------------------------------------------------- text classification

def _topic(words: list[str]) -> str:
    if {"cat", "dog", "bird", "fish"} & set(words):
        return "animal"
    return "colour" if {"blue", "red", "green"} & set(words) else "other"


def test_text_classification_with_sequence_classifiers_end_to_end(tmp_path):
    """A tiny BERT AutoModelForSequenceClassification teacher (fine-tuned on hard labels first) and a
    narrower 1-layer student from its config: generate -> train -> eval -> export, its KL + CE loss
    against a float64 reference, and every export loaded back and compared."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from distil import pipeline
    from distil.tasks.classification import load_model, load_split, logits_of
    from distil.tasks.export import TaskRuntime

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "."] + WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                             num_labels=3)).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    for name, n, seed in (("train.jsonl", 192, 0), ("eval.jsonl", 48, 1)):
        rows = [{"text": s, "label": _topic(s.split())} for s in _sentences(n, seed)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"task": "classification",
            "teacher": {"model": str(bert), "train": {"epochs": 10, "batch_size": 16, "lr": 3e-3, "warmup": 0}},
            "student": {"model": str(bert), "config": {"num_hidden_layers": 1, "hidden_size": 16,
                                                       "num_attention_heads": 2, "intermediate_size": 32}},
            "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 12},
            "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup": 0, "temperature": 2.0, "alpha": 0.5,
                      "baseline": False},
            "export": {"formats": ["hf", "onnx", "int8"]},
            "out": str(tmp_path / "out"), "cache": str(tmp_path / "cache")}
    recipe = load_recipe(_write(tmp_path / "r.yaml", data))
    assert pipeline.generate(recipe)["generated"] == 240
    assert pipeline.train(recipe)["student"]["steps"] == 36
    report = pipeline.evaluate(recipe)
    assert_valid_report(report)
    t = {name: m["teacher"] for name, m in report["metrics"].items()}
    s = {name: m["student"] for name, m in report["metrics"].items()}
    assert t["accuracy"] > 0.7  # the teacher learned the topics (majority class: 46%)
    assert report["models"]["student"]["params"] < report["models"]["teacher"]["params"]
    assert report["classes"] == ["animal", "colour", "other"] and "teacher_agreement" in s
    exports = pipeline.export(recipe)

    # the trained student's KD loss on a training batch, against float64 arithmetic
    from distil.tasks.classification import _cached_logits
    train_split, held_out = load_split(recipe, "train", tokenizer), load_split(recipe, "eval", tokenizer)
    teacher_logits = _cached_logits(recipe, train_split, held_out)["train"][:16]
    student = load_model(tmp_path / "out/student", is_text=True)
    batch, y = train_split.take(torch.arange(16)), train_split.y[:16]
    with torch.no_grad():
        z32 = logits_of(student, batch)
        z64 = logits_of(student.double(), batch)
    T, alpha = 2.0, 0.5
    p_t = torch.softmax(teacher_logits.double() / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(z64 / T, -1))).sum(-1).mean()
    ce = -torch.log_softmax(z64, -1).gather(1, y[:, None]).mean()
    reference = alpha * ce + (1 - alpha) * T ** 2 * kl
    got = soft_label_kd(z32, teacher_logits, y, temperature=T, alpha=alpha).double()
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-6)

    # exports: the student folder carries its tokenizer, so each artifact tokenizes for itself
    assert (tmp_path / "out/student/tokenizer.json").exists()
    probe = held_out.take(torch.arange(6))
    _assert_exports(tmp_path / "out/student", exports, probe, lambda rt, p: rt.logits(p), lambda rt, p: rt.logits(p))
    assert TaskRuntime(exports["rows"][1]["path"]).kind == "sequence"
    assert exports["rows"][1]["metrics"]["accuracy"] == pytest.approx(s["accuracy"])
    html = (tmp_path / "out/report.html").read_text()
    assert "Exports" in html and "Confusion matrices" in html


def test_a_task_without_its_extra_installed_says_which_to_install(monkeypatch):
    import importlib.util

    from distil import tasks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    tasks.require_extra("classification")  # needs sklearn only
    with pytest.raises(DistilError) as e:
        tasks.require_extra("embedding")
    assert "scipy" in str(e.value) and "distil[tasks]" in str(e.value) and "task" in str(e.value)


# ----------------------------------------------------------------------------- the shared loop

TASK_WORKER = """
import sys
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from distil.config.tasks import ClassificationTrain
from distil.tasks import common, factory
from distil.tasks.losses import soft_label_kd

out, batch_size, grad_accum, processes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, soft, y = torch.randn(48, 16, generator=g), torch.randn(48, 3, generator=g), torch.randint(0, 3, (48,), generator=g)
torch.manual_seed(0)
model = factory.build("factory:mlp", 3, {"in_features": 16, "hidden": [8]})
cfg = ClassificationTrain(epochs=2, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup=2, temperature=2.0)

def mean_loss(idx, device, _view_seed):
    return soft_label_kd(model(x[idx].to(device)), soft[idx].to(device), y[idx].to(device),
                         temperature=cfg.temperature, alpha=cfg.alpha)

summary = common.train_examples(model, mean_loss, len(y), cfg, out_dir=__import__("pathlib").Path(out), name="s")
assert PartialState().num_processes == processes
assert summary["steps"] == 12 and summary["examples"] == 2 * 48, summary
if PartialState().is_main_process:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + "/weights.safetensors")
"""


def _task_run(tmp_path, name: str, batch_size: int, grad_accum: int, processes: int = 1) -> dict[str, torch.Tensor]:
    """The worker above trained in `processes` processes (torchrun, gloo on CPU); rank 0's weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    import distil

    worker, out = tmp_path / "worker.py", tmp_path / name
    worker.write_text(TASK_WORKER)
    out.mkdir()
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    proc = subprocess.run([sys.executable, *launch, str(worker), str(out), str(batch_size), str(grad_accum),
                           str(processes)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1",  # this checkout's distil in the worker too
                               "PYTHONPATH": os.pathsep.join([str(Path(distil.__file__).parents[1]),
                                                              os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-8000:]
    return load_file(str(out / "weights.safetensors"))


def test_task_grad_accumulation_takes_the_same_step(tmp_path):
    """Batch 8 equals two accumulated micro-batches of 4: the same 8 examples a step (48 examples,
    a multiple of 8, so each epoch's micro-batches line up), summed and divided by 8."""
    one, accumulated = _task_run(tmp_path, "b8", 8, 1), _task_run(tmp_path, "b4x2", 4, 2)
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.manual_seed(0)
    from distil.tasks import factory
    fresh = factory.build("factory:mlp", 3, {"in_features": 16, "hidden": [8]}).state_dict()
    assert not torch.equal(fresh["1.weight"], one["1.weight"]), "training must change the weights"


@pytest.mark.slow
def test_task_two_process_data_parallel_equals_one_process(tmp_path):
    """Two processes with a micro-batch of 4 each equal one process accumulating two of 4."""
    single, ddp = _task_run(tmp_path, "single", 4, 2), _task_run(tmp_path, "ddp", 4, 1, processes=2)
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=1e-4, msg=name)
