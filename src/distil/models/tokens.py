"""Token ids <-> the exact bytes each token stands for.

`distil serve` reports every token with its bytes (OpenAI's `bytes` field), and the remote
teacher maps the tokens an endpoint returns back to the student tokenizer's ids by those
bytes. Decoding one id at a time is not enough: a byte-level BPE token holding half a UTF-8
character decodes to "\ufffd", so many ids would collide.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(tokenizer) -> set[str]:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    spec = json.loads(backend.to_str()).get("decoder") or {}
    parts = spec.get("decoders", [spec])
    return {p.get("type") for p in parts if isinstance(p, dict)}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for, indexed by id (special tokens: their text).

    Args:
        tokenizer: a Hugging Face tokenizer.
    Returns:
        A list of `len(tokenizer)` byte strings.
    """
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    if "ByteLevel" in _decoder_types(tokenizer):
        table = _unicode_to_byte()
        out = []
        for i, piece in enumerate(pieces):
            if piece is None:
                out.append(b"")
            elif i in special or any(ch not in table for ch in piece):
                out.append(piece.encode())  # added tokens are stored as plain text
            else:
                out.append(bytes(table[ch] for ch in piece))
        return out
    out = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(b"")
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # sentencepiece byte fallback
            out.append(bytes([int(piece[3:5], 16)]))
        elif i in special:
            out.append(piece.encode())
        else:
            out.append(piece.replace("\u2581", " ").encode() if "\u2581" in piece
                       else tokenizer.decode([i]).encode())
    return out


class TokenMap:
    """Look up a token an endpoint returned (its bytes, its text, or vLLM's "token_id:N") as an id.

    Example:
        >>> tmap = TokenMap(tokenizer)
        >>> tmap.lookup({"token": " hello", "bytes": [32, 104, 101, 108, 108, 111]})
        22691
    """

    def __init__(self, tokenizer):
        self.by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(token_bytes(tokenizer)):
            if b and b not in self.by_bytes:  # the first (lowest) id wins a tie
                self.by_bytes[b] = i
        self.size = len(tokenizer)

    def lookup(self, entry: dict) -> int | None:
        """The id of one logprobs entry ({"token": str, "bytes": [int] | None}), or None if not one token."""
        raw = entry.get("bytes")
        if isinstance(raw, list) and raw and all(isinstance(x, int) and 0 <= x < 256 for x in raw):
            hit = self.by_bytes.get(bytes(raw))
            if hit is not None:
                return hit
        token = entry.get("token")
        if not isinstance(token, str):
            return None
        if token.startswith("token_id:") and token[9:].isdigit():
            i = int(token[9:])
            return i if i < self.size else None
        return self.by_bytes.get(token.encode())
