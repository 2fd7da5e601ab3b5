"""Schemathesis against `distil serve`'s own OpenAPI schema: no generated request gets a 5xx.

The server runs a tiny model over real loopback HTTP, with an API key; schemathesis generates
bodies from every operation in /openapi.json (valid and invalid ones) and sends them with the key.
Quick by default (25 examples per operation); `pytest --reliability-full` sends 150.
"""

from __future__ import annotations

import httpx
import schemathesis
from endpoints import ThreadServer
from hypothesis import HealthCheck, given, settings

from distil.serving.server import Limits, create_app, load_engine

KEY = "sk-test-key"


def test_schemathesis_finds_no_5xx(tiny_model_dir, reliability_full):
    engine = load_engine(str(tiny_model_dir), limits=Limits(max_tokens=16))
    with ThreadServer(create_app(engine, api_key=KEY)) as server:
        root = server.url.removesuffix("/v1")
        schema = schemathesis.openapi.from_url(f"{root}/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {(op.method.upper(), op.path) for op in operations} >= {
            ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}
        seen = {"requests": 0, "4xx": 0}
        for operation in operations:
            @settings(max_examples=150 if reliability_full else 25, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case):
                response = case.call(base_url=root, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                seen["requests"] += 1
                seen["4xx"] += 400 <= response.status_code < 500
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

            check()
        # Without the key, the same routes refuse.
        assert httpx.get(f"{root}/v1/models").status_code == 401
    print(seen)
    assert seen["requests"] >= 3 * 10
