"""What ``colln-finetune`` does, as one function: load, prune, fine-tune with checkpoints in the
output directory, write the weights and ``finetune.json``. The CLI parses and renders around it."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from colln.data import DIGITS, class_folders, model_class_names, pick
from colln.errors import OutputExistsError, UsageError
from colln.files import check_replaceable, check_writable_dir
from colln.models import bundled
from colln.models.config import PruneConfig
from colln.models.registry import load_model, resolve_name, set_class_names
from colln.models.rewrite import prune
from colln.train import checkpoint as ckpt
from colln.train.datasets import open_dataset
from colln.train.distributed import env_ranks
from colln.train.finetune import FinetuneResult, Recipe, Reporter, finetune

OUTPUTS = (ckpt.WEIGHTS, ckpt.RECORD, ckpt.CHECKPOINT, ckpt.LOSS_PLOT)


@dataclass(frozen=True)
class FinetuneJob:
    """One ``colln-finetune`` run. ``data`` / ``val``: ``None`` = the model default (``digits`` and
    its test split for digits_vit; a directory is required otherwise). ``num_classes``: re-head the
    model for a folder with other classes (distillation is then off: the teacher's head does not
    fit). ``limit``: train on that many images, spread evenly over the set
    (:func:`colln.data.pick`; quick runs)."""

    model: str
    config: PruneConfig
    out: Path
    weights: str | None = None
    img_size: int | None = None
    data: str | None = None
    val: str | None = None
    num_classes: int | None = None
    distill: bool | None = None
    limit: int | None = None
    recipe: Recipe = field(default_factory=Recipe)
    device: str = "cpu"
    amp: bool = False
    resume: bool = False
    force: bool = False


def run_job(
    job: FinetuneJob,
    reporter: Reporter | None = None,
) -> dict:
    """Run ``job``; returns the ``finetune.json`` record (rank 0 writes the files, every rank returns it).

    Everything that can be refused (output directory, model, plan, data) is checked before the
    first file is written."""
    start = time.perf_counter()
    ranks = env_ranks()
    _check_out(job)
    canonical = resolve_name(job.model)
    model = load_model(canonical, job.weights, job.img_size)
    distill = job.distill if job.distill is not None else job.num_classes is None
    if distill and job.num_classes is not None:
        raise UsageError(
            "--distill with --num-classes: the unpruned teacher's head does not fit the new classes; use --no-distill"
        )
    is_digits = canonical in bundled.NAMES
    data = job.data or (DIGITS if is_digits else None)
    if data is None:
        raise UsageError(f"--data DIR is required for {canonical} (an ImageFolder directory: DIR/<class>/<image>)")
    val = job.val or (DIGITS if data == DIGITS else None)
    if job.num_classes is not None:
        _rehead(model, job.num_classes, data)
    pruned = prune(model, job.config)
    train_set = _limited(open_dataset(data, pruned, training=True), job.limit)
    val_set = open_dataset(val, pruned, training=False) if val is not None else None
    if ranks.is_main:
        plan = pruned.colln_plan
        _prepare_out(job, {"model": canonical, "plan": plan.to_dict(), "config": plan.config.to_dict(), "complete": False})
    result = finetune(
        pruned,
        train_set,
        val=val_set,
        recipe=job.recipe,
        teacher=model if distill else None,
        device=job.device,
        amp=job.amp,
        checkpoint_dir=job.out,
        resume=job.resume,
        reporter=reporter,
    )
    record = _record(job, canonical, model, pruned, result, distill, time.perf_counter() - start)
    if ranks.is_main:
        ckpt.save_weights(result.model, job.out / ckpt.WEIGHTS)
        ckpt.write_record(job.out / ckpt.RECORD, record)
    return record


def _check_out(
    job: FinetuneJob,
) -> None:
    """``--force`` starts over only in a colln run directory (it holds ``finetune.json``, written
    when a run starts) or an empty one, never in the current directory: the rule of colln-export."""
    out = job.out
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose another --out")
    if job.resume:
        if not (out / ckpt.CHECKPOINT).is_file():
            raise OutputExistsError(f"nothing to resume: {out / ckpt.CHECKPOINT} does not exist; run without --resume")
        return
    if not out.is_dir():
        return
    if job.force:
        check_replaceable(out, ckpt.RECORD)
    elif any(out.iterdir()):
        raise OutputExistsError(
            f"{out} already exists and is not empty: pass --force to start over, --resume to continue, or --out another directory"
        )


def _prepare_out(
    job: FinetuneJob,
    started: dict,
) -> None:
    """Fail now, not after the first epoch, when ``out`` cannot be written. Starting over (--force)
    removes the outputs of the earlier run (no stale checkpoint is left to resume by mistake); the
    ``started`` record marks the directory as colln's from the first moment (``--force`` may
    replace it after an interrupted first epoch)."""
    check_writable_dir(job.out, "choose a writable --out")
    if not job.resume:
        for name in OUTPUTS:
            (job.out / name).unlink(missing_ok=True)
        ckpt.write_record(job.out / ckpt.RECORD, started)


def _rehead(
    model: nn.Module,
    num_classes: int,
    data: str,
) -> None:
    """A new head; with one training folder per output, its classes are those folders (sorted), and
    the names travel with the weights, so every command maps folders by them."""
    if num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.reset_classifier(num_classes)
    folders = class_folders(Path(data)) if data != DIGITS else None
    set_class_names(model, folders if folders is not None and len(folders) == num_classes else None)


def _limited(
    dataset: Dataset,
    limit: int | None,
) -> Dataset:
    chosen = pick(len(dataset), limit)
    if len(chosen) == len(dataset):
        return dataset
    subset = Subset(dataset, chosen.tolist())
    subset.description = f"{getattr(dataset, 'description', type(dataset).__name__)}, {limit} images (--limit)"
    subset.skipped = getattr(dataset, "skipped", [])
    return subset


def _record(
    job: FinetuneJob,
    canonical: str,
    model: nn.Module,
    pruned: nn.Module,
    result: FinetuneResult,
    distill: bool,
    seconds: float,
) -> dict:
    import timm

    import colln

    plan = pruned.colln_plan
    return {
        "model": canonical,
        "complete": True,
        "weights": job.weights or ("bundled" if canonical in bundled.NAMES else "pretrained"),
        "num_classes": model.num_classes,
        "class_names": model_class_names(model),
        "plan": plan.to_dict(),
        "config": plan.config.to_dict(),
        "data": {
            "train": result.train_data,
            "train_images": result.train_images,
            "val": result.val_data,
            "val_images": result.val_images,
            "skipped_images": len(result.skipped_images),
            "skipped_examples": result.skipped_images[:5],
        },
        "recipe": asdict(result.recipe),
        "distill": distill,
        "device": job.device,
        "amp_bf16": job.amp,
        "world_size": result.world_size,
        "batch_size_per_process": result.recipe.batch_size,
        "effective_batch_size": result.recipe.batch_size * result.world_size,
        "history": [asdict(h) for h in result.history],
        "accuracy": {
            "before": result.initial_val_acc,
            "after": result.final_val_acc,
            "unpruned_teacher": result.teacher_val_acc,
        },
        "wall_seconds": round(seconds, 1),
        "versions": {
            "colln": colln.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
    }
