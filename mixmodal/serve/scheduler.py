"""The server's scheduler: one thread owns the engine and runs a continuous batch.

Requests wait in a bounded queue; before every engine step the thread moves waiting requests
into the RunningBatch (up to `max_batch` sequences), so a new request joins at the next step
while the others keep decoding; a finished or cancelled one leaves at once. A request's
guidance streams are rows of one sequence, so they join, run and leave together.

Events go back to the asyncio side through each ticket's `asyncio.Queue`, fed with
`loop.call_soon_threadsafe`: the event loop never blocks on the engine. An error in one
request's set-up (a prompt that does not fit) fails that request only; so does an error while
advancing one sequence (sampling, decoding its image); an error in the batched forward itself
fails the sequences of that step, and the scheduler goes on with a fresh batch.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from mixmodal.documents import Document
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.engine import Engine, RunningBatch
from mixmodal.inference.events import End, Event, ImageDone


class QueueFull(RuntimeError):
    """The waiting queue is full: answer 429 and ask the client to retry."""


@dataclass
class Failure:
    """What a ticket receives instead of its End when its sequence could not be run."""

    message: str
    status: int = 500


@dataclass
class Ticket:
    """One sequence of a request: what was asked, and where its events go."""

    prompt: Document
    config: GenerationConfig
    seed: int
    loop: asyncio.AbstractEventLoop
    context: list[Document] = field(default_factory=list)  # retrieved documents, read before the prompt
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_event: float | None = None
    index: int | None = None  # its sequence index in the running batch
    prompt_tokens: int | None = None  # the prompt's positions (conditional stream), set when it joins
    cancelled: bool = False

    def put(self, item: Event | Failure) -> None:
        if self.first_event is None:
            self.first_event = time.perf_counter()
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    """`submit` tickets from any thread; the scheduler thread runs them, `max_batch` at a time."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, capacity: int | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.capacity = capacity
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: dict[int, Ticket] = {}
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.batch = self._new_batch()
        self.stats = {"requests": 0, "finished": 0, "failed": 0, "cancelled": 0, "rejected": 0, "steps": 0,
                      "positions": 0, "images": 0, "step_seconds": 0.0,
                      "max_running": 0}
        self.latencies: collections.deque[float] = collections.deque(maxlen=1000)  # submit -> End, seconds
        self.first_event_latencies: collections.deque[float] = collections.deque(maxlen=1000)

    def _new_batch(self) -> RunningBatch:
        return RunningBatch(self.engine, self.capacity, isolate_errors=True)

    # --- the asyncio side ----------------------------------------------------------------

    def submit(self, tickets: list[Ticket]) -> None:
        """Queue the sequences of one request together, or raise QueueFull for all of them."""
        with self._lock:
            if len(self._waiting) + len(tickets) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (the limit is {self.max_queue})")
            self._waiting.extend(tickets)
            self.stats["requests"] += 1
            self._lock.notify()

    def cancel(self, tickets: list[Ticket]) -> None:
        """The client went away: drop its sequences, waiting or running, at the next step."""
        with self._lock:
            for ticket in tickets:
                ticket.cancelled = True
            self._lock.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def rows(self) -> int:
        return self.batch.rows

    # --- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mixmodal-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stop:
                    break
                self._drop_cancelled()
                joining = []
                while self._waiting and len(self._running) + len(joining) < self.max_batch:
                    ticket = self._waiting.popleft()
                    if not ticket.cancelled:
                        joining.append(ticket)
            for ticket in joining:
                self._join(ticket)
            if self._running:
                self.stats["max_running"] = max(self.stats["max_running"], len(self._running))
                self._step()

    def _drop_cancelled(self) -> None:
        for ticket in [t for t in self._waiting if t.cancelled]:
            self._waiting.remove(ticket)
            self.stats["cancelled"] += 1
        for index, ticket in list(self._running.items()):
            if ticket.cancelled:
                self.batch.cancel(index)
                del self._running[index]
                self.stats["cancelled"] += 1

    def _join(self, ticket: Ticket) -> None:
        try:
            ticket.index = self.batch.add(ticket.prompt, ticket.config, seed=ticket.seed, context=ticket.context)
            ticket.prompt_tokens = len(self.batch.live[-1].blocks[0].ids)
        except ValueError as e:  # PromptError and config errors: this request only
            self.stats["failed"] += 1
            ticket.put(Failure(str(e), status=400))
            return
        self._running[ticket.index] = ticket

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.batch.step()
        except Exception as e:  # noqa: BLE001 - the scheduler must survive; the step's requests fail
            for ticket in self._running.values():
                ticket.put(Failure(f"generation failed: {type(e).__name__}: {e}"))
            self.stats["failed"] += len(self._running)
            self._running.clear()
            self.batch = self._new_batch()
            return
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - started
        for event in events:
            ticket = self._running.get(event.index)
            if ticket is None:
                continue
            if isinstance(event, ImageDone):
                self.stats["images"] += 1
            if isinstance(event, End) and event.result.finish_reason == "error":  # this sequence only
                del self._running[event.index]
                self.stats["failed"] += 1
                ticket.put(Failure(f"generation failed: {event.result.document.metadata.get('error', '?')}"))
                continue
            ticket.put(event)
            if isinstance(event, End):
                del self._running[event.index]
                self.stats["finished"] += 1
                self.stats["positions"] += len(event.result.ids)
                now = time.perf_counter()
                self.latencies.append(now - ticket.submitted)
                if ticket.first_event is not None:
                    self.first_event_latencies.append(ticket.first_event - ticket.submitted)


__all__ = ["Failure", "QueueFull", "Scheduler", "Ticket"]
