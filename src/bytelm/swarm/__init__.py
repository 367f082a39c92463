"""A swarm: one model served by many machines over hivemind (see the README's "Swarm"). Servers hold spans of the
remote stack's blocks (bytelm.swarm.server); a client holds the rest and routes each global step through a chain of
servers (bytelm.swarm.client). Needs `pip install bytelm[swarm]` (hivemind)."""

from .client import RemoteStack, remote_model
from .finetune import SwarmFinetuneConfig, swarm_finetune, swarm_lora
from .peers import ServerFailed, SwarmClient
from .server import SpanServer, run_server
from .session import RemoteSession
from .spans import load_client_parts, load_span, swarm_name
from .wire import SwarmError

__all__ = ["RemoteSession", "RemoteStack", "ServerFailed", "SpanServer", "SwarmClient", "SwarmError",
           "SwarmFinetuneConfig", "load_client_parts", "load_span", "remote_model", "run_server", "swarm_finetune",
           "swarm_lora", "swarm_name"]
