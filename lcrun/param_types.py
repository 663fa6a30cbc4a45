"""How the command line spells numbers: sizes, memory, context lengths — as click parameter types, in one module that
imports only click, so every command module can use them without importing `lcrun.cli` (which imports the commands)."""
from __future__ import annotations

import re
from typing import Any

import click

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_FILE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}  # decimal, as llama.cpp's gguf-split
_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # memory sizes are binary (24G = 24 GiB)
_CTX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_size(text: str) -> int:
    """File sizes, decimal as llama.cpp's gguf-split takes them: 500M, 4G."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 500M or 4G")
    return int(float(match.group(1)) * _FILE_UNITS[match.group(2).upper()])


def parse_memory(text: str) -> int:
    """Memory sizes, binary: 24G = 24 GiB."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a memory size like 24G or 512M")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).upper()])


def parse_ctx(text: str) -> int:
    """Token counts with binary suffixes, as model cards use them: 32k = 32768, 1M = 1048576."""
    match = _CTX.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a context length like 32768, 32k or 1M")
    return int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1 << 20}[match.group(2).upper()])


class _Parsed(click.ParamType):
    def __init__(self, name: str, parse: Any) -> None:
        self.name, self._parse = name, parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return self._parse(str(value))
        except click.BadParameter as bad:
            self.fail(bad.message, param, ctx)


def _auto_or(parse: Any) -> Any:
    """`auto` (None: the planner decides), else what `parse` makes of the text."""
    return lambda text: None if text.strip().lower() == "auto" else parse(text)


def _kv_type(text: str) -> str:
    from .memory_model import kv_type_name, parse_kv_type

    try:
        return kv_type_name(*parse_kv_type(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


# `--ctx effective` (chat, serve, plan): the longest context measured good that fits (lcrun.launch.recall)
EFFECTIVE = "effective"


def _effective_or(parse: Any) -> Any:
    return lambda text: EFFECTIVE if text.strip().lower() == EFFECTIVE else parse(text)


SIZE = _Parsed("size", parse_size)
MEMORY = _Parsed("memory", parse_memory)
CONTEXT = _Parsed("context", _auto_or(parse_ctx))
RUN_CONTEXT = _Parsed("context", _effective_or(_auto_or(parse_ctx)))   # CONTEXT, or EFFECTIVE
KV_TYPE = _Parsed("kv_type", _auto_or(_kv_type))   # "q8_0" or "q8_0/q4_0", lower-cased


def kv_type_from(kv_type: str | None, cache_type_k: str | None, cache_type_v: str | None) -> str | None:
    """lcrun's `--kv-type K[/V]` (already parsed by KV_TYPE), from itself or from llama.cpp's `-ctk`/`-ctv`, which
    set K and V apart (the one not given stays f16, as in llama.cpp)."""
    if cache_type_k is None and cache_type_v is None:
        return kv_type
    if kv_type:
        raise click.UsageError("give the KV cache type once: --kv-type K[/V], or -ctk/-ctv")
    return _kv_type(f"{cache_type_k or 'f16'}/{cache_type_v or 'f16'}")


class _Endpoints(click.ParamType):
    """`--rpc HOST:PORT[,HOST:PORT…]`, llama.cpp's spelling: a list of worker endpoints (the port defaults to 50052)."""

    name = "host:port,…"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        from lcrun.engine.rpc import parse_endpoint

        try:
            endpoints = [parse_endpoint(part) for part in str(value).split(",") if part.strip()]
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if not endpoints:
            self.fail("no worker given (expected HOST:PORT[,HOST:PORT…])", param, ctx)
        if len(set(endpoints)) != len(endpoints):
            self.fail(f"{value!r} names a worker twice", param, ctx)
        return endpoints


class _WorkerMemory(click.ParamType):
    """`--rpc-mem HOST[:PORT]=SIZE`: plan for a worker that is not running yet, with SIZE of free memory."""

    name = "host=size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        from lcrun.engine.rpc import parse_endpoint

        host, sep, size = str(value).partition("=")
        if not sep:
            self.fail(f"{value!r} is not HOST=SIZE (e.g. gpu-box:50052=80G)", param, ctx)
        try:
            return parse_endpoint(host), parse_memory(size)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        except click.BadParameter as bad:
            self.fail(bad.message, param, ctx)


RPC_ENDPOINTS = _Endpoints()
RPC_MEMORY = _WorkerMemory()


def worker_memory_map(values: Any) -> dict[str, int]:
    """--rpc-mem values as {endpoint: bytes}; a worker given twice is a usage error."""
    found: dict[str, int] = {}
    for endpoint, size in values or ():
        if endpoint in found:
            raise click.UsageError(f"--rpc-mem gives {endpoint} twice")
        found[endpoint] = size
    return found
