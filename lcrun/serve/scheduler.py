"""The slots and continuous batching. One thread owns the engine; every step it

1. ends what was cancelled (a client that went away) — and, after the shutdown grace period, everything in flight;
2. admits queued requests into free slots: the slot (or another slot, by a sequence copy) holding the longest prefix
   of the prompt is reused; with a disk prompt cache, a saved state sharing more of the prompt is read in the cache's
   worker thread and restored when it arrives;
3. decodes, in one `llama_decode`, the last sampled token of every generating slot and a chunk of the prompts being
   prefilled — the chunk is small while others generate, so a long new prompt delays them by one short decode per
   step instead of its whole prefill;
4. samples each slot's next token from its own logits with its own sampler, and streams the text to its request.

Requests talk to the scheduler through `Job`: a thread-safe `sink` receives `Delta`, then `Done` or `Failed`.
"""
from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from lcrun.engine.protocol import Feed, Sampling, SequenceEngineProtocol, SequenceState
from lcrun.errors import LcrunError

from .metrics import Metrics
from .openai_api import APIError, unavailable
from .prompt_cache import PromptCache

log = logging.getLogger("lcrun.serve")

PREFILL_CHUNK = 128       # a prompt is planned in chunks of this many tokens (at least 2 × the CPU FA tile)
BUSY_PREFILL_TOKENS = 256  # prompt tokens per step while other slots generate: what one step may delay them by
COPY_MIN_GAIN = 32         # copy another slot's cache when it holds at least this many more prompt tokens


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str          # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int          # prompt tokens not evaluated: reused from a slot or restored from disk
    restored_tokens: int        # of those, restored from the disk cache
    time_to_first_token_s: float
    # every sampled token (an end-of-generation one included) when the text sent is exactly theirs; None when a
    # stop string cut it
    tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Failed:
    error: APIError


JobEvent = Delta | Done | Failed


class Job:
    """One request's generation. `sink` is called from the scheduler thread (it must hand events over, not block)."""

    def __init__(self, prompt: list[int], sampling: Sampling, sink: Callable[[JobEvent], None], *,
                 max_tokens: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False) -> None:
        if not prompt:
            raise ValueError("a job needs at least one prompt token")
        self.prompt = prompt
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.ignore_eos = ignore_eos
        self.sink = sink
        self.cancelled = threading.Event()
        self.finished = False
        self.submitted_at = time.perf_counter()
        self._wake: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled.set()
            self._wake()

    def deliver(self, event: JobEvent) -> None:
        if isinstance(event, (Done, Failed)):
            self.finished = True
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a request whose loop is gone must not stop the scheduler
            log.debug("dropped an event for a finished request", exc_info=True)


class State(Enum):
    IDLE = "idle"
    LOADING = "loading"      # reading a saved prompt state from the disk cache
    PREFILL = "prefill"
    GENERATE = "generate"


@dataclass
class Slot:
    seq: int
    state: State = State.IDLE
    job: Job | None = None
    chunks: deque[list[int]] = field(default_factory=deque)
    admitted: int = 0            # admission order: prompts are prefilled first come, first served
    reused: int = 0
    restored: int = 0
    limit: int = 0
    generated: int = 0
    sampled: list[int] = field(default_factory=list)
    next_token: int = -1
    held: str = ""               # text not yet sent: it may be the start of a stop string
    started_at: float = 0.0
    first_token_at: float | None = None
    last_used: float = 0.0
    load: Future[SequenceState] | None = None
    restore_hint: int = 0        # tokens the disk entry being loaded shares with the prompt
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


class Scheduler:
    def __init__(self, engine: SequenceEngineProtocol, *, metrics: Metrics | None = None, max_queue: int = 64,
                 prompt_cache: PromptCache | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 busy_prefill_tokens: int = BUSY_PREFILL_TOKENS) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.max_queue = max_queue
        self.prompt_cache = prompt_cache
        config = engine.config
        self.n_ctx_slot: int = engine.n_ctx_seq
        self.n_batch = max(1, min(config.n_batch, config.n_ctx))
        self.n_ubatch = max(1, min(config.n_ubatch, self.n_batch))
        self.prefill_chunk = min(prefill_chunk, self.n_ubatch)
        self.busy_prefill_tokens = max(self.prefill_chunk, min(busy_prefill_tokens, self.n_ubatch))
        self.slots = [Slot(seq) for seq in range(engine.n_seq)]
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
        self._admissions = 0
        self._kv_cells_used = 0
        self._steps = 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="lcrun-prompt-cache") if prompt_cache is not None else None
        self._thread = threading.Thread(target=self._run, name="lcrun-scheduler", daemon=True)

    # -- the outside (event loop threads) ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; a 503 APIError when the queue is full or the server is shutting down."""
        with self._cond:
            if self._closing:
                raise unavailable("the server is shutting down", code="shutting_down")
            if len(self._queue) >= self.max_queue:
                raise unavailable(f"the queue is full ({self.max_queue} requests wait for a slot); retry later",
                                  retry_after_s=max(1, len(self._queue) // max(len(self.slots), 1)),
                                  code="queue_full")
            job._wake = self._notify
            self._queue.append(job)
            self._cond.notify()

    def begin_close(self, grace_s: float = 5.0) -> None:
        """Refuse new jobs and fail the queued ones; those in flight may finish for `grace_s`, then they fail too."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + grace_s
            self._cond.notify()

    def close(self, grace_s: float = 5.0) -> None:
        """`begin_close`, then wait for the thread to stop and the cache's writes to land."""
        self.begin_close(grace_s)
        if self._thread.is_alive():
            self._thread.join()
        if self._io is not None:
            self._io.shutdown(wait=True)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.state is not State.IDLE)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def kv_cells_used(self) -> int:
        return self._kv_cells_used

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_work():
                    if self._closing and not self.busy_slots:
                        self._fail_queued(unavailable("the server is shutting down", code="shutting_down"))
                        return
                    loading = any(s.state is State.LOADING for s in self.slots)
                    self._cond.wait(0.02 if loading or self._closing else 1.0)
                if self._closing:
                    self._fail_queued(unavailable("the server is shutting down", code="shutting_down"))
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - one bad step fails its requests, not the server
                log.exception("scheduler step failed")
                self._fail_busy(APIError(500, f"generation failed: {exc}", type="server_error"))

    def _has_work(self) -> bool:
        busy = [s for s in self.slots if s.state is not State.IDLE]
        if any(s.state in (State.PREFILL, State.GENERATE) for s in busy):
            return True
        if any(s.job is not None and s.job.cancelled.is_set() for s in busy):
            return True
        if any(s.state is State.LOADING and s.load is not None and s.load.done() for s in busy):
            return True
        if self._closing and busy and time.monotonic() >= self._deadline:
            return True
        return bool(self._queue) and len(busy) < len(self.slots)

    def _fail_queued(self, error: APIError) -> None:
        while self._queue:
            self._queue.popleft().deliver(Failed(error))

    def _fail_busy(self, error: APIError) -> None:
        self._fail([s for s in self.slots if s.job is not None], error)

    def _fail(self, slots: list[Slot], error: APIError) -> None:
        for slot in slots:
            if slot.job is not None:
                job = slot.job
                self._release(slot)
                job.deliver(Failed(error))
                try:
                    self.engine.seq_clear(slot.seq)
                except Exception:  # noqa: BLE001
                    log.exception("could not clear sequence %d", slot.seq)

    def _step(self) -> None:
        self._reap()
        self._admit()
        self._finish_loads()
        feeds, owners = self._batch()
        if feeds:
            try:
                self.engine.decode(feeds)
            except LcrunError as exc:  # llama.cpp refused the batch: its requests fail, the others go on
                log.error("decode failed: %s", exc)
                self._fail(owners, APIError(500, f"llama.cpp could not decode: {exc}", type="server_error"))
                return
            for slot in owners:
                if slot.state is State.PREFILL and not slot.chunks:
                    self._prompt_done(slot)
                if slot.state is State.GENERATE:
                    self._on_token(slot, self.engine.sample(slot.seq))
        self._steps += 1
        if self._steps % 8 == 0 or not feeds or not any(s.state is State.GENERATE for s in self.slots):
            self._kv_cells_used = self.engine.kv_cells_used()

    # -- admission -----------------------------------------------------------------------------------------------
    def _reap(self) -> None:
        overdue = self._closing and time.monotonic() >= self._deadline
        for slot in self.slots:
            job = slot.job
            if job is None:
                continue
            if job.cancelled.is_set():
                self._finish(slot, "cancelled")
            elif overdue:
                self._release(slot)
                self.metrics.add("requests_cancelled")
                job.deliver(Failed(unavailable("the server shut down before the reply was complete",
                                               code="shutting_down")))

    def _admit(self) -> None:
        while True:
            with self._cond:
                free = [s for s in self.slots if s.state is State.IDLE]
                if not free or not self._queue:
                    return
                job = self._queue.popleft()
            if job.cancelled.is_set():
                job.deliver(Done("cancelled", len(job.prompt), 0, 0, 0, 0.0))
                self.metrics.add("requests_cancelled")
                continue
            try:
                self._start(job, free)
            except LcrunError as exc:
                log.error("could not start a request: %s", exc)
                self._fail([s for s in self.slots if s.job is job],
                           APIError(500, f"could not start the generation: {exc}", type="server_error"))
                if not job.finished:
                    job.deliver(Failed(APIError(500, f"could not start the generation: {exc}", type="server_error")))

    def _start(self, job: Job, free: list[Slot]) -> None:
        engine, prompt = self.engine, job.prompt
        held = {s.seq: engine.common_prefix(s.seq, prompt) for s in self.slots}
        # a free slot holding part of the prompt; else the one unused longest (the others' caches stay)
        slot = max(free, key=lambda s: (held[s.seq], -s.last_used))
        if held[slot.seq] == 0:
            slot = min(free, key=lambda s: s.last_used)
        source = max(self.slots, key=lambda s: held[s.seq])
        # the disk, another slot or nothing — decided before anything is copied: a restore replaces the sequence,
        # so a copy made first would be wasted (and would cost a decode to complete before the restore)
        hit = self.prompt_cache.lookup(prompt) if self.prompt_cache is not None else None
        from_disk = hit is not None and self._io is not None and hit[1] > held[source.seq] + COPY_MIN_GAIN
        if not from_disk and held[source.seq] >= held[slot.seq] + COPY_MIN_GAIN:
            engine.seq_copy(source.seq, slot.seq, held[source.seq])
        self._admissions += 1
        slot.job, slot.admitted, slot.started_at = job, self._admissions, time.perf_counter()
        slot.generated, slot.held, slot.first_token_at, slot.restored, slot.sampled = 0, "", None, 0, []
        slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        room = self.n_ctx_slot - len(prompt)
        slot.limit = min(job.max_tokens or room, room)
        engine.set_sampler(slot.seq, job.sampling)
        if from_disk:
            assert hit is not None and self._io is not None and self.prompt_cache is not None
            entry, shared = hit
            slot.state, slot.restore_hint = State.LOADING, shared
            slot.load = self._io.submit(self.prompt_cache.load, entry)
            slot.load.add_done_callback(lambda _: self._notify())
            return
        self._plan(slot)

    def _finish_loads(self) -> None:
        for slot in self.slots:
            if slot.state is not State.LOADING or slot.load is None or not slot.load.done():
                continue
            future, slot.load = slot.load, None
            try:
                restored = self.engine.restore(future.result(), slot.seq)
            except Exception as exc:  # noqa: BLE001 - a bad cache file costs a prefill, nothing more
                log.warning("prompt cache: %s; evaluating the prompt instead", exc)
                restored = 0
            self._plan(slot, restored=restored)

    def _plan(self, slot: Slot, restored: int = 0) -> None:
        job = slot.job
        assert job is not None
        plan = self.engine.plan_prompt(slot.seq, job.prompt, chunk=self.prefill_chunk)
        slot.chunks = deque(plan.chunks)
        slot.reused = plan.reused
        slot.restored = min(restored, plan.reused)
        slot.state = State.PREFILL
        m = self.metrics
        m.add("prompt_tokens", len(job.prompt))
        m.add("prompt_tokens_evaluated", plan.n_tokens)
        m.add("cache_reused_tokens", plan.reused)
        m.add("cache_restored_tokens", slot.restored)

    # -- one batch ---------------------------------------------------------------------------------------------------
    def _batch(self) -> tuple[list[Feed], list[Slot]]:
        generating = [s for s in self.slots if s.state is State.GENERATE]
        owners = list(generating)
        feeds = [Feed(s.seq, [s.next_token]) for s in generating]
        budget = min(self.busy_prefill_tokens if generating else self.n_ubatch, self.n_batch - len(feeds))
        for slot in sorted((s for s in self.slots if s.state is State.PREFILL), key=lambda s: s.admitted):
            tokens: list[int] = []
            # whole planned chunks only (the plan keeps short, slow batches away), at most one ubatch per decode
            while slot.chunks and len(tokens) + len(slot.chunks[0]) <= budget:
                tokens += slot.chunks.popleft()
            if not tokens and not feeds and slot.chunks:
                tokens = slot.chunks.popleft()  # progress even if a chunk is larger than the budget
            if not tokens:
                break
            feeds.append(Feed(slot.seq, tokens, logits=not slot.chunks))
            owners.append(slot)
            budget -= len(tokens)
        # llama.cpp splits a batch over separate KV streams into ubatches of consecutive sequence ids
        order = sorted(range(len(feeds)), key=lambda i: feeds[i].seq)
        return [feeds[i] for i in order], [owners[i] for i in order]

    def _prompt_done(self, slot: Slot) -> None:
        slot.state = State.GENERATE
        job = slot.job
        assert job is not None
        cache = self.prompt_cache
        if (cache is not None and self._io is not None and len(job.prompt) >= cache.min_tokens
                and len(job.prompt) - slot.restored >= cache.min_tokens // 2 and not cache.covers(job.prompt)):
            state = self.engine.snapshot(slot.seq)
            future = self._io.submit(cache.store, state)
            future.add_done_callback(self._stored)

    def _stored(self, future: Future) -> None:
        try:
            if future.result() is not None:
                self.metrics.add("cache_saved_prompts")
        except Exception as exc:  # noqa: BLE001 - a full disk must not fail requests
            log.warning("prompt cache: %s", exc)

    # -- tokens out ------------------------------------------------------------------------------------------------
    def _on_token(self, slot: Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        slot.generated += 1
        slot.sampled.append(token)
        if slot.first_token_at is None:
            slot.first_token_at = time.perf_counter()
        if not job.ignore_eos and self.engine.is_eog(token):
            self._flush(slot)
            self._finish(slot, "stop")
            return
        if self._emit(slot, slot.decoder.decode(self.engine.token_bytes(token))):
            slot.sampled = []  # the text stops inside them
            self._finish(slot, "stop")
        elif slot.generated >= slot.limit:
            self._flush(slot)
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _emit(self, slot: Slot, text: str) -> bool:
        """Send what can no longer be part of a stop string; True when a stop string is complete."""
        job = slot.job
        assert job is not None
        if not text:
            return False
        if not job.stop:
            job.deliver(Delta(text))
            return False
        buf = slot.held + text
        found = [i for i in (buf.find(s) for s in job.stop) if i >= 0]
        if found:
            slot.held = ""
            if min(found):
                job.deliver(Delta(buf[: min(found)]))
            return True
        keep = max((n for s in job.stop for n in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:n])),
                   default=0)
        slot.held = buf[len(buf) - keep:] if keep else ""
        if len(buf) > keep:
            job.deliver(Delta(buf[: len(buf) - keep]))
        return False

    def _flush(self, slot: Slot) -> None:
        job = slot.job
        assert job is not None
        tail = slot.held + slot.decoder.decode(b"", final=True)
        slot.held = ""
        if tail:
            job.deliver(Delta(tail))

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        now = time.perf_counter()
        done = Done(reason, len(job.prompt), slot.generated, slot.reused, slot.restored,
                    (slot.first_token_at or now) - slot.started_at, tuple(slot.sampled) if slot.sampled else None)
        self.metrics.add("generated_tokens", slot.generated)
        if reason == "cancelled":
            self.metrics.add("requests_cancelled")
        self._release(slot)
        job.deliver(done)

    def _release(self, slot: Slot) -> None:
        slot.state, slot.job, slot.chunks, slot.load = State.IDLE, None, deque(), None
        slot.last_used = time.perf_counter()
