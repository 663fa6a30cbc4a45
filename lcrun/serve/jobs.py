"""What a request holds while the scheduler works for it: its `Ticket` (its place in the admission bound, taken
before its body is parsed) and its `Job` (the generation request, where its events go, its cancel flag, and whose
cached prompts it may share)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lcrun.generation.records import Failed, Finished, GenerateEvent, Request

log = logging.getLogger("lcrun.serve")


class Ticket:
    """A request's place in the admission bound, from `Scheduler.reserve` until its generation ends (or the request
    fails before it is submitted: `release` is idempotent, and a `with` block releases a ticket no job took)."""

    def __init__(self, release: Callable[[Ticket], None]) -> None:
        self._release: Callable[[Ticket], None] | None = release
        self.job: Job | None = None     # the job holding it, once one is made

    @property
    def taken(self) -> bool:
        return self.job is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.taken:
            self.release()


class Job:
    """One request's generation. `sink` is called from the scheduler thread (it must hand events over, not block)."""

    def __init__(self, request: Request, sink: Callable[[GenerateEvent], None], *, partition: str | None = None,
                 ticket: Ticket | None = None) -> None:
        """`partition`: whose prompts this one may share cached tokens with (the API key's id; None: everyone's)."""
        if not request.prompt:
            raise ValueError("a job needs at least one prompt token")
        self.request = request
        self.sink = sink
        self.partition = partition
        self.ticket = ticket
        if ticket is not None:
            ticket.job = self
        self.cancelled = threading.Event()
        self.finished = False
        self.submitted_at = time.perf_counter()
        self._wake: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled.set()
            self._wake()

    def deliver(self, event: GenerateEvent) -> None:
        if isinstance(event, (Finished, Failed)):
            if self.finished:
                return  # one end per request
            self.finished = True
            if self.ticket is not None:
                self.ticket.release()
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a request whose loop is gone must not stop the scheduler
            log.debug("dropped an event for a finished request", exc_info=True)
