"""An OpenAI-compatible HTTP server over the continuous-batching engine (bytelm.generation.engine): FastAPI +
uvicorn, Prometheus metrics. Needs `pip install bytelm[serve]`. Start it with `bytelm serve MODEL`."""

from .app import ServerLimits, create_app

__all__ = ["ServerLimits", "create_app"]
