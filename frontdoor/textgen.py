"""Text generation shared by the OpenAI HTTP API and the gRPC Router API.

``TextGenerator`` validates a ``TextRequest`` (OpenAI-style messages, ``InvalidRequest`` with ``param``),
tokenizes it with the model's tokenizer, hands the token ids to a ``TokenRouter`` (the dispatch layer that
talks to the workers) and turns the token stream back into text: incremental detokenization, stop strings,
usage. It holds no per-request state outside ``stream``; closing the stream early aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from frontdoor.tokenizer import ModelTokenizer
from protocol.errors import InvalidRequest, ModelNotFound, Overloaded, WorkerFailed
from protocol.ids import RequestId
from protocol.messages import FinishReason, SamplingSpec, TokenChunk

MAX_STOP_STRINGS = 4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TOKENIZE_INLINE_CHARS = 8192  # longer texts are tokenized on a thread (1 MB takes about 0.85 s)


class TokenRouter(Protocol):
    """Routes token ids to the worker pools and streams the generated ids back (written by the dispatch
    layer; the front door's only way to the workers)."""

    def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        """Yield the request's ``TokenChunk``s in order; the last one has ``finish_reason`` set.

        Raises ``protocol.errors.PdflowError`` subclasses (``PoolEmpty``, ``WorkerFailed``,
        ``DeadlineExceeded`` ...). Closing the iterator early (``aclose``) aborts the request and frees its
        KV blocks on every worker that holds them.
        """
        ...

    async def abort(self, request_id: RequestId) -> bool:
        """Abort a running request; True if it was running. Idempotent."""
        ...

    def stopped(self, request_id: RequestId) -> None:
        """The caller is about to close the request's iterator because one of its stop strings matched: the
        request finished (``FINISHED_STOP``, in the latency figures), it was not aborted."""
        ...


@dataclass(frozen=True)
class TextRequest:
    """One generation request as both APIs describe it. Exactly one of ``prompt``, ``messages`` and
    ``prompt_token_ids`` is set. ``None`` sampling fields mean the defaults (temperature 1, top_p 1, no
    top_k); ``priority`` goes to the router unchanged."""

    model: str
    request_id: RequestId
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    prompt_token_ids: Sequence[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    priority: int = 0
    caller: str = ""  # who sent it (``protocol.auth.caller_id``), for the per-key limit


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New output of one request: the ids the engine generated and the text that became final with them
    (possibly "" while a character or a possible stop string is incomplete). The last delta has
    ``finish_reason`` and ``usage``."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request: the prompt's ids and the sampling spec the workers get."""

    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    stop: tuple[str, ...]
    priority: int


class TextGenerator:
    """Validate, tokenize, route, detokenize. One instance per front door, shared by every request."""

    def __init__(
        self,
        router: TokenRouter,
        tokenizer: ModelTokenizer,
        model_name: str,
        max_model_len: int,
        default_max_tokens: int,
        max_concurrent_per_key: int = 0,
    ) -> None:
        """``max_concurrent_per_key``: requests one caller may have in flight (0: no limit)."""
        self.router = router
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self._per_key = max_concurrent_per_key
        self._in_flight: dict[str, int] = {}  # caller -> its requests in flight (per-key limit)

    async def abort(self, request_id: RequestId) -> bool:
        return await self.router.abort(request_id)

    def prepare(self, req: TextRequest) -> PreparedRequest:
        """Validate and tokenize; raises ``InvalidRequest`` (or ``ModelNotFound``) with an OpenAI-style
        message and the offending ``param``. Pure."""
        if req.model != self.model_name:
            raise ModelNotFound(
                f"The model '{req.model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
            )
        _check_sampling(req)
        prompt_ids, prompt_param = self._prompt_ids(req)
        n_prompt, context = len(prompt_ids), self.max_model_len
        if n_prompt >= context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{n_prompt} tokens in the prompt, which leaves no room for a completion. Please reduce "
                f"the length of the {prompt_param}.",
                param=prompt_param,
            )
        if req.max_tokens is None:
            max_tokens = min(self.default_max_tokens, context - n_prompt)
        elif n_prompt + req.max_tokens > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the {prompt_param}, {req.max_tokens} "
                f"in the completion). Please reduce the length of the {prompt_param} or completion.",
                param="max_tokens",
            )
        else:
            max_tokens = req.max_tokens
        sampling = SamplingSpec(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=0 if req.top_k is None or req.top_k == -1 else req.top_k,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        return PreparedRequest(req.request_id, tuple(prompt_ids), sampling, tuple(req.stop), req.priority)

    async def stream(self, req: TextRequest) -> AsyncGenerator[TextDelta, None]:
        """Validate (see ``prepare``), then yield one ``TextDelta`` per router chunk. Router errors propagate
        as they are. Closing this generator early closes the router's iterator, which aborts the request.
        A long text is tokenized off the event loop: the other requests' streams go on meanwhile."""
        if _text_chars(req) > _TOKENIZE_INLINE_CHARS:
            prepared = await asyncio.to_thread(self.prepare, req)
        else:
            prepared = self.prepare(req)
        with self._held_for(req.caller):
            async with contextlib.aclosing(
                self._generate(prepared)
            ) as deltas:  # closed now, not when collected
                async for delta in deltas:
                    yield delta

    @contextlib.contextmanager
    def _held_for(self, caller: str) -> Iterator[None]:
        """Count the request against its caller's limit while it runs; ``Overloaded`` past the limit."""
        held = self._in_flight.get(caller, 0)
        if self._per_key and held >= self._per_key:
            raise Overloaded(
                f"This API key already has {held} requests in flight, the most this server takes from one "
                "key (frontdoor.max_concurrent_per_key). Please retry after 1 s.",
                retry_after_s=1,
            )
        self._in_flight[caller] = held + 1
        try:
            yield
        finally:
            if (left := self._in_flight[caller] - 1) > 0:
                self._in_flight[caller] = left
            else:
                del self._in_flight[caller]

    async def _generate(self, prepared: PreparedRequest) -> AsyncGenerator[TextDelta, None]:
        chunks = self.router.generate(
            prepared.request_id, prepared.prompt_token_ids, prepared.sampling, prepared.priority
        )
        detok = self.tokenizer.detokenizer()
        stops = _StopMatcher(prepared.stop)
        n_generated = 0
        try:
            async for chunk in chunks:
                taken: list[int] = []
                text: list[str] = []
                finish = chunk.finish_reason
                for token_id in chunk.token_ids:
                    taken.append(token_id)
                    emitted, matched = stops.feed(detok.push((token_id,)))
                    text.append(emitted)
                    if matched:
                        finish = FinishReason.STOP
                        break
                else:
                    if finish is not None:
                        emitted, matched = stops.finish(detok.flush())
                        text.append(emitted)
                        finish = FinishReason.STOP if matched else finish
                n_generated += len(taken)
                if finish is None:
                    yield TextDelta(tuple(taken), "".join(text))
                    continue
                # Before the last yield: a stop string ends the request now, not when the caller closes us.
                if finish is FinishReason.STOP and chunk.finish_reason is not FinishReason.STOP:
                    self.router.stopped(prepared.request_id)  # ours, not the engine's: a finish, no abort
                await _close(chunks)
                usage = Usage(len(prepared.prompt_token_ids), n_generated)
                yield TextDelta(tuple(taken), "".join(text), finish, usage)
                return
            raise WorkerFailed(
                f"the token stream of request {prepared.request_id} ended without a finish reason"
            )
        finally:
            await _close(chunks)

    def _prompt_ids(self, req: TextRequest) -> tuple[list[int], str]:
        inputs = ("prompt", "messages", "prompt_token_ids")
        given = [name for name in inputs if getattr(req, name) is not None]
        if len(given) != 1:
            raise InvalidRequest(
                "Exactly one of 'prompt', 'messages' or 'prompt_token_ids' must be given; "
                f"got {', '.join(given) or 'none'}.",
                param="prompt",
            )
        self._check_chars(req)
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequest("The prompt is empty; give at least one character.", param="prompt")
            ids = self.tokenizer.encode(req.prompt)
            param = "prompt"
        elif req.messages is not None:
            if not req.messages:
                raise InvalidRequest("'messages' is empty; give at least one message.", param="messages")
            ids = self.tokenizer.apply_chat_template(req.messages)
            param = "messages"
        else:
            ids = list(req.prompt_token_ids or ())
            param = "prompt"
            if not ids:
                raise InvalidRequest(
                    "The prompt's token id list is empty; give at least one token id.", param="prompt"
                )
            vocab = self.tokenizer.vocab_size
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(
                    f"Token id {bad[0]!r} is out of vocabulary; this model's token ids are 0 to {vocab - 1}.",
                    param="prompt",
                )
        if not ids:
            raise InvalidRequest(f"The {param} encodes to no tokens.", param=param)
        return ids, param

    def _check_chars(self, req: TextRequest) -> None:
        """Refuse, before tokenizing it, a text too long to fit the context whatever its tokens."""
        limit = self.max_model_len * self.tokenizer.max_token_chars
        chars = _text_chars(req)
        if chars > limit:
            param = "prompt" if req.prompt is not None else "messages"
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens, which no text of more "
                f"than {limit} characters fits; your {param} has {chars}. Please reduce its length.",
                param=param,
            )


_MESSAGE_CHARS = 32  # what the chat template writes around each message (role, markers), at least


def _text_chars(req: TextRequest) -> int:
    """Characters of text the request asks to tokenize: the prompt, or each message's text and what the
    chat template writes around it."""
    if req.prompt is not None:
        return len(req.prompt)
    return sum(_MESSAGE_CHARS + _content_chars(m) for m in req.messages or ())


def _content_chars(message: Any) -> int:
    if not isinstance(message, Mapping):
        return len(str(message))
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, Sequence):  # content parts: their text
        return sum(len(str(p.get("text") or "")) if isinstance(p, Mapping) else len(str(p)) for p in content)
    return 0


async def _close(chunks: AsyncIterator[TokenChunk]) -> None:
    """Close the router's iterator: aborts the request unless it already finished; idempotent."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _check_sampling(req: TextRequest) -> None:
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be at least 1; got {req.max_tokens}.", param="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise InvalidRequest(
            f"temperature must be between 0 and 2; got {req.temperature}.", param="temperature"
        )
    if req.top_p is not None and not (0.0 < req.top_p <= 1.0 and math.isfinite(req.top_p)):
        raise InvalidRequest(f"top_p must be greater than 0 and at most 1; got {req.top_p}.", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise InvalidRequest(
            f"top_k must be -1 or 0 (disabled) or a positive number; got {req.top_k}.", param="top_k"
        )
    if req.seed is not None and not _INT64_MIN <= req.seed <= _INT64_MAX:
        raise InvalidRequest(f"seed must fit in a signed 64-bit integer; got {req.seed}.", param="seed")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"At most {MAX_STOP_STRINGS} stop sequences are supported; got {len(req.stop)}.", param="stop"
        )
    if any(not isinstance(s, str) or not s for s in req.stop):
        raise InvalidRequest("Stop sequences must be non-empty strings.", param="stop")


class _StopMatcher:
    """Finds the client's stop strings in the generated text. Text that could still be the start of a stop
    string is held back, so the client never sees any part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found; then the text is cut before it)."""
        if not self._stops:
            return text, False
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return held[: min(hits)], True
        keep = self._partial_suffix(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def finish(self, text: str) -> tuple[str, bool]:
        """``feed`` for the last text of the request; a held partial stop string is plain text after all."""
        emitted, matched = self.feed(text)
        if matched:
            return emitted, True
        rest, self._held = self._held, ""
        return emitted + rest, False

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self._stops) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
