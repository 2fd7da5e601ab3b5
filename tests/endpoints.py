"""Test servers on loopback: `distil serve` in a subprocess, and a faulty OpenAI-compatible endpoint.

The faulty endpoint answers chat completions with a fixed text per prompt (words of the tiny
tokenizer's vocabulary, with top log-probs) and, on a fixed share of requests, fails the way
real endpoints do: 429 with Retry-After, 500, a hang past the client's timeout, truncated JSON,
a connection dropped mid-response, an answer without the log-probs asked for.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

REPO = Path(__file__).resolve().parent.parent


class ServeProcess:
    """`distil serve --model DIR --port 0 ...` in a subprocess; `.url` is its /v1 root once it listens."""

    def __init__(self, model_dir: Path, *extra: str, timeout: float = 120):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "distil.cli", "serve", "--model", str(model_dir),
                                      "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=str(REPO))
        line = self._first_line(timeout)
        if "http://" not in line:
            self.stop()
            raise RuntimeError(f"distil serve did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = line.split("at ", 1)[1].strip()

    def _first_line(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return out[0] if out else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ThreadServer:
    """A uvicorn server for an ASGI app on 127.0.0.1, in a background thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def expected_answer(messages: list[dict], words: list[str]) -> list[str]:
    """The fake teacher's answer to a chat: three vocabulary words chosen from the last message."""
    text = messages[-1]["content"]
    seed = sum(map(ord, text))
    return [words[(seed + 7 * i) % len(words)] for i in range(3)]


FAULTS = ("429", "500", "503", "hang", "truncated", "reset", "no-logprobs")


def faulty_endpoint(words: list[str], *, fault_every: int | None = 10, hang_s: float = 3.0, logprobs: bool = True,
                    die_after: int | None = None, fail_rate: float | None = None, seed: int = 0,
                    scripted: dict[str, list[str]] | None = None):
    """A FastAPI app for POST /v1/chat/completions that fails `len(FAULTS)` of every `fault_every` requests.

    Args:
        words: vocabulary words the answers are made of (one token each in the student tokenizer).
        fault_every: request i fails with FAULTS[i % fault_every] when i % fault_every < len(FAULTS); None: never.
        hang_s: how long a "hang" waits before answering (longer than the client's timeout).
        logprobs: include top log-probs in answers.
        die_after: after this many good answers, answer 401 to everything (a permanent failure).
        fail_rate: instead of `fault_every`'s fixed pattern, each request fails with this
            probability, with a kind drawn uniformly from FAULTS (a `random.Random(seed)`).
        scripted: instead, the requests for a prompt (the last message's text) fail with these kinds in
            turn, one per request, and then succeed.
    Returns:
        The app; `app.state.stats` counts requests, faults by kind and good answers per prompt.
    """
    app = FastAPI()
    stats = {"requests": 0, "faults": Counter(), "answered": Counter()}
    app.state.stats = stats
    lock = threading.Lock()
    rng = random.Random(seed)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with lock:
            i = stats["requests"]
            stats["requests"] += 1
            drawn = rng.choice(FAULTS) if fail_rate is not None and rng.random() < fail_rate else None
        if die_after is not None and sum(stats["answered"].values()) >= die_after:
            return JSONResponse({"error": {"message": "invalid api key", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        if scripted is not None:
            turns = scripted.get(body["messages"][-1]["content"], [])
            kind = turns.pop(0) if turns else None
        elif fail_rate is not None:
            kind = drawn
        else:
            kind = FAULTS[i % fault_every] if fault_every and i % fault_every < len(FAULTS) else None
        answer = expected_answer(body["messages"], words)
        content = []
        for w in answer:
            other = words[1] if w == words[0] else words[0]
            content.append({"token": w, "logprob": -0.25, "bytes": list(w.encode()),
                            "top_logprobs": [{"token": w, "logprob": -0.25, "bytes": list(w.encode())},
                                             {"token": other, "logprob": -2.0, "bytes": list(other.encode())}]})
        payload = json.dumps({
            "id": f"x{i}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(answer)},
                         "logprobs": {"content": content} if logprobs and body.get("logprobs") and kind != "no-logprobs"
                         else None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(answer), "total_tokens": 10 + len(answer)}})
        if kind is not None:
            stats["faults"][kind] += 1
        if kind == "429":
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429,
                                headers={"Retry-After": "0.05"})
        if kind == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if kind == "503":
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503,
                                headers={"Retry-After": "0"})
        if kind == "hang":
            await asyncio.sleep(hang_s)
        if kind == "truncated":
            return Response(payload[: len(payload) // 2], media_type="application/json")
        if kind == "reset":
            async def broken():
                yield payload[:10].encode()
                raise ConnectionResetError("dropped mid-response")
            return StreamingResponse(broken(), media_type="application/json")
        if kind is None:
            stats["answered"][body["messages"][-1]["content"]] += 1
        return Response(payload, media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        with lock:
            stats["requests"] += 1
        answer = expected_answer([{"content": body["prompt"]}], words)
        lp = {"tokens": answer, "token_logprobs": [-0.5] * len(answer), "text_offset": [0] * len(answer),
              "top_logprobs": [{w: -0.5, words[2] if w != words[2] else words[3]: -1.5} for w in answer]}
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": " ".join(answer), "finish_reason": "length",
                             "logprobs": lp if body.get("logprobs") else None}]}  # and no usage

    return app
