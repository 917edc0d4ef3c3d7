"""The Ollama `Modelfile` written beside a GGUF export: `FROM`, the chat template as Ollama's
`TEMPLATE` (Go template syntax), and `PARAMETER stop` for the end-of-turn tokens.

No library turns a Jinja chat template into Ollama's Go template, and in general no program can
(Jinja is a language). What chat templates do is simpler: wrap each message in a prefix and a
suffix that depend on its role, sometimes put in a default system message, and end with the
assistant's opening. `learn_template` finds those pieces by rendering the tokenizer's own template
on marker messages, `go_template` writes them as a Go template, and `render_go` (a renderer of just
the Go template syntax written here) proves the result renders conversations exactly as the Jinja
template does before the Modelfile claims it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER{}\x01", "assistant": "\x01ASSISTANT{}\x01"}
# the conversations the learned template must render exactly as the Jinja one does
CHECK_CONVERSATIONS = [
    [("user", "Hi there!")],
    [("system", "You are terse."), ("user", "What is 2+2?")],
    [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?")],
    [
        ("system", "Be kind."),
        ("user", "Hello"),
        ("assistant", "Hi! How can I help?"),
        ("user", "Tell me a joke."),
    ],
]


@dataclass
class ChatPieces:
    """Around each role's content: prefix + content + suffix; `default_system` stands first when the
    conversation has no system message; `generation` opens the assistant's answer."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    default_system: str
    generation: str


def _between(text: str, start: str, end: str) -> str:
    a = text.index(start) + len(start)
    return text[a : text.index(end, a)]


def _common_prefix_cut(whole: str, head: str) -> str:
    if not whole.startswith(head):
        raise ValueError("the template does not render turn by turn")
    return whole[len(head) :]


def learn_template(render: Any) -> ChatPieces:
    """The pieces of a chat template, found by rendering marker conversations.

    `render(messages, add_generation_prompt)` is the tokenizer's template.

    Raises:
        ValueError: the template is not of the prefix / content / suffix kind.
    """
    s, u1, a1, u2 = (
        MARK["system"],
        MARK["user"].format(1),
        MARK["assistant"].format(1),
        MARK["user"].format(2),
    )
    system, user, assistant = ({"role": "system", "content": s}, {"role": "user", "content": u1},
                               {"role": "assistant", "content": a1})  # fmt: skip
    full = render([system, user, assistant, {"role": "user", "content": u2}], True)
    with_user = render([system, user], False)
    with_answer = render([system, user, assistant], False)
    user_suffix = with_user[with_user.index(u1) + len(u1) :]
    assistant_suffix = with_answer[with_answer.index(a1) + len(a1) :]
    generation = _common_prefix_cut(render([system, user], True), with_user)
    user_prefix = _between(full, a1, u2)[len(assistant_suffix) :]
    if not _between(full, a1, u2).startswith(assistant_suffix):
        raise ValueError("the assistant's turn does not end the same way in every conversation")
    system_suffix = _between(full, s, u1)
    if not system_suffix.endswith(user_prefix):
        raise ValueError("the user's turn does not start the same way in every conversation")
    system_suffix = system_suffix[: len(system_suffix) - len(user_prefix)]
    assistant_prefix = _common_prefix_cut(_between(full, u1, a1), user_suffix)
    system_prefix = full[: full.index(s)]
    alone = render([user], True)
    default_system = alone[: alone.index(user_prefix + u1)] if user_prefix + u1 in alone else ""
    pieces = ChatPieces(
        prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        default_system=default_system,
        generation=generation,
    )
    return pieces


def _literal(text: str) -> str:
    """Text for a Go template: literal, except a `{{` (which would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """Ollama's TEMPLATE for the pieces: a default system message when the conversation has none,
    each message wrapped by its role, then the assistant's opening."""
    out = []
    if pieces.default_system:
        out.append(
            f'{{{{ if ne (index .Messages 0).Role "system" }}}}{_literal(pieces.default_system)}{{{{ end }}}}'
        )
    out.append("{{ range .Messages }}")
    for n, role in enumerate(ROLES):
        keyword = "if" if n == 0 else "else if"
        out.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(pieces.prefix[role])}{{{{ .Content }}}}'
                   f"{_literal(pieces.suffix[role])}")  # fmt: skip
    out.append("{{ end }}{{ end }}")
    out.append(_literal(pieces.generation))
    return "".join(out)


ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def _condition(expr: str, scope: Any, root: dict[str, Any]) -> bool:
    m = re.fullmatch(r'(eq|ne) (\.Role|\(index \$?\.Messages 0\)\.Role) "([^"]*)"', expr)
    if not m:
        raise ValueError(f"render_go: unsupported condition {expr!r}")
    op, subject, value = m.groups()
    role = scope["role"] if subject == ".Role" else (root["Messages"][0]["role"] if root["Messages"] else "")
    return (role == value) == (op == "eq")


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template that `go_template` writes (text, `{{ .Content }}`,
    `{{ range .Messages }}`, `{{ if / else if / else / end }}` with `eq` / `ne` on a role, and string
    literals) for `messages`, as Ollama would. Trim markers (`{{-`) are not used and not supported."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in ACTION.finditer(template):
        tokens.append(("text", template[pos : m.start()]))
        tokens.append(("action", m.group(1)))
        pos = m.end()
    tokens.append(("text", template[pos:]))
    root = {"Messages": messages}
    out, _ = _run(tokens, 0, root, root)
    return out


def _run(tokens: list[tuple[str, str]], i: int, scope: Any, root: dict[str, Any]) -> tuple[str, int]:
    """Render from tokens[i] to the matching `end` / `else` (not consumed); returns (text, index)."""
    out = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            out.append(value)
            i += 1
        elif value == "end" or value == "else" or value.startswith("else if "):
            return "".join(out), i
        elif value == ".Content":
            out.append(scope["content"])
            i += 1
        elif value.startswith('"'):
            out.append(json.loads(value))
            i += 1
        elif value == "range .Messages":
            start = i + 1
            end = _skip(tokens, start)
            for message in root["Messages"]:
                text, _ = _run(tokens, start, message, root)
                out.append(text)
            i = end + 1
        elif value.startswith("if "):
            taken, text, i = False, "", i
            condition: str | None = value[3:]
            while True:
                branch_start = i + 1
                branch_end = _skip(tokens, branch_start)
                if not taken and (condition is None or _condition(condition, scope, root)):
                    text, _ = _run(tokens, branch_start, scope, root)
                    taken = True
                ending = tokens[branch_end][1]
                i = branch_end
                if ending == "end":
                    break
                condition = ending[8:] if ending.startswith("else if ") else None
            out.append(text)
            i += 1
        else:
            raise ValueError(f"render_go: unsupported action {{{{ {value} }}}}")
    return "".join(out), i


def _skip(tokens: list[tuple[str, str]], i: int) -> int:
    """The index of the `end` / `else ...` closing the block whose body starts at tokens[i]."""
    depth = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "action":
            if value.startswith(("if ", "range ")):
                depth += 1
            elif value == "end":
                if depth == 0:
                    return i
                depth -= 1
            elif depth == 0 and (value == "else" or value.startswith("else if ")):
                return i
        i += 1
    raise ValueError("render_go: a block has no {{ end }}")


def modelfile(gguf_name: str, tokenizer: Any, stop_ids: list[int]) -> tuple[str, dict[str, Any]]:
    """The Modelfile's text and what was checked: the template is written only when it renders
    every check conversation exactly as the tokenizer's chat template does."""
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in stop_ids))
    lines = [f"FROM ./{gguf_name}"]
    report: dict[str, Any] = {"stop": stops}
    template = chat_as_go(tokenizer)
    if template is None:
        lines.append("# TEMPLATE: the chat template could not be expressed in Ollama's template syntax; "
                     "the GGUF file carries the original (Jinja) template")  # fmt: skip
        report["template"] = "not written: not expressible as an Ollama template"
    else:
        lines.append(f'TEMPLATE """{template}"""')
        report["template"] = f"renders {len(CHECK_CONVERSATIONS)} conversations as the chat template does"
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n", report


def jinja_render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template rendered as llama.cpp / Ollama see it: a leading bos token
    that tokenization adds anyway is left out."""
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def chat_as_go(tokenizer: Any) -> str | None:
    """The tokenizer's chat template as an Ollama Go template, or None when it is not of the kind
    `learn_template` reads or the result renders any check conversation differently."""
    if not isinstance(tokenizer.chat_template, str):
        return None
    try:
        template = go_template(learn_template(lambda m, g: jinja_render(tokenizer, m, g)))
        for conversation in CHECK_CONVERSATIONS:
            messages = [{"role": r, "content": c} for r, c in conversation]
            if render_go(template, messages) != jinja_render(tokenizer, messages):
                return None
    except Exception:  # noqa: BLE001 - a template that rejects the markers is one we cannot express
        return None
    return template
