"""The JSON bodies `tunelab serve` accepts, and the OpenAI-shaped error it answers with.

Request models follow the OpenAI API where it has one (completions, chat completions) and
ignore fields they do not know, since OpenAI clients send more than tunelab reads. Every
refused request gets `{"error": {"message", "type", "param", "code"}}`, the body OpenAI
clients parse into their own exceptions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, server_error
    param: str | None = None  # the request field at fault, as a dotted path
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`."""
    return ErrorBody(error=ErrorDetail(message=message, type=kind, param=param)).model_dump()


class APIError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputRequest(Body):
    """`/v1/classify`, `/v1/entities`, `/v1/predict`: one text or a list of texts."""

    input: str | list[str]
    model: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class AnswerRequest(Body):
    """`/v1/answer`: a question and the context that holds its answer, or lists of both."""

    question: str | list[str]
    context: str | list[str]
    model: str | None = None

    def pairs(self) -> tuple[list[str], list[str]]:
        """(questions, contexts); raises APIError when the lists differ in length."""
        questions = [self.question] if isinstance(self.question, str) else self.question
        contexts = [self.context] if isinstance(self.context, str) else self.context
        if len(questions) != len(contexts):
            raise APIError(400, f"context: {len(contexts)} contexts for {len(questions)} questions; give one "
                                f"context per question", param="context")  # fmt: skip
        return questions, contexts


class Sampling(Body):
    """The decoding options shared by completions and chat completions (OpenAI's names)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(Sampling):
    prompt: str | list[str]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class FeedbackRequest(Body):
    """`/v1/feedback`: a rating of a logged answer (`up`, `down`, or a score 1-5) and an optional
    correction (the right answer, or the right label); `index` picks the input of a batched request."""

    id: str = Field(min_length=1)
    rating: Literal["up", "down"] | int
    correction: str | None = None
    index: int = Field(default=0, ge=0)

    def rating_and_score(self) -> tuple[str | None, int | None]:
        """(rating, score): one of the two is set; raises APIError for a score outside 1-5."""
        if isinstance(self.rating, str):
            return self.rating, None
        if not 1 <= self.rating <= 5:
            raise APIError(
                400, f"rating: {self.rating}; give up, down, or a score from 1 to 5", param="rating"
            )
        return None, self.rating
