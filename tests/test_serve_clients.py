"""`lcrun serve` driven by the clients people point at it — the official `openai` package and the `ollama` package —
on the real llama.cpp engine (a tiny random Llama GGUF; a Qwen-2.5-shape file for its tool-call format): structured
output that parses even from random weights, schemas and grammars that cannot be followed refused with a 400 naming
why, tool calls (required, named, streamed, fed back), log-probabilities in OpenAI's shapes with the most likely
token the greedy one, several choices from one prefill, and Ollama's endpoints, streamed and not."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import ollama
import pytest
from pydantic import BaseModel, Field

from lcrun.engine.protocol import EngineConfig
from lcrun.engine.runtime import Engine
from tests.fixtures.realistic_gguf import write_realistic_gguf
from tests.fixtures.serve_support import LiveServer, http, metrics


class Person(BaseModel):
    name: str = Field(max_length=12)            # bounded: random weights would ramble inside a string
    age: int
    admin: bool
    color: Literal["red", "green", "blue"]
    pets: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[LiveServer]:
    engine = Engine(EngineConfig(tiny_gguf, n_ctx=4096, n_seq=4, n_threads=1, n_threads_batch=1))
    with engine, LiveServer(engine, model_id="tiny") as live:
        yield live


def ask(server: LiveServer, content: str = "Tell me about a person.", **kw: Any) -> Any:
    kw.setdefault("max_tokens", 200)
    return server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                   **kw)


# -- structured output -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_the_openai_clients_parse_returns_a_valid_object(server: LiveServer, sampling: dict[str, Any]) -> None:
    done = server.client().chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Describe a person."}], response_format=Person,
        max_tokens=300, **sampling)
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
    free = ask(server, "Describe a person.", max_tokens=60, **sampling).choices[0].message.content
    with pytest.raises(ValueError):   # negative control: without the schema this model writes no such JSON
        Person.model_validate_json(free)


def test_json_object_output_parses_streamed_or_not(server: LiveServer) -> None:
    whole = ask(server, response_format={"type": "json_object"}, seed=3, max_tokens=300)
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    streamed = ask(server, response_format={"type": "json_object"}, seed=3, max_tokens=300, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize(("body", "param", "named"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}}, "response_format", "'minimum'"),
    ({"json_schema": {"type": "string", "format": "email"}}, "json_schema", "format 'email'"),
    ({"grammar": 'root ::= "a" undefined-rule'}, "grammar", "Undefined rule identifier 'undefined-rule'"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema is required"),
    ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format", "cannot both"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"n": 5}, "n", "at most 4 at once"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the declared tools"),
])
def test_what_cannot_be_followed_is_a_400_naming_why(server: LiveServer, body: dict[str, Any], param: str,
                                                    named: str) -> None:
    status, _, raw = http("POST", server.url + "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "x"}], **body})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param and named in error["message"], error
    assert http("GET", server.url + "/health")[0] == 200


def test_a_schema_on_the_completions_endpoint_holds_too(server: LiveServer) -> None:
    done = server.client().completions.create(model="tiny", prompt="A list:", max_tokens=200, temperature=0,
                                              extra_body={"json_schema": {"type": "array", "items": {"type": "boolean"},
                                                                          "maxItems": 3}})
    assert all(isinstance(v, bool) for v in json.loads(done.choices[0].text))


# -- tool calls --------------------------------------------------------------------------------------------------
def call_of(message: Any) -> tuple[str, dict[str, Any]]:
    call = message.tool_calls[0]
    return call.function.name, json.loads(call.function.arguments)


def test_a_tool_call_round_trip_in_the_generic_format(server: LiveServer) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    client = server.client()
    done = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                          tool_choice="required", temperature=0, max_tokens=120)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    name, arguments = call_of(choice.message)
    assert name in ("get_weather", "get_time")
    if name == "get_weather":
        assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 10
    named = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=120)
    assert call_of(named.choices[0].message) == ("get_time", {})
    streamed = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice="required", temperature=0, max_tokens=120, stream=True)
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in streamed:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(name, arguments)]
    assert reasons[-1] == "tool_calls" and calls[0]["id"].startswith("call_")
    fed_back = messages + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model="tiny", messages=fed_back, tools=[WEATHER, TIME],
                                            tool_choice="none", temperature=0, max_tokens=12)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


# -- log-probabilities and choices -------------------------------------------------------------------------------
def test_logprobs_have_openais_shape_and_the_top_one_is_the_greedy_token(server: LiveServer) -> None:
    done = ask(server, "Count with me:", temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    choice = done.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == done.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.logprob <= 0 and sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-5
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
    stream = ask(server, "Count with me:", temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    legacy = server.client().completions.create(model="tiny", prompt="Count with me:", max_tokens=8, temperature=0,
                                                logprobs=2).choices[0]
    lp = legacy.logprobs
    assert "".join(lp.tokens) == legacy.text and len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(max(top, key=top.get) == token for top, token in zip(lp.top_logprobs, lp.tokens))


def test_three_choices_evaluate_the_prompt_once(server: LiveServer) -> None:
    question = "Please give me three different short answers about the river and the mill."
    ask(server, "warm the slots", max_tokens=1)
    before = metrics(server.url)
    done = ask(server, question, n=3, temperature=1.0, seed=11, max_tokens=10)
    after = metrics(server.url)
    assert [c.index for c in done.choices] == [0, 1, 2]
    texts = [c.message.content for c in done.choices]
    assert len(set(texts)) > 1   # a seed each
    evaluated = after["lcrun_prompt_tokens_evaluated_total"] - before["lcrun_prompt_tokens_evaluated_total"]
    assert 0 < evaluated <= done.usage.prompt_tokens   # once, not three times
    assert done.usage.completion_tokens >= 3
    stream = ask(server, question, n=2, temperature=1.0, seed=11, max_tokens=10, stream=True)
    by_choice: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            by_choice[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and [by_choice[0], by_choice[1]] == texts[:2]


# -- Ollama's API ------------------------------------------------------------------------------------------------
def test_the_ollama_package_talks_to_lcrun_serve(server: LiveServer) -> None:
    client = ollama.Client(host=server.url)
    listed = client.list().models
    assert [m.model for m in listed] == ["tiny:latest"] and listed[0].details.format == "gguf"
    shown = client.show("tiny")
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert shown.modelinfo["llama.context_length"] == 1024 == client.ps().models[0].context_length
    assert http("GET", server.url + "/api/version")[0] == 200
    options = {"num_predict": 10, "temperature": 0}
    whole = client.chat(model="tiny", messages=[{"role": "user", "content": "Hello!"}], options=options)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 10 and whole.message.content
    parts = list(client.chat(model="tiny:latest", messages=[{"role": "user", "content": "Hello!"}], options=options,
                             stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content and parts[-1].done
    assert not any(p.done for p in parts[:-1])
    generated = client.generate(model="tiny", prompt="Once upon a time", options=options)
    assert generated.response and len(generated.context) > generated.eval_count
    more = client.generate(model="tiny", prompt="and then", context=generated.context, options=options)
    assert more.prompt_eval_count >= 1 and more.response
    shaped = client.chat(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                         format={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
                         options={"num_predict": 40})
    assert isinstance(json.loads(shaped.message.content)["ok"], bool)
    for call, status, named in ((lambda: client.chat(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                     options={"num_ctx": 99999}), 400, "num_ctx"),
                                (lambda: client.chat(model="other", messages=[]), 404, "not found"),
                                (lambda: client.chat(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                     options={"num_gpu": 99}), 400, "num_gpu")):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == status and named in caught.value.error


# -- a Qwen-2.5-shape file: the hermes format, its <tool_call> token ---------------------------------------------
@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = write_realistic_gguf(tmp_path_factory.mktemp("qwen") / "qwen2.5.gguf", "qwen2.5")
    engine = Engine(EngineConfig(path, n_ctx=4096, n_seq=2, n_threads=1, n_threads_batch=1))
    with engine, LiveServer(engine, model_id="qwen") as live:
        yield live


@pytest.mark.slow
def test_tool_calls_in_the_qwen_format_through_both_apis(qwen: LiveServer) -> None:
    client = qwen.client()
    messages = [{"role": "user", "content": "Weather in Oslo, and the time?"}]
    done = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER, TIME],
                                          tool_choice="required", parallel_tool_calls=True, seed=5, max_tokens=200)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls" and 1 <= len(message.tool_calls) <= 16
    for call in message.tool_calls:
        assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments),
                                                                                dict)
    fed_back = messages + [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "fine"} for c in message.tool_calls]
    answer = client.chat.completions.create(model="qwen", messages=fed_back, tools=[WEATHER, TIME], temperature=0,
                                            max_tokens=8)   # auto: lazy, the reply is free until a <tool_call>
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    called = ollama.Client(host=qwen.url).chat(model="qwen", messages=messages, tools=[WEATHER],
                                               options={"num_predict": 8, "temperature": 0})
    assert called.done and (called.message.content or called.message.tool_calls)
