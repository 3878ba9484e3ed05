"""What goes over the wire between an OpenAI client and ``cacheaug serve``: the request bodies (pydantic models:
validated, one-line 422s that never echo the input) and the text given out as tokens arrive (:class:`TextStream`)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from .policies import get_policy


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate such as \\ud800?)") from None
    return text


def _policy(name: str) -> str:
    get_policy(name)  # ValueError naming the registered policies: a 422
    return name


Text = Annotated[str, AfterValidator(_utf8)]
PolicyName = Annotated[str, AfterValidator(_policy)]
Float = partial(Field, allow_inf_nan=False)


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints: OpenAI's, plus ``augment`` and ``deadline_ms``. OpenAI fields this
    server does not implement are accepted only at their neutral value (``n=1``, no ``logprobs``, ``echo=false``, zero
    penalties); any other field is refused with 422."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Float(default=0.0, ge=0.0, le=5.0)  # below MIN_TEMPERATURE: greedy (sampling.py)
    top_p: float = Float(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None  # {"include_usage": true}: a last chunk with the usage
    stop: (
        Annotated[list[Annotated[Text, Field(max_length=256)]], Field(max_length=4)]
        | Annotated[Text, Field(max_length=256)]
        | None
    ) = None  # as OpenAI's API: at most 4
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    augment: PolicyName | None = None  # a registered policy (cacheaug.serving.policies): off, sync, async, ...
    deadline_ms: int | None = Field(default=None, ge=0, le=600_000)
    user: str | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: None = None


class CompletionRequest(_Sampling):
    prompt: Text = Field(min_length=1)
    logprobs: Literal[0, None] = None
    echo: Literal[False] = False
    best_of: Literal[1, None] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """A chat message; ``content`` a string or a list of text parts (what the official SDK sends); ``developer`` is
    OpenAI's newer name of ``system`` and reaches the template as ``system``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]
    name: Text | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False, None] = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)


class AugmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1)
    deadline_ms: int | None = Field(default=None, ge=0, le=600_000)  # default: the engine's hard timeout


def _validation_message(err: RequestValidationError) -> str:
    """One line naming each bad field, without echoing the input (it may be NaN or not valid Unicode). pydantic
    names the member of a union type in the location (``stop.list[function-after[...]]``): such names are dropped and
    the members' complaints about one field joined with "or"."""
    parts: dict[str, list[str]] = {}
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and (isinstance(x, int) or str(x).isidentifier())]
        msg = e.get("msg", "invalid")
        found = parts.setdefault(".".join(loc) or "body", [])
        if msg not in found:
            found.append(msg)
    return "invalid request: " + "; ".join(f"{where}: {' or '.join(msgs)}" for where, msgs in parts.items())


class TextStream:
    """The text of a growing list of token ids, given out in pieces that never need taking back: the whole
    continuation is decoded each time (single-token decodes lose spaces and split characters), and its tail is held
    back while it may still change: an incomplete UTF-8 character (decoded as U+FFFD: a character spelled as byte
    tokens) or the head of a stop string. ``push`` returns ``(piece, stopped)``; with ``stopped`` the piece ends right
    before the first stop string. ``flush`` gives what was held back at the end."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int, end: bool = False) -> tuple[str, bool]:
        self.ids.append(token)
        full = self._text()
        cut = _stop_at(full, self.stops)
        if cut is not None:
            piece = cut[len(self.sent) :] if cut.startswith(self.sent) else ""
            self.sent = cut
            return piece, True
        safe = full if end else full[: len(full) - self._held(full)]
        piece = safe[len(self.sent) :] if safe.startswith(self.sent) else ""
        self.sent = self.sent + piece
        return piece, False

    def flush(self) -> str:
        full = self._text()
        rest = full[len(self.sent) :] if full.startswith(self.sent) else ""
        self.sent += rest
        return rest

    def _held(self, text: str) -> int:
        """How many characters at the end of ``text`` may still change."""
        keep = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep


def _stop_at(text: str, stops: list[str]) -> str | None:
    """``text`` cut before the first stop string, or None if none occurs."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
