"""What fine-tuning leaves in its output directory, and how the export checks it.

``model.safetensors``: the fine-tuned weights in the UNPRUNED model's key layout, so
``load_model(name, weights=path)`` (and ``colln-export --weights``) load them and then prune with
the plan they were trained for. ``finetune.json`` beside them records that plan. ``checkpoint.pt``:
the resumable training state, rewritten atomically after every epoch (and on Ctrl-C, SIGTERM,
SIGHUP).
"""

from __future__ import annotations

import io
import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from colln.data import model_class_names
from colln.errors import CheckpointError, PlanMismatchError
from colln.files import atomic_write
from colln.models.config import PruneConfig, config_flags
from colln.models.plan import KeepPlan, default_layers
from colln.models.registry import CLASS_NAMES_KEY

WEIGHTS = "model.safetensors"
RECORD = "finetune.json"
CHECKPOINT = "checkpoint.pt"
LOSS_PLOT = "loss.png"

# A pruning block keeps timm's block as ``.block`` and a ReducedViT the model as ``.vit``:
# [vit.]blocks.2.block.attn... -> blocks.2.attn...
_WRAPPED = re.compile(r"^(?:vit\.)?(blocks\.\d+\.)(?:block\.)?")


def unpruned_state_dict(
    model: nn.Module,
) -> dict[str, torch.Tensor]:
    """The pruned model's parameters under the unpruned model's keys (pruning adds none)."""
    return {_unwrapped(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _unwrapped(key: str) -> str:
    return _WRAPPED.sub(r"\1", key) if _WRAPPED.match(key) else key.removeprefix("vit.")


def save_weights(
    model: nn.Module,
    path: Path,
) -> None:
    """The weights, with the model's class names in the file's metadata: a re-headed model's
    classes go wherever the file goes (:func:`colln.models.registry.load_weights` reads them)."""
    from safetensors.torch import save

    names = model_class_names(model)
    metadata = {CLASS_NAMES_KEY: json.dumps(names)} if names is not None else None
    atomic_write(path, save(unpruned_state_dict(model), metadata=metadata))


def save_state(
    path: Path,
    state: dict,
) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_state(
    path: Path,
) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}: run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({exc.__class__.__name__}): run without --resume and with --force"
        ) from exc


def write_record(
    path: Path,
    record: dict,
) -> None:
    atomic_write(path, json.dumps(record, indent=2) + "\n")


def recorded_plan(
    weights_path: Path,
) -> KeepPlan | None:
    """The keep plan recorded in ``finetune.json`` beside ``weights_path``; ``None`` when there is none."""
    record_path = Path(weights_path).parent / RECORD
    if not record_path.is_file():
        return None
    try:
        return KeepPlan.from_dict(json.loads(record_path.read_text())["plan"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read the plan recorded in {record_path} ({exc.__class__.__name__}): is it corrupt?"
        ) from exc


def recorded_config(
    weights_path: Path,
) -> PruneConfig | None:
    """The PruneConfig the weights at ``weights_path`` were fine-tuned for, ``layers`` and the
    per-layer keep rates resolved; ``None`` when no ``finetune.json`` lies beside them."""
    plan = recorded_plan(weights_path)
    return None if plan is None else plan.config


def _resolved(
    config: PruneConfig,
    depth: int,
) -> PruneConfig:
    """``config`` with its layers and rates spelt out, and the settings its metric ignores at their
    defaults ([CLS] uses no norm, only ``correct`` a rescue ratio), so equal plans compare equal."""
    # ToMe merges at every block by default, pruning at EViT's.
    every = tuple(range(depth)) if config.tome is not None else default_layers(depth)
    layers = config.layers if config.layers is not None else every
    rates = config.rates(len(layers))
    return replace(
        config,
        layers=layers,
        keep=rates[0] if len(set(rates)) == 1 else rates,
        norm=PruneConfig.norm if config.metric == "cls" else config.norm,
        rescue=config.rescue if config.metric == "correct" else PruneConfig.rescue,
    )


def check_recorded_plan(
    weights_path: Path,
    config: PruneConfig,
    *,
    force: bool,
) -> str | None:
    """Compare the plan an export asks for with the one recorded beside fine-tuned weights.

    Returns ``None`` when they agree or nothing is recorded; raises :class:`PlanMismatchError` (one
    line: both plans as flags) when they differ, or with ``force`` returns that line as a warning.
    Every setting counts, ``layers=None`` meaning the default layers of the recorded depth.
    """
    plan = recorded_plan(weights_path)
    if plan is None:
        return None
    trained, asked = _resolved(plan.config, plan.depth), _resolved(config, plan.depth)
    if trained == asked:
        return None
    trained_flags, asked_flags = shlex.join(config_flags(trained)), shlex.join(config_flags(asked))
    message = f"{weights_path} was fine-tuned for {trained_flags}, this export asks {asked_flags}"
    if force:
        return f"warning: {message}; exporting anyway (--force)"
    raise PlanMismatchError(f"{message}: pass the recorded plan, or --force to export anyway")
