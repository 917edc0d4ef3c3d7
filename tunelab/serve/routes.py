"""The endpoints of `tunelab serve`, as an APIRouter over the app's shared `Served` state.

`GET /health` (open, for probes), `GET /v1/models`; by task `POST /v1/classify`,
`/v1/entities`, `/v1/predict`, `/v1/answer` (question answering); for generative models `POST /v1/completions` and (causal-lm)
`/v1/chat/completions` in the OpenAI request/response shape, with `stream: true` as server-sent
events ending in `[DONE]`; `GET /` is a small page to try the model. Inputs are checked against
the limits before they reach the model worker.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from transformers import AsyncTextIteratorStreamer

from tunelab.page import PAGE
from tunelab.serve.feedback import AnswerLog
from tunelab.serve.limits import Limits
from tunelab.serve.schemas import (
    AnswerRequest,
    APIError,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    InputRequest,
    Sampling,
)
from tunelab.serve.worker import Decoding, Job, ServedRun, StreamCancelled, Worker, cut_at_stop

# the endpoint each task answers on, for the 404 a request to another task's endpoint gets
ENDPOINT_OF_TASK = {
    "classification": "/v1/classify",
    "token-classification": "/v1/entities",
    "regression": "/v1/predict",
    "causal-lm": "/v1/chat/completions or /v1/completions",
    "seq2seq": "/v1/completions",
    "question-answering": "/v1/answer",
    "masked-lm": "/v1/predict",
}
STREAM_TIMEOUT_S = 600  # the longest wait for the next streamed piece before the stream fails


@dataclass
class Served:
    """What every handler shares: the model, its worker, the limits, the model's name and the key."""

    run: ServedRun
    worker: Worker
    limits: Limits
    model_id: str
    api_key: str | None
    log: AnswerLog | None = None  # `--log DIR`: every answer stored, with an id for feedback

    @property
    def task(self) -> str:
        task: str = self.run.config.task
        return "causal-lm" if task == "preference" else task  # a preference run is a chat model

    def count_tokens(self, text: str) -> int:
        return len(self.run.tokenizer(text, add_special_tokens=False)["input_ids"])

    def remember(self, kind: str, inputs: list[Any], outputs: list[Any], response: dict[str, Any]) -> None:
        """With `--log`, store the answer under the response's id (given one if it has none)."""
        if self.log is not None:
            response["id"] = self.log.record(kind, inputs, outputs, response.get("id"))


# The dependencies are `async def` because FastAPI runs plain `def` ones in its thread pool: a
# waiting request must hold no thread.
async def served(request: Request) -> Served:
    """The app's shared state, set by create_app."""
    state: Served = request.app.state.served
    return state


ServedState = Annotated[Served, Depends(served)]


async def authorize(request: Request, state: ServedState) -> None:
    """Refuse a request without the right bearer key, when the server has one."""
    if state.api_key is None:
        return
    if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            "authentication_error",
        )


router = APIRouter()
authorized = [Depends(authorize)]


def needs(state: Served, *tasks: str) -> None:
    """Refuse with a 404 naming the right endpoint unless the served model's task is one of `tasks`."""
    if state.task not in tasks:
        use = ENDPOINT_OF_TASK[state.task]
        raise APIError(404, f"this server runs a {state.task} model; use {use}", "not_found_error")


def check_inputs(state: Served, texts: list[str], param: str) -> None:
    """Refuse an empty request, too many inputs, or an input over the token limit."""
    limits = state.limits
    if not texts:
        raise APIError(400, f"{param}: give at least one input", param=param)
    if len(texts) > limits.max_batch:
        raise APIError(
            400, f"{param}: {len(texts)} inputs; the limit is {limits.max_batch} per request", param=param
        )
    for i, text in enumerate(texts):
        n = state.count_tokens(text)
        if n > limits.max_input_tokens:
            where = f"{param}[{i}]" if len(texts) > 1 else param
            raise APIError(400, f"{where}: {n} tokens; the limit is {limits.max_input_tokens}", param=where)


def decoding(state: Served, body: Sampling) -> Decoding:
    """The request's decoding settings, within the limits; greedy unless a temperature is given."""
    limit = state.limits.max_tokens
    max_tokens = body.max_tokens or min(state.run.config.generation.max_new_tokens, limit)
    if max_tokens > limit:
        raise APIError(400, f"max_tokens: {max_tokens}; the limit is {limit}", param="max_tokens")
    stop = body.stops()
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", param="stop")
    return Decoding(max_tokens, body.temperature or 0.0, body.top_p, stop)


def usage(state: Served, prompts: list[str], texts: list[str]) -> dict[str, int]:
    p, c = sum(map(state.count_tokens, prompts)), sum(map(state.count_tokens, texts))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def predict(state: Served, body: InputRequest, kind: str) -> dict[str, Any]:
    texts = body.texts()
    check_inputs(state, texts, "input")
    results = await state.worker.call("predict", texts)
    response = {
        "object": "list",
        "model": state.model_id,
        "data": [{"index": i, **r} for i, r in enumerate(results)],
    }
    state.remember(kind, texts, results, response)
    return response


@router.get("/health")
async def health(state: ServedState) -> dict[str, Any]:
    worker = state.worker
    return {
        "status": "ok",
        "task": state.task,
        "model": state.model_id,
        "requests": worker.requests,
        "model_calls": worker.model_calls,
        "streams_stopped": worker.streams_stopped,
    }


@router.get("/v1/models", dependencies=authorized)
async def models(state: ServedState) -> dict[str, Any]:
    model = {"id": state.model_id, "object": "model", "created": 0, "owned_by": "tunelab", "task": state.task}
    return {"object": "list", "data": [model]}


@router.post("/v1/classify", dependencies=authorized)
async def classify(body: InputRequest, state: ServedState) -> dict[str, Any]:
    needs(state, "classification")
    return await predict(state, body, "classify")


@router.post("/v1/entities", dependencies=authorized)
async def entities(body: InputRequest, state: ServedState) -> dict[str, Any]:
    needs(state, "token-classification")
    return await predict(state, body, "entities")


@router.post("/v1/predict", dependencies=authorized)
async def regress(body: InputRequest, state: ServedState) -> dict[str, Any]:
    needs(state, "regression", "masked-lm")
    return await predict(state, body, "predict")


@router.post("/v1/answer", dependencies=authorized)
async def answer(body: AnswerRequest, state: ServedState) -> dict[str, Any]:
    """Extractive answers: {answer, start, end, score} per question (answer null: none found)."""
    needs(state, "question-answering")
    questions, contexts = body.pairs()
    check_inputs(state, questions, "question")
    check_inputs(state, contexts, "context")
    results = await state.worker.call("answer", [json.dumps([q, c]) for q, c in zip(questions, contexts)])
    response = {
        "object": "list",
        "model": state.model_id,
        "data": [{"index": i, **r} for i, r in enumerate(results)],
    }
    state.remember("answer", [list(p) for p in zip(questions, contexts)], results, response)
    return response


Chunk = Callable[[str, str | None], dict[str, Any]]  # (text, finish_reason) -> one streamed event


class CancellableStreamer(AsyncTextIteratorStreamer):
    """transformers' asyncio streamer that stops `generate` once its reader has gone away: after
    `cancel()`, the next token `generate` hands it raises StreamCancelled in the model thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, value: Any) -> None:
        if self.cancelled.is_set():
            raise StreamCancelled("the client disconnected")
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.cancelled.is_set() and not stream_end:
            raise StreamCancelled("the client disconnected")
        super().on_finalized_text(text, stream_end)


def stream(state: Served, prompt: str, settings: Decoding, chunk: Chunk,
           done: Callable[[str], None] | None = None) -> StreamingResponse:  # fmt: skip
    """Generate `prompt` as server-sent events: a chunk per decoded piece, a finishing chunk, [DONE];
    `done` gets the whole text once the last event is sent."""
    # made here, on the event loop: the streamer hands each piece to it with call_soon_threadsafe
    streamer = CancellableStreamer(
        state.run.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
    )
    job = state.worker.submit("stream", [prompt], settings, streamer)
    return StreamingResponse(events(job, chunk, done), media_type="text/event-stream")


async def events(job: Job, chunk: Chunk, done: Callable[[str], None] | None = None) -> AsyncIterator[str]:
    """The events of a stream job; text after a stop sequence is cut, as OpenAI does. When the
    client disconnects, Starlette cancels this generator: the job's streamer is cancelled then, so
    that the model thread stops generating for nobody and takes the next request."""
    text = ""
    stop = job.decoding.stop if job.decoding else ()
    finished = False
    try:
        async for piece in job.streamer:
            if not piece:
                continue
            if stop:
                cut = cut_at_stop(text + piece, stop)
                if len(cut) < len(text + piece):
                    piece = cut[len(text) :]
                    text = cut
                    if piece:
                        yield f"data: {json.dumps(chunk(piece, None))}\n\n"
                    break
            text += piece
            yield f"data: {json.dumps(chunk(piece, None))}\n\n"
        # the 200 and the pieces are already sent: a failed model call can only end the stream early
        with contextlib.suppress(Exception):
            await job.future
        yield f"data: {json.dumps(chunk('', 'stop'))}\n\n"
        if done is not None:
            done(text)
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished and hasattr(job.streamer, "cancel"):
            job.streamer.cancel()


@router.post("/v1/completions", dependencies=authorized)
async def completions(body: CompletionRequest, state: ServedState) -> Any:
    needs(state, "causal-lm", "seq2seq")
    prompts = body.prompts()
    check_inputs(state, prompts, "prompt")
    settings = decoding(state, body)
    created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        if len(prompts) != 1:
            raise APIError(400, "prompt: stream one prompt at a time", param="prompt")

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": state.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        return stream(state, prompts[0], settings, chunk,
                      lambda text: state.remember("completion", prompts, [text], {"id": ident}))  # fmt: skip
    texts = await state.worker.call("generate", prompts, settings)
    response = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": state.model_id,
        "choices": [
            {"index": i, "text": t, "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)
        ],
        "usage": usage(state, prompts, texts),
    }
    state.remember("completion", prompts, texts, response)
    return response


@router.post("/v1/chat/completions", dependencies=authorized)
async def chat(body: ChatRequest, state: ServedState) -> Any:
    needs(state, "causal-lm")
    messages = [m.model_dump() for m in body.messages]
    if messages[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be the user's", param="messages")
    try:
        prompt = state.run.task.prompt_for(messages[-1]["content"], state.run.tokenizer, messages[:-1])
    except Exception as e:  # noqa: BLE001 - a template that rejects this conversation
        raise APIError(
            400, f"messages: the chat template cannot render them ({e})", param="messages"
        ) from None
    check_inputs(state, [prompt], "messages")
    settings = decoding(state, body)
    created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        first = [True]

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": text} if text or finish is None else {}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        return stream(state, prompt, settings, chunk,
                      lambda text: state.remember("chat", messages, [text], {"id": ident}))  # fmt: skip
    (text,) = await state.worker.call("generate", [prompt], settings)
    response = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": state.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage(state, [prompt], [text]),
    }
    state.remember("chat", messages, [text], response)
    return response


@router.post("/v1/feedback", dependencies=authorized)
async def feedback(body: FeedbackRequest, state: ServedState) -> dict[str, Any]:
    """Attach a rating (up, down, or 1-5) and an optional correction to a logged answer."""
    if state.log is None:
        raise APIError(
            404, "feedback is off: start the server with tunelab serve RUN --log DIR", "not_found_error"
        )
    stored = state.log.answer(body.id)
    if stored is None:
        raise APIError(404, f"id: no answer {body.id!r} in this server's log", "not_found_error", param="id")
    kind, inputs, _ = stored
    items = 1 if kind == "chat" else len(inputs)
    if body.index >= items:
        raise APIError(400, f"index: {body.index}; answer {body.id} has {items} item(s)", param="index")
    labels = getattr(getattr(state.run.config, "data", None), "labels", None) if kind == "classify" else None
    if body.correction is not None and labels and body.correction not in labels:
        raise APIError(400, f"correction: {body.correction!r} is not a label of this model ({', '.join(labels)})",
                       param="correction")  # fmt: skip
    rating, score = body.rating_and_score()
    ident = state.log.feedback(body.id, body.index, rating, score, body.correction)
    return {"object": "feedback", "id": ident, "answer_id": body.id}


@router.get("/", response_class=HTMLResponse)
async def page(state: ServedState) -> str:
    config = {"task": state.task, "model": state.model_id, "auth": state.api_key is not None,
              "feedback": state.log is not None}  # fmt: skip
    return PAGE.replace("__CONFIG__", json.dumps(config))
