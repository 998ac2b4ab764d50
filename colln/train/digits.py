"""Train a bundled digits model deterministically: ``python -m colln.train.digits [--model NAME]``.

Writes ``colln/models/weights/NAME.safetensors`` (fp16, well under 2 MB) and its card
``NAME.json`` with the settings and the test accuracy of the weights as stored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from colln.data import preprocess, top1_accuracy
from colln.models import bundled

SEED = 0
EPOCHS = 60
BATCH = 48
LR = 1e-3
WEIGHT_DECAY = 0.05
SHIFT = 2  # random translation in pixels at 32x32


def shift(
    x: torch.Tensor,
    dy: int,
    dx: int,
    fill: float,
) -> torch.Tensor:
    """One ``[C, H, W]`` image moved by ``(dy - SHIFT, dx - SHIFT)`` pixels, the border filled with ``fill``."""
    _, h, w = x.shape
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), value=fill)
    return padded[:, dy : dy + h, dx : dx + w]


def _augment(
    x: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Random translation by up to SHIFT pixels (pad with the background, crop back)."""
    b = x.shape[0]
    dy = torch.randint(0, 2 * SHIFT + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * SHIFT + 1, (b,), generator=gen)
    fill = float(x.min())
    return torch.stack([shift(x[i], int(dy[i]), int(dx[i]), fill) for i in range(b)])


def accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    model.eval()
    with torch.no_grad():
        return top1_accuracy(torch.cat([model(chunk) for chunk in x.split(256)]), y)


def train(
    out_dir: Path,
    epochs: int = EPOCHS,
    name: str = bundled.NAME,
) -> dict:
    """Train, write the weights and card into ``out_dir``, return the card."""
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # One thread: float reductions then run in one order whatever the machine's core count.
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        # The training seeds torch's generator: forked, so the caller's random stream is untouched.
        with torch.random.fork_rng(devices=[]):
            return _train(out_dir, epochs, name)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _train(
    out_dir: Path,
    epochs: int,
    name: str,
) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = bundled.create_model(name=name)
    train_split, test_split = bundled.load_split("train"), bundled.load_split("test")
    x_train = preprocess(train_split.images, model)
    y_train = torch.from_numpy(train_split.labels)
    x_test = preprocess(test_split.images, model)
    y_test = torch.from_numpy(test_split.labels)

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(x_train) / BATCH)
    total = epochs * steps_per_epoch
    warmup = 5 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(_augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f} test acc {accuracy(model, x_test, y_test):.4f}", flush=True)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    save_file(state, str(weights))
    # The card reports the accuracy of the weights as stored (fp16 round trip), evaluated in fp32.
    model.load_state_dict({k: v.float() for k, v in state.items()})
    card = {
        "name": name,
        "dataset": "sklearn.datasets.load_digits",
        "split": {"test_fraction": bundled.TEST_FRACTION, "seed": bundled.SPLIT_SEED, "stratified": True},
        "train_images": len(x_train),
        "test_images": len(x_test),
        "test_top1": round(accuracy(model, x_test, y_test), 4),
        "epochs": epochs,
        "batch": BATCH,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "seed": SEED,
        "torch": torch.__version__,
        "train_seconds": round(time.time() - start, 1),
    }
    weights.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=bundled.weights_path().parent)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--model", choices=bundled.NAMES, default=bundled.NAME)
    args = parser.parse_args()
    print(json.dumps(train(args.out, args.epochs, args.model), indent=2))


if __name__ == "__main__":
    main()
