"""The server's scheduler: lcrun.generation's decode loop with one slot per sequence, and what a server adds around
it. One thread owns the engine; every step it

1. fails, after the shutdown grace period, everything still in flight (cancelled requests — a client that went away
   — the loop itself ends at its next step);
2. admits queued requests into free slots: the slot (or another slot, by a sequence copy) holding the longest prefix
   of the prompt is reused; with a disk prompt cache, a saved state sharing more of the prompt is read in the cache's
   worker thread, the slot waiting, and restored when it arrives;
3. runs one step of the loop: one `llama_decode` of every generating slot's last token and a chunk of the prompts
   being prefilled, then each slot's next token (chat, niah and bench run the same loop on one slot).

Requests talk to the scheduler through `Job`: a thread-safe `sink` receives the loop's `TextChunk`s, then its
`Finished` or a `Failed` carrying an APIError.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from lcrun.engine.protocol import EngineProtocol, SequenceState
from lcrun.errors import GrammarError, LcrunError
from lcrun.generation.loop import DecodeLoop
from lcrun.generation.records import Failed, Finished, GenerateEvent, PrefillProgress, Request, not_started
from lcrun.generation.slots import Phase, Slot

from .metrics import Metrics
from .openai_api import APIError, unavailable
from .prompt_cache import PromptCache

log = logging.getLogger("lcrun.serve")

PREFILL_CHUNK = 128       # a prompt is planned in chunks of this many tokens (at least 2 × the CPU FA tile)
BUSY_PREFILL_TOKENS = 256  # prompt tokens per step while other slots generate: what one step may delay them by
COPY_MIN_GAIN = 32         # copy another slot's cache when it holds at least this many more prompt tokens


class Job:
    """One request's generation. `sink` is called from the scheduler thread (it must hand events over, not block)."""

    def __init__(self, request: Request, sink: Callable[[GenerateEvent], None]) -> None:
        if not request.prompt:
            raise ValueError("a job needs at least one prompt token")
        self.request = request
        self.sink = sink
        self.cancelled = threading.Event()
        self.finished = False
        self._choices_left = request.params.n   # a Finished each, or one Failed, ends the job
        self.submitted_at = time.perf_counter()
        self._wake: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled.set()
            self._wake()

    def deliver(self, event: GenerateEvent) -> None:
        if isinstance(event, Finished):
            self._choices_left -= 1
            self.finished = self._choices_left <= 0
        elif isinstance(event, Failed):
            self.finished = True
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a request whose loop is gone must not stop the scheduler
            log.debug("dropped an event for a finished request", exc_info=True)


class Scheduler:
    def __init__(self, engine: EngineProtocol, *, metrics: Metrics | None = None, max_queue: int = 64,
                 prompt_cache: PromptCache | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 busy_prefill_tokens: int = BUSY_PREFILL_TOKENS) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.max_queue = max_queue
        self.prompt_cache = prompt_cache
        config = engine.config
        n_ubatch = max(1, min(config.n_ubatch, config.n_batch, config.n_ctx))
        chunk = min(prefill_chunk, n_ubatch)
        self.loop = DecodeLoop(engine, prefill_chunk=chunk, prefill_budget=n_ubatch,
                               busy_prefill_tokens=max(chunk, min(busy_prefill_tokens, n_ubatch)),
                               on_prefilled=self._prompt_done)
        self.slots: list[Slot] = self.loop.slots
        self.n_ctx_slot: int = self.loop.n_ctx_slot
        self._queue: deque[Job] = deque()
        self._loads: dict[int, tuple[Future[SequenceState], Job]] = {}   # slot → the state read for its job
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
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
        return sum(1 for s in self.slots if s.phase is not Phase.IDLE)

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
                    self._cond.wait(0.02 if self._loads or self._closing else 1.0)
                if self._closing:
                    self._fail_queued(unavailable("the server is shutting down", code="shutting_down"))
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - one bad step fails its requests, not the server
                log.exception("scheduler step failed")
                self._fail([s for s in self.slots if s.phase is not Phase.IDLE],
                           APIError(500, f"generation failed: {exc}", type="server_error"))

    def _has_work(self) -> bool:
        if self.loop.busy or any(future.done() for future, _ in self._loads.values()):
            return True
        if self._closing and self.busy_slots and time.monotonic() >= self._deadline:
            return True
        return bool(self._queue) and len(self.slots) - self.busy_slots >= self._queue[0].request.params.n

    def _fail_queued(self, error: APIError) -> None:
        while self._queue:
            self._queue.popleft().deliver(Failed(error))

    def _fail(self, slots: list[Slot], error: APIError) -> None:
        for slot in slots:
            self._loads.pop(slot.seq, None)
        self.loop.fail(slots, error)

    def _step(self) -> None:
        if self._closing and time.monotonic() >= self._deadline:
            overdue = [s for s in self.slots if s.phase is not Phase.IDLE]
            self.metrics.add("requests_cancelled", len(overdue))
            self._fail(overdue, unavailable("the server shut down before the reply was complete",
                                            code="shutting_down"))
        self._admit()
        self._finish_loads()
        generating = any(s.phase is Phase.GENERATE for s in self.slots)
        self.loop.step()
        self._steps += 1
        if self._steps % 8 == 0 or not generating or not any(s.phase is Phase.GENERATE for s in self.slots):
            self._kv_cells_used = self.engine.kv_cells_used()

    # -- admission -----------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while True:
            with self._cond:
                free = [s for s in self.slots if s.phase is Phase.IDLE]
                if not self._queue or len(free) < self._queue[0].request.params.n:  # a choice a slot, together
                    return
                job = self._queue.popleft()
            if job.cancelled.is_set():
                for choice in range(job.request.params.n):
                    job.deliver(not_started(len(job.request.prompt), choice))
                self.metrics.add("requests_cancelled")
                continue
            try:
                self._start(job, free)
            except (LcrunError, ValueError) as exc:
                log.error("could not start a request: %s", exc)
                error = APIError(500, f"could not start the generation: {exc}", type="server_error")
                self._fail([s for s in self.slots if s.request is job.request], error)
                if not job.finished:
                    job.deliver(Failed(error))

    def _start(self, job: Job, free: list[Slot]) -> None:
        engine, prompt = self.engine, job.request.prompt
        held = {s.seq: engine.common_prefix(s.seq, prompt) for s in self.slots}
        # a free slot holding part of the prompt; else the one unused longest (the others' caches stay)
        slot = max(free, key=lambda s: (held[s.seq], -s.last_used))
        if held[slot.seq] == 0:
            slot = min(free, key=lambda s: s.last_used)
        # the other choices (n > 1) on the free slots unused longest; they start from a copy of the prompt
        siblings = sorted((s for s in free if s is not slot), key=lambda s: s.last_used)[:job.request.params.n - 1]
        source = max(self.slots, key=lambda s: held[s.seq])
        # the disk, another slot or nothing — decided before anything is copied: a restore replaces the sequence,
        # so a copy made first would be wasted (and would cost a decode to complete before the restore)
        hit = self.prompt_cache.lookup(list(prompt)) if self.prompt_cache is not None else None
        from_disk = hit is not None and self._io is not None and hit[1] > held[source.seq] + COPY_MIN_GAIN
        if not from_disk and held[source.seq] >= held[slot.seq] + COPY_MIN_GAIN:
            engine.seq_copy(source.seq, slot.seq, held[source.seq])
        self.loop.assign(slot, job.request, lambda event: self._deliver(job, event), cancel=job.cancelled,
                         siblings=siblings)
        if from_disk:
            assert hit is not None and self._io is not None and self.prompt_cache is not None
            future = self._io.submit(self.prompt_cache.load, hit[0])
            self._loads[slot.seq] = (future, job)
            future.add_done_callback(lambda _: self._notify())
            return
        self._begin(slot)

    def _finish_loads(self) -> None:
        for seq, (future, job) in list(self._loads.items()):
            if not future.done():
                continue
            del self._loads[seq]
            slot = self.slots[seq]
            if slot.phase is not Phase.WAITING or slot.request is not job.request:
                continue  # cancelled while the state was read
            try:
                restored = self.engine.restore(future.result(), seq)
            except Exception as exc:  # noqa: BLE001 - a bad cache file costs a prefill, nothing more
                log.warning("prompt cache: %s; evaluating the prompt instead", exc)
                restored = 0
            self._begin(slot, restored)

    def _begin(self, slot: Slot, restored: int = 0) -> None:
        assert slot.request is not None
        prompt_tokens = len(slot.request.prompt)
        plan = self.loop.start(slot, restored=restored)
        m = self.metrics
        m.add("prompt_tokens", prompt_tokens)
        m.add("prompt_tokens_evaluated", plan.n_tokens)
        m.add("cache_reused_tokens", plan.reused)
        m.add("cache_restored_tokens", min(restored, plan.reused))

    def _prompt_done(self, slot: Slot) -> None:
        cache, request = self.prompt_cache, slot.request
        assert request is not None
        prompt = list(request.prompt)
        if (cache is not None and self._io is not None and len(prompt) >= cache.min_tokens
                and len(prompt) - slot.restored >= cache.min_tokens // 2 and not cache.covers(prompt)):
            state = self.engine.snapshot(slot.seq)
            future = self._io.submit(cache.store, state)
            future.add_done_callback(self._stored)

    def _stored(self, future: Future) -> None:
        try:
            if future.result() is not None:
                self.metrics.add("cache_saved_prompts")
        except Exception as exc:  # noqa: BLE001 - a full disk must not fail requests
            log.warning("prompt cache: %s", exc)

    # -- events out ------------------------------------------------------------------------------------------------
    def _deliver(self, job: Job, event: GenerateEvent) -> None:
        if isinstance(event, PrefillProgress):
            return  # nothing a client is told
        if isinstance(event, Finished):
            self.metrics.add("generated_tokens", event.completion_tokens)
            if event.reason == "cancelled":
                self.metrics.add("requests_cancelled")
        elif isinstance(event, Failed) and isinstance(event.error, GrammarError):  # the request's grammar, stuck
            event = Failed(APIError(400, f"the reply could not go on: {event.error}", param="grammar",
                                    code="grammar_dead_end"))
        elif isinstance(event, Failed) and not isinstance(event.error, APIError):  # llama.cpp refused a decode
            log.error("decode failed: %s", event.error)
            event = Failed(APIError(500, f"llama.cpp could not decode: {event.error}", type="server_error"))
        job.deliver(event)
