"""The engine's refusals, torch-free so that a server or another EngineClient can raise and catch them
without importing the engine."""
from __future__ import annotations

# Shared with the server (which reaches the engine only through this module and the facade): the same limits and
# words on both sides.
MAX_USER_CHARS = 256  # as the server's session_id: an id, not a payload (the vtc policy keys its counters by it)
# The same words from LLM.chat and from the server's 400 (server/errors.py), so both refuse alike.
EMPTY_MESSAGES = "messages is empty: a chat needs at least one message ({'role': 'user', 'content': ...})"


class RequestError(ValueError):
    """A request the engine refuses (prompt too long, empty, ...); the message says what to change."""


class QueueFull(RuntimeError):
    """The waiting queue is at its configured limit (the server answers 429)."""
