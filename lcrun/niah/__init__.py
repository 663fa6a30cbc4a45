"""Needle in a haystack: the core of `lcrun niah`. A grid of context lengths × needle depths × samples; for each cell
a haystack cut to the length in the model's own tokens, a number hidden at a sentence boundary, one greedy answer,
a score of 1 or 0. Results go to an append-only JSONL log that an interrupted run resumes from.

Pure: the engine is a parameter (lcrun.engine.protocol.EngineProtocol), each answer comes from lcrun.generation's
decode loop; no llama_cpp, no rich. Modules: grid (cells and their order), haystack (the text and its token stream),
prompt (needle placement and the chat template), results (the JSONL log), run (the cells, in order), summary (the
heatmap's numbers)."""
from __future__ import annotations

from lcrun.errors import LcrunError


class NiahError(LcrunError):
    """Bad niah parameters, an unusable haystack, or a results file that belongs to another run."""
