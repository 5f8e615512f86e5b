"""The OpenAPI 3.1 document, with each served model's own paths, and Swagger UI served from
this process (no CDN: the assets ship in the ``fastapi-offline`` wheel).

The generic routes (``/v1/models/{model}/jobs`` …) are documented once; then, for every
model live workers serve, the same operations appear under the model's own path
(``/v1/models/digits/jobs``) with a request schema built from its signature (input names,
datatypes, shapes) and a ready-to-send example. The document is rebuilt when the served
models change (the gateway re-reads them every ``refresh_s``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from producer.submission import ModelInfo
from workers.gateway import schemas
from workers.gateway.payloads import MSGPACK, datatype, example

#: Where the Swagger UI assets are served from.
STATIC_PATH = "/docs/static"
#: Generic path → its per-model twin (``{model}`` filled in).
GENERIC_PATHS = ("/v1/models/{model}/jobs", "/v1/models/{model}/jobs:batch",
                 "/v1/models/{model}:predict")
#: Components every document carries (request bodies are read raw, so FastAPI does not
#: add them by itself).
COMPONENTS: tuple[type[BaseModel], ...] = (schemas.JobRequest, schemas.BatchRequest)


def static_dir() -> Path:
    """Swagger UI's ``swagger-ui-bundle.js`` / ``swagger-ui.css`` (v5: OpenAPI 3.1)."""
    return Path(str(files("fastapi_offline") / "static"))


def request_body(component: str, *, msgpack: bool = True) -> dict[str, Any]:
    """An ``openapi_extra`` request body referring to ``component`` (JSON), and msgpack."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}
    if msgpack:
        content[MSGPACK] = {"schema": {"type": "string", "format": "binary",
                                       "description": "msgpack map: inputs as "
                                       "{name: {dtype, shape, data: <raw bytes>}}"}}
    return {"requestBody": {"required": True, "content": content}}


def _component_name(model: str, suffix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model) + suffix


def _tensor_schema(spec: Any) -> dict[str, Any]:
    shape = list(spec.shape)
    return {
        "type": "object",
        "title": spec.name,
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"const": spec.name},
            "datatype": {"const": datatype(spec.dtype)},
            "shape": {"type": "array", "items": {"type": "integer"},
                      "minItems": len(shape), "maxItems": len(shape),
                      "description": f"{shape} (-1: any length; the first axis is rows)"},
            "data": {"description": f"{spec.dtype} values, row-major",
                     "oneOf": [{"type": "array"}, {"type": "string", "contentEncoding": "base64"}]},
            "parameters": {"type": "object"},
        },
    }


def _version_schema(info: ModelInfo) -> dict[str, Any]:
    return {"oneOf": [{"enum": info.versions}, {"type": "string"}, {"type": "null"}],
            "description": f"{info.versions}, \"latest\", an alias (stable, canary, ...), "
                           "or null: the model's route decides"}


def model_request(info: ModelInfo) -> dict[str, Any]:
    """The JSON schema of one job for ``info``'s model, its example included."""
    inputs = [_tensor_schema(s) for s in info.inputs]
    return {
        "type": "object",
        "title": f"{info.name} job",
        "description": info.description or f"A job for {info.name}",
        "required": ["inputs"],
        "properties": {
            "inputs": {"type": "array", "minItems": len(inputs), "maxItems": len(inputs),
                       "items": {"oneOf": inputs} if len(inputs) > 1 else inputs[0]},
            "version": _version_schema(info),
            "deadline_s": {"type": "number", "exclusiveMinimum": 0},
            "priority": {"type": "integer", "minimum": 0, "maximum": 9, "default": 0},
        },
        "examples": [{"inputs": [example(s) for s in info.inputs]}],
    }


def model_result(info: ModelInfo) -> dict[str, Any]:
    """The JSON schema of a successful job of ``info``'s model (its outputs named)."""
    outputs = [{"type": "object", "title": s.name,
                "properties": {"name": {"const": s.name},
                               "datatype": {"const": datatype(s.dtype)},
                               "shape": {"type": "array", "items": {"type": "integer"},
                                         "description": f"{list(s.shape)}"},
                               "data": {"type": "array"}}} for s in info.outputs]
    doc = copy.deepcopy(schemas.JobDone.model_json_schema(
        ref_template="#/components/schemas/{model}"))
    doc.pop("$defs", None)
    doc["title"] = f"{info.name} result"
    if outputs:
        doc["properties"]["outputs"] = {"type": "array",
                                        "items": {"oneOf": outputs} if len(outputs) > 1
                                        else outputs[0]}
    return doc


def _add_components(doc: dict[str, Any]) -> None:
    found = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in COMPONENTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            found.setdefault(name, sub)
        found.setdefault(model.__name__, schema)


def _model_paths(doc: dict[str, Any], name: str, info: ModelInfo) -> None:
    components = doc["components"]["schemas"]
    request_ref = _component_name(name, "_JobRequest")
    result_ref = _component_name(name, "_JobResult")
    components[request_ref] = model_request(info)
    components[result_ref] = model_result(info)
    components[_component_name(name, "_BatchRequest")] = {
        "type": "object", "title": f"{name} batch", "required": ["jobs"],
        "properties": {
            "jobs": {"type": "array", "minItems": 1, "maxItems": 10_000,
                     "items": {"type": "object", "required": ["inputs"],
                               "properties": {"inputs": model_request(info)["properties"]
                                              ["inputs"]}}},
            "version": _version_schema(info),
            "deadline_s": {"type": "number", "exclusiveMinimum": 0},
            "priority": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "examples": [{"jobs": [{"inputs": [example(s) for s in info.inputs]}] * 2}],
    }
    for generic in GENERIC_PATHS:
        item = doc["paths"].get(generic)
        if item is None:
            continue
        path = generic.replace("{model}", name)
        twin = copy.deepcopy(item)
        for method, op in twin.items():
            op["operationId"] = f"{op.get('operationId', method)}__{name}"
            op["tags"] = [f"model: {name}"]
            op["summary"] = f"{op.get('summary', '')} ({name})".strip()
            op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "model"]
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                ref = _component_name(name, "_BatchRequest" if generic.endswith(":batch")
                                      else "_JobRequest")
                body["schema"] = {"$ref": f"#/components/schemas/{ref}"}
                body["example"] = components[ref]["examples"][0]
            ok = op.get("responses", {}).get("200", {}).get("content", {}).get(
                "application/json")
            if ok is not None and generic.endswith(":predict"):
                ok["schema"] = {"$ref": f"#/components/schemas/{result_ref}"}
        doc["paths"][path] = twin


def build(app: FastAPI, models: Mapping[str, ModelInfo]) -> dict[str, Any]:
    """The document: every route, then each model's own paths."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes, tags=app.openapi_tags)
    _add_components(doc)
    for name in sorted(models):
        _model_paths(doc, name, models[name])
    return doc
