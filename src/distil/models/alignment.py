"""Cross-tokenizer distillation: a teacher's cached row, re-expressed in the student's vocabulary.

The teacher cache stays in the teacher's own vocabulary (one cache serves any student); a
student with a different tokenizer reads it through `StudentAligner`:

1. The teacher's answer is decoded to text and re-tokenized by the student, keeping each
   student token's character span (the fast tokenizer's offsets).
2. A student position is *aligned* when a teacher token starts at the same character
   (leading whitespace inside a token skipped on both sides, since "▁hello" and "Ġhello" put
   their space in the token while some tokenizers trim it from the offsets).
3. At an aligned position the teacher's distribution moves to student ids: the teacher's own
   token goes to the student's token there (both stand for "the text from here on"); every
   other top-k alternative goes to the student token whose bytes are the longest prefix of
   the alternative's bytes (the token the student would start that text with); a teacher stop
   token goes to the student's end-of-turn token. Alternatives landing on the same student id
   merge their mass; alternatives with no student token (special tokens, ids past the
   tokenizer in a padded embedding) join the tail bucket. Mapped mass + tail = 1 as before.
4. An unaligned position (a student token that starts inside a teacher token) gets a one-hot
   target on the student's own token: forward KL to it is exactly its cross-entropy.

Rows come out shaped like cache rows (prompt_ids, token_ids, topk_*, tail_logprob), so the
trainer and the evaluation read them unchanged; `uld_*` fields add the teacher's own top-k
at each aligned position (for `losses.sparse_uld`, which needs no shared vocabulary). docs/losses.md and docs/teachers.md say more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distil.errors import DistilError
from distil.models.tokens import TokenMap, token_bytes


def _visible_start(text: str, start: int, end: int) -> int:
    """The first non-whitespace character of text[start:end] (start itself for an all-space span)."""
    s = start
    while s < end and text[s].isspace():
        s += 1
    return start if s == end else s


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == float("-inf"):
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class AlignStats:
    """How much of the teacher's text the student could learn from as distributions."""
    rows: int = 0
    student_tokens: int = 0
    aligned_tokens: int = 0
    mapped_mass: float = 0.0  # summed over aligned positions: teacher mass that found a student id

    def as_dict(self) -> dict:
        n = max(self.aligned_tokens, 1)
        return {"rows": self.rows, "student_tokens": self.student_tokens, "aligned_tokens": self.aligned_tokens,
                "aligned_share": self.aligned_tokens / max(self.student_tokens, 1),
                "mapped_mass_mean": self.mapped_mass / n}


def check_fast(tokenizer, field: str) -> None:
    """Character offsets need a fast (Rust) tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise DistilError("cross-tokenizer distillation needs a fast tokenizer (character offsets); "
                          f"{type(tokenizer).__name__} has none", field=field)


class StudentAligner:
    """Map teacher cache rows (teacher vocabulary) to rows in the student's vocabulary.

    Args:
        teacher_tokenizer, student_tokenizer: Hugging Face fast tokenizers.
        teacher_stop_ids: the teacher's stop tokens (mapped to the student's eos).
        student_eos_id: the student's end-of-turn token.

    Example:
        >>> aligner = StudentAligner(teacher_tok, student_tok, {1}, student_tok.eos_token_id)
        >>> row = aligner.convert(teacher_row, student_prompt_ids)
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, teacher_stop_ids, student_eos_id: int):
        check_fast(teacher_tokenizer, "teacher.model")
        check_fast(student_tokenizer, "student")
        self.teacher, self.student = teacher_tokenizer, student_tokenizer
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.teacher_special = set(teacher_tokenizer.all_special_ids)
        self.teacher_stop = set(teacher_stop_ids)
        self.student_eos = student_eos_id
        self.student_size = len(student_tokenizer)
        student_special = set(student_tokenizer.all_special_ids)
        # Special tokens are never the start of ordinary text.
        self.by_bytes = {b: i for b, i in TokenMap(student_tokenizer).by_bytes.items() if i not in student_special}
        self.longest = max((len(b) for b in self.by_bytes), default=0)
        self._mapped: dict[int, int | None] = {}
        self.stats = AlignStats()

    def student_id(self, teacher_id: int) -> int | None:
        """The student token that starts the text of teacher token `teacher_id` (None: none does)."""
        if teacher_id in self._mapped:
            return self._mapped[teacher_id]
        hit = None
        if teacher_id in self.teacher_stop:
            hit = self.student_eos
        elif 0 <= teacher_id < len(self.teacher_bytes) and teacher_id not in self.teacher_special:
            piece = self.teacher_bytes[teacher_id]
            for n in range(min(len(piece), self.longest), 0, -1):
                hit = self.by_bytes.get(piece[:n])
                if hit is not None:
                    break
        self._mapped[teacher_id] = hit
        return hit

    def _teacher_starts(self, ids: list[int]) -> tuple[str, dict[int, int], int | None]:
        """The teacher's answer text, {visible start character: teacher position}, and the stop position."""
        text_ids, positions, stop_at = [], [], None
        for i, t in enumerate(ids):
            if t in self.teacher_stop:
                stop_at = i
                break
            if t in self.teacher_special or t >= len(self.teacher_bytes):
                continue
            text_ids.append(t)
            positions.append(i)
        text = self.teacher.decode(text_ids, skip_special_tokens=True)
        starts: dict[int, int] = {}
        prev = ""
        for n, pos in enumerate(positions):
            upto = self.teacher.decode(text_ids[: n + 1], skip_special_tokens=True)
            # A token holding part of a UTF-8 character decodes to U+FFFD: its span is not reliable.
            if not prev.endswith("\ufffd") and not upto.endswith("\ufffd") and text.startswith(upto):
                starts.setdefault(_visible_start(text, len(prev), len(upto)), pos)
            prev = upto
        return text, starts, stop_at

    def _target(self, row: dict, pos: int, own: int, k: int) -> tuple[list[int], list[float], float]:
        """The teacher's distribution at position `pos`, on student ids; `own` is the student's token there."""
        merged: dict[int, list[float]] = {}
        unmapped = [row["tail_logprob"][pos]]
        chosen = row["token_ids"][pos]
        for tid, lp in zip(row["topk_ids"][pos], row["topk_logprobs"][pos]):
            sid = own if tid == chosen else self.student_id(tid)
            if sid is None or sid >= self.student_size:
                unmapped.append(lp)
            else:
                merged.setdefault(sid, []).append(lp)
        if chosen not in row["topk_ids"][pos]:  # sampled outside the top-k: its mass sits in the tail
            merged.setdefault(own, [])
        ids = list(merged)
        lps = [_logsumexp(v) if v else float("-inf") for v in merged.values()]
        order = sorted(range(len(ids)), key=lambda j: -lps[j])
        keep = order[:k] if ids.index(own) in order[:k] else order[:k - 1] + [ids.index(own)]
        # k + 1 ids only when the teacher sampled outside its top-k: the smallest joins the tail.
        dropped = [lps[j] for j in order if j not in keep]
        return [ids[j] for j in keep], [lps[j] for j in keep], _logsumexp(unmapped + dropped)

    def convert(self, row: dict, student_prompt_ids: list[int]) -> dict:
        """One teacher cache row -> the same answer as a student-vocabulary row (see module docstring)."""
        k = len(row["topk_ids"][0]) if row["topk_ids"] else 1
        text, starts, stop_at = self._teacher_starts(row["token_ids"])
        enc = self.student(text, add_special_tokens=False, return_offsets_mapping=True)
        s_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        aligned = [starts.get(_visible_start(text, a, b)) if b > a else None for a, b in offsets]
        if stop_at is not None or not s_ids:  # an answer with no text still teaches when to stop
            s_ids.append(self.student_eos)
            aligned.append(stop_at)
        topk_ids, topk_lps, tails, chosen_lps = [], [], [], []
        uld_lps, uld_tails, uld_mask = [], [], []
        for own, pos in zip(s_ids, aligned):
            if pos is None:
                ids, lps, tail = [own], [0.0], float("-inf")
                uld_lps.append([0.0] + [float("-inf")] * (k - 1))
                uld_tails.append(float("-inf"))
                uld_mask.append(0.0)
            else:
                uld_lps.append(list(row["topk_logprobs"][pos]))
                uld_tails.append(row["tail_logprob"][pos])
                uld_mask.append(1.0)
                ids, lps, tail = self._target(row, pos, own, k)
                self.stats.aligned_tokens += 1
                self.stats.mapped_mass += sum(math.exp(v) for v in lps)
            used = set(ids)
            pad = (i for i in range(self.student_size) if i not in used)
            while len(ids) < k:  # rows need k entries: unused ids with no teacher mass
                ids.append(next(pad))
                lps.append(float("-inf"))
            topk_ids.append(ids)
            topk_lps.append(lps)
            tails.append(tail)
            chosen_lps.append(lps[ids.index(own)])
        self.stats.rows += 1
        self.stats.student_tokens += len(s_ids)
        return {**row, "prompt_ids": list(student_prompt_ids), "token_ids": s_ids, "token_logprobs": chosen_lps,
                "topk_ids": topk_ids, "topk_logprobs": topk_lps, "tail_logprob": tails, "text": text.strip(),
                # The teacher's own distribution at the aligned position, for ULD (vocabulary-free).
                "uld_logprobs": uld_lps, "uld_tail": uld_tails, "uld_mask": uld_mask}
