"""The model's own tokenizer in the front door: text and chat messages to token ids on the way in, and
incremental detokenization of the streamed token ids on the way out.

Workers see token ids only; this module is the one place where text and ids meet. Loading is the only slow
call (a second or two); ``encode``, ``apply_chat_template`` and ``IncrementalDetokenizer.push`` are quick,
CPU-bound, and safe to call from the event loop for prompts within the model's context length.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from protocol.errors import InvalidRequest

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# Byte-level BPE writes a character that is cut in the middle of its UTF-8 bytes as U+FFFD.
_REPLACEMENT = "\ufffd"


class ModelTokenizer:
    """A Hugging Face tokenizer loaded from a model directory. Immutable after construction; one instance is
    shared by every request of a front door."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._hf: Any = AutoTokenizer.from_pretrained(str(self.model_dir))
        # the most characters one token stands for: a byte-level token's string has one character per
        # byte, and a character is at least a byte, so no text of more than n x this is n tokens or fewer
        self.max_token_chars = max((len(t) for t in self._hf.get_vocab()), default=1)
        self._hf.encode("warm")  # a tokenizer sets its state up on first use: not from two threads at once

    @property
    def eos_token_id(self) -> int | None:
        eos = self._hf.eos_token_id
        return int(eos) if eos is not None else None

    @property
    def vocab_size(self) -> int:
        """Number of valid token ids (base vocabulary plus added tokens): ids are 0..vocab_size-1."""
        return len(self._hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the special tokens the tokenizer adds by default."""
        return list(self._hf.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens skipped (what the client sees)."""
        return str(self._hf.decode(list(token_ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a chat prompt, ending with the assistant's generation prompt. Raises
        ``InvalidRequest`` (param ``messages``, or ``messages[i]...`` naming the bad field) when the tokenizer
        has no chat template or a message is malformed."""
        if not self.has_chat_template:
            raise InvalidRequest(
                "This model's tokenizer has no chat template, so chat messages cannot be turned into a "
                "prompt; use /v1/completions with a plain prompt instead.",
                param="messages",
            )
        normalized = [_normalize_message(i, message) for i, message in enumerate(messages)]
        try:
            text = self._hf.apply_chat_template(normalized, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 errors from the model's template: the messages do not fit it
            raise InvalidRequest(
                f"The messages do not fit this model's chat template: {exc}", param="messages"
            ) from exc
        # The template already wrote every special token (BOS included): add none again.
        return list(self._hf.encode(str(text), add_special_tokens=False))

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's generated ids."""
        return IncrementalDetokenizer(self._hf)


def _normalize_message(index: int, message: Any) -> dict[str, str]:
    """``{"role", "content"}`` with string content; OpenAI text parts (``[{"type": "text", "text": ...}]``)
    are joined. Anything else is an ``InvalidRequest`` naming the message."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"{where} must be an object with 'role' and 'content'.", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}; got {role!r}.",
            param=f"{where}.role",
        )
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            is_text = isinstance(part, Mapping) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise InvalidRequest(
                    f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported.",
                    param=f"{where}.content",
                )
            texts.append(part["text"])
        return {"role": role, "content": "".join(texts)}
    raise InvalidRequest(
        f"{where}.content must be a string or a list of text parts; got {type(content).__name__}.",
        param=f"{where}.content",
    )


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text piece by piece.

    The prefix/read offset method (as in vLLM and TGI): each step decodes a short window of ids twice, with
    and without the new ones, and emits the difference. Text is held back while it ends in an incomplete
    UTF-8 character (U+FFFD) or a new id adds no text yet (a special token, a partial piece). ``flush()`` at
    the end emits whatever is held, so that the concatenation of every ``push`` and the final ``flush`` is
    exactly ``tokenizer.decode(all_ids, skip_special_tokens=True)``. Not thread-safe; one per request.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window decoded with the new ids
        self._read_offset = 0  # ids before this were emitted as text
        self._emitted: list[str] = []

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def push(self, token_ids: Iterable[int]) -> str:
        """Add generated ids; return only the text that became final with them (possibly "")."""
        pieces = []
        for token_id in token_ids:
            self._ids.append(int(token_id))
            pieces.append(self._step())
        text = "".join(pieces)
        if text:
            self._emitted.append(text)
        return text

    def flush(self) -> str:
        """The held-back rest at the end of the request (an incomplete character comes out as U+FFFD)."""
        full = self._decode(self._ids)
        emitted = "".join(self._emitted)
        # Always true for byte-level BPE; a tokenizer whose decode rewrites earlier text could differ, and
        # text already sent cannot be taken back.
        rest = full[len(emitted) :] if full.startswith(emitted) else ""
        self._read_offset = self._prefix_offset = len(self._ids)
        if rest:
            self._emitted.append(rest)
        return rest

    def _step(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        if not new_text.startswith(prefix_text):
            return ""  # the window decodes inconsistently: keep holding, flush() settles it
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return str(self._hf.decode(token_ids, skip_special_tokens=True))
