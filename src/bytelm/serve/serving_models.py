"""What the server is and how it is doing: GET /v1/models (the one model, its context and modality), /health (the
engine's load) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import media as served
from .serving import Serving


class ServingModels(Serving):
    def list(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "bytelm", "max_model_len": self.engine.max_len,
                                            "modality": served.modality(self.media)}]}


class ServingHealth(Serving):
    def health(self) -> dict:
        return {"status": "ok", "active_streams": self.engine.active, "queue_length": self.engine.queued}

    def metrics_page(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)
