"""An OpenAI-compatible endpoint as a teacher (a hosted API, vLLM, llama.cpp server, `distil serve`).

Requests run concurrently (httpx + asyncio, at most `max_concurrency` in flight, at most
`requests_per_minute` started). A request is retried with exponential backoff and jitter on
429 (honouring Retry-After), 408/409, 5xx, timeouts, connection errors and bodies that do not
parse; any other 4xx, or a request that runs out of retries, stops the run with one
`DistilError`. Finished rows go to the teacher cache in shards as they complete, so a stop
keeps everything already answered and a rerun asks only for the rest.

Soft targets: the endpoint's per-token `top_logprobs` are mapped to the student tokenizer's
ids by their bytes (`distil.models.tokens.TokenMap`) and stored in the cache's top-k columns; the
tail is log(1 - sum of the kept probabilities), so alternatives that do not map to one
student token fall into the tail. Where the endpoint returns no log-probs, or a chosen token
is not one student token (another tokenizer), the row keeps the text only, re-tokenized with
the student tokenizer and stored one-hot: training on it is sequence-level distillation
(cross-entropy on the teacher text).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from distil.errors import DistilError
from distil.files import write_json
from distil.generation.cache import SHARD_SECONDS, TeacherCache
from distil.generation.decoding import encode_prompt
from distil.generation.explain import teacher_chat
from distil.generation.teachers.replicas import Replica, ReplicaPool
from distil.models.tokens import TokenMap
from distil.progress import progress_bar

RETRY_STATUS = {408, 409, 429}
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 300.0
# A reply without the log-probs we asked for: from an endpoint that has sent log-probs, a glitch, retried within
# max_retries (the last reply is kept as text rather than failing the run); before any came, retried this often,
MISSING_LOGPROBS_RETRIES = 2
TEXT_ONLY_AFTER = 3  # ... and after this many replies without and none with, the endpoint is taken as text-only


class Permanent(Exception):
    """A failure that retrying will not fix."""


class _Retry(Exception):
    """A failed request worth another try; `unwell`: the server itself failed (5xx, timeout, connection)."""

    def __init__(self, reason: str, retry_after: float | None = None, unwell: bool = False):
        super().__init__(reason)
        self.reason, self.retry_after, self.unwell = reason, retry_after, unwell


@dataclass
class Usage:
    """What the run asked of the endpoint: requests, retries by reason, tokens, cost."""
    requests: int = 0
    retries: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rows_soft: int = 0       # rows with top-k soft targets
    rows_text: int = 0       # rows with text only (sequence-level distillation)
    rows_counted_locally: int = 0  # rows whose reply had no usage: tokens counted with the local tokenizer

    def cost(self, price_in: float, price_out: float) -> float:
        return self.prompt_tokens * price_in / 1e6 + self.completion_tokens * price_out / 1e6


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(when - time.time(), 0.0), RETRY_AFTER_CAP_S)


class _RateLimiter:
    """Start at most `per_minute` requests a minute, evenly spaced."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = asyncio.get_running_loop().time()
            start = max(now, self.next)
            self.next = start + self.interval
        await asyncio.sleep(start - now)


def chat_messages(messages, system_prompt: str | None) -> list[dict]:
    """The chat sent to the endpoint: the example's messages, with the recipe's system prompt first."""
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt is not None and not any(m["role"] == "system" for m in chat):
        chat.insert(0, {"role": "system", "content": system_prompt})
    return chat


@dataclass
class Reply:
    """One parsed answer: text, finish reason, per-token [(chosen entry, [top entries])] or None, usage."""
    text: str
    finish_reason: str
    tokens: list[tuple[dict, list[dict]]] | None
    prompt_tokens: int | None
    completion_tokens: int | None


def parse_reply(data, endpoint: str) -> Reply:
    """Parse a chat or completions response body; raises ValueError/KeyError/TypeError when malformed."""
    choice = data["choices"][0]
    if endpoint == "chat":
        text = choice["message"]["content"] or ""
        content = (choice.get("logprobs") or {}).get("content")
        tokens = None
        if isinstance(content, list):  # [] for an empty answer: log-probs present, no tokens
            tokens = [({"token": e["token"], "bytes": e.get("bytes"), "logprob": float(e["logprob"])},
                       [{"token": t["token"], "bytes": t.get("bytes"), "logprob": float(t["logprob"])}
                        for t in e.get("top_logprobs") or []]) for e in content]
    else:
        text = choice["text"] or ""
        lp = choice.get("logprobs") or {}
        tokens = None
        if isinstance(lp.get("tokens"), list):
            tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
            tokens = [({"token": t, "logprob": float(v)}, [{"token": a, "logprob": float(b)} for a, b in (top or {}).items()])
                      for t, v, top in zip(lp["tokens"], lp["token_logprobs"], tops)]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    usage = data.get("usage") or {}
    return Reply(text, choice.get("finish_reason") or "stop", tokens, usage.get("prompt_tokens"),
                 usage.get("completion_tokens"))


def _pad(ids: list[int], lps: list[float], k: int) -> tuple[list[int], list[float]]:
    """Fill a top-k list up to k with distinct unused ids of probability 0 (the cache is rectangular)."""
    used, candidate = set(ids), 0
    ids, lps = ids[:k], lps[:k]
    while len(ids) < k:
        if candidate not in used:
            ids.append(candidate)
            lps.append(float("-inf"))
        candidate += 1
    return ids, lps


class RowBuilder:
    """Turns a `Reply` into a cache row in the student tokenizer's ids (soft targets where possible)."""

    def __init__(self, tokenizer, k: int):
        self.tokenizer, self.k = tokenizer, max(k, 1)
        self.tmap = TokenMap(tokenizer)
        self.eos = tokenizer.eos_token_id

    def one_hot(self, tok: int) -> tuple[list[int], list[float], float]:
        ids, lps = _pad([tok], [0.0], self.k)
        return ids, lps, float("-inf")

    def build(self, reply: Reply) -> tuple[dict, bool]:
        """(row fields, has soft targets)."""
        text = reply.text.strip()
        chosen = [self.tmap.lookup(c) for c, _ in reply.tokens] if reply.tokens is not None else None
        soft = chosen is not None and all(c is not None for c in chosen)
        token_ids, token_lps, topk_ids, topk_lps, tails = [], [], [], [], []
        if soft:
            for tok, (c, tops) in zip(chosen, reply.tokens):
                ids, lps, seen = [], [], set()
                for entry in tops:
                    i = self.tmap.lookup(entry)
                    if i is not None and i not in seen and math.isfinite(entry["logprob"]):
                        seen.add(i)
                        ids.append(i)
                        lps.append(min(entry["logprob"], 0.0))
                ids, lps = ids[: self.k], lps[: self.k]
                mass = sum(math.exp(v) for v in lps)
                tail = math.log(1.0 - mass) if mass < 1.0 - 1e-6 else math.log(1e-6)
                ids, lps = _pad(ids, lps, self.k)
                token_ids.append(tok)
                token_lps.append(min(c["logprob"], 0.0))
                topk_ids.append(ids)
                topk_lps.append(lps)
                tails.append(tail)
        else:
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            for tok in encoded:
                ids, lps, tail = self.one_hot(tok)
                token_ids.append(tok)
                token_lps.append(0.0)
                topk_ids.append(ids)
                topk_lps.append(lps)
                tails.append(tail)
        finish = "stop" if reply.finish_reason in ("stop", "eos") else "length"
        if finish == "stop" and self.eos is not None:
            # Endpoints leave the end-of-turn token out; the student must still learn to stop.
            ids, lps, tail = self.one_hot(self.eos)
            token_ids.append(self.eos)
            token_lps.append(0.0)
            topk_ids.append(ids)
            topk_lps.append(lps)
            tails.append(tail)
        row = {"text": text, "finish_reason": finish, "token_ids": token_ids, "token_logprobs": token_lps,
               "topk_ids": topk_ids, "topk_logprobs": topk_lps, "tail_logprob": tails}
        return row, soft


class OpenAITeacher:
    """Ask an OpenAI-compatible endpoint about many prompts; write cache rows as answers arrive.

    Args:
        config: the recipe's `teacher` section (type: openai).
        generate: the recipe's `generate` section (max_new_tokens, do_sample, temperature, top_p, seed).
        tokenizer: the student-side tokenizer (prompts' ids and the mapping of returned tokens).
        name: the teacher name written in each row.
    """

    def __init__(self, config, generate, tokenizer, name: str):
        self.config, self.settings, self.tokenizer, self.name = config, generate, tokenizer, name
        self.builder = RowBuilder(tokenizer, config.top_logprobs)
        self.usage = Usage()
        self.pool = ReplicaPool(config.urls, config.max_concurrency, config.replica_cooldown)
        self.headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise DistilError(f"environment variable {config.api_key_env} (the API key) is not set",
                                  field="teacher.api_key_env")
            self.headers["Authorization"] = f"Bearer {key}"
        self.logprobs_seen = False         # any reply had log-probs
        self.replies_without_logprobs = 0

    def body(self, prompt: str, messages: list[dict]) -> dict:
        c, g = self.config, self.settings
        body = {"model": c.model, "max_tokens": g.max_new_tokens, "temperature": g.temperature if g.do_sample else 0.0}
        if g.do_sample:
            body.update(top_p=g.top_p, seed=g.seed)
        if c.endpoint == "chat":
            body["messages"] = messages
            if c.top_logprobs:
                body.update(logprobs=True, top_logprobs=c.top_logprobs)
        else:
            body["prompt"] = prompt
            if c.top_logprobs:
                body["logprobs"] = c.top_logprobs
        return body

    async def _ask(self, client: httpx.AsyncClient, limiter: _RateLimiter, pool: ReplicaPool,
                   body: dict) -> tuple[Reply, Replica]:
        c = self.config
        path = "chat/completions" if c.endpoint == "chat" else "completions"
        missing_logprobs = 0
        for attempt in range(c.max_retries + 1):
            await limiter.wait()
            replica = None
            try:
                async with pool.take() as replica:
                    self.usage.requests += 1
                    try:
                        resp = await client.post(replica.url + path, json=body)
                    except httpx.TimeoutException:
                        raise _Retry("timeout", unwell=True) from None
                    except httpx.TransportError as e:
                        raise _Retry(f"connection ({type(e).__name__})", unwell=True) from None
                if resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    raise _Retry(f"HTTP {resp.status_code}", _retry_after(resp.headers.get("retry-after")),
                                 unwell=resp.status_code >= 500)
                if resp.status_code != 200:
                    raise Permanent(f"HTTP {resp.status_code} from {replica.url.rstrip('/')}: {_error_message(resp)}")
                try:
                    reply = parse_reply(resp.json(), c.endpoint)
                except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                    raise _Retry("unparseable body") from None
                if c.top_logprobs and reply.tokens is None:
                    # A glitch is worth a retry; an endpoint that never sends log-probs is text-only.
                    self.replies_without_logprobs += 1
                    maybe_glitch = self.logprobs_seen or self.replies_without_logprobs <= TEXT_ONLY_AFTER
                    budget_left = self.logprobs_seen or missing_logprobs < MISSING_LOGPROBS_RETRIES
                    if maybe_glitch and budget_left and attempt < c.max_retries:
                        missing_logprobs += 1
                        raise _Retry("log-probs missing")
                self.logprobs_seen |= reply.tokens is not None
                pool.succeeded(replica)
                return reply, replica
            except _Retry as r:
                self.usage.retries[r.reason] += 1
                pool.failed(replica, r.reason, take_out=r.unwell)
                if attempt == c.max_retries:
                    where = replica.url.rstrip("/") if len(pool.replicas) == 1 else f"{len(pool.replicas)} replicas"
                    raise Permanent(f"{where} failed {attempt + 1} times in a row (last: {r.reason})") from None
                if r.unwell and pool.others_up(replica):
                    continue  # another replica takes the row now; this one sits out its cool-down
                delay = r.retry_after if r.retry_after is not None else \
                    min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt) * (0.5 + random.random())
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _add(self, buffer: list[dict], key: str, prompt: str, prompt_ids: list[int], reply: Reply,
             replica: Replica) -> None:
        fields, soft = self.builder.build(reply)
        if soft:
            self.usage.rows_soft += 1
        else:
            self.usage.rows_text += 1
        if reply.prompt_tokens is None or reply.completion_tokens is None:
            # The endpoint did not say: count with the local tokenizer, and say how many rows were counted so.
            self.usage.rows_counted_locally += 1
        self.usage.prompt_tokens += reply.prompt_tokens if reply.prompt_tokens is not None else len(prompt_ids)
        completion = (reply.completion_tokens if reply.completion_tokens is not None
                      else len(fields["token_ids"]) - (fields["finish_reason"] == "stop"))
        self.usage.completion_tokens += completion
        replica.rows += 1
        replica.completion_tokens += completion
        buffer.append({"key": key, "teacher": self.name, "prompt": prompt, "prompt_ids": prompt_ids, **fields})

    def run(self, items: list[tuple[str, str, list[dict], list[int]]], cache: TeacherCache) -> Usage:
        """Answer every (key, formatted prompt, chat messages, prompt ids) and write the rows to `cache`."""
        return asyncio.run(self._run(items, cache))

    async def _run(self, items, cache: TeacherCache) -> Usage:
        c = self.config
        limiter = _RateLimiter(c.requests_per_minute)
        buffer: list[dict] = []
        last_flush = time.monotonic()
        written = 0

        def flush():
            nonlocal last_flush, written
            if buffer:
                cache.write_shard(list(buffer))
                written += len(buffer)
                buffer.clear()
            last_flush = time.monotonic()

        async def one(item):
            key, prompt, messages, prompt_ids = item
            reply, replica = await self._ask(client, limiter, self.pool, self.body(prompt, messages))
            return key, prompt, prompt_ids, reply, replica

        timeout = httpx.Timeout(c.timeout, connect=min(c.timeout, 30.0))
        in_flight = c.max_concurrency * len(self.pool.replicas)
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        async with httpx.AsyncClient(headers=self.headers, timeout=timeout, limits=limits) as client:
            # A bounded window of tasks (the semaphore bounds what is in flight), so a million
            # prompts do not become a million coroutines at once.
            todo, pending = iter(items), set()
            window = 2 * in_flight + 8

            def refill():
                for item in todo:
                    pending.add(asyncio.create_task(one(item)))
                    if len(pending) >= window:
                        break

            t0 = time.time()
            try:
                with progress_bar() as bar:
                    task = bar.add_task("generate (remote)", total=len(items), status="")
                    refill()
                    while pending:
                        finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for fut in finished:
                            pending.discard(fut)
                            try:
                                key, prompt, prompt_ids, reply, replica = fut.result()
                            except Permanent as e:
                                raise DistilError(f"teacher endpoint failed for good: {e}; the rows already answered "
                                                  "are cached, rerun to continue", field="teacher.base_url") from None
                            self._add(buffer, key, prompt, prompt_ids, reply, replica)
                            if len(buffer) >= self.settings.shard_rows or time.monotonic() - last_flush > SHARD_SECONDS:
                                flush()
                            rate = self.usage.completion_tokens / max(time.time() - t0, 1e-9)
                            bar.update(task, advance=1,
                                       status=f"{rate:.0f} tok/s, {sum(self.usage.retries.values())} retries")
                        refill()
            finally:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                flush()
        return self.usage


def _error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
    except (ValueError, AttributeError):
        pass
    return resp.text[:200].replace("\n", " ") or resp.reason_phrase


def generate_remote(recipe, view, items: list[tuple[str, str, tuple]], cache: TeacherCache, summary: dict) -> dict:
    """The generate stage for a type: openai teacher: `items` are (key, formatted prompt, messages) not yet cached.

    Adds to `summary` what was asked of the endpoint (requests, retries, tokens, estimated
    cost, rows with soft targets vs text only) and keeps a running total in <out>/teacher_usage.json.
    """
    c = recipe.teacher
    max_prompt = recipe.data.max_prompt_tokens
    tok = view.tokenizer
    work = []
    for key, prompt, messages in items:
        ids = encode_prompt(tok, prompt, max_prompt)
        work.append((key, prompt, chat_messages(*teacher_chat(messages, recipe)), ids))
    teacher = OpenAITeacher(c, recipe.generate, tok, view.source.name)
    t0 = time.time()
    try:
        teacher.run(work, cache)
    finally:
        usage = teacher.usage
        seconds = time.time() - t0
        cost = usage.cost(c.price_input_per_mtok, c.price_output_per_mtok)
        now = {"endpoint": c.base_url, "model": c.model, "requests": usage.requests,
               "retries": dict(usage.retries), "prompt_tokens": usage.prompt_tokens,
               "completion_tokens": usage.completion_tokens, "estimated_cost": round(cost, 6),
               "price_input_per_mtok": c.price_input_per_mtok, "price_output_per_mtok": c.price_output_per_mtok,
               "rows_soft_targets": usage.rows_soft, "rows_text_only": usage.rows_text,
               "rows_tokens_counted_locally": usage.rows_counted_locally, "seconds": round(seconds, 2),
               "replicas": teacher.pool.summary(seconds)}
        _add_usage(recipe.out_dir / "teacher_usage.json", now)
    generated = usage.rows_soft + usage.rows_text
    summary.update(generated=generated, tokens=usage.completion_tokens, seconds=round(seconds, 2),
                   tokens_per_s=round(usage.completion_tokens / seconds, 1) if seconds else None,
                   teacher_usage={k: v for k, v in now.items() if k not in ("endpoint", "model")})
    if usage.rows_text:
        note = (f"{usage.rows_text} of {generated} teacher answers came without usable log-probs: those rows train by "
                "sequence-level distillation (cross-entropy on the teacher text)")
        summary["distillation"] = note
        print(f"note: {note}", file=sys.stderr)
    return summary


def _add_usage(path, now: dict) -> None:
    """Keep a running total of endpoint usage across generate runs (the report shows it)."""
    total = {}
    if path.exists():
        try:
            total = json.loads(path.read_text())
        except (OSError, ValueError):
            total = {}
    try:
        write_json(path, _merged(total, now))
    except OSError as e:  # the rows are cached; only the running total is lost
        print(f"warning: cannot write {path}: {e.strerror or e}", file=sys.stderr)


RATES = ("price_input_per_mtok", "price_output_per_mtok", "tokens_per_s")  # the latest run's, not summed


def _merged(total: dict, now: dict) -> dict:
    """`total` with `now` added: numbers summed, sections merged key by key, anything else replaced."""
    out = dict(total)
    for k, v in now.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in RATES:
            old = out.get(k, 0)
            out[k] = round((old if isinstance(old, (int, float)) else 0) + v, 6)
        elif isinstance(v, dict):
            out[k] = _merged(out.get(k) if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = v
    return out
