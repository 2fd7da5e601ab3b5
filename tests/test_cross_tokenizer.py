"""Cross-tokenizer distillation: alignment by character offsets (distil.align), ULD against a
float64 reference, and a tiny end-to-end run whose teacher and student tokenizers differ.

The two tokenizers are built offline: a SentencePiece-style teacher (Metaspace BPE, "▁the",
like Gemma's) and a byte-level BPE student ("Ġthe", like SmolLM2's), trained on the same
few sentences with different vocabulary sizes, so their merges differ.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import build_tiny_llama, run_cli, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distil.errors import DistilError
from distil.models.alignment import StudentAligner
from distil.training.losses import sparse_uld, uld

SENTENCES = ["the cat sat on the mat", "a dog ran to the park", "the sun is hot today",
             "cats and dogs play", "where is the red hat", "today the park is quiet"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def metaspace_teacher_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def bytelevel_student_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def toks():
    return metaspace_teacher_tokenizer(), bytelevel_student_tokenizer()


def _row(teacher, pieces_by_position, chosen_pieces, tail: float):
    """A teacher cache row: at each position the chosen piece and its alternatives, with probabilities."""
    ids = [teacher.convert_tokens_to_ids(p) for p in chosen_pieces]
    topk_ids, topk_lps = [], []
    for options in pieces_by_position:
        topk_ids.append([teacher.convert_tokens_to_ids(p) for p, _ in options])
        topk_lps.append([math.log(q) for _, q in options])
    return {"key": "k", "teacher": "t", "prompt": "p", "text": "", "finish_reason": "stop", "prompt_ids": [5, 6],
            "token_ids": ids, "token_logprobs": [lp[0] for lp in topk_lps], "topk_ids": topk_ids,
            "topk_logprobs": topk_lps, "tail_logprob": [math.log(tail)] * len(ids)}


def test_alignment_by_character_offsets_hand_checked(toks):
    teacher, student = toks
    # "the red hat today": teacher ▁the ▁re d ▁h at ▁today <eos>; student the Ġre d Ġh at Ġto day <|im_end|>
    chosen = ["▁the", "▁re", "d", "▁h", "at", "▁today", "<eos>"]
    options = [[(p, 0.6), ("▁cat", 0.2), ("<unk>", 0.1)] for p in chosen]
    options[5] = [("▁today", 0.5), ("▁to", 0.3), ("▁dog", 0.1)]  # ▁today and ▁to both start with Ġto
    row = _row(teacher, options, chosen, tail=0.1)
    aligner = StudentAligner(teacher, student, {teacher.eos_token_id}, student.eos_token_id)
    out = aligner.convert(row, [1, 2, 3])
    sid = student.convert_tokens_to_ids
    assert student.convert_ids_to_tokens(out["token_ids"]) == ["the", "Ġre", "d", "Ġh", "at", "Ġto", "day", "<|im_end|>"]
    assert out["prompt_ids"] == [1, 2, 3] and out["text"] == "the red hat today"
    probs = [dict(zip(i, np.exp(lp))) for i, lp in zip(out["topk_ids"], out["topk_logprobs"])]
    # Position 0: the teacher's own token goes to the student's token there; ▁cat -> Ġcat; <unk> -> tail.
    assert probs[0][sid("the")] == pytest.approx(0.6) and probs[0][sid("Ġcat")] == pytest.approx(0.2)
    assert math.exp(out["tail_logprob"][0]) == pytest.approx(0.2)  # 0.1 cached tail + 0.1 of <unk>
    # Position 5: ▁today (chosen) -> Ġto, and ▁to -> Ġto as well: their mass merges.
    assert probs[5][sid("Ġto")] == pytest.approx(0.8) and probs[5][sid("Ġdog")] == pytest.approx(0.1)
    # "day" starts inside the teacher's ▁today: no teacher distribution, a one-hot on the student's token.
    assert out["topk_ids"][6][0] == sid("day") and out["topk_logprobs"][6][0] == 0.0
    assert out["tail_logprob"][6] == float("-inf") and out["uld_mask"][6] == 0.0
    # The teacher's stop token aligns with the student's end-of-turn token.
    assert probs[7][student.eos_token_id] == pytest.approx(0.6)
    assert out["uld_mask"] == [1.0] * 6 + [0.0, 1.0]
    assert out["uld_logprobs"][5] == row["topk_logprobs"][5]
    for ids, lps, tail in zip(out["topk_ids"], out["topk_logprobs"], out["tail_logprob"]):
        assert len(ids) == 3 and len(set(ids)) == 3 and max(ids) < len(student)
        assert sum(np.exp(lps)) + math.exp(tail) == pytest.approx(1.0)  # mapped + tail = 1
    assert aligner.stats.as_dict()["aligned_tokens"] == 7


def test_ids_past_the_tokenizer_go_to_the_tail(toks):
    """A padded embedding lets a teacher emit ids >= len(tokenizer): they map to nothing, never crash."""
    teacher, student = toks
    chosen = ["▁the", "▁cat"]
    row = _row(teacher, [[(p, 0.5), ("▁the", 0.3)] for p in chosen], chosen, tail=0.2)
    row["topk_ids"][0][1] = len(teacher) + 3  # an id only the padded embedding has
    row["topk_ids"][1][1] = len(teacher) + 7
    row["finish_reason"] = "length"
    aligner = StudentAligner(teacher, student, {teacher.eos_token_id}, student.eos_token_id)
    out = aligner.convert(row, [0])
    assert student.convert_ids_to_tokens(out["token_ids"]) == ["the", "Ġcat"]
    for lps, tail in zip(out["topk_logprobs"], out["tail_logprob"]):
        assert math.exp(tail) == pytest.approx(0.5) and sum(np.exp(lps)) == pytest.approx(0.5)
    assert aligner.student_id(len(teacher) + 3) is None


# --- ULD against float64 references ------------------------------------------------------------------


def np_uld(student_logits, teacher_logits, temperature):
    """Dense ULD in float64: softmax, sort each descending, pad the shorter with zeros, L1."""
    def probs(x):
        x = x / temperature
        e = np.exp(x - x.max(-1, keepdims=True))
        return -np.sort(-(e / e.sum(-1, keepdims=True)), axis=-1)
    p_s, p_t = probs(student_logits), probs(teacher_logits)
    width = max(p_s.shape[-1], p_t.shape[-1])
    pad = lambda p: np.concatenate([p, np.zeros(p.shape[:-1] + (width - p.shape[-1],))], -1)  # noqa: E731
    return np.abs(pad(p_s) - pad(p_t)).sum(-1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5), v_s=st.integers(2, 30), v_t=st.integers(2, 30), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.1, 1.0, 5.0]), temperature=st.sampled_from([1.0, 2.0]))
def test_uld_matches_float64_reference_across_vocabularies(n, v_s, v_t, seed, scale, temperature):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(n, v_s)) * scale, rng.normal(size=(n, v_t)) * scale
    expected = np_uld(s, t, temperature)
    got = uld(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), temperature=temperature,
              reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    # Cached form with every teacher token kept (tail = -inf) is the same loss.
    logp = t - t.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    sparse = sparse_uld(torch.tensor(s, dtype=torch.float32), torch.tensor(logp, dtype=torch.float32),
                        torch.full((n,), float("-inf")), temperature=temperature, reduction="none")
    np.testing.assert_allclose(sparse.numpy(), expected, atol=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5), v_s=st.integers(3, 30), k=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_sparse_uld_top_k_plus_tail_matches_float64_reference(n, v_s, k, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, v_s)) * 2
    t = rng.normal(size=(n, 40)) * 2
    logp_t = t - np.log(np.exp(t).sum(-1, keepdims=True))
    top = -np.sort(-logp_t, -1)[:, :k]
    tail = np.log(1 - np.exp(top).sum(-1))
    p_s = np.exp(s - np.log(np.exp(s).sum(-1, keepdims=True)))
    top_s = -np.sort(-p_s, -1)[:, :k]
    top_s = np.concatenate([top_s, np.zeros((n, k - top_s.shape[-1]))], -1)
    expected = np.abs(top_s - np.exp(top)).sum(-1) + np.abs((1 - top_s.sum(-1)) - np.exp(tail))
    # Shuffled teacher columns: the loss sorts them itself.
    perm = rng.permutation(k)
    got = sparse_uld(torch.tensor(s, dtype=torch.float32), torch.tensor(top[:, perm], dtype=torch.float32),
                     torch.tensor(tail, dtype=torch.float32), reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    ref = sparse_uld(s64, torch.tensor(top[:, perm]), torch.tensor(tail), reduction="sum")
    s32 = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    sparse_uld(s32, torch.tensor(top[:, perm], dtype=torch.float32), torch.tensor(tail, dtype=torch.float32),
               reduction="sum").backward()
    ref.backward()
    np.testing.assert_allclose(s32.grad.numpy(), s64.grad.numpy(), atol=1e-5)


# --- end to end --------------------------------------------------------------------------------------


def _save_model(folder, tokenizer, layers: int, extra_rows: int, seed: int):
    """A tiny Llama whose embedding has `extra_rows` rows past the tokenizer (padded, as real models do)."""
    model = build_tiny_llama(len(tokenizer) + extra_rows, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=seed)
    if layers != model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cross_recipe(tmp_path, toks, distil_home):
    student_tok = toks[1]
    teacher_tok = metaspace_teacher_tokenizer()  # a fresh copy: the chat template is set on it
    teacher_tok.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "<eos>")
    teacher_dir = _save_model(tmp_path / "teacher", teacher_tok, layers=4, extra_rows=9, seed=0)
    student_src = _save_model(tmp_path / "student-src", student_tok, layers=2, extra_rows=5, seed=1)
    data = tmp_path / "data"
    data.mkdir()
    prompts = [" ".join(SENTENCES[i % 6].split()[: 2 + i % 3]) + f" {i}" for i in range(16)]
    write_jsonl(data / "train.jsonl", [{"prompt": p} for p in prompts[:12]])
    write_jsonl(data / "eval.jsonl", [{"prompt": p, "reference": "the cat"} for p in prompts[12:]])
    recipe = {
        "teacher": {"model": str(teacher_dir)},
        "student": {"from_model": {"model": str(student_src), "layers": [0, 1]}},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"},
        "generate": {"max_new_tokens": 8, "top_k": 6, "batch_size": 8},
        "train": {"steps": 4, "batch_size": 4, "log_every": 1, "warmup": 1, "cross_tokenizer": "both", "alpha": 0.2},
        "eval": {"speed_prompts": 2},
        "out": str(tmp_path / "out"),
        "cache": str(tmp_path / "cache"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_cross_tokenizer_run_end_to_end(cross_recipe, tmp_path):
    proc = run_cli("run", str(cross_recipe), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    align = report["cross_tokenizer"]["held_out_alignment"]
    assert report["cross_tokenizer"]["method"] == "both" and align["rows"] == 4
    assert 0 < align["aligned_tokens"] <= align["student_tokens"]
    assert 0 < align["mapped_mass_mean"] <= 1 + 1e-6
    # The student reads and is saved with its own tokenizer, not the teacher's.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "student")
    assert saved.get_vocab() == bytelevel_student_tokenizer().get_vocab()
    logs = [json.loads(line) for line in (out / "logs" / "student.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and all(math.isfinite(x["loss"]) and x["kd"] > 0 for x in logs)
    for metric in ("top1_agreement", "teacher_kl", "perplexity"):
        assert math.isfinite(report["metrics"][metric]["student"])


def test_different_tokenizers_without_the_key_fail_before_any_work(cross_recipe, tmp_path):
    text = cross_recipe.read_text().replace("cross_tokenizer: both", "loss: forward_kl")
    cross_recipe.write_text(text)
    proc = run_cli("run", str(cross_recipe))
    assert proc.returncode != 0
    assert "student.from_model.model" in proc.stderr and "train.cross_tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # the teacher wrote nothing


def test_impossible_pairings_are_named(cross_recipe):
    from distil.config.loading import load_recipe
    from distil.generation.view import TeacherPrompts, check_student

    for overrides, field in ((["train.loss=reverse_kl"], "train.loss"),
                             (["train.mode=on_policy"], "train.mode")):
        recipe = load_recipe(cross_recipe, overrides)
        with pytest.raises(DistilError) as e:
            check_student(TeacherPrompts(recipe))
        assert e.value.field == field
    # A student that reads the teacher's own tokenizer has nothing to align.
    recipe = load_recipe(cross_recipe, ["student.from_model=null", "student.from_teacher.layers=[0]"])
    with pytest.raises(DistilError) as e:
        check_student(TeacherPrompts(recipe))
    assert e.value.field == "train.cross_tokenizer"
