"""MODEL and --adapter arguments -> a loaded model, as `bytelm eval` and `bytelm generate` take them."""

from __future__ import annotations

from typing import Annotated

import tyro
from tyro.conf import Positional

from ..errors import UsageError

ModelArg = Annotated[Positional[str | None], tyro.conf.arg(metavar="MODEL")]
MODEL_HELP = ("a model folder, a training run folder or a hub id (org/name); with --adapter: its base (default: the "
              "base the adapter records)")
ADAPTER_HELP = "a LoRA adapter folder or fine-tune run folder (or hub id) to use on top of MODEL"


def load(path: str | None, device: str, adapter: str | None = None, merge: bool = False):
    """`merge`: fold the adapter into the base's weights (faster to run; the adapter can no longer be switched)."""
    from ..devices import resolve_device

    if adapter is not None:
        from ..finetune import load_adapter

        return load_adapter(adapter, base=path, device=resolve_device(device), merge=merge)
    if path is None:
        raise UsageError("name a MODEL (a model folder, a training run folder or a hub id), or an --adapter")
    from ..models import load_model

    return load_model(path, device=resolve_device(device))


def load_remote(path: str | None, adapter: str | None, initial_peers: list[str], swarm: str | None = None,
                merge: bool = False, **client_options):
    """MODEL with its global model served by a swarm (bytelm.swarm.remote_model), an adapter on top if given (checked
    against the base's config; the client holds only part of the weights)."""
    if path is None:
        raise UsageError("name the MODEL the swarm serves (a model folder, a training run folder or a hub id)")
    try:
        from ..swarm import remote_model
    except ImportError as e:
        raise UsageError(f"the swarm needs hivemind: pip install 'bytelm[swarm]' ({e.name} is missing)") from None
    model = remote_model(path, initial_peers, swarm, **client_options)
    if adapter is None:
        return model
    from ..finetune import attach

    peft_model = attach(model, adapter, check_weights=False)
    return peft_model.merge_and_unload() if merge else peft_model.get_base_model()
