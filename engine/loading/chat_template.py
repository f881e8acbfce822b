"""Chat templates: the jinja2 environment transformers renders them in, message checks, and where each
message's content lands in the rendered text (so the tokenizer can keep content plain text).
"""
from __future__ import annotations

import datetime
import json
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import jinja2.ext
import jinja2.sandbox

ALLOWED_ROLES = ("system", "user", "assistant", "tool")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_messages(messages: Any) -> None:
    """Raise ValueError naming the first bad message field (roles must be in ALLOWED_ROLES)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        if msg.get("role") not in ALLOWED_ROLES:
            raise ValueError(f"messages[{i}].role={msg.get('role')!r} is not allowed; "
                             f"choose one of {', '.join(ALLOWED_ROLES)}")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {msg.get('content')!r}")


def compile_template(text: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, trim/lstrip blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(text)


def content_spans(render: Callable[[list[dict]], str], messages: list[dict[str, str]],
                  text: str) -> list[tuple[int, int]] | None:
    """[start, end) of every message content's place in `text` (= render(messages)), found by rendering once
    more with a unique marker as each content. Templates that pass content through, or `| trim` it, are
    understood; for one that changes content otherwise the places are unknowable: None."""
    tag = secrets.token_hex(8)  # no whitespace, so `trim` leaves the marker alone
    marked = render([{**m, "content": f"\ue000{tag}:{i}\ue001"} for i, m in enumerate(messages)])
    for transform in (lambda c: c, str.strip):
        out, spans, pos = [], [], 0
        for m in re.finditer(f"\ue000{tag}:(\\d+)\ue001", marked):
            out.append(marked[pos:m.start()])
            content = transform(messages[int(m.group(1))]["content"])
            start = sum(map(len, out))
            out.append(content)
            spans.append((start, start + len(content)))
            pos = m.end()
        out.append(marked[pos:])
        if "".join(out) == text:
            return spans
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes ("<" -> "\u003c"); templates expect plain JSON, as in transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
