"""The engine's refusals, torch-free so that a server or another EngineClient can raise and catch them
without importing the engine."""
from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses (prompt too long, empty, ...); the message says what to change."""


class QueueFull(RuntimeError):
    """The waiting queue is at its configured limit (the server answers 429)."""
