"""Chat formats: how a conversation becomes prompt text for one model, computed once.

:meth:`ChatFormat.for_model` looks at the model once (its GGUF chat template, its BOS token
and whether its vocabulary asks for one) and answers every later question from what it
found. Rendering is llama.cpp's own (:func:`llamaffi.apply_template`): llama.cpp does not
run the template's Jinja, it recognises the family from the template text and formats with
that family's built-in formatter. Everything else is derived generically from renders of a
few probe conversations, never from a per-family table: the family's llama.cpp name (the
built-in formatter whose renders equal the template's), the text that closes an assistant
turn, the end-of-turn markers (:attr:`ChatFormat.stop_strings`), and whether system messages
keep a turn of their own.

Plain fallback
--------------
A model without a chat template, or with one llama.cpp does not recognise, gets the
``plain`` format (``builtin`` is False), rendered here. Each message is::

    ### System:
    <content>

    ### User:
    <content>

    ### Assistant:
    <content>

that is ``"### " + Role + ":\\n" + content + "\\n\\n"`` with the role capitalised; the
generation prompt is ``"### Assistant:\\n"``. Its stop strings are the three headers
``"### User:"``, ``"### System:"`` and ``"### Assistant:"``; an assistant turn is closed by
``"\\n\\n"``. System messages keep their own turn.

What llama.cpp's formatters do differently from the Jinja they stand for (llama.cpp's
choice, kept here): the leading ``{{ bos_token }}`` of a template is not rendered (the BOS
token comes from :meth:`ChatFormat.tokenize` instead), a default system prompt that the
Jinja would insert (SmolLM2's "You are a helpful AI assistant named SmolLM...") is not, and
some families (Llama-3, Gemma) strip the message content.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from llamaffi.errors import ArgumentError, TemplateError

if TYPE_CHECKING:
    import llamaffi

logger = logging.getLogger(__name__)

__all__ = ["PLAIN", "ChatFormat", "Message"]

#: The name of the fallback format.
PLAIN: Final = "plain"

_PLAIN_STOPS: Final = ("### User:", "### System:", "### Assistant:")
_PLAIN_CLOSE: Final = "\n\n"

# llama.cpp's formatter names that we report under a family name. llama.cpp formats the
# pre-v1 Mistral-Instruct template ("[INST]", no system role, no <<SYS>>) as plain
# "llama2"; a real Llama-2-chat template has <<SYS>> and is detected as a llama2-sys*.
_FAMILY: Final = {
    "llama2": "mistral",
    "mistral-v1": "mistral",
    "mistral-v3": "mistral",
    "mistral-v3-tekken": "mistral",
    "mistral-v7": "mistral",
    "mistral-v7-tekken": "mistral",
}

# Assistant-turn closes, used only when a render does not contain the reply verbatim even
# for a probe reply without surrounding whitespace (no known formatter does that).
_CLOSE_TABLE: Final = {
    "chatml": "<|im_end|>\n",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>\n",
    PLAIN: _PLAIN_CLOSE,
}

# Probe texts: distinctive, no surrounding whitespace (some formatters strip content).
_P_SYSTEM: Final = "Psys7q"
_P_USER: Final = "Puser7q"
_P_USER2: Final = "Pnext7q"
_P_REPLY: Final = "Preply7q"
# With surrounding whitespace and a second turn, so that strip and BOS-in-history variants
# of a family render differently from each other.
_SIGNATURE_PROBES: Final = (
    ((("system", " Psys7q "), ("user", " Puser7q "), ("assistant", " Preply7q ")), False),
    ((("user", "Puser7q"), ("assistant", "Preply7q"), ("user", "Pnext7q")), True),
    ((("system", "Psys7q"), ("user", "Puser7q")), True),
)
_FOLD_SEPARATORS: Final = ("\n\n", "\n", " ", "")
# Histories up to this long are always rendered whole (see ChatFormat._recent).
_TAIL_MIN: Final = 4


@dataclass(frozen=True)
class Message:
    """One message of a conversation."""

    role: str  # "system" | "user" | "assistant"
    content: str


def _pairs(messages: Sequence[Message]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


def _render_plain(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    parts = [f"### {m.role.capitalize()}:\n{m.content}{_PLAIN_CLOSE}" for m in messages]
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


def _marker_prefix(a: str, b: str) -> str:
    """The common start of two turn openers, cut back to its last whole marker.

    ``"<|im_start|>user\n"`` and ``"<|im_start|>assistant\n"`` give ``"<|im_start|>"``;
    ``"<|user|>"`` and ``"<|assistant|>"`` give ``""`` rather than a bare ``"<|"``.
    """
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    common = a[:n].strip()
    end = max(common.rfind(">"), common.rfind("]"))
    return common[: end + 1] if end >= 0 else ""


@dataclass(frozen=True)
class ChatFormat:
    """The chat format of one model: rendering, incremental deltas, markers, tokenisation.

    Build it with :meth:`for_model` (once per model); every method then only renders and
    compares strings. Attributes beyond the contract: ``template`` (the text given to
    llama.cpp, ``None`` for plain), ``llama_cpp_name`` (llama.cpp's name of the formatter,
    e.g. ``"llama2"`` for the ``mistral`` family), ``incremental`` (whether the probe
    conversation rendered turn by turn), ``tail_safe`` (deltas and closes depend only on the
    last turns, so they cost the same at any conversation length: checked against whole
    renders on probe conversations), and the BOS facts used by :meth:`tokenize`.
    """

    name: str
    builtin: bool
    stop_strings: tuple[str, ...]
    supports_system: bool
    template: str | None = None
    llama_cpp_name: str | None = None
    incremental: bool = True
    tail_safe: bool = False
    add_bos: bool = False
    bos_token: int = -1
    bos_text: str = ""
    _warned: list[bool] = field(
        default_factory=lambda: [False], init=False, repr=False, compare=False
    )
    #: token id -> whether it is a control token (asked of the model once per token)
    _control: dict[int, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: llamaffi.Model, template: str | None = None) -> ChatFormat:
        """The chat format of ``model``, from ``template`` or else the GGUF's own template.

        Falls back to the plain format (module docstring) when there is no template or
        llama.cpp does not recognise it; that is logged at INFO.
        """
        bos = model.bos
        add_bos = bos >= 0 and bos in model.tokenize("", add_special=True)
        bos_text = (
            model.token_to_piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else ""
        )
        text = template if template is not None else model.chat_template()
        fmt = cls._from_template(text, add_bos=add_bos, bos_token=bos, bos_text=bos_text)
        logger.info(
            "chat format of %s: %s (llama.cpp %s), stops %s, system turns %s, add BOS %s",
            model.path.name,
            fmt.name,
            fmt.llama_cpp_name,
            fmt.stop_strings,
            fmt.supports_system,
            fmt.add_bos,
        )
        return fmt

    @classmethod
    def _from_template(
        cls, template: str | None, *, add_bos: bool, bos_token: int, bos_text: str
    ) -> ChatFormat:
        plain = cls.plain(add_bos=add_bos, bos_token=bos_token, bos_text=bos_text)
        if template is None:
            logger.info("the model has no chat template; using the plain format")
            return plain
        try:
            from llamaffi.chat import apply_template

            apply_template(template, [("user", _P_USER)], True)
        except (TemplateError, ArgumentError):  # unknown, or a NUL that C would cut at
            head = template[:60] + ("..." if len(template) > 60 else "")
            logger.info(
                "llama.cpp does not know the chat template %r; using the plain format", head
            )
            return plain
        llama_cpp_name = _detect_builtin(template)
        name = _FAMILY.get(llama_cpp_name, llama_cpp_name) if llama_cpp_name else "custom"
        probe = dataclasses.replace(
            plain, name=name, builtin=True, template=template, llama_cpp_name=llama_cpp_name
        )
        return dataclasses.replace(
            probe,
            stop_strings=probe._derive_stop_strings(),
            supports_system=probe._derive_supports_system(),
            incremental=probe._derive_incremental(),
            tail_safe=probe._derive_tail_safe(),
        )

    @classmethod
    def plain(cls, *, add_bos: bool = False, bos_token: int = -1, bos_text: str = "") -> ChatFormat:
        """The fallback format of the module docstring."""
        return cls(
            PLAIN,
            False,
            _PLAIN_STOPS,
            True,
            tail_safe=True,  # every message renders on its own
            add_bos=add_bos,
            bos_token=bos_token,
            bos_text=bos_text,
        )

    # -- derived once, from probe renders ----------------------------------------------------

    def _derive_stop_strings(self) -> tuple[str, ...]:
        user, reply = Message("user", _P_USER), Message("assistant", _P_REPLY)
        close = self.assistant_close([user], reply)
        after_reply = self.render([user, reply], False)
        next_turn = self.render([user, reply, Message("user", _P_USER2)], True)
        user_opener = ""
        if next_turn.startswith(after_reply) and _P_USER2 in next_turn[len(after_reply) :]:
            delta = next_turn[len(after_reply) :]
            user_opener = delta[: delta.index(_P_USER2)]
        gen_prompt = self.render([user], True)[len(self.render([user], False)) :]
        # The marker every turn starts with ("<|im_start|>", "<start_of_turn>"), else the
        # user turn's opener ("[INST]": the llama2 formatter writes no assistant opener).
        opener = _marker_prefix(user_opener, gen_prompt) or user_opener.strip()
        stops: list[str] = []
        for marker in (close.strip(), opener):
            if len(marker) >= 2 and marker not in stops:
                stops.append(marker)
        return tuple(stops)

    def _derive_supports_system(self) -> bool:
        with_system = self.render([Message("system", _P_SYSTEM), Message("user", _P_USER)], True)
        if _P_SYSTEM not in with_system:
            return False  # dropped altogether
        for sep in _FOLD_SEPARATORS:
            folded = self.render([Message("user", _P_SYSTEM + sep + _P_USER)], True)
            if folded == with_system:
                return False  # folded into the first user message (Gemma)
        return True

    def _derive_incremental(self) -> bool:
        history: list[Message] = [Message("system", _P_SYSTEM)]
        for i in range(2):
            user = Message("user", f"{_P_USER}{i}")
            before = self.render(history, False)
            if not self.render([*history, user], True).startswith(before):
                return False
            history += [user, Message("assistant", f"{_P_REPLY}{i}")]
        return True

    def _derive_tail_safe(self) -> bool:
        """Whether deltas and closes from the last turns equal those from whole renders."""
        whole = dataclasses.replace(self, tail_safe=False)
        tail = dataclasses.replace(self, tail_safe=True)
        turns: list[Message] = []
        for i in range(4):
            turns += [Message("user", f" {_P_USER}{i} "), Message("assistant", f"{_P_REPLY}{i}")]
        # an imported multi-party history: runs of user messages between the replies
        runs = [Message("user", f" {_P_USER}{i} ") for i in range(4, 9)]
        runs[3:3] = [Message("assistant", f"{_P_REPLY}4")]
        for conversation in ([Message("system", _P_SYSTEM), *turns], turns, [*turns, *runs]):
            for k, message in enumerate(conversation):
                history = conversation[:k]
                if message.role == "user":
                    same = tail.user_delta(history, message) == whole.user_delta(history, message)
                elif message.role == "assistant":
                    same = tail.assistant_close(history, message) == whole.assistant_close(
                        history, message
                    )
                else:
                    continue
                if not same:
                    return False
        return True

    def _recent(self, history: Sequence[Message]) -> Sequence[Message]:
        """The part of ``history`` that a delta or a close is computed from.

        All of it, unless the format is ``tail_safe``: then the messages from the last turn
        boundary (a user message right after an assistant or a user one, at least two
        messages back) on, if no system message is among them. This keeps the per-turn cost
        independent of the conversation's length, an imported multi-party history (runs of
        user messages) included.
        """
        if not self.tail_safe or len(history) <= _TAIL_MIN:
            return history
        for j in range(len(history) - 2, 0, -1):
            if history[j].role == "user" and history[j - 1].role in ("assistant", "user"):
                tail = history[j:]
                if any(m.role == "system" for m in tail):
                    return history
                return tail
        return history

    # -- per call ----------------------------------------------------------------------------

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """The prompt text of ``messages``; with the assistant's opener when asked."""
        if not self.builtin or self.template is None:
            return _render_plain(messages, add_generation_prompt)
        from llamaffi.chat import apply_template

        return apply_template(self.template, _pairs(messages), add_generation_prompt)

    def user_delta(self, history: Sequence[Message], user: Message) -> tuple[str, bool]:
        """Text that turns ``render(history, False)`` into ``render(history + [user], True)``.

        Returns ``(text, True)`` when ``render(history + [user], True)`` extends
        ``render(history, False)``; otherwise ``(render(history + [user], True), False)``
        (the caller must re-prefill), with a log line saying the template does not render
        incrementally. An empty history counts as rendering to ``""`` (nothing fed yet), so
        the first delta is the whole first prompt.
        """
        recent = self._recent(history)
        if recent is not history:
            after = self.render([*recent, user], True)
            before = self.render(recent, False)
            if after.startswith(before):
                return after[len(before) :], True
        after = self.render([*history, user], True)
        before = self.render(history, False) if history else ""
        if after.startswith(before):
            return after[len(before) :], True
        level = logging.DEBUG if self._warned[0] else logging.WARNING
        self._warned[0] = True
        logger.log(
            level,
            "the %s chat template does not render incrementally: the prompt for %d messages "
            "does not extend the render of the %d before it; re-prefilling the whole render",
            self.name,
            len(history) + 1,
            len(history),
        )
        return after, False

    def assistant_close(self, history: Sequence[Message], reply: Message) -> str:
        """The text the template puts right after the reply's content.

        So that ``render(history, True) + reply.content + close ==
        render(history + [reply], False)`` (ChatML ``"<|im_end|>\\n"``, llama3
        ``"<|eot_id|>"``, mistral ``"</s>"``, gemma ``"<end_of_turn>\\n"``). Computed from
        the two renders; when they do not contain the content verbatim (Llama-3 and Gemma
        strip it), from the same renders with a probe reply, and only then from a family
        table (the equality above then holds for the stripped content only). Whitespace
        that a formatter puts between its assistant opener and the reply (vicuna's
        ``"ASSISTANT: "``) is not part of the close: the model generates it.
        """
        close = self._close_from_renders(history, reply)
        if close is None:
            close = self._close_from_renders(history, Message(reply.role, _P_REPLY))
        if close is None:
            close = _CLOSE_TABLE.get(self.name)
            logger.debug("%s: assistant close from the family table: %r", self.name, close)
        if close is None:
            logger.warning("%s: cannot tell what closes an assistant turn; using ''", self.name)
            close = ""
        return close

    def _close_from_renders(self, history: Sequence[Message], reply: Message) -> str | None:
        recent = self._recent(history)
        prefix = self.render(recent, True)
        full = self.render([*recent, reply], False)
        if not full.startswith(prefix):
            return None
        rest = full[len(prefix) :]
        # Some formatters put a space between the opener and the reply ("ASSISTANT: " in
        # vicuna, " " in mistral-v1); the model generates that space itself.
        body = rest.lstrip() if reply.content[:1].strip() else rest
        if not body.startswith(reply.content):
            return None
        return body[len(reply.content) :]

    def tokenize(
        self, model: llamaffi.Model, text: str, *, first: bool, plain: Sequence[str] = ()
    ) -> list[int]:
        """Tokens of rendered ``text``, template markers parsed as special tokens.

        ``plain`` are the message contents rendered into ``text``, in order: each is
        tokenized as plain text where it stands (llama-server's ``tokenize_mixed``), so a
        user who writes ``<|im_start|>system`` gets those characters, never the control
        token. BOS is prepended only for the ``first`` chunk of a sequence, only when the
        model's vocabulary asks for it, and only when ``text`` does not already start with
        the BOS text (no double BOS). EOS is never added.
        """
        risky = [c for c in plain if c and self._has_control(model, c)]
        if not risky:
            # the usual case: nothing in the messages parses as a control token, so the
            # text is tokenized whole, exactly as the model saw its template in training
            tokens = model.tokenize(text, add_special=False, parse_special=True)
        else:
            tokens = self._mixed(model, text, risky)
        if first and self.add_bos and not (self.bos_text and text.startswith(self.bos_text)):
            tokens.insert(0, self.bos_token)
        return tokens

    def _has_control(self, model: llamaffi.Model, content: str) -> bool:
        """Whether ``content`` holds text that parses as a control token."""
        tokens = model.tokenize(content, add_special=False, parse_special=True)
        return any(self._is_control(model, t) for t in tokens)

    def _mixed(self, model: llamaffi.Model, text: str, risky: Sequence[str]) -> list[int]:
        """``text`` tokenized with each of the ``risky`` contents (in order) as plain text
        where it stands and the template around them parsed for its markers."""
        tokens: list[int] = []
        at = 0
        for content in risky:
            found = text.find(content, at)
            if found < 0 or text.find(content, found + 1) >= 0:
                # rewritten by the template, or also standing elsewhere in it: which copy
                # is the user's cannot be told, so it is refused rather than guessed
                raise ArgumentError(
                    f"a message contains control-token text that the {self.name} chat "
                    "template rewrites or also uses, so it cannot be kept as plain text"
                )
            tokens += model.tokenize(text[at:found], add_special=False, parse_special=True)
            tokens += model.tokenize(content, add_special=False, parse_special=False)
            at = found + len(content)
        tokens += model.tokenize(text[at:], add_special=False, parse_special=True)
        return tokens

    def _is_control(self, model: llamaffi.Model, token: int) -> bool:
        """A control token renders only when special tokens are shown."""
        known = self._control.get(token)
        if known is None:
            known = not model.token_to_piece(token) and bool(
                model.token_to_piece(token, special=True)
            )
            self._control[token] = known
        return known

    def clean(self, text: str) -> str:
        """Reply text without template markers: cut at the first stop string, stripped."""
        cut = len(text)
        for stop in self.stop_strings:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
        return text[:cut].strip()


def _signature(template: str) -> tuple[str, ...] | None:
    from llamaffi.chat import apply_template

    try:
        return tuple(apply_template(template, list(msgs), gen) for msgs, gen in _SIGNATURE_PROBES)
    except TemplateError:
        return None


def _detect_builtin(template: str) -> str | None:
    """llama.cpp's name of the formatter it uses for ``template`` (first match by name)."""
    from llamaffi.chat import builtin_templates

    names = builtin_templates()
    if template in names:
        return template
    wanted = _signature(template)
    for name in names:
        if _signature(name) == wanted:
            return name
    return None
