"""`lcrun serve`: an OpenAI-compatible HTTP server over one llama.cpp context with several slots.

- `openai_api`: the request bodies (validated by pydantic) and the response shapes, errors as OpenAI error objects.
- `scheduler`: the slots and continuous batching — one thread owns the engine and decodes every busy slot's next
  token (and a chunk of a new prompt) in one `llama_decode` per step.
- `prompt_cache`: KV states of long prompts on disk, keyed by prefix hashes and the model's fingerprint, LRU-bounded.
- `metrics`: the counters behind `/metrics` (Prometheus text).
- `edge`: what a request must be before the app sees it (Host, Origin/CORS, JSON content type, body bound, API keys);
  `keys`: the keys as the CLI reads them.
- `app`: the Starlette application (routes, server-sent events); `server`: uvicorn and a clean shutdown.

Nothing here imports llama_cpp (the engine comes in as a parameter) or rich (the CLI renders).
"""
