"""Serving: an OpenAI-compatible HTTP API over a continuous-batching engine, and a chat page."""

from .api import create_app
from .engine import Engine, Event, GenerationRequest

__all__ = ["Engine", "Event", "GenerationRequest", "create_app"]
