"""`tunelab serve`: an HTTP API for a run or an exported folder (FastAPI + uvicorn).

Endpoints: `GET /health`, `GET /v1/models`; by task `POST /v1/classify`, `/v1/entities`,
`/v1/predict`; for generative models `POST /v1/completions` and (causal-lm)
`/v1/chat/completions` in the OpenAI request/response shape, with `stream: true` as
server-sent events; `GET /` is a small page to try the model.

One worker thread owns the model. Requests queue for it, and the worker takes every request
that arrives within a short window (`batch_wait_ms`) into one model call (dynamic
micro-batching): classification inputs are concatenated, generation requests with the same
decoding settings share one `generate` call; streamed answers run one at a time. Bad input
(malformed JSON, wrong types, over-limit sizes) gets a 4xx with an OpenAI-style error body
before it reaches the model.
"""

# no `from __future__ import annotations`: FastAPI reads the annotations of the handlers
# (request models defined inside create_app) at definition time
import asyncio
import dataclasses
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import ConfigError, TunelabError


@dataclass
class Limits:
    max_batch: int = 64  # inputs per request
    max_input_tokens: int = 1024  # tokens per input (the rendered prompt for chat)
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    batch_wait_ms: float = 10.0  # how long the worker waits to gather a micro-batch
    max_model_batch: int = 32  # inputs per model call


def load_served(path: str | Path) -> Any:
    """A run directory, or a plain Hugging Face folder (e.g. from `tunelab export --merge`)."""
    from tunelab.run import Run

    path = Path(path)
    if (path / "config.yaml").is_file():
        return Run.load(path)
    if not (path / "config.json").is_file():
        raise TunelabError(
            f"{path} is neither a tunelab run (config.yaml) nor a Hugging Face model folder (config.json)"
        )
    import transformers

    from tunelab.config import load_config
    from tunelab.device import pick_device
    from tunelab.models import load_tokenizer, quiet_transformers
    from tunelab.tasks import TASKS

    quiet_transformers()
    hf = transformers.AutoConfig.from_pretrained(path)
    arch = " ".join(hf.architectures or [])
    if "TokenClassification" in arch:
        task_name = "token-classification"
    elif "SequenceClassification" in arch:
        task_name = "regression" if hf.problem_type == "regression" else "classification"
    elif getattr(hf, "is_encoder_decoder", False):
        task_name = "seq2seq"
    elif "CausalLM" in arch:
        task_name = "causal-lm"
    else:
        raise TunelabError(f"{path}: cannot tell the task from the architecture {arch or '(none)'}")
    tokenizer = load_tokenizer(str(path))
    overrides: dict[str, Any] = {"model": str(path), "task": task_name, "method": "full"}
    if task_name in ("classification", "token-classification"):
        overrides["data.labels"] = [hf.id2label[i] for i in range(len(hf.id2label))]
    if task_name == "classification" and hf.problem_type == "multi_label_classification":
        overrides["classification.multi_label"] = True
    if task_name == "causal-lm":
        overrides["data.format"] = "messages" if tokenizer.chat_template else "text"
    config = load_config(**overrides)
    task = TASKS[task_name](config)
    model = task.build_model(str(path)).to(pick_device()).eval()
    return Run(path, config, task, model, tokenizer)


# ---------------------------------------------------------------------------- worker


@dataclass
class Job:
    kind: Literal["predict", "generate", "stream"]
    inputs: list[str]
    options: tuple[Any, ...] = ()  # decoding settings; jobs batch together only when equal
    streamer: Any = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Worker:
    """The thread that runs the model, batching the jobs that arrive close together."""

    def __init__(self, run: Any, limits: Limits):
        self.run, self.limits = run, limits
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.requests = self.model_calls = 0
        self.thread = threading.Thread(target=self._loop, name="tunelab-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.requests += 1
        self.jobs.put(job)
        return job

    def _gather(self, first: Job) -> list[Job]:
        batch, size = [first], len(first.inputs)
        if first.kind == "stream":
            return batch
        deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
        held: list[Job] = []
        while size < self.limits.max_model_batch:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=max(left, 0)) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job.kind == first.kind and job.options == first.options:
                batch.append(job)
                size += len(job.inputs)
            else:
                held.append(job)
        for job in held:  # other settings wait for the next round, in order
            self.jobs.put(job)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather(self.jobs.get())
            self.model_calls += 1
            inputs = [text for job in batch for text in job.inputs]
            try:
                results = self._call(batch[0], inputs)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
                for job in batch:
                    job.error = e
                    if job.streamer is not None:
                        job.streamer.end()  # a stream that is being read ends here
                    job.done.set()
                continue
            start = 0
            for job in batch:
                job.result = results[start : start + len(job.inputs)]
                start += len(job.inputs)
                job.done.set()

    def _call(self, job: Job, inputs: list[str]) -> list[Any]:
        run = self.run
        if job.kind == "predict":
            return run.predict(inputs)
        max_tokens, temperature, top_p, stop = job.options
        defaults = run.config.generation
        options = dataclasses.replace(defaults, do_sample=bool(temperature),
                                      temperature=temperature or defaults.temperature,
                                      top_p=defaults.top_p if top_p is None else top_p)  # fmt: skip
        texts = run.generate(
            inputs, streamer=job.streamer, max_new_tokens=max_tokens, options=options, stop=stop
        )
        return [cut_at_stop(t, stop) for t in texts]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text up to (not including) the first stop sequence, as OpenAI returns it."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


async def wait_for(job: Job) -> Any:
    await asyncio.get_running_loop().run_in_executor(None, job.done.wait)
    if job.error is not None:
        raise job.error
    return job.result


# ---------------------------------------------------------------------------- the app


def create_app(
    run: Any, api_key: str | None = None, limits: Limits | None = None, name: str | None = None
) -> Any:
    """The FastAPI application serving `run` (a loaded run or exported folder)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    task = run.config.task
    model_id = name or Path(run.path).name
    worker = Worker(run, limits)
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)

    class APIError(Exception):
        def __init__(
            self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
        ):
            self.status, self.message, self.kind, self.param = status, message, kind, param

    def error_body(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": param, "code": None}}, status
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_body(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return error_body(400, f"the request body is not valid JSON ({reason}); send a JSON object",
                              "invalid_request_error")  # fmt: skip
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return error_body(400, message, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_body(e.status_code, str(e.detail), kind)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error")  # fmt: skip

    def count_tokens(text: str) -> int:
        return len(run.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_inputs(texts: list[str], param: str) -> None:
        if not texts:
            raise APIError(400, f"{param}: give at least one input", param=param)
        if len(texts) > limits.max_batch:
            raise APIError(400, f"{param}: {len(texts)} inputs; the limit is {limits.max_batch} per request",
                           param=param)  # fmt: skip
        for i, text in enumerate(texts):
            n = count_tokens(text)
            if n > limits.max_input_tokens:
                where = f"{param}[{i}]" if len(texts) > 1 else param
                raise APIError(
                    400, f"{where}: {n} tokens; the limit is {limits.max_input_tokens}", param=where
                )

    def needs(*tasks: str) -> None:
        if task not in tasks:
            use = {"classification": "/v1/classify", "token-classification": "/v1/entities",
                   "regression": "/v1/predict", "causal-lm": "/v1/chat/completions or /v1/completions",
                   "seq2seq": "/v1/completions"}[task]  # fmt: skip
            raise APIError(404, f"this server runs a {task} model; use {use}", "not_found_error")

    class Body(BaseModel):
        model_config = ConfigDict(extra="ignore")

    class InputRequest(Body):
        input: str | list[str]
        model: str | None = None

    class Sampling(Body):
        model: str | None = None
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, gt=0, le=1)
        stop: str | list[str] | None = None
        stream: bool = False
        n: int = Field(default=1, ge=1, le=1)

    class CompletionRequest(Sampling):
        prompt: str | list[str]

    class Message(Body):
        role: Literal["system", "user", "assistant"]
        content: str

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)

    def options(body: Sampling) -> tuple[Any, ...]:
        max_tokens = body.max_tokens or min(run.config.generation.max_new_tokens, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise APIError(
                400, f"max_tokens: {max_tokens}; the limit is {limits.max_tokens}", param="max_tokens"
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop")
        return max_tokens, body.temperature or 0.0, body.top_p, stop

    def usage(prompts: list[str], texts: list[str]) -> dict[str, int]:
        p, c = sum(map(count_tokens, prompts)), sum(map(count_tokens, texts))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def predict(body: InputRequest) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        check_inputs(texts, "input")
        results = await wait_for(worker.submit(Job("predict", texts)))
        return {
            "object": "list",
            "model": model_id,
            "data": [{"index": i, **r} for i, r in enumerate(results)],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": task, "model": model_id, "requests": worker.requests,
                "model_calls": worker.model_calls}  # fmt: skip

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "tunelab",
                                            "task": task}]}  # fmt: skip

    @app.post("/v1/classify", dependencies=[Depends(authorize)])
    async def classify(body: InputRequest) -> dict[str, Any]:
        needs("classification")
        return await predict(body)

    @app.post("/v1/entities", dependencies=[Depends(authorize)])
    async def entities(body: InputRequest) -> dict[str, Any]:
        needs("token-classification")
        return await predict(body)

    @app.post("/v1/predict", dependencies=[Depends(authorize)])
    async def regress(body: InputRequest) -> dict[str, Any]:
        needs("regression")
        return await predict(body)

    def stream_events(job: Job, chunk: Any) -> Any:
        """Server-sent events from the worker's streamer; the last event is [DONE]."""

        def events() -> Any:
            text = ""
            stop = job.options[3]
            for piece in job.streamer:
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
            job.done.wait()
            yield f"data: {json.dumps(chunk('', 'stop'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def streamer() -> Any:
        from transformers import TextIteratorStreamer

        return TextIteratorStreamer(run.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        needs("causal-lm", "seq2seq")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        check_inputs(prompts, "prompt")
        settings = options(body)
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            if len(prompts) != 1:
                raise APIError(400, "prompt: stream one prompt at a time", param="prompt")
            job = worker.submit(Job("stream", prompts, settings, streamer()))

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

            return stream_events(job, chunk)
        texts = await wait_for(worker.submit(Job("generate", prompts, settings)))
        return {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
                            for i, t in enumerate(texts)], "usage": usage(prompts, texts)}  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest) -> Any:
        needs("causal-lm")
        messages = [m.model_dump() for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, "messages: the last message must be the user's", param="messages")
        try:
            prompt = run.task.prompt_for(messages[-1]["content"], run.tokenizer, messages[:-1])
        except Exception as e:  # noqa: BLE001 - a template that rejects this conversation
            raise APIError(
                400, f"messages: the chat template cannot render them ({e})", param="messages"
            ) from None
        check_inputs([prompt], "messages")
        settings = options(body)
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            job = worker.submit(Job("stream", [prompt], settings, streamer()))
            first = [True]

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                if first[0]:
                    delta["role"], first[0] = "assistant", False
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

            return stream_events(job, chunk)
        (text,) = await wait_for(worker.submit(Job("generate", [prompt], settings)))
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage([prompt], [text])}  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        from tunelab.page import PAGE

        return PAGE.replace(
            "__CONFIG__", json.dumps({"task": task, "model": model_id, "auth": api_key is not None})
        )

    return app


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None) -> None:  # fmt: skip
    """Load the model and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'tunelab[serve]'") from None
    api_key = api_key or os.environ.get("TUNELAB_API_KEY") or None
    run = load_served(path)
    app = create_app(run, api_key, limits)
    print(f"tunelab: serving {path} ({run.config.task}) on http://{host}:{port}"
          + (" (API key required)" if api_key else ""), flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
