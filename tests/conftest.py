"""Shared fixtures: a tiny Llama teacher built offline, an isolated DISTIL_HOME, and a tiny recipe.

Everything is built from scratch (no hub, no downloads): a WordLevel tokenizer trained on a
few hundred words with a small chat template, and a 4-layer Llama with hidden size 32,
randomly initialised with a fixed seed. The model folder is written once per test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]

# The words the test prompts are made of; the tokenizer also learns a few hundred filler words.
# The student and data sections of a recipe, for tests of how recipes load (no model is read).
RECIPE_BODY = """\
student:
  from_teacher:
    layers: [0, 3]
data:
  train: data/train.jsonl
  eval: data/eval.jsonl
"""
PROMPT_WORDS = (
    "what is the best way to learn a new language quickly how do you cook rice tell me about "
    "stars planets and moons why sky blue who wrote this book can robots feel happy sad where "
    "does rain come from when should i sleep explain gravity simply name three colors small "
    "large fast slow cat dog bird fish tree river mountain city music song dance paint write "
    "read count numbers one two three four five answer question please thanks hello goodbye"
).split()
PUNCTUATION = ["?", ".", ",", "!", "'"]


def _filler_words(n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "da", "fe"]
    words = []
    for a in syllables:
        for b in syllables:
            words.append(a + b)
            if len(words) == n:
                return words
    return words


def build_tokenizer():
    """A WordLevel tokenizer trained on a few hundred words, with eos/pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_words = PROMPT_WORDS + PUNCTUATION + ["system", "user", "assistant"] + _filler_words(140)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([" ".join(corpus_words)] * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, eos_id: int, pad_id: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256, initializer_range=0.2, eos_token_id=eos_id,
                         pad_token_id=pad_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Make the end-of-turn token a likely (not certain) choice, so some rows stop early
        # and generation exercises dropping finished rows from the batch.
        emb = model.get_input_embeddings().weight
        emb[eos_id] *= 2.0
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder holding the tiny Llama teacher and its tokenizer (built once)."""
    folder = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (the kind GGUF/llama.cpp take), saved once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(PROMPT_WORDS)] * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    folder = tmp_path_factory.mktemp("bpe") / "bpe-llama"
    model = build_tiny_llama(len(fast), fast.eos_token_id, fast.pad_token_id, seed=1)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture
def distil_home(tmp_path, monkeypatch) -> Path:
    """$DISTIL_HOME pointed at a fresh temporary folder."""
    home = tmp_path / "distil-home"
    home.mkdir()
    monkeypatch.setenv("DISTIL_HOME", str(home))
    return home


def _prompt(i: int) -> str:
    n = 3 + (i * 7) % 9  # prompts of different lengths, so batches need padding
    words = [PROMPT_WORDS[(i * 13 + j * 5) % len(PROMPT_WORDS)] for j in range(n)]
    return " ".join(words) + "?"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def prompts_files(tmp_path) -> tuple[Path, Path]:
    """data/train.jsonl (24 rows) and data/eval.jsonl (8 rows with reference and category)."""
    data = tmp_path / "data"
    data.mkdir()
    prompts = [_prompt(i) for i in range(32)]
    assert len(set(prompts)) == 32
    train = write_jsonl(data / "train.jsonl", [{"prompt": p} for p in prompts[:24]])
    categories = ["science", "food", "chat"]
    evaluation = write_jsonl(data / "eval.jsonl", [
        {"prompt": prompts[24 + i], "reference": " ".join(PROMPT_WORDS[i:i + 4]), "category": categories[i % 3]}
        for i in range(8)])
    return train, evaluation


def tiny_recipe_dict(model_dir: Path, root: Path) -> dict:
    return {
        "teacher": {"model": str(model_dir)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"},
        "generate": {"max_new_tokens": 6, "top_k": 8, "batch_size": 8, "shard_rows": 8},
        "train": {"steps": 6, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "warmup": 2},
        "eval": {"speed_prompts": 2},
        "out": str(root / "out"),
        "cache": str(root / "cache"),
    }


@pytest.fixture
def recipe_path(tmp_path, tiny_model_dir, prompts_files, distil_home) -> Path:
    """recipe.yaml in tmp_path: the tiny teacher, student layers [0, 3], tiny generate/train/eval."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp_path), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def load(recipe_path):
    """load(*overrides) -> the tiny recipe, validated, with `key.sub=value` overrides applied."""
    from distil.config.loading import load_recipe

    def _load(*overrides: str):
        return load_recipe(recipe_path, list(overrides))

    return _load


@pytest.fixture
def in_process_speed(monkeypatch):
    """Time models in this process, 4 new tokens each, to keep the suite fast."""
    import distil.evaluation.speed as speed

    def measure_here(model_dir, prompts, max_new_tokens=32):
        return speed.measure(model_dir, prompts, 4)

    monkeypatch.setattr(speed, "measure_in_subprocess", measure_here)


def run_cli(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m distil.cli ARGS` in a fresh process; returns the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "distil.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def assert_valid_report(report: dict) -> None:
    """`report` validates against the one report-card schema shipped in the package, and survives a
    JSON round trip as report.json does."""
    import jsonschema

    from distil.evaluation.report import SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(json.dumps(report, default=str)), schema)


def die_after_checkpoint(monkeypatch, module, kill_at: int, train) -> None:
    """Run `train()` with `module._save_checkpoint` raising KeyboardInterrupt right after it wrote the
    checkpoint of step `kill_at` (a kill at the worst moment that still leaves a checkpoint)."""
    original = module._save_checkpoint

    def save_then_die(folder, step, *args, **kwargs):
        original(folder, step, *args, **kwargs)
        if step == kill_at:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(module, "_save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train()


def pytest_configure(config):
    # The models here are tiny: one thread avoids thread start-up and contention costs, and
    # keeps float results independent of the machine's core count.
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--reliability-full", action="store_true",
                     help="run the reliability tests at full size (20+ kill trials); by default a quick subset")


@pytest.fixture
def reliability_full(request) -> bool:
    return request.config.getoption("--reliability-full")
