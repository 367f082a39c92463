"""Model cards (README.md with a YAML header) for model and adapter folders, via huggingface_hub's ModelCard.

The header says `library_name: bytelm` (`peft` for an adapter), license, tags, `pipeline_tag: text-generation`, and
when known the validation bits per byte and training data as `model-index`. What a model type is called and how it is
tagged comes from the caller (bytelm.models' registry): this module knows no model types.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .._version import __version__
from ..io import CARD_NAME, atomic_write_text

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, as the Hub spells repository ids


def model_card(config: dict[str, Any], num_params: int, *, description: str, tags: list[str],
               name: str | None = None, val_bpb: float | None = None, data: str | None = None,
               step: int | None = None, base_model: str | None = None, license: str = "apache-2.0",
               adapter: dict | None = None) -> str:
    """A model card for a model (or a LoRA adapter: `adapter` gives its target, rank and trainable params).
    config: the model config as a dict; description: what the model is ("MEGABYTE (Yu et al. ...)")."""
    name = name or f"bytelm-{config.get('model_type', 'model')}"
    results = None
    if val_bpb is not None:
        results = [EvalResult(task_type="text-generation", dataset_type="bytes", dataset_name=data or "unknown",
                              dataset_split="validation", metric_type="bits_per_byte",
                              metric_name="validation bits per byte", metric_value=round(val_bpb, 4))]
    card_data = ModelCardData(
        library_name="peft" if adapter else "bytelm", license=license,
        tags=["bytelm", *tags] + (["lora", "peft"] if adapter else []), pipeline_tag="text-generation",
        model_name=name if results else None, eval_results=results,
        base_model=base_model if base_model and HUB_ID.fullmatch(base_model) else None,
    )
    if adapter:
        what = (f"A LoRA adapter (peft, rank {adapter['rank']}) for a {description} model, trained with bytelm "
                f"{__version__}: {adapter['trainable']:,} trainable parameters on a base of {num_params:,}, in the "
                f"Linear layers matching `{adapter['target']}`. Base model: `{base_model or 'unknown'}`.")
        use = (f"bytelm generate --adapter {name} --prompt 'def '\n"
               f"bytelm merge {name} --out merged     # a plain model folder")
    else:
        what = (f"A tokenizer-free {description} over raw bytes, {num_params:,} parameters, trained with "
                f"bytelm {__version__}.")
        use = f"import bytelm\nmodel = bytelm.load('{name}')\nprint(model.generate(b'def ', 64))"
    lines = [f"# {name}", "", what, ""]
    if base_model and not adapter:
        lines += [f"Fine-tuned from `{base_model}` (a LoRA adapter, merged in).", ""]
    if val_bpb is not None:
        lines += [f"Validation bits per byte: **{val_bpb:.4f}**" + (f" (at step {step:,})" if step else ""), ""]
    if data:
        lines += [f"Training data: {data}", ""]
    lines += ["```" + ("bash" if adapter else "python"), use, "```", "", "Config:", "", "```json",
              json.dumps(config, indent=2), "```"]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_model_card(folder: str | Path, config: dict[str, Any], num_params: int, **card) -> Path:
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, model_card(config, num_params, **card))
    return path


def set_card_base_model(path: str | Path, base_model: str, was: str | None = None) -> None:
    """Name `base_model` (a hub id) as the base in the model card at `path`: its header's `base_model:` (how the Hub
    links a fine-tune or an adapter to its base) and, in its text, in place of `was` (a local path it named)."""
    card = ModelCard.load(path)
    card.data.base_model = base_model
    if was:
        card.text = card.text.replace(f"`{was}`", f"`{base_model}`")
    atomic_write_text(Path(path), str(card))
