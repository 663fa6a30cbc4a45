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
slot samples (a grammar that can go no further too) or turns its token into text ends that slot's request. The owner
of the loop — the single-slot driver (drive.py) or serve's scheduler (queue, slot choice, cross-slot copies, the disk
prompt cache, shutdown) — calls `step` from one thread, the only one that touches the engine.

The request's features, each in one place: its grammar joins the slot's sampler at `start` (`set_sampler`);
log-probabilities are read from `engine.logits(seq)` right before `sample` (`_sample`); several choices (n > 1)
take a slot each — the first evaluates the prompt, and when its last chunk is decoded the others get a copy of the
sequence and of its logits (`_fork`) and sample their first tokens in the same step, so the prompt is evaluated
once and the choices then decode together, one token each per step. (A draft source would feed several tokens per
slot in `_batch` and accept a prefix of them after sampling.)
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from lcrun.engine.protocol import EngineProtocol, Feed, PromptPlan

from .logprobs import token_logprob
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
    def assign(self, slot: Slot, request: Request, sink: Sink, *, cancel: threading.Event | None = None,
               siblings: Sequence[Slot] = ()) -> None:
        """Give `slot` a request to `start` later (its prompt's time counts from now); with n > 1 choices, the
        `siblings` (n - 1 other free slots) take the other choices once the prompt is evaluated."""
        if slot.phase is not Phase.IDLE or any(s.phase is not Phase.IDLE for s in siblings):
            raise ValueError(f"slot {slot.seq} is busy")
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        request.params.check()
        if len(siblings) != request.params.n - 1 or slot in siblings:
            raise ValueError(f"{request.params.n} choices need {request.params.n - 1} other slots")
        slot.assign(request, sink, cancel)
        for choice, sibling in enumerate(siblings, 1):
            sibling.assign(request, sink, cancel, choice)
        slot.siblings = list(siblings)

    def start(self, slot: Slot, *, restored: int = 0) -> PromptPlan:
        """Plan an assigned request's prompt on its slot and set its sampler; the next steps evaluate it.
        `restored`: tokens the sequence holds because a saved state was just loaded into it."""
        request = slot.request
        assert request is not None and slot.phase is Phase.WAITING
        params, engine = request.params, self.engine
        generates = params.max_tokens != 0
        if generates:
            engine.set_sampler(slot.seq, params.sampling, params.grammar)
        plan = engine.plan_prompt(slot.seq, list(request.prompt), chunk=self.prefill_chunk, sample=generates,
                                  pad_short_batches=self.pad_short_batches)
        self._starts += 1
        slot.admitted = self._starts
        slot.begin(plan.reused, restored, plan.chunks, self._limit(request))
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

    def _limit(self, request: Request) -> int:
        room = self.n_ctx_slot - len(request.prompt)
        return room if request.params.max_tokens is None else min(request.params.max_tokens, room)

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
                    token = engine.sample(slot.seq) if slot.top_logprobs is None else self._sample(slot)
                    more = slot.on_token(token, engine)
                except Exception as exc:  # noqa: BLE001 - llama.cpp refused it, the sampler or the text failed
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
        """After a decode holding `feed`: the slot's prompt progress, or its next token (before the next decode); when
        its prompt is done, the request's other choices start from it (`_fork`) and sample their first tokens."""
        forked: list[Slot] = []
        try:
            if slot.phase is PREFILL:
                slot.prefill_done += len(feed.tokens)
                slot.sink(PrefillProgress(slot.prefill_done, slot.prefill_total))
                if not slot.chunks:
                    self._prompt_done(slot)
                    forked = self._fork(slot)
            if slot.phase is GENERATE:
                self._next(slot)
        except Exception as exc:  # noqa: BLE001 - the sampler, the text or a hook failed: this request only
            self.fail([slot], exc)
            return
        for sibling in forked:  # the other choices, from the logits of the prompt's last token
            self._next(sibling)

    def _next(self, slot: Slot) -> None:
        """Sample a generating slot's next token and hand it to the slot."""
        try:
            token = self.engine.sample(slot.seq) if slot.top_logprobs is None else self._sample(slot)
            more = slot.on_token(token, self.engine)
        except Exception as exc:  # noqa: BLE001 - its grammar can go no further, or its text failed: this request
            self.fail([slot], exc)
            return
        if not more and slot in self._active:
            self._active.remove(slot)

    def _sample(self, slot: Slot) -> int:
        """`sample`, with the token's log-probability (and the top alternatives') from the logits it is drawn from."""
        engine = self.engine
        assert slot.top_logprobs is not None
        logits = engine.logits(slot.seq)
        token = engine.sample(slot.seq)
        slot.logprobs.append(token_logprob(logits, token, slot.top_logprobs, lambda t: slot.piece(t, engine)))
        return token

    def _fork(self, slot: Slot) -> list[Slot]:
        """Start the other choices of `slot`'s request from a copy of its sequence (its prompt, all evaluated) and
        of its last logits; each samples with its own chain, its seed the request's plus its choice."""
        request = slot.request
        siblings = [s for s in slot.siblings if s.phase is Phase.WAITING and s.request is request]
        slot.siblings = []
        if not siblings or slot.phase is not GENERATE:
            return []
        assert request is not None
        engine, params = self.engine, request.params
        for sibling in siblings:
            engine.seq_copy(slot.seq, sibling.seq)
            engine.copy_logits(slot.seq, sibling.seq)
            sampling = dataclasses.replace(params.sampling, seed=(params.sampling.seed + sibling.choice) & 0xFFFFFFFF)
            engine.set_sampler(sibling.seq, sampling, params.grammar)
            sibling.begin(len(request.prompt), 0, [], self._limit(request))
            sibling.admitted = slot.admitted
            sibling.prefilled_at = slot.prefilled_at
            sibling.phase = Phase.GENERATE
            self._active.append(sibling)
        return siblings

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
        """End these slots' requests with `Failed(error)` and empty their sequences (their cache is unknown now); the
        choices still waiting for a failed prompt fail with it."""
        slots = slots + [s for slot in slots for s in slot.siblings if s not in slots]
        for slot in slots:
            if slot.phase is Phase.IDLE:
                continue
            sink = slot.sink
            self.release(slot)
            try:
                self.engine.seq_clear(slot.seq)
            finally:
                sink(Failed(error))
