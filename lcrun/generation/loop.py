"""The one decode loop: every token lcrun generates — for `chat`, `niah`, `bench` and `serve` — comes out of
`DecodeLoop.step`, as llama.cpp's server and llama-cli share one slot loop and mlx-lm's `stream_generate` feeds both
its CLI and its server.

A request is assigned to a slot (one sequence of the engine) and started: the engine plans its prompt against what
the sequence holds (the longest common prefix is reused) and the slot gets its sampler chain. Each step then

1. ends the requests whose cancel event is set (between two tokens, or two prefill chunks);
2. decodes, in one `llama_decode`, the last sampled token of every generating slot and whole prompt chunks of the
   slots being prefilled, first come first served — fewer prompt tokens while others generate, so a long prompt
   delays them by one short decode per step instead of its whole prefill;
3. samples each generating slot's next token from its own logits and hands it to the slot, which turns it into text
   (slots.py: end of generation, UTF-8, stop strings and the length limit, in one place).

A failure ends only the request it belongs to: a batch llama.cpp refuses is decoded again one sequence at a time
(each back to where it was), and only the requests whose own decode fails end with `Failed`; an exception while a
slot samples or turns its token into text ends that slot's request. The owner of the loop —
the single-slot driver (drive.py) or serve's scheduler (queue, slot choice, cross-slot copies, the disk prompt cache,
shutdown) — calls `step` from one thread, the only one that touches the engine.

Where later features hook in: a grammar joins the slot's sampler chain at `start` (`set_sampler`); log-probabilities
read `engine.logits(seq)` right before `sample`; n > 1 choices start sibling slots from a `seq_copy` of the prompt;
a draft source feeds several tokens per slot in `_batch` and accepts a prefix of them after sampling.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from lcrun.engine.protocol import EngineProtocol, Feed, PromptPlan

from .records import Failed, PrefillProgress, Request
from .slots import Phase, Sink, Slot

IDLE, PREFILL, GENERATE = Phase.IDLE, Phase.PREFILL, Phase.GENERATE  # looked up once per token below


class DecodeLoop:
    def __init__(self, engine: EngineProtocol, *, prefill_chunk: int = 512, prefill_budget: int | None = None,
                 busy_prefill_tokens: int | None = None, pad_short_batches: bool = True,
                 on_prefilled: Callable[[Slot], None] | None = None, seqs: Sequence[int] | None = None) -> None:
        """`prefill_chunk`: a prompt is planned in chunks of this many tokens (whole chunks are fed); at most
        `prefill_budget` prompt tokens per step while no slot generates, `busy_prefill_tokens` while some do (both
        default to one chunk: one chunk a decode). `pad_short_batches=False` evaluates exactly the new tokens even
        where llama.cpp is slow for short batches (bench measures llama.cpp as it is). `on_prefilled(slot)` runs when a
        slot's prompt is all evaluated (serve saves its state to the disk cache then). `seqs`: the engine's sequences
        this loop drives, a slot each (default: all)."""
        self.engine = engine
        config = engine.config
        self.n_batch = max(1, min(config.n_batch, config.n_ctx))
        self.prefill_chunk = max(1, min(prefill_chunk, self.n_batch))
        self.prefill_budget = min(prefill_budget or self.prefill_chunk, self.n_batch)
        self.busy_prefill_tokens = min(busy_prefill_tokens or self.prefill_chunk, self.n_batch)
        self.pad_short_batches = pad_short_batches
        self.on_prefilled = on_prefilled
        self.slots = [Slot(seq) for seq in (range(engine.n_seq) if seqs is None else seqs)]
        self._active: list[Slot] = []      # prefilling or generating, in start order
        self._starts = 0

    @property
    def n_ctx_slot(self) -> int:
        return self.engine.n_ctx_seq

    @property
    def busy(self) -> bool:
        """Whether a step has something to do: a prompt to evaluate, a token to decode, a cancellation to end."""
        return bool(self._active) or any(s.phase is Phase.WAITING and s.cancel is not None and s.cancel.is_set()
                                         for s in self.slots)

    # -- requests in --------------------------------------------------------------------------------------------------
    def assign(self, slot: Slot, request: Request, sink: Sink, *, cancel: threading.Event | None = None) -> None:
        """Give `slot` a request to `start` later (its prompt's time counts from now)."""
        if slot.phase is not Phase.IDLE:
            raise ValueError(f"slot {slot.seq} is busy")
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        request.params.check()
        slot.assign(request, sink, cancel)

    def start(self, slot: Slot, *, restored: int = 0) -> PromptPlan:
        """Plan an assigned request's prompt on its slot and set its sampler; the next steps evaluate it.
        `restored`: tokens the sequence holds because a saved state was just loaded into it."""
        request = slot.request
        assert request is not None and slot.phase is Phase.WAITING
        params, engine = request.params, self.engine
        generates = params.max_tokens != 0
        if generates:
            engine.set_sampler(slot.seq, params.sampling)
        plan = engine.plan_prompt(slot.seq, list(request.prompt), chunk=self.prefill_chunk, sample=generates,
                                  pad_short_batches=self.pad_short_batches)
        room = self.n_ctx_slot - len(request.prompt)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        self._starts += 1
        slot.admitted = self._starts
        slot.begin(plan.reused, restored, plan.chunks, limit)
        if not plan.chunks:  # a prompt-only request whose tokens the sequence holds already
            slot.prefilled_at = time.perf_counter()
            slot.finish("length")
        else:
            self._active.append(slot)
        return plan

    def submit(self, slot: Slot, request: Request, sink: Sink, *,
               cancel: threading.Event | None = None) -> PromptPlan:
        """`assign` and `start` at once."""
        self.assign(slot, request, sink, cancel=cancel)
        return self.start(slot)

    def release(self, slot: Slot) -> None:
        """Free a slot without a finish record (its owner tells the requester why)."""
        if slot in self._active:
            self._active.remove(slot)
        slot.release()

    # -- one step -------------------------------------------------------------------------------------------------
    def step(self) -> None:
        if len(self.slots) == 1 and self._active:  # one slot generating: the common case, kept short
            slot = self._active[0]
            cancel = slot.cancel
            if slot.phase is GENERATE and (cancel is None or not cancel.is_set()):
                engine = self.engine
                try:
                    engine.decode((Feed(slot.seq, (slot.next_token,)),))
                    more = slot.on_token(engine.sample(slot.seq), engine)
                except Exception as exc:  # noqa: BLE001 - llama.cpp refused it, or the sampler or text failed
                    self.fail([slot], exc)
                    return
                if not more:
                    self._active.clear()
                return
        self._end_cancelled()
        feeds, owners = self._batch()
        if not feeds:
            return
        engine = self.engine
        starts = [engine.seq_len(feed.seq) for feed in feeds] if len(feeds) > 1 else []
        try:
            engine.decode(feeds)
        except Exception as exc:  # noqa: BLE001 - llama.cpp refused the batch: find whose decode it is
            self._decode_apart(feeds, owners, starts, exc)
            return
        for slot, feed in zip(owners, feeds):
            self._decoded(slot, feed)

    def _decoded(self, slot: Slot, feed: Feed) -> None:
        """After a decode holding `feed`: the slot's prompt progress, or its next token (before the next decode)."""
        try:
            if slot.phase is PREFILL:
                slot.prefill_done += len(feed.tokens)
                slot.sink(PrefillProgress(slot.prefill_done, slot.prefill_total))
                if not slot.chunks:
                    self._prompt_done(slot)
            if slot.phase is GENERATE and not slot.on_token(self.engine.sample(slot.seq), self.engine):
                self._active.remove(slot)
        except Exception as exc:  # noqa: BLE001 - the sampler, the text or a hook failed: this request only
            self.fail([slot], exc)

    def _decode_apart(self, feeds: list[Feed], owners: list[Slot], starts: list[int], error: Exception) -> None:
        """A batch failed: decode each sequence's feed on its own, from where it was before the batch (llama.cpp keeps
        the ubatches it finished). Those that fail alone fail; a batch of one is that one."""
        if len(feeds) == 1:
            self.fail(owners, error)
            return
        engine = self.engine
        for slot, feed, start in zip(owners, feeds, starts):
            try:
                engine.seq_truncate(feed.seq, start)
                engine.decode([feed])
            except Exception as exc:  # noqa: BLE001 - this sequence's own decode failed
                self.fail([slot], exc)
                continue
            self._decoded(slot, feed)

    def _end_cancelled(self) -> None:
        for slot in self.slots:
            if slot.cancel is not None and slot.phase is not IDLE and slot.cancel.is_set():
                if slot in self._active:
                    self._active.remove(slot)
                slot.finish("cancelled")

    def _batch(self) -> tuple[list[Feed], list[Slot]]:
        active = self._active
        generating = [s for s in active if s.phase is Phase.GENERATE]
        owners = list(generating)
        feeds = [Feed(s.seq, (s.next_token,)) for s in generating]
        budget = min(self.busy_prefill_tokens if generating else self.prefill_budget, self.n_batch - len(feeds))
        for slot in sorted((s for s in active if s.phase is Phase.PREFILL), key=lambda s: s.admitted):
            tokens: list[int] = []
            while slot.chunks and len(tokens) + len(slot.chunks[0]) <= budget:
                tokens += slot.chunks.popleft()
            if not tokens and not feeds and slot.chunks:
                tokens = slot.chunks.popleft()  # progress even if a chunk is larger than the budget
            if not tokens:
                break
            assert slot.request is not None
            last = not slot.chunks
            feeds.append(Feed(slot.seq, tokens, logits=last and slot.request.params.max_tokens != 0))
            owners.append(slot)
            budget -= len(tokens)
        # llama.cpp splits a batch over separate KV streams into ubatches of consecutive sequence ids
        order = sorted(range(len(feeds)), key=lambda i: feeds[i].seq)
        return [feeds[i] for i in order], [owners[i] for i in order]

    def _prompt_done(self, slot: Slot) -> None:
        slot.prefilled_at = time.perf_counter()
        if self.on_prefilled is not None:
            self.on_prefilled(slot)
        assert slot.request is not None
        if slot.request.params.max_tokens == 0:
            self._active.remove(slot)
            slot.finish("length")
        else:
            slot.phase = Phase.GENERATE

    def fail(self, slots: list[Slot], error: Exception) -> None:
        """End these slots' requests with `Failed(error)` and empty their sequences (their cache is unknown now)."""
        for slot in slots:
            if slot.phase is Phase.IDLE:
                continue
            sink = slot.sink
            self.release(slot)
            try:
                self.engine.seq_clear(slot.seq)
            finally:
                sink(Failed(error))
