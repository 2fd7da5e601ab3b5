"""distil's embedding students beside model2vec's distillation of the same teacher (issue 23).

    python -m bench.static_vs_model2vec --work runs/m2v \
        --model "distil static=runs/minilm-static/student" --model "distil 4-layer=runs/minilm/student"

model2vec 0.10's `distill` extra pins transformers<5.4 while distil pins 5.24, so model2vec runs in
its own venv (WORK/venv, made on first use: torch==2.13.0 CPU and model2vec[distill,quantization]==0.10.0). There it
distils the recipe's teacher with its defaults (PCA to 256 dimensions, SIF weights 1e-4 over Zipf
ranks, mean pooling) into WORK/model2vec, times its own `StaticModel.encode`, and saves its
embeddings of the timed sentences. Here every model (the teacher, model2vec's, each --model) is
scored by distil's evaluator (`distil.tasks.embedding.score`) on the recipe's held-out rows and
timed on the same sentences through sentence-transformers in this one process. model2vec's folder
is read by sentence-transformers' StaticEmbedding; that it encodes as model2vec does is checked
(cosine of the two embeddings of every timed sentence).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL2VEC = "model2vec[distill,quantization]==0.10.0"  # distill imports scikit-learn (quantization)

DISTIL_IN_VENV = """
import json, sys, time
import numpy as np
from model2vec import StaticModel
from model2vec.distill import distill
teacher, out, speed_file = sys.argv[1:4]
t0 = time.perf_counter()
distill(teacher, pca_dims=256, device="cpu").save_pretrained(out)
seconds = time.perf_counter() - t0
model = StaticModel.from_pretrained(out)
sentences = json.loads(open(speed_file).read())
model.encode(sentences[:64])
t0 = time.perf_counter()
emb = model.encode(sentences, batch_size=64)
speed = len(sentences) / (time.perf_counter() - t0)
np.save(out + "/timed_embeddings.npy", emb)
print(json.dumps({"distill_s": round(seconds, 1), "sentences_per_s": round(speed, 1)}))
"""


def model2vec_venv(work: Path) -> Path:
    python = work / "venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", MODEL2VEC], check=True)
    return python


def load_model2vec(folder: Path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

    return SentenceTransformer(modules=[StaticEmbedding.load(str(folder)), Normalize()], device="cpu")


def main(argv: list[str] | None = None) -> dict:
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from distil.config.loading import load_recipe
    from distil.models import sources
    from distil.tasks import common
    from distil.tasks.embedding import eval_rows, load_teacher, score, sentences_per_s, speed_sentences

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/m2v"))
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "minilm-static.yaml"),
                        help="teacher, held-out rows and eval settings")
    parser.add_argument("--model", action="append", default=[], help="LABEL=FOLDER of a sentence-transformers model")
    parser.add_argument("--speed-sentences", type=int, default=4096,
                        help="held-out sentences (repeated) each model encodes for sentences/s")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, [f"eval.speed_sentences={args.speed_sentences}"])
    rows = eval_rows(recipe)
    timed = speed_sentences(recipe, rows)
    (work / "timed.json").write_text(json.dumps(timed))
    teacher_dir = sources.resolve(recipe.teacher.model, field="teacher.model").directory

    m2v_dir = work / "model2vec"
    if not (m2v_dir / "own.json").exists():
        proc = subprocess.run([str(model2vec_venv(work)), "-c", DISTIL_IN_VENV, str(teacher_dir), str(m2v_dir),
                               str(work / "timed.json")], check=True, stdout=subprocess.PIPE, text=True)
        (m2v_dir / "own.json").write_text(proc.stdout.strip().splitlines()[-1])
    own = json.loads((m2v_dir / "own.json").read_text())

    teacher, _ = load_teacher(recipe)
    teacher.max_seq_length = recipe.data.max_length
    models = {"teacher": teacher, "model2vec": load_model2vec(m2v_dir)}
    for text in args.model:
        label, _, folder = text.partition("=")
        models[label] = SentenceTransformer(folder, device="cpu")

    ours = models["model2vec"].encode(timed, convert_to_tensor=True).float()
    theirs = torch.from_numpy(np.load(m2v_dir / "timed_embeddings.npy")).float()
    same_encoding = float(torch.nn.functional.cosine_similarity(ours, theirs).min())

    results, pair_sims = {}, {}
    for label, model in models.items():
        metrics, pair_sims[label] = score(recipe, model, rows)
        if pair_sims[label] is not None:
            metrics["spearman_teacher"] = float(spearmanr(pair_sims[label].numpy(),
                                                          pair_sims["teacher"].numpy()).statistic)
        results[label] = {"metrics": metrics, "params": common.parameter_count(model),
                          "sentences_per_s": round(sentences_per_s(model, timed, recipe.eval.batch_size), 1)}
    results["model2vec"]["own_sentences_per_s"] = own["sentences_per_s"]
    out = {"recipe": args.recipe, "held_out_rows": len(rows), "timed_sentences": len(timed),
           "threads": torch.get_num_threads(), "model2vec": {**own, "version": MODEL2VEC,
                                                            "min_cosine_st_vs_own_encode": same_encoding},
           "models": results, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (work / "results.json").write_text(json.dumps(out, indent=2))
    print(table(out))
    return out


def table(out: dict) -> str:
    teacher = out["models"]["teacher"]
    names = list(teacher["metrics"])
    lines = ["| model | parameters | " + " | ".join(names) + " | sentences/s (sentence-transformers; model2vec's own "
             "encode) |", "|---" * (len(names) + 3) + "|"]
    for label, r in out["models"].items():
        cells = []
        for name in names:
            value, ref = r["metrics"].get(name), teacher["metrics"][name]
            cells.append(f"{value:.4f}" + (f" ({100 * value / ref:.0f}%)" if label != "teacher" and ref else ""))
        own = f"; {r['own_sentences_per_s']:.0f}" if "own_sentences_per_s" in r else ""
        lines.append(f"| {label} | {r['params']:,} | " + " | ".join(cells) + f" | {r['sentences_per_s']:.0f}{own} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
