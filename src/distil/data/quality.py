"""Data quality: repeated prompts out, unusable teacher answers out, categories balanced, all counted.

Prompts (before the teacher sees them, so duplicates cost nothing):
  - exact duplicates: the same chat after lower-casing and dropping punctuation and extra spaces;
  - near duplicates: Jaccard similarity of character 5-gram sets at least `near_duplicate_threshold`,
    found with MinHash + locality-sensitive hashing (no all-pairs comparison) and then checked exactly;
  - category balance: at most `max_per_category` training prompts per category (with
    `balance_categories`, every category is cut to the smallest one's size).
Teacher answers (after generation, before training):
  - empty; cut off at generate.max_new_tokens (finish_reason "length"); disagreeing with the
    example's `reference` (token F1 below `min_reference_f1`).
The first example of a duplicate group is the one kept. Counts go to <out>/data_quality.json and
the report's data section.
"""

from __future__ import annotations

import collections
import re
import string
import zlib
from collections import Counter

import numpy as np

from distil.data.examples import Example

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")
SHINGLE = 5
PERMUTATIONS, BANDS = 64, 16  # 16 bands of 4 rows: pairs with Jaccard >= ~0.5 become candidates
_PRIME = (1 << 31) - 1


def normalize(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def chat_text(example: Example) -> str:
    """The whole chat, normalised: what two examples must share to be duplicates."""
    return " | ".join(f"{m['role']}: {normalize(m['content'])}" for m in example.messages)


def _shingles(text: str) -> set[str]:
    padded = f" {text} "
    return {padded[i:i + SHINGLE] for i in range(max(1, len(padded) - SHINGLE + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class _MinHash:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, PERMUTATIONS, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, PERMUTATIONS, dtype=np.uint64)

    def bands(self, shingles: set[str]) -> list[bytes]:
        h = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.uint64) % np.uint64(_PRIME)
        signature = ((h[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(_PRIME)).min(axis=0)
        rows = PERMUTATIONS // BANDS
        return [bytes([band]) + signature[band * rows:(band + 1) * rows].tobytes() for band in range(BANDS)]


def dedupe(examples: list[Example], mode: str, threshold: float, against: list[Example] = ()) -> tuple[list[Example], Counter]:
    """Drop exact (and, with mode "near", near) duplicates, keeping the first; also drop those repeating `against`.

    Returns:
        (kept examples, Counter of reasons: exact_duplicate, near_duplicate).
    """
    reasons: Counter = Counter()
    if mode == "none":
        return list(examples), reasons
    seen: set[str] = set()
    minhash, buckets, kept_shingles = _MinHash(), {}, []
    kept: list[Example] = []

    def admit(text: str) -> str | None:
        """None if `text` is new (and remember it), else why it is a duplicate."""
        if text in seen:
            return "exact_duplicate"
        if mode == "near":
            sh = _shingles(text)
            bands = minhash.bands(sh)
            candidates = {j for band in bands for j in buckets.get(band, ())}
            if any(jaccard(sh, kept_shingles[j]) >= threshold for j in candidates):
                return "near_duplicate"
            for band in bands:
                buckets.setdefault(band, []).append(len(kept_shingles))
            kept_shingles.append(sh)
        seen.add(text)
        return None

    for ex in against:
        admit(chat_text(ex))
    for ex in examples:
        why = admit(chat_text(ex))
        if why:
            reasons[why] += 1
        else:
            kept.append(ex)
    return kept, reasons


def balance(examples: list[Example], max_per_category: int | None, equalize: bool) -> tuple[list[Example], Counter]:
    """Keep at most `max_per_category` examples per category (the smallest category's size with `equalize`)."""
    counts = Counter(ex.category for ex in examples if ex.category is not None)
    cap = max_per_category
    if equalize and counts:
        cap = min(min(counts.values()), cap or min(counts.values()))
    if cap is None:
        return list(examples), Counter()
    taken: Counter = Counter()
    kept = []
    for ex in examples:
        if ex.category is not None and taken[ex.category] >= cap:
            continue
        taken[ex.category] += 1
        kept.append(ex)
    return kept, Counter({"category_cap": len(examples) - len(kept)} if len(kept) < len(examples) else {})


def answer_problem(row: dict, example: Example, reject: list[str], min_reference_f1: float) -> str | None:
    """Why a teacher answer should not be trained on, or None."""
    from distil.data.quality import token_f1

    text = (row.get("text") or "").strip()
    if "empty" in reject and not text:
        return "empty"
    if "truncated" in reject and row.get("finish_reason") == "length":
        return "truncated"
    if "reference_mismatch" in reject and example.reference and token_f1(text, example.reference) < min_reference_f1:
        return "reference_mismatch"
    return None


def per_category(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(ex.category or "(none)" for ex in examples).items()))


def _normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two texts (lower-cased, punctuation and articles removed)."""
    pred, ref = _normalize(prediction), _normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


