"""`mixmodal serve`: an OpenAI-compatible HTTP server (FastAPI) with continuous batching.
See docs/serve.md."""

from mixmodal.serve.app import Limits, create_app
from mixmodal.serve.scheduler import Scheduler

__all__ = ["Limits", "Scheduler", "create_app"]
