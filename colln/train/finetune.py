"""``colln.finetune``: win back the accuracy a pruned model lost, EViT-style: a short fine-tune of
the pruned model, optionally distilled from the unpruned one. Plain PyTorch; the same code runs as
one process or as DDP under ``torchrun`` (see :mod:`colln.train.distributed`)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from colln.data import top1_correct
from colln.errors import CheckpointError, TrainingDivergedError, UnsupportedModelError, UsageError
from colln.train import checkpoint as ckpt
from colln.train.datasets import data_identity, describe, open_dataset
from colln.train.distributed import Ranks, all_sum, any_rank, gather_to_main, process_group

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning hyper-parameters. The defaults recover the bundled digits_vit's pruned
    accuracy in 10 epochs (docs/finetune.md); ``batch_size`` is per process."""

    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    distill_alpha: float = 0.5
    temperature: float = 2.0
    clip_grad: float = 1.0
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise UsageError(f"distill alpha must be in [0, 1], got {self.distill_alpha}")

    def lr_factor(
        self,
        step: int,
        steps_per_epoch: int,
    ) -> float:
        """Linear warm-up, then cosine to zero; ``step`` counts optimiser steps from 0."""
        warmup = max(1, round(self.warmup_epochs * steps_per_epoch))
        total = self.epochs * steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss and accuracy (augmented batches), validation loss and top-1,
    the learning rate at its end, wall seconds and training throughput (all processes)."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float
    images_per_s: float


@dataclass
class FinetuneResult:
    """The fine-tuned pruned model (a copy; ``colln_plan`` attached) and how it got there.
    ``initial_val_acc``: the pruned model before fine-tuning; ``teacher_val_acc``: the teacher's."""

    model: nn.Module
    history: list[EpochRecord]
    recipe: Recipe
    initial_val_acc: float | None
    teacher_val_acc: float | None
    world_size: int
    train_data: str
    train_images: int
    val_data: str | None
    val_images: int | None
    skipped_images: list[str] = field(default_factory=list)

    @property
    def final_val_acc(self) -> float | None:
        return self.history[-1].val_acc if self.history else None


class Reporter(Protocol):
    """Progress for a display; called on rank 0 only."""

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...

    def step(self, loss: float, acc: float, images_per_s: float) -> None: ...

    def end_epoch(self, record: EpochRecord) -> None: ...


def finetune(
    pruned: nn.Module,
    train: str | Path | Dataset,
    *,
    recipe: Recipe | None = None,
    val: str | Path | Dataset | None = None,
    teacher: nn.Module | None = None,
    device: str = "cpu",
    amp: bool = False,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune a copy of ``pruned`` (a model from ``colln.prune``; ``keep=1.0`` for the unpruned
    baseline) on ``train``; the inputs are left untouched.

    ``recipe``: the hyper-parameters (:class:`Recipe`, ``None`` = its defaults); ``overrides``:
    Recipe fields given as keywords replace the recipe's (``epochs=2, batch_size=32``).
    ``train`` / ``val``: an ImageFolder directory (the model's timm train / eval transform, folder
    names matched to the model's classes), ``'digits'`` (digits_vit's train / test split), or a
    Dataset of ``(image tensor, label)``. ``teacher``: an unpruned model to distil from: the loss is
    ``(1 - distill_alpha) * CE(label_smoothing) + distill_alpha * T^2 * KL(teacher/T || student/T)``.
    AdamW, warm-up then cosine per step, gradient clipping at ``clip_grad``; deterministic for a
    ``seed`` and a process count. Under torchrun each process takes ``batch_size`` images a step
    (DistributedSampler). ``device``: ``cpu`` or ``cuda``; ``amp``: bf16 autocast.

    ``checkpoint_dir``: rank 0 writes ``checkpoint.pt`` there after each epoch (atomically);
    ``resume`` continues from it (refused when the plan, recipe, starting weights or data differ).
    Ctrl-C, SIGTERM or SIGHUP stop at the next step boundary, save a resumable checkpoint (with
    ``checkpoint_dir``) and raise KeyboardInterrupt. A non-finite gradient stops with
    :class:`TrainingDivergedError`, the last epoch's checkpoint kept.
    """
    if getattr(pruned, "colln_plan", None) is None:
        raise UnsupportedModelError(
            "colln.finetune takes a model made by colln.prune (no keep plan attached): "
            "prune it first (keep=1.0 for the unpruned baseline)"
        )
    unknown = sorted(set(overrides) - {f.name for f in fields(Recipe)})
    if unknown:
        raise TypeError(f"finetune() got unexpected keyword argument(s) {', '.join(unknown)}: not Recipe fields")
    recipe = replace(recipe if recipe is not None else Recipe(), **overrides)
    if teacher is None:
        recipe = replace(recipe, distill_alpha=0.0)
    if resume and checkpoint_dir is None:
        raise UsageError("resume needs a checkpoint directory")
    train_set = open_dataset(train, pruned, training=True)
    val_set = open_dataset(val, pruned, training=False) if val is not None else None
    dev = _device(device)
    with process_group(dev) as ranks:
        if dev.type == "cuda":
            dev = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(dev)
        trainer = _Trainer(pruned, teacher, train_set, val_set, recipe, dev, amp, ranks, checkpoint_dir)
        trainer.run(resume, reporter if ranks.is_main else None, on_epoch)
    return FinetuneResult(
        model=trainer.model.cpu().eval(),
        history=trainer.history,
        recipe=recipe,
        initial_val_acc=trainer.initial_val_acc,
        teacher_val_acc=trainer.teacher_val_acc,
        world_size=ranks.world_size,
        train_data=describe(train_set),
        train_images=len(train_set),
        val_data=describe(val_set) if val_set is not None else None,
        val_images=len(val_set) if val_set is not None else None,
        skipped_images=[*getattr(train_set, "skipped", []), *getattr(val_set, "skipped", [])],
    )


def _device(
    name: str,
) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r}: use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible to PyTorch: use --device cpu")
    return torch.device(name)


# The signals that stop training gracefully: Ctrl-C, and what schedulers, ``docker stop``, a closed
# terminal and torchrun (which forwards SIGTERM to its workers) send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    """A stop signal sets an event the loop checks between steps, so a step is never cut in half and
    the checkpoint is consistent; a second one interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def at_once(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def handler(signum: int, frame: object) -> None:
        stop.set()
        for sig in STOP_SIGNALS:
            signal.signal(sig, at_once)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# How a refused resume names what changed (the other keys are their own names).
_SIGNATURE_WORDS = {"weights": "the starting weights (--weights)", "data": "the training data (--data, --limit)"}


def weights_sha256(
    model: nn.Module,
) -> str:
    """A hash of ``model``'s parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _RunRandom:
    """The random state of one rank's fine-tuning epoch (torch's, Python's and, on CUDA, the GPU's
    generator: what timm's augmentations, dropout and drop path draw from), swapped in only while
    the run draws, so the caller's global generators are left as they were."""

    def __init__(
        self,
        seed: int,
        device: torch.device,
    ) -> None:
        # The states torch.manual_seed / random.seed would give, without touching the global generators.
        self.torch = torch.Generator().manual_seed(seed).get_state()
        self.python = random.Random(seed).getstate()
        self.device = device
        self.cuda = torch.Generator(device=device).manual_seed(seed).get_state() if device.type == "cuda" else None

    @classmethod
    def restored(
        cls,
        saved: dict,
        device: torch.device,
    ) -> _RunRandom:
        """The state a mid-epoch checkpoint saved (the GPU's generator is not saved: seeded afresh)."""
        run = cls(0, device)
        run.torch, run.python = saved["torch"], saved["python"]
        return run

    def state(self) -> dict:
        """What a mid-epoch checkpoint keeps."""
        return {"torch": self.torch, "python": self.python}

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The run's state in the global generators for the block; the caller's back after it."""
        cuda = [self.device.index or 0] if self.cuda is not None else []
        with torch.random.fork_rng(devices=cuda):
            outer = random.getstate()
            torch.set_rng_state(self.torch)
            random.setstate(self.python)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            try:
                yield
            finally:
                self.torch, self.python = torch.get_rng_state(), random.getstate()
                if self.cuda is not None:
                    self.cuda = torch.cuda.get_rng_state(self.device)
                random.setstate(outer)

    def draws(
        self,
        loader: DataLoader,
    ) -> Iterator[Any]:
        """``loader``'s batches, each fetched (and augmented, in this process) inside :meth:`scope`."""
        batches = iter(loader)
        while True:
            with self.scope():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


class _Trainer:
    """The training state of one process and the loop over it."""

    def __init__(
        self,
        pruned: nn.Module,
        teacher: nn.Module | None,
        train_set: Dataset,
        val_set: Dataset | None,
        recipe: Recipe,
        device: torch.device,
        amp: bool,
        ranks: Ranks,
        checkpoint_dir: Path | None,
    ) -> None:
        self.recipe, self.device, self.amp, self.ranks = recipe, device, amp, ranks
        self.train_set, self.val_set = train_set, val_set
        self.path = Path(checkpoint_dir) / ckpt.CHECKPOINT if checkpoint_dir is not None else None
        self.model = copy.deepcopy(pruned).to(device)
        self.start_weights = weights_sha256(self.model)
        self.teacher = copy.deepcopy(teacher).to(device).eval().requires_grad_(False) if teacher is not None else None
        self.net: nn.Module = self.model
        if ranks.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        # No weight decay on biases, norms, position and class embeddings (the 1-d and token tensors).
        decay = [p for p in self.model.parameters() if p.ndim >= 2 and p.shape[0] != 1]
        rest = [p for p in self.model.parameters() if not (p.ndim >= 2 and p.shape[0] != 1)]
        groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=recipe.lr)
        self.sampler = DistributedSampler(
            train_set, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=recipe.seed
        )
        self.steps_per_epoch = math.ceil(len(self.sampler) / recipe.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: recipe.lr_factor(s, self.steps_per_epoch))
        self.history: list[EpochRecord] = []
        self.initial_val_acc: float | None = None
        self.teacher_val_acc: float | None = None

    def signature(self) -> dict:
        """What a resumed run must share with the checkpoint it resumes."""
        return {
            "plan": self.model.colln_plan.to_dict(),
            "recipe": asdict(self.recipe),
            "train_images": len(self.train_set),
            "weights": self.start_weights,
            "data": data_identity(self.train_set),
            "world_size": self.ranks.world_size,
            "distill": self.teacher is not None,
        }

    def run(
        self,
        resume: bool,
        reporter: Reporter | None,
        on_epoch: Callable[[EpochRecord], None] | None,
    ) -> None:
        start, skip, partial, rng = 0, 0, [0.0, 0.0, 0.0, 0.0], None
        if resume:
            start, skip, partial, rng = self._restore()
        elif self.val_set is not None:
            self.initial_val_acc = self.evaluate(self.model)[1]
            if self.teacher is not None:
                self.teacher_val_acc = self.evaluate(self.teacher)[1]
        with _graceful_stop() as stop:
            for epoch in range(start, self.recipe.epochs):
                first = epoch == start
                record = self._epoch(
                    epoch, skip if first else 0, partial if first else [0.0] * 4, rng if first else None, stop, reporter
                )
                self.history.append(record)
                self._save(epoch + 1, 0, [0.0] * 4)
                if reporter is not None:
                    reporter.end_epoch(record)
                if on_epoch is not None:
                    on_epoch(record)

    def _epoch(
        self,
        epoch: int,
        skip: int,
        sums: list[float],
        rng: dict | None,
        stop: threading.Event,
        reporter: Reporter | None,
    ) -> EpochRecord:
        """One epoch from step ``skip`` on; ``sums`` (loss sum, correct, images, seconds) carry the
        steps before it, ``rng`` the random state at ``skip`` (else the epoch's seed)."""
        r = self.recipe
        # Seeded per epoch and rank: a resumed epoch draws the augmentations an unbroken run would.
        epoch_seed = r.seed * 1_000_003 + epoch * self.ranks.world_size + self.ranks.rank
        run_random = _RunRandom(epoch_seed, self.device) if rng is None else _RunRandom.restored(rng, self.device)
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)[skip * r.batch_size :]
        # Its own generator: the loader's seed draw must not move the state the augmentations use,
        # or a loader made mid-epoch (on resume) would shift them by one draw.
        loader = DataLoader(
            self.train_set,
            batch_size=r.batch_size,
            sampler=indices,
            num_workers=r.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed),
        )
        if reporter is not None:
            reporter.start_epoch(epoch, r.epochs, self.steps_per_epoch, skip)
        self.net.train()
        t0 = time.perf_counter() - sums[3]
        for step, (x, y) in enumerate(run_random.draws(loader), start=skip):
            with run_random.scope():  # dropout and drop path
                loss_sum, correct = self._step(x, y, epoch, step)
            sums = [sums[0] + loss_sum, sums[1] + correct, sums[2] + len(y), 0.0]
            if reporter is not None:
                reporter.step(loss_sum / len(y), correct / len(y), sums[2] * self.ranks.world_size / (time.perf_counter() - t0))
            if any_rank(stop.is_set(), self.ranks):
                partial = [*all_sum(sums[:3], self.ranks), time.perf_counter() - t0]
                # Every rank's random state, so that each resumes drawing the augmentations it would have.
                rngs = gather_to_main(run_random.state(), self.ranks)
                self._save(epoch, step + 1, partial, rngs)
                raise KeyboardInterrupt
        loss_sum, correct, count = all_sum(sums[:3], self.ranks)
        seconds = time.perf_counter() - t0
        val_loss, val_acc = self.evaluate(self.model) if self.val_set is not None else (None, None)
        return EpochRecord(
            epoch=epoch + 1,
            train_loss=loss_sum / count,
            train_acc=correct / count,
            val_loss=val_loss,
            val_acc=val_acc,
            lr=self.opt.param_groups[0]["lr"],
            seconds=round(seconds, 3),
            images_per_s=round(count / seconds, 1),
        )

    def _step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        step: int,
    ) -> tuple[float, int]:
        r = self.recipe
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.net(x).float()
            if self.teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(self.teacher(x).float() / r.temperature, dim=-1)
        loss = F.cross_entropy(logits, y, label_smoothing=r.label_smoothing)
        if self.teacher is not None:
            kd = F.kl_div(F.log_softmax(logits / r.temperature, dim=-1), soft, reduction="batchmean", log_target=True)
            loss = (1.0 - r.distill_alpha) * loss + r.distill_alpha * r.temperature**2 * kd
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # DDP has averaged the gradients, so the norm (and the decision to stop) is the same on every rank.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.clip_grad if r.clip_grad > 0 else math.inf)
        if not torch.isfinite(norm):
            kept = (
                f"the last good checkpoint (epoch {epoch}) is kept in {self.path}"
                if self.path is not None and epoch > 0
                else "no epoch had finished"
            )
            raise TrainingDivergedError(
                f"the loss became NaN/inf in epoch {epoch + 1} (step {step + 1}) and training stopped; "
                f"{kept}: lower --lr or check the data"
            )
        self.opt.step()
        self.sched.step()
        return float(loss.detach()) * len(y), top1_correct(logits, y)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
    ) -> tuple[float, float]:
        """Mean cross-entropy and top-1 on the validation set, each rank taking every world_size-th image."""
        assert self.val_set is not None
        model.eval()
        shard = list(range(self.ranks.rank, len(self.val_set), self.ranks.world_size))
        loss_sum = correct = 0.0
        # A generator of its own: a loader without one draws its workers' seed from torch's global one.
        loader = DataLoader(
            self.val_set, batch_size=256, sampler=shard, num_workers=self.recipe.workers, generator=torch.Generator()
        )
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += top1_correct(logits, y)
        loss_sum, correct, count = all_sum([loss_sum, correct, float(len(shard))], self.ranks)
        return loss_sum / count, correct / count

    def _save(
        self,
        epoch: int,
        step: int,
        partial: list[float],
        rngs: list | None = None,
    ) -> None:
        """Rank 0 writes the resumable state: ``epoch`` whole epochs and ``step`` steps of the next done;
        mid-epoch, ``rngs`` holds every rank's random state (at an epoch's end each rank reseeds)."""
        if self.path is None or not self.ranks.is_main:
            return
        ckpt.save_state(
            self.path,
            {
                "format": CHECKPOINT_FORMAT,
                "signature": self.signature(),
                "epoch": epoch,
                "step": step,
                "partial": partial,
                "rng": rngs,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "history": [asdict(h) for h in self.history],
                "initial_val_acc": self.initial_val_acc,
                "teacher_val_acc": self.teacher_val_acc,
            },
        )

    def _restore(self) -> tuple[int, int, list[float], dict | None]:
        assert self.path is not None
        state = ckpt.load_state(self.path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.path} is not a colln fine-tuning checkpoint (format {state.get('format')!r})")
        mine = self.signature()
        for key, value in mine.items():
            what = _SIGNATURE_WORDS.get(key, key)
            if key not in state["signature"]:
                raise CheckpointError(
                    f"{self.path} does not record {what} (an older colln wrote it), so resuming cannot be checked: "
                    "start over without --resume (with --force)"
                )
            if state["signature"][key] != value:
                raise CheckpointError(
                    f"{self.path} was made with other settings ({what} differs): "
                    "resume with the same command, or start over without --resume (with --force)"
                )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history = [EpochRecord(**h) for h in state["history"]]
        self.initial_val_acc, self.teacher_val_acc = state["initial_val_acc"], state["teacher_val_acc"]
        # A mid-epoch checkpoint (Ctrl-C) carries every rank's random state and the interrupted
        # epoch's sums over all ranks (rank 0 carries them on, so they count once).
        partial = list(state["partial"]) if self.ranks.is_main else [0.0, 0.0, 0.0, state["partial"][3]]
        rngs = state["rng"] if state["step"] else None
        if isinstance(rngs, dict):  # written before every rank's state was kept: rank 0's only
            rngs = [rngs]
        rng = rngs[self.ranks.rank] if rngs and self.ranks.rank < len(rngs) else None
        return state["epoch"], state["step"], partial, rng
