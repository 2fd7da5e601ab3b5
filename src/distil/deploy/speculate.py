"""Speculative decoding with the student as the teacher's draft model.

The draft proposes a few tokens, the target scores them all in one forward pass and keeps the
longest prefix it agrees with, plus its own next token, so the output is the target's own
greedy output. `decode` is that loop (and, without a draft, plain greedy decoding through the
same code, so both are timed alike); transformers' assisted generation is kept as a second
engine to compare against.

On a CPU, PyTorch's default float32 matrix multiply (MKL here) is slow for a handful of rows:
scoring 4 tokens cost the 135M teacher 1.5-1.8x a single token, which eats the gain before any
draft is accepted. `prepack_linears` routes the Linear layers through oneDNN with weights
packed once, where 4 tokens cost 1.1-1.2x one (docs/deploy.md has the measurements).
"""

from __future__ import annotations

import contextlib
import time

import torch

from distil.errors import DistilError


class PrepackedLinear(torch.nn.Module):
    """An inference-only nn.Linear whose weight oneDNN packed once for small batches (CPU, float32)."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int = 8):
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def can_prepack(model) -> bool:
    """Whether `prepack_linears` applies: a float32 model on a CPU, with oneDNN's packing ops."""
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack_linears(model):
    """Replace every nn.Linear of a CPU float32 model by a PrepackedLinear, in place; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, PrepackedLinear(child))
    return model


def _next_tokens(model, cache, tokens: list[int]) -> list[int]:
    """Feed `tokens` after what `cache` holds; the model's greedy choice after each of them."""
    logits = model(torch.tensor([tokens], device=model.device), cache=cache, use_cache=True).logits
    return logits[0].argmax(-1).tolist()


def _keep(cache, length: int) -> None:
    cache.crop(length - cache.get_seq_length())  # transformers 5: a negative count of tokens to drop


class Draft:
    """A draft model with its own KV cache: `propose` greedy tokens after a sequence, `keep` a prefix."""

    vocab_size: int

    def reset(self) -> None:
        """Forget everything: the next `propose` starts a new sequence."""
        raise NotImplementedError

    def keep(self, length: int) -> None:
        """Forget everything after the first `length` tokens."""
        raise NotImplementedError

    def cached(self) -> int:
        """How many tokens of the current sequence the cache holds."""
        raise NotImplementedError

    def next_logits(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after the cache; the logits after the last one (1-D)."""
        raise NotImplementedError

    def propose(self, seq: list[int], n: int, min_confidence: float = 0.0) -> list[int]:
        """Feed what the cache lacks of `seq`, then greedily propose up to `n` tokens after it,
        stopping after a token the draft gives less than `min_confidence` probability."""
        proposal, pending = [], seq[self.cached():]
        for _ in range(n):
            logits = self.next_logits(pending)
            token = int(logits.argmax())
            proposal.append(token)
            if min_confidence and torch.softmax(logits.float(), -1)[token] < min_confidence:
                break
            pending = [token]
        return proposal


class TorchDraft(Draft):
    """A transformers causal LM as the draft."""

    def __init__(self, model):
        self.model, self.vocab_size = model, model.config.vocab_size
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def cached(self) -> int:
        return self.cache.get_seq_length()

    def next_logits(self, tokens: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([tokens], device=self.model.device), cache=self.cache, use_cache=True).logits[0, -1]

    def keep(self, length: int) -> None:
        _keep(self.cache, min(length, self.cache.get_seq_length()))


class LlamaCppDraft(Draft):
    """A GGUF draft run by llama.cpp (the `llama` extra): the student as it ships, at llama.cpp's speed."""

    def __init__(self, path, threads: int | None = None, context: int = 4096):
        from distil.errors import require

        require("llama_cpp", "llama")
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=context, n_threads=threads or torch.get_num_threads(), verbose=False)
        self.vocab_size = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.n_tokens = 0

    def cached(self) -> int:
        return self.llm.n_tokens

    def next_logits(self, tokens: list[int]) -> torch.Tensor:
        import numpy as np

        self.llm.eval(tokens)  # drops any cached tokens past llm.n_tokens first
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(logits, shape=(self.vocab_size,)).copy())

    def keep(self, length: int) -> None:
        self.llm.n_tokens = min(length, self.llm.n_tokens)


def new_counts() -> dict:
    """What `decode` adds up across prompts: draft tokens proposed and accepted, rounds, and the
    seconds spent in the draft's proposals and in the target's verification passes."""
    return {"proposed": 0, "accepted": 0, "rounds": 0, "draft_s": 0.0, "verify_s": 0.0}


@torch.inference_mode()
def decode(target, prompt: list[int], *, max_new_tokens: int, stop_ids: set[int], draft: Draft | None = None,
           draft_tokens: int = 3, min_confidence: float = 0.0, counts: dict | None = None) -> list[int]:
    """Greedy-decode one prompt with the target; with a draft, speculatively (same output).

    Each round the draft (a TorchDraft or LlamaCppDraft, reset here) proposes up to
    `draft_tokens` tokens (fewer once it is less sure than `min_confidence`); the target scores
    the last emitted token and the proposal in one pass; the proposal's prefix that matches the
    target's own choices is kept, followed by the target's choice after it. Both KV caches are
    cut back to the kept tokens. `counts` (a `new_counts()` dict) is added to in place.
    """
    from transformers import DynamicCache

    seq = list(prompt)
    cache = DynamicCache()
    if draft is not None:
        draft.reset()
    next_token = _next_tokens(target, cache, seq)[-1]
    out: list[int] = []
    while True:
        out.append(next_token)
        seq.append(next_token)
        if next_token in stop_ids or len(out) >= max_new_tokens:
            return out
        room = min(draft_tokens, max_new_tokens - len(out) - 1)  # leave room for the target's own token
        started = time.perf_counter()
        proposal = draft.propose(seq, room, min_confidence) if draft is not None and room > 0 else []
        proposed = time.perf_counter()
        choices = _next_tokens(target, cache, [next_token] + proposal)
        verified = time.perf_counter()
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == choices[accepted]:
            accepted += 1
        _keep(cache, len(seq) + accepted)
        if proposal:
            draft.keep(len(seq) + accepted)
            if counts is not None:
                counts["proposed"] += len(proposal)
                counts["accepted"] += accepted
                counts["rounds"] += 1
                counts["draft_s"] += proposed - started
                counts["verify_s"] += verified - proposed
        for token in proposal[:accepted]:
            out.append(token)
            seq.append(token)
            if token in stop_ids:
                return out
        next_token = choices[accepted]


@contextlib.contextmanager
def _count_transformers_acceptance():
    """Count draft tokens proposed and accepted inside transformers' assisted generation.

    transformers does not return these numbers, so the candidate generator's two hooks are
    wrapped for the duration of the block (and restored after).
    """
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    counts = new_counts()
    get_candidates, update = AssistedCandidateGenerator.get_candidates, AssistedCandidateGenerator.update_candidate_strategy

    def counted_get_candidates(self, input_ids, **kwargs):
        candidates, logits = get_candidates(self, input_ids, **kwargs)
        counts["proposed"] += candidates.shape[1] - input_ids.shape[1]
        return candidates, logits

    def counted_update(self, input_ids, scores, num_matches):
        counts["accepted"] += int(num_matches)
        counts["rounds"] += 1
        return update(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.get_candidates = counted_get_candidates
    AssistedCandidateGenerator.update_candidate_strategy = counted_update
    try:
        yield counts
    finally:
        AssistedCandidateGenerator.get_candidates = get_candidates
        AssistedCandidateGenerator.update_candidate_strategy = update


def stop_ids_of(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


@torch.inference_mode()
def speculate(target, draft, prompts: list[list[int]], *, max_new_tokens: int = 64, draft_tokens: int | None = 3,
              min_confidence: float = 0.0, pad_id: int | None = None, engine: str = "distil") -> dict:
    """Greedy-decode each prompt (batch 1) with the target alone and with the draft; compare.

    Args:
        target, draft: loaded causal LMs sharing a tokenizer (the teacher and its student); for
            the distil engine the draft may instead be a TorchDraft or LlamaCppDraft.
        prompts: token ids, one list per prompt.
        max_new_tokens: tokens generated per prompt (both runs stop at end of turn, identically).
        draft_tokens: tokens the draft proposes per round (at most). With engine "transformers",
            None means its own schedule, adjusted as acceptance goes.
        min_confidence: (distil engine) end a proposal after a token the draft gives less
            probability than this; 0 proposes `draft_tokens` every round.
        engine: "distil" (`decode`, this module's loop) or "transformers" (`generate(...,
            assistant_model=draft)`); the target alone runs through the same engine.

    Returns:
        tokens/s alone and with the draft, speedup, acceptance rate (accepted / proposed draft
        tokens), mean accepted tokens per round, and how many prompts gave identical output.
    """
    if engine == "distil" and isinstance(draft, torch.nn.Module):
        draft = TorchDraft(draft)
    vocab_size = draft.vocab_size if engine == "distil" else draft.config.vocab_size
    if target.config.vocab_size != vocab_size:
        raise DistilError(f"the draft's vocabulary ({vocab_size}) differs from the target's "
                          f"({target.config.vocab_size}); the draft must share the target's tokenizer", field="draft")
    if engine == "distil":
        if draft_tokens is None:
            raise DistilError("the distil engine needs a number of draft tokens", field="draft_tokens")
        stop_ids = stop_ids_of(target)
        counts = new_counts()

        def alone(ids):
            return decode(target, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids)

        def helped(ids):
            return decode(target, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, draft=draft,
                          draft_tokens=draft_tokens, min_confidence=min_confidence, counts=counts)
        counting = contextlib.nullcontext(counts)
    elif engine == "transformers":
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        assisted = dict(kwargs, assistant_model=draft)
        if draft_tokens is not None:
            assisted.update(num_assistant_tokens=draft_tokens, num_assistant_tokens_schedule="constant")

        def alone(ids):
            return target.generate(torch.tensor([ids], device=target.device), **kwargs)[0, len(ids):].tolist()

        def helped(ids):
            return target.generate(torch.tensor([ids], device=target.device), **assisted)[0, len(ids):].tolist()
        counting = _count_transformers_acceptance()
    else:
        raise DistilError(f"unknown engine {engine!r}: use 'distil' or 'transformers'", field="engine")
    with counting as counts:
        alone(prompts[0][:8])  # warm-up, not counted
        helped(prompts[0][:8])
        counts.update(new_counts())
        plain_s = assisted_s = 0.0
        plain_tokens = assisted_tokens = identical = 0
        for ids in prompts:  # alternate prompt by prompt, so a change of machine load hits both alike
            t0 = time.perf_counter()
            plain = alone(ids)
            plain_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            fast = helped(ids)
            assisted_s += time.perf_counter() - t0
            plain_tokens += len(plain)
            assisted_tokens += len(fast)
            identical += plain == fast
    plain_tps, assisted_tps = plain_tokens / plain_s, assisted_tokens / assisted_s
    return {"engine": engine, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "draft_tokens": draft_tokens,
            "min_confidence": min_confidence,
            "identical_greedy_output": identical,
            "target_tokens_per_s": plain_tps, "speculative_tokens_per_s": assisted_tps,
            "speedup": assisted_tps / plain_tps,
            "acceptance_rate": counts["accepted"] / counts["proposed"] if counts["proposed"] else None,
            "accepted_per_round": counts["accepted"] / counts["rounds"] if counts["rounds"] else None,
            # where a round's time goes (distil engine): the draft's proposal, the target's verification
            "draft_ms_per_round": 1000 * counts["draft_s"] / counts["rounds"] if counts["draft_s"] else None,
            "verify_ms_per_round": 1000 * counts["verify_s"] / counts["rounds"] if counts["verify_s"] else None,
            "draft_tokens_proposed": counts["proposed"], "threads": torch.get_num_threads()}


def speculate_paths(target: str, draft: str, prompts: list[str], *, prepack: bool = True, draft_runtime: str = "auto",
                    device: str = "auto", **kwargs) -> dict:
    """`speculate` on model sources (HF folders, .gguf, pypi:...) and plain-text prompts (chat-formatted).

    device: where the torch models run: "cpu", "cuda", or "auto" (the GPU when there is one).
    prepack: on a CPU, run the torch models' Linear layers through `prepack_linears` (both runs alike).
    draft_runtime: "torch", "llama.cpp" for a .gguf draft (e.g. `distil export --format gguf`), or
        "auto": llama.cpp for a .gguf file where the `llama` extra is installed, torch otherwise.
    """
    import importlib.util
    from pathlib import Path

    from distil.data.examples import format_prompt
    from distil.models.sources import default_device, load_causal_lm, load_tokenizer, resolve

    if device not in ("auto", "cpu", "cuda"):
        raise DistilError(f"unknown device {device!r}: use auto, cpu or cuda", field="device")
    if device == "cuda" and not torch.cuda.is_available():
        raise DistilError("device cuda asked for, but torch sees no CUDA GPU here", field="device")
    device = default_device() if device == "auto" else torch.device(device)
    target_dir = resolve(target).directory
    tokenizer = load_tokenizer(target_dir)
    ids = [tokenizer(format_prompt(tokenizer, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
           for p in prompts]
    target_model = load_causal_lm(target_dir, device=device)
    if draft_runtime == "auto":
        gguf = Path(draft).suffix == ".gguf" and importlib.util.find_spec("llama_cpp") is not None
        draft_runtime = "llama.cpp" if gguf else "torch"
    if draft_runtime == "llama.cpp":
        if Path(draft).suffix != ".gguf" or not Path(draft).is_file():
            raise DistilError(f"{draft}: the llama.cpp draft runtime takes a .gguf file "
                              "(distil export --format gguf writes one)", field="draft")
        draft_model, draft_name = LlamaCppDraft(draft), draft
    elif draft_runtime == "torch":
        draft_dir = resolve(draft).directory
        draft_model, draft_name = load_causal_lm(draft_dir, device=device), str(draft_dir)
    else:
        raise DistilError(f"unknown draft runtime {draft_runtime!r}: use auto, torch or llama.cpp", field="draft_runtime")
    torch_models = [m for m in (target_model, draft_model) if isinstance(m, torch.nn.Module)]
    prepacked = prepack and all(can_prepack(m) for m in torch_models)
    if prepacked:
        for m in torch_models:
            prepack_linears(m)
    result = speculate(target_model, draft_model, ids, pad_id=tokenizer.pad_token_id, **kwargs)
    return {"target": str(target_dir), "draft": draft_name, "draft_runtime": draft_runtime, "device": str(device),
            "prepacked_linears": prepacked, **result}
