"""The canonical text of a chat, which the router hashes into prefix blocks (dispatcher/routing.py `describe`).

The engine applies the model's chat template to the messages (SGLang's chat API); the router does not know
that template. It keys the prefix index on this rendering instead: each message as its role and text between
fixed markers, one after the other. The rendering of a conversation's first k messages is a prefix of the
rendering of its first k + 1, as the template's output is, so a next turn matches the blocks of the turns
before it, and two chats that share a system prompt share its blocks: the same cases where the engine's
cache holds the templated prefix. What the template adds (special tokens, a generation prompt) is a small,
nearly constant number of tokens that the estimate of the prompt's length ignores.
"""

from __future__ import annotations

from collections.abc import Sequence

from lodestar.schemas import ChatMessage


def render_messages(messages: Sequence[ChatMessage]) -> str:
    """The chat as one text: `<|role|>` then the message's text then a newline, for each message in order."""
    return "".join(f"<|{m.role}|>{m.text}\n" for m in messages)
