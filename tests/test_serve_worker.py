"""The model worker: requests arriving together share model calls (only with equal settings, up
to max_model_batch), waiting requests hold futures rather than threads, a failed call fails only
its own requests, and a stop serves what was queued before it, then refuses."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")  # the optional `serve` extra: without it these tests skip

import httpx

from tunelab.serve import Limits, create_app, load_served
from tunelab.serve.worker import Decoding, Worker, WorkerStopped, cut_at_stop

from .test_serve import ANSWER, FakeRun, trained_classifier

GREEDY = Decoding(max_tokens=8, temperature=0.0, top_p=None, stop=())


async def concurrently(app, requests: list[tuple[str, dict]], while_waiting=None) -> list[httpx.Response]:
    """Send the requests to the app all at once, in this event loop (no server, no threads), with
    the app's lifespan around them; `while_waiting(app)` runs while they are in flight."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=60) as client:
            asks = [asyncio.create_task(client.post(path, json=body)) for path, body in requests]
            if while_waiting is not None:
                await while_waiting(app)
            return await asyncio.gather(*asks)


def test_concurrent_requests_share_model_calls(tmp_path_factory, tiny_bert, sentiment_files):
    run = load_served(trained_classifier(tmp_path_factory, tiny_bert, sentiment_files))
    app = create_app(run, limits=Limits(max_batch=8, max_input_tokens=32, batch_wait_ms=50))
    worker = app.state.served.worker
    before = (worker.requests, worker.model_calls)
    replies = asyncio.run(
        concurrently(app, [("/v1/classify", {"input": f"the plot was good {i}"}) for i in range(32)])
    )
    assert all(r.status_code == 200 for r in replies)
    requests, calls = worker.requests - before[0], worker.model_calls - before[1]
    assert requests == 32 and calls < requests  # requests arriving together were batched


def test_32_waiting_requests_hold_no_threads():
    fake = FakeRun()
    fake.gate.clear()  # the model holds its first call until the test has counted threads
    # one input per model call: 31 requests wait in the queue while the first call is held
    app = create_app(fake, limits=Limits(max_model_batch=1, batch_wait_ms=0))
    counts: dict[str, int] = {}

    async def count_threads(app) -> None:
        counts["before"] = threading.active_count()  # the worker's thread is running already
        while app.state.served.worker.requests < 32:
            await asyncio.sleep(0.01)
        assert fake.started.wait(30)
        counts["waiting"] = threading.active_count()
        fake.gate.set()

    requests = [("/v1/classify", {"input": f"good {i}"}) for i in range(32)]
    replies = asyncio.run(concurrently(app, requests, count_threads))
    assert [r.json()["data"][0]["label"] for r in replies] == ["positive"] * 32
    assert len(fake.calls) == 32 and fake.threads == {"tunelab-model"}  # only the worker runs the model
    # a thread per waiting request (a blocked executor thread each) would add up to 32 here
    assert counts["waiting"] - counts["before"] <= 2


async def with_worker(worker: Worker, work):
    worker.start()
    try:
        return await work()
    finally:
        await asyncio.to_thread(worker.stop)


def test_generation_jobs_share_a_call_only_with_equal_settings():
    fake = FakeRun("causal-lm")
    worker = Worker(fake, Limits(batch_wait_ms=200))
    other = Decoding(max_tokens=4, temperature=0.5, top_p=0.8, stop=("x",))

    async def work():
        jobs = [
            worker.submit("generate", [p], d)
            for p, d in [("a", GREEDY), ("b", GREEDY), ("c", other), ("d", GREEDY)]
        ]
        return [await job.future for job in jobs]

    assert asyncio.run(with_worker(worker, work)) == [[ANSWER]] * 4
    assert fake.calls == [["a", "b", "d"], ["c"]]  # c waited for the next round
    (greedy_tokens, greedy, _), (tokens, sampled, stop) = fake.options
    assert greedy_tokens == 8 and greedy.do_sample is False and greedy.top_p == fake.config.generation.top_p
    assert (tokens, sampled.do_sample, sampled.temperature, sampled.top_p, stop) == (
        4,
        True,
        0.5,
        0.8,
        ("x",),
    )


def test_a_model_call_takes_at_most_max_model_batch_inputs():
    fake = FakeRun()
    worker = Worker(fake, Limits(max_model_batch=3, batch_wait_ms=200))

    async def work():
        jobs = [worker.submit("predict", [f"good {i}"]) for i in range(7)]
        return [(await job.future)[0]["label"] for job in jobs]

    assert asyncio.run(with_worker(worker, work)) == ["positive"] * 7
    assert [len(call) for call in fake.calls] == [3, 3, 1]


def test_a_stream_runs_alone():
    fake = FakeRun("causal-lm")
    worker = Worker(fake, Limits(batch_wait_ms=200))

    class Pieces:  # what the worker needs of a streamer
        def __init__(self) -> None:
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text

        def end(self) -> None:
            pass

    pieces = Pieces()

    async def work():
        jobs = [worker.submit("stream", ["s"], GREEDY, pieces)]
        jobs += [worker.submit("generate", [p], GREEDY) for p in "ab"]
        return [await job.future for job in jobs]

    assert asyncio.run(with_worker(worker, work)) == [[ANSWER]] * 3
    assert fake.calls == [["s"], ["a", "b"]] and pieces.text.split() == ANSWER.split()


def test_a_failed_model_call_fails_its_requests_and_the_worker_lives_on():
    fake = FakeRun()
    fake.fail = ValueError("the model broke")
    worker = Worker(fake, Limits(batch_wait_ms=100))

    async def work():
        jobs = [worker.submit("predict", [f"good {i}"]) for i in range(2)]
        errors = [(await asyncio.gather(job.future, return_exceptions=True))[0] for job in jobs]
        fake.fail = None
        return errors, await worker.call("predict", ["good again"])

    errors, after = asyncio.run(with_worker(worker, work))
    assert [str(e) for e in errors] == ["the model broke"] * 2
    assert after[0]["label"] == "positive" and worker.thread is not None and not worker.thread.is_alive()


def test_stop_serves_what_was_queued_then_joins_and_refuses():
    fake = FakeRun()
    fake.gate.clear()
    worker = Worker(fake, Limits(batch_wait_ms=0))

    async def work():
        worker.start()
        running = worker.submit("predict", ["good one"])
        assert await asyncio.to_thread(fake.started.wait, 30)
        queued = worker.submit("predict", ["good two"])  # behind the held model call
        stopping = asyncio.create_task(asyncio.to_thread(worker.stop))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # stop waits for the model call in progress
        fake.gate.set()
        await stopping
        late = worker.submit("predict", ["good three"])
        return (
            await running.future,
            await queued.future,
            await asyncio.gather(late.future, return_exceptions=True),
        )

    running, queued, (late,) = asyncio.run(work())
    assert running[0]["label"] == queued[0]["label"] == "positive"
    assert worker.thread is not None and not worker.thread.is_alive()
    assert isinstance(late, WorkerStopped)


def test_cut_at_stop_cuts_at_the_first_stop_sequence():
    assert cut_at_stop("good great fine", ("fine", "great")) == "good "
    assert cut_at_stop("good great fine", ("", "none")) == "good great fine"
    assert cut_at_stop("good", ()) == "good"
