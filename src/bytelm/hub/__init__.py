"""The Hugging Face Hub: model cards, hub ids resolved through the local hub cache, uploads. Knows no model types."""

from .cards import HUB_ID, model_card, set_card_base_model, write_model_card
from .remote import cache_dir, check_repo_id, is_hub_id, offline, resolve, snapshot, upload

__all__ = ["HUB_ID", "cache_dir", "check_repo_id", "is_hub_id", "model_card", "offline", "resolve",
           "set_card_base_model", "snapshot", "upload", "write_model_card"]
