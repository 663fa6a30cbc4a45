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
`Finished` or a `Failed` carrying an APIError. A request takes its place first (`reserve`: a 503 when every slot is
busy and `max_queue` requests wait), before its body is parsed and its prompt tokenized, and holds it until its
generation ends.

A failure ends only the request it belongs to: each job's admission, prompt planning, decode (a batch llama.cpp
refuses is decoded again sequence by sequence), sampling and text are guarded one request at a time; the disk cache is
best-effort (a snapshot or a write that fails is counted and skipped; the writer holds at most `MAX_PENDING_SAVES`
states, more are dropped and counted); every job taken from the queue gets its finish or failure event. With several
API keys each key's prompts stay its own: a slot's cache, another slot's copy or a disk file written for one key is
never reused for another's (`Job.partition`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from lcrun.engine.protocol import EngineProtocol, SequenceState
from lcrun.errors import LcrunError
from lcrun.generation.loop import DecodeLoop
from lcrun.generation.records import Failed, Finished, GenerateEvent, PrefillProgress, not_started
from lcrun.generation.slots import Phase, Slot

from .jobs import Job, Ticket
from .metrics import Metrics
from .openai_api import APIError, unavailable
from .prompt_cache import PromptCache

__all__ = ["Job", "Scheduler", "Ticket"]

log = logging.getLogger("lcrun.serve")

PREFILL_CHUNK = 128       # a prompt is planned in chunks of this many tokens (at least 2 × the CPU FA tile)
BUSY_PREFILL_TOKENS = 256  # prompt tokens per step while other slots generate: what one step may delay them by
COPY_MIN_GAIN = 32         # copy another slot's cache when it holds at least this many more prompt tokens
UNKNOWN_OWNER = "?"        # a sequence whose content is unknown: cleared before anyone's next request
MAX_PENDING_SAVES = 2      # states held for the disk cache's writer (one written, one waiting): an 8B model's
#                            32K-token state is ~4 GiB


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
        self._owners: dict[int, str | None] = {s.seq: None for s in self.slots}   # whose tokens each sequence holds
        self._cond = threading.Condition()
        self._tickets: set[Ticket] = set()   # requests accepted and not ended
        self.abandoned = False      # the engine is gone for good (a worker went away): see `abandon`
        self._pending_saves = 0     # states handed to the cache's writer and not yet written
        self._closing = False
        self._deadline = float("inf")
        self._kv_cells_used = 0
        self._steps = 0
        # loads and saves apart: a slot waiting for a state is never queued behind a 4 GiB write
        cached = prompt_cache is not None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="lcrun-cache-read") if cached else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="lcrun-cache-write") if cached else None
        self._thread = threading.Thread(target=self._run, name="lcrun-scheduler", daemon=True)

    # -- the outside (event loop threads) ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def reserve(self) -> Ticket:
        """A place for one request, taken before anything is spent on it: a 503 APIError when every slot is busy
        and `max_queue` requests wait (with `max_queue` 0: when every slot is busy), or the server is shutting down."""
        with self._cond:
            if self._closing:
                raise unavailable("the server is shutting down", code="shutting_down")
            n_slots = len(self.slots)
            if len(self._tickets) >= n_slots + self.max_queue:
                waiting = len(self._tickets) - n_slots
                raise unavailable(f"all {n_slots} slots are busy and {waiting} requests wait (--max-queue "
                                  f"{self.max_queue}); retry later", code="queue_full",
                                  retry_after_s=max(1, waiting // max(n_slots, 1)))
            ticket = Ticket(self._release)
            self._tickets.add(ticket)
        return ticket

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            self._tickets.discard(ticket)

    def submit(self, job: Job) -> None:
        """Queue a job (reserving its place unless it holds a ticket); a 503 APIError when the server is full or
        shutting down."""
        if job.ticket is None:
            job.ticket = self.reserve()
            job.ticket.job = job
        with self._cond:
            if self._closing:
                job.ticket.release()
                raise unavailable("the server is shutting down", code="shutting_down")
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
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)

    def abandon(self, error: APIError) -> None:
        """The engine cannot run another step (a worker went away, and the scheduler's thread is held in ggml for
        good): refuse new requests and end every accepted one with `error` now, from the calling thread."""
        with self._cond:
            self._closing = self.abandoned = True
            jobs = [t.job for t in self._tickets if t.job is not None]
            self._queue.clear()
        for job in jobs:
            job.deliver(Failed(error))

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
        try:
            while self._next():
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - the last resort: every request is guarded on its own
                    log.exception("scheduler step failed")
                    self._fail([s for s in self.slots if s.phase is not Phase.IDLE],
                               APIError(500, f"generation failed: {exc}", type="server_error"))
        finally:  # however the thread ends, nothing accepted is left without an answer
            with self._cond:
                self._closing = True
                self._fail_queued(unavailable("the server is shutting down", code="shutting_down"))
            self._fail([s for s in self.slots if s.phase is not Phase.IDLE],
                       unavailable("the server shut down before the reply was complete", code="shutting_down"))

    def _next(self) -> bool:
        """Wait for work; False once the server is closing and nothing is in flight."""
        with self._cond:
            while not self._has_work():
                if self._closing and not self.busy_slots:
                    return False
                self._cond.wait(0.02 if self._loads or self._closing else 1.0)
            if self._closing:
                self._fail_queued(unavailable("the server is shutting down", code="shutting_down"))
        return True

    def _has_work(self) -> bool:
        if self.loop.busy or any(future.done() for future, _ in self._loads.values()):
            return True
        if self._closing and self.busy_slots and time.monotonic() >= self._deadline:
            return True
        return bool(self._queue) and self.busy_slots < len(self.slots)

    def _fail_queued(self, error: APIError) -> None:
        while self._queue:
            self._queue.popleft().deliver(Failed(error))

    def _fail(self, slots: list[Slot], error: Exception) -> None:
        for slot in slots:
            self._loads.pop(slot.seq, None)
            try:
                self.loop.fail([slot], error)
            except Exception:  # noqa: BLE001 - the request has its event; its sequence is cleared at its next start
                log.exception("could not clear sequence %d", slot.seq)
                self._owners[slot.seq] = UNKNOWN_OWNER

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
            try:
                self._kv_cells_used = self.engine.kv_cells_used()
            except Exception:  # noqa: BLE001 - a gauge
                log.debug("kv_cells_used failed", exc_info=True)

    # -- admission -----------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while True:
            with self._cond:
                free = [s for s in self.slots if s.phase is Phase.IDLE]
                if not free or not self._queue:
                    return
                job = self._queue.popleft()
            # from here on this job is nowhere but in this frame: whatever happens, it gets its event
            try:
                if job.cancelled.is_set():
                    job.deliver(not_started(len(job.request.prompt)))
                    self.metrics.add("requests_cancelled")
                    continue
                self._start(job, free)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.error("could not start a request: %s", exc, exc_info=not isinstance(exc, (LcrunError, ValueError)))
                error = APIError(500, f"could not start the generation: {exc}", type="server_error")
                self._fail([s for s in self.slots if s.request is job.request], error)
                if not job.finished:
                    job.deliver(Failed(error))

    def _start(self, job: Job, free: list[Slot]) -> None:
        engine, prompt, owner = self.engine, job.request.prompt, job.partition
        # another key's tokens are never a prefix of this prompt (cached tokens and timing would tell it)
        held = {s.seq: engine.common_prefix(s.seq, prompt) if self._owners[s.seq] == owner else 0
                for s in self.slots}
        # a free slot holding part of the prompt; else the one unused longest (the others' caches stay)
        slot = max(free, key=lambda s: (held[s.seq], -s.last_used))
        if held[slot.seq] == 0:
            slot = min(free, key=lambda s: s.last_used)
        source = max(self.slots, key=lambda s: held[s.seq])
        # the disk, another slot or nothing — decided before anything is copied: a restore replaces the sequence,
        # so a copy made first would be wasted (and would cost a decode to complete before the restore)
        cache = self.prompt_cache
        hit = cache.lookup(list(prompt), owner) if cache is not None else None
        from_disk = hit is not None and self._reader is not None and hit[1] > held[source.seq] + COPY_MIN_GAIN
        if self._owners[slot.seq] != owner:
            engine.seq_clear(slot.seq)
            self._owners[slot.seq] = owner
        if not from_disk and held[source.seq] >= held[slot.seq] + COPY_MIN_GAIN:
            engine.seq_copy(source.seq, slot.seq, held[source.seq])
        self.loop.assign(slot, job.request, lambda event: self._deliver(job, event), cancel=job.cancelled)
        if from_disk:
            assert hit is not None and self._reader is not None and cache is not None
            future = self._reader.submit(cache.load, hit[0], owner)
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
            try:
                self._begin(slot, restored)
            except Exception as exc:  # noqa: BLE001 - planning this prompt failed: this request, no other
                log.error("could not start a request: %s", exc)
                self._fail([slot], APIError(500, f"could not start the generation: {exc}", type="server_error"))

    def _begin(self, slot: Slot, restored: int = 0) -> None:
        assert slot.request is not None
        prompt_tokens = len(slot.request.prompt)
        plan = self.loop.start(slot, restored=restored)
        m = self.metrics
        m.add("prompt_tokens", prompt_tokens)
        m.add("prompt_tokens_evaluated", plan.n_tokens)
        m.add("cache_reused_tokens", plan.reused)
        m.add("cache_restored_tokens", min(restored, plan.reused))

    # -- the disk cache: best-effort ---------------------------------------------------------------------------------
    def _prompt_done(self, slot: Slot) -> None:
        cache, request = self.prompt_cache, slot.request
        assert request is not None
        prompt = list(request.prompt)
        owner = self._owners[slot.seq]
        if (cache is None or self._writer is None or len(prompt) < cache.min_tokens
                or len(prompt) - slot.restored < cache.min_tokens // 2 or cache.covers(prompt, owner)):
            return
        with self._cond:
            if self._pending_saves >= MAX_PENDING_SAVES:  # the writer is behind: this state is not taken at all
                self.metrics.add("cache_saves_dropped")
                return
            self._pending_saves += 1
        try:
            state = self.engine.snapshot(slot.seq)
            future = self._writer.submit(cache.store, state, owner)
        except Exception as exc:  # noqa: BLE001 - out of memory for the copy, say: the request goes on uncached
            self._saved(exc)
            return
        future.add_done_callback(self._stored)

    def _stored(self, future: Future) -> None:
        try:
            path = future.result()
        except Exception as exc:  # noqa: BLE001 - a full disk must not fail requests
            self._saved(exc)
            return
        self._saved(None if path is not None else "too large for --cache-size")

    def _saved(self, failure: Exception | str | None) -> None:
        with self._cond:
            self._pending_saves -= 1
        if failure is None:
            self.metrics.add("cache_saved_prompts")
        elif isinstance(failure, Exception):
            log.warning("prompt cache: the state was not saved: %s", failure)
            self.metrics.add("cache_save_failures")

    # -- events out ------------------------------------------------------------------------------------------------
    def _deliver(self, job: Job, event: GenerateEvent) -> None:
        if isinstance(event, PrefillProgress):
            return  # nothing a client is told
        if isinstance(event, Finished):
            self.metrics.add("generated_tokens", event.completion_tokens)
            if event.reason == "cancelled":
                self.metrics.add("requests_cancelled")
        elif isinstance(event, Failed) and not isinstance(event.error, APIError):  # llama.cpp refused a decode
            log.error("decode failed: %s", event.error)
            event = Failed(APIError(500, f"generation failed: {event.error}", type="server_error"))
        job.deliver(event)
