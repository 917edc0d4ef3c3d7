"""The model worker of `tunelab serve`: one thread owns the model and runs micro-batches.

Requests become jobs on a queue. The thread takes the first job waiting, then every job of the
same kind and decoding settings that arrives within `batch_wait_ms`, up to `max_model_batch`
inputs, and runs them as one model call (dynamic micro-batching): classification inputs are
concatenated, generation requests with equal settings share one `generate` call, and a streamed
answer runs alone. Jobs with other settings wait for the next round, in order. A streamed
answer whose client disconnects stops at its next token (the streamer raises `StreamCancelled`
inside `generate`), or never starts if it was still waiting; `streams_stopped` counts them.

A job carries an asyncio future of the event loop that submitted it; the thread resolves it
through `loop.call_soon_threadsafe`, so a waiting request holds a future, not a thread. The app
starts the worker when it starts and stops it, joining the thread, when it stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from tunelab.serve.limits import Limits

JobKind = Literal["predict", "answer", "generate", "stream"]  # answer: inputs are JSON [question, context]
# how long a stop waits for the model call in progress; a longer one is left to end with the process
JOIN_TIMEOUT_S = 10.0


class ServedRun(Protocol):
    """What the server needs of a loaded model: `tunelab.run.Run` (from `load_served`) has it."""

    path: Path
    config: Any
    task: Any
    tokenizer: Any

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]: ...

    def generate(
        self,
        prompts: list[str],
        streamer: Any = None,
        max_new_tokens: int | None = None,
        options: Any = None,
        stop: tuple[str, ...] = (),
    ) -> list[str]: ...


class StreamCancelled(Exception):
    """The client of a streamed answer went away: its generation stops at the next token."""


def stream_cancelled(streamer: Any) -> bool:
    """Whether the reader of `streamer` (a `CancellableStreamer`) has gone away."""
    cancelled = getattr(streamer, "cancelled", None)
    return isinstance(cancelled, threading.Event) and cancelled.is_set()


class WorkerStopped(RuntimeError):
    """The worker is not running (the server is starting or shutting down): the job did not run."""

    def __init__(self) -> None:
        super().__init__("the server is not taking requests now (starting or shutting down)")


@dataclass(frozen=True)
class Decoding:
    """A generation request's settings; generation jobs share a model call only when these are equal."""

    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float | None  # None: the run's own generation.top_p
    stop: tuple[str, ...]


@dataclass(eq=False)
class Job:
    """One request's work for the model, and the future its request awaits."""

    kind: JobKind
    inputs: list[str]
    decoding: Decoding | None  # None for predict jobs
    streamer: Any  # for stream jobs: the streamer `generate` writes to, read by the response
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]  # one result per input

    def resolve(self, results: list[Any] | None = None, error: BaseException | None = None) -> None:
        """Hand the results (or the error) to the waiting request; call from the worker thread."""

        def settle() -> None:
            if self.future.done():  # the request went away (cancelled, client disconnected)
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(results or [])

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def end_stream(self) -> None:
        """End the stream of a stream job that failed or never ran, so its reader stops."""
        if self.streamer is not None:
            try:
                self.streamer.end()
            except RuntimeError:  # the event loop has closed: nobody is reading
                pass


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text up to (not including) the first stop sequence, as OpenAI returns it."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


class Worker:
    """The thread that runs the model, batching the jobs that arrive close together."""

    def __init__(self, run: ServedRun, limits: Limits, join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
        self.run, self.limits, self.join_timeout_s = run, limits, join_timeout_s
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # None: stop
        self.requests = self.model_calls = 0
        self.streams_stopped = 0  # streamed answers whose client left before the end: generation stopped
        self.thread: threading.Thread | None = None
        self._accepting = False
        self._lock = threading.Lock()  # orders submit() against the drain at stop

    def start(self) -> None:
        """Start the model thread (the app's lifespan does, on startup)."""
        self.jobs = queue.Queue()
        self._accepting = True
        # daemon: a model call stuck past join_timeout_s must not keep the process alive
        self.thread = threading.Thread(target=self._serve, name="tunelab-model", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop taking jobs, let the model call in progress finish, and join the thread.

        Jobs still queued fail with WorkerStopped."""
        self.jobs.put(None)
        if self.thread is not None:
            self.thread.join(self.join_timeout_s)
        self._fail_waiting()
        if self.thread is not None and self.thread.is_alive():  # the drain took its stop: give it another
            self.jobs.put(None)

    def submit(
        self, kind: JobKind, inputs: list[str], decoding: Decoding | None = None, streamer: Any = None
    ) -> Job:
        """Queue work for the model. Call from the event loop, then await `job.future`."""
        loop = asyncio.get_running_loop()
        job = Job(kind, inputs, decoding, streamer, loop, loop.create_future())
        self.requests += 1
        with self._lock:
            if self._accepting:
                self.jobs.put(job)
                return job
        job.end_stream()
        job.future.set_exception(WorkerStopped())
        return job

    async def call(self, kind: JobKind, inputs: list[str], decoding: Decoding | None = None) -> list[Any]:
        """The model's results for `inputs`, one per input, once the worker has run them."""
        return await self.submit(kind, inputs, decoding).future

    def _fail_waiting(self) -> None:
        with self._lock:
            self._accepting = False
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.end_stream()
                job.resolve(error=WorkerStopped())

    def _serve(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                break
            batch, stopping = self._gather(first)
            self._run(batch)
            if stopping:
                break
        self._fail_waiting()

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """The batch that starts with `first`, and whether a stop arrived while gathering it."""
        batch, size, stopping = [first], len(first.inputs), False
        if first.kind == "stream":
            return batch, stopping
        deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
        held: list[Job] = []
        while size < self.limits.max_model_batch:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stopping = True
                break
            if job.kind == first.kind and job.decoding == first.decoding:
                batch.append(job)
                size += len(job.inputs)
            else:
                held.append(job)
        for job in held:  # other settings wait for the next round, in order
            self.jobs.put(job)
        return batch, stopping

    def _run(self, batch: list[Job]) -> None:
        if batch[0].kind == "stream" and stream_cancelled(
            batch[0].streamer
        ):  # its client left while it waited
            self.streams_stopped += 1
            batch[0].resolve([])  # nobody reads it: an exception here would be logged as never retrieved
            return
        self.model_calls += 1
        inputs = [text for job in batch for text in job.inputs]
        try:
            results = self._call(batch[0], inputs)
        except StreamCancelled:  # the streamer stopped `generate` for a client that left
            self.streams_stopped += 1
            batch[0].resolve([])  # nobody reads it: an exception here would be logged as never retrieved
            return
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            error = e if isinstance(e, Exception) else RuntimeError(f"the model call failed: {e!r}")
            for job in batch:
                job.end_stream()  # a stream that is being read ends here
                job.resolve(error=error)
            return
        start = 0
        for job in batch:
            job.resolve(results[start : start + len(job.inputs)])
            start += len(job.inputs)

    def _call(self, first: Job, inputs: list[str]) -> list[Any]:
        run = self.run
        if first.kind == "predict":
            return run.predict(inputs)
        if first.kind == "answer":
            questions, contexts = zip(*(json.loads(text) for text in inputs))
            return run.predict(list(questions), list(contexts))
        decoding = first.decoding
        assert decoding is not None, "generation jobs carry their decoding settings"
        defaults = run.config.generation
        options = dataclasses.replace(
            defaults,
            do_sample=bool(decoding.temperature),
            temperature=decoding.temperature or defaults.temperature,
            top_p=defaults.top_p if decoding.top_p is None else decoding.top_p,
        )
        texts = run.generate(
            inputs,
            streamer=first.streamer,
            max_new_tokens=decoding.max_tokens,
            options=options,
            stop=decoding.stop,
        )
        return [cut_at_stop(t, decoding.stop) for t in texts]
