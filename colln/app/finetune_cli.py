"""``colln-finetune MODEL --keep R --out DIR``: prune, then fine-tune the pruned model (distilled
from the unpruned one) to win back its accuracy. Writes ``DIR/model.safetensors`` (loadable by
``colln-export MODEL --weights DIR/model.safetensors`` with the same plan), ``DIR/finetune.json`` and
``DIR/loss.png``; ``DIR/checkpoint.pt`` after every epoch (``--resume`` continues from it).

Runs unchanged under ``torchrun --nproc_per_node N -m colln.app.finetune_cli ...`` (DDP; rank 0
writes and prints; an error line is printed once, by the first rank that fails). Exit codes: 0 ok,
2 bad input or a failed run (``colln: error: <stage>: ...``), 130 interrupted by Ctrl-C, SIGTERM or
SIGHUP (a resumable checkpoint is saved); under torchrun, torchrun's own 1 for any failed worker
(its summary lists each worker's code). See docs/robustness.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from colln.app.cli import ArgumentParser, add_prune_arguments, entry_point, prune_config

if TYPE_CHECKING:
    from colln.jobs.finetune import FinetuneJob
    from colln.train.finetune import EpochRecord


def build_parser() -> ArgumentParser:
    from colln.train.finetune import Recipe

    r = Recipe()
    p = ArgumentParser(
        prog="colln-finetune",
        description="Prune a timm Vision Transformer with Col-Ln and fine-tune it "
        "(distilled from the unpruned model) to recover its accuracy.",
    )
    p.add_argument("model", help="timm model name or alias, or digits_vit (bundled)")
    add_prune_arguments(p, tokens=False)
    p.add_argument(
        "--weights", default=None, help="pretrained | random | PATH (default: bundled for digits_vit, pretrained otherwise)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument(
        "--data",
        default=None,
        help="ImageFolder directory DIR/<class>/<image>, or 'digits' (the default for digits_vit: its train split)",
    )
    p.add_argument(
        "--val",
        default=None,
        help="validation ImageFolder directory (default: the digits test split for 'digits'; none otherwise)",
    )
    p.add_argument(
        "--num-classes", type=int, default=None, help="re-head the model for a folder with other classes (turns distillation off)"
    )
    p.add_argument("--limit", type=int, default=None, help="train on N images spread evenly over the set (quick runs)")
    p.add_argument("--epochs", type=int, default=r.epochs, help=f"epochs (default {r.epochs})")
    p.add_argument("--lr", type=float, default=r.lr, help=f"peak AdamW learning rate, warm-up then cosine (default {r.lr:g})")
    p.add_argument("--batch-size", type=int, default=r.batch_size, help=f"images per step per process (default {r.batch_size})")
    p.add_argument("--weight-decay", type=float, default=r.weight_decay, help=f"AdamW weight decay (default {r.weight_decay:g})")
    p.add_argument(
        "--warmup-epochs", type=float, default=r.warmup_epochs, help=f"linear warm-up length (default {r.warmup_epochs:g})"
    )
    p.add_argument("--label-smoothing", type=float, default=r.label_smoothing, help=f"(default {r.label_smoothing:g})")
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="distil from the unpruned model (default: on, off with --num-classes)",
    )
    p.add_argument(
        "--distill-alpha",
        type=float,
        default=r.distill_alpha,
        help=f"weight of the distillation loss (default {r.distill_alpha:g})",
    )
    p.add_argument(
        "--temperature", type=float, default=r.temperature, help=f"distillation temperature (default {r.temperature:g})"
    )
    p.add_argument("--clip-grad", type=float, default=r.clip_grad, help=f"gradient norm clip, 0 = off (default {r.clip_grad:g})")
    p.add_argument("--seed", type=int, default=r.seed, help=f"random seed (default {r.seed})")
    p.add_argument("--workers", type=int, default=r.workers, help=f"data loader worker processes (default {r.workers})")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (mixed precision; meant for --device cuda)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (same command otherwise)")
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def job_from_args(
    args: argparse.Namespace,
) -> FinetuneJob:
    from colln.jobs.finetune import FinetuneJob
    from colln.train.finetune import Recipe

    # Option dests are the field names: a new Recipe or FinetuneJob field needs only its option.
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    rest = {f.name: getattr(args, f.name) for f in fields(FinetuneJob) if f.name not in ("config", "recipe")}
    return FinetuneJob(config=prune_config(args), recipe=recipe, **rest)


class RichReporter:
    """A rich progress bar per epoch (loss, accuracy, throughput) and one summary line after it."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.progress = None
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.epochs = epochs
        if not self.console.is_terminal:
            return  # logs and pipes get the summary line only
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=done, stats="")

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, stats=f"loss {loss:.3f} acc {100 * acc:.1f}% {images_per_s:.0f} img/s")

    def end_epoch(self, record: EpochRecord) -> None:
        self.stop()
        val = f"  val {100 * record.val_acc:.1f}%" if record.val_acc is not None else ""
        self.console.print(
            f"epoch {record.epoch}/{self.epochs}  loss {record.train_loss:.4f}  train {100 * record.train_acc:.1f}%{val}"
            f"  lr {record.lr:.2e}  {record.seconds:.1f} s  {record.images_per_s:.0f} img/s",
            highlight=False,
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run(
    args: argparse.Namespace,
) -> int:
    from colln.jobs.finetune import run_job
    from colln.report.loss_plot import plot_history
    from colln.train import checkpoint as ckpt
    from colln.train.distributed import env_ranks

    job = job_from_args(args)
    main_rank = env_ranks().is_main
    reporter = RichReporter() if main_rank else None
    try:
        record = run_job(job, reporter)
    except KeyboardInterrupt:
        if reporter is not None:
            reporter.stop()
        saved = job.out / ckpt.CHECKPOINT
        if main_rank:
            where = f"; resumable checkpoint {saved}: rerun the same command with --resume" if saved.is_file() else ""
            print(f"colln: interrupted{where}", file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    acc = record["accuracy"]
    plot_history(
        {f"{record['model']} tokens {record['plan']['token_steps']}": record}, job.out / ckpt.LOSS_PLOT, title=_title(record)
    )
    if acc["after"] is not None:
        before = f"{100 * acc['before']:.1f}% -> " if acc["before"] is not None else ""
        unpruned = f" (unpruned {100 * acc['unpruned_teacher']:.1f}%)" if acc["unpruned_teacher"] is not None else ""
        print(f"validation top-1 {before}{100 * acc['after']:.1f}%{unpruned}")
    print(
        f"wrote {job.out / ckpt.WEIGHTS}, {ckpt.RECORD}, {ckpt.LOSS_PLOT} "
        f"({record['world_size']} process(es), {record['wall_seconds']} s)"
    )
    return 0


def _title(
    record: dict,
) -> str:
    plan = record["plan"]
    keep = ",".join(f"{r:g}" for r in sorted(set(plan["keep_rates"]))) or "1"
    return f"{record['model']}: {plan['metric']} keep {keep} at blocks {plan['layers']}, tokens {plan['token_steps']}"


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
