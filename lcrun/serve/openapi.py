"""The server's OpenAPI document (`GET /openapi.json`), generated from the pydantic models that validate the requests
(openai_api.py): what a client generator or a property-based fuzzer (tests/test_serve_fuzz.py drives the server from
it) reads. Responses are described by their media type only; their shapes are OpenAI's."""
from __future__ import annotations

from functools import cache
from typing import Any

from . import ollama_api as ol
from . import openai_api as oa

_ERROR = {"description": "an OpenAI error object", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}


def _post(model: type, summary: str, stream: str = "text/event-stream") -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
        "responses": {"200": {"description": "the completion (a JSON body, or a stream)",
                              "content": {"application/json": {}, stream: {}}},
                      "400": _ERROR, "401": _ERROR, "413": _ERROR, "415": _ERROR, "503": _ERROR}}}


def _get(summary: str, media: str = "application/json") -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": summary, "content": {media: {}}},
                                                      "401": _ERROR}}}


@cache
def openapi_document(version: str) -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    _, schemas = models_json_schema([(oa.ChatCompletionRequest, "validation"), (oa.CompletionRequest, "validation"),
                                     (ol.OllamaChatRequest, "validation"), (ol.OllamaGenerateRequest, "validation"),
                                     (ol.ModelRequest, "validation")], ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "lcrun serve", "version": version,
                 "description": "An OpenAI-compatible API over llama.cpp, and Ollama's under /api. Unknown fields are "
                                "ignored; what the server cannot honour (logit_bias, a schema keyword the grammar cannot "
                                "enforce, …) is refused with a 400 naming the parameter."},
        "paths": {
            "/v1/chat/completions": _post(oa.ChatCompletionRequest, "Chat completion (OpenAI's shape)"),
            "/v1/completions": _post(oa.CompletionRequest, "Text completion (OpenAI's shape)"),
            "/v1/models": _get("The model this server runs"),
            "/health": _get("Whether the server is up, and its slots"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/api/chat": _post(ol.OllamaChatRequest, "Chat (Ollama's shape)", "application/x-ndjson"),
            "/api/generate": _post(ol.OllamaGenerateRequest, "Generate (Ollama's shape)", "application/x-ndjson"),
            "/api/show": _post(ol.ModelRequest, "The model, its capabilities and context (Ollama's shape)"),
            "/api/tags": _get("The model (Ollama's list)"),
            "/api/ps": _get("The model, loaded (Ollama's shape)"),
            "/api/version": _get("The Ollama API version these endpoints follow"),
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }
