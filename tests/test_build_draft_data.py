"""scripts/build_draft_data.py: every corpus utterance becomes a prompt, held-out prompts never do."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import build_draft_data  # noqa: E402


def test_every_utterance_is_a_prompt_except_held_out_ones(tmp_path):
    english = tmp_path / "english"
    english.mkdir()
    (english / "food.yml").write_text(
        "conversations:\n- - Do you like pizza?\n  - Yes, with olives.\n  - Olives are salty.\n"
        "- - do you like PIZZA?\n  - No.\n- - yes\n  - Hello\n")
    (english / "ai.yml").write_text("conversations:\n- - What are you?\n  - A bot.\n")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps({"prompt": "what are you?"}) + "\n")

    build_draft_data.main(["--corpus-dir", str(english), "--held-out", str(held_out), "--out", str(tmp_path / "out")])

    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").open()]
    by_prompt = {r["prompt"]: r for r in rows}
    # "yes" is read by YAML as a boolean, not text; the second "pizza" is a duplicate; "What are you?" is held out.
    assert set(by_prompt) == {"Do you like pizza?", "Yes, with olives.", "Olives are salty.", "No.", "Hello",
                              "A bot."}
    assert by_prompt["Do you like pizza?"]["reference"] == "Yes, with olives."
    assert by_prompt["Yes, with olives."]["reference"] == "Olives are salty."
    assert by_prompt["Olives are salty."]["reference"] is None
    assert by_prompt["A bot."]["category"] == "ai"
    assert f"{len(rows)} rows" in (tmp_path / "out" / "README.md").read_text()


def test_teacher_writes_user_messages_after_its_template_head(tiny_model_dir, distil_home):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    head = build_draft_data.user_turn_head(tokenizer)
    full = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert full.startswith(head + "hello") and "hello" not in head

    first = build_draft_data.teacher_prompts(str(tiny_model_dir), 6, seed=1, batch_size=4, max_tokens=64)
    again = build_draft_data.teacher_prompts(str(tiny_model_dir), 6, seed=1, batch_size=4, max_tokens=64)
    assert len(first) == 6 and first == again  # seeded: the same messages every time
    assert any(first) and all(isinstance(t, str) for t in first)
