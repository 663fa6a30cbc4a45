"""Generation: the one request record (`Request` = prompt tokens + `GenerationParams`), the one finish record
(`Finished`), and the one decode loop that produces every token for chat, niah, bench and serve.

- `records`: the request, its events (`PrefillProgress`, `TextChunk`, `Finished`, `Failed`) and their bounds;
- `stops`: the incremental stop-string matcher;
- `slots`: a slot (one sequence and its request) and the one place a sampled token becomes text;
- `loop`: `DecodeLoop`, batching every slot's next token and prompt chunks into one `llama_decode` per step;
- `drive`: one request on one slot, in the calling thread (`generate`, `prefill`).

It imports only the engine's protocol: the engine comes in as a parameter, so the fake engine of the tests drives the
same loop as llama.cpp does."""
