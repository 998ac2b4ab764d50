"""``digits_vit``: a small timm ViT trained on scikit-learn's digits (real handwritten images that
install offline). The weights ship in the package; ``python -m colln.train.digits`` rebuilds
them deterministically.

The 8x8 digits become 32x32 RGB images (grey replicated) and go through the same timm eval transform
as any other model, taken from the model's data config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "digits_vit"
IMG_SIZE = 32
PATCH_SIZE = 4
NUM_CLASSES = 10
TEST_FRACTION = 0.25
SPLIT_SEED = 0

PRETRAINED_CFG = {
    "input_size": (3, IMG_SIZE, IMG_SIZE),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
    "interpolation": "bilinear",
    "num_classes": NUM_CLASSES,
    "architecture": NAME,
}


def weights_path() -> Path:
    return Path(str(resources.files("colln.models") / "weights" / f"{NAME}.safetensors"))


def card() -> dict:
    """The bundled weights' card: training settings and measured test accuracy."""
    return json.loads(weights_path().with_suffix(".json").read_text())


def create_model(
    img_size: int | None = None,
):
    """The digits_vit architecture with random weights (timm VisionTransformer, 8 blocks, 64 dims)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size or IMG_SIZE,
        patch_size=PATCH_SIZE,
        num_classes=NUM_CLASSES,
        embed_dim=64,
        depth=8,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=True,
    )
    cfg = dict(PRETRAINED_CFG)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    model.pretrained_cfg = cfg
    return model


@dataclass(frozen=True)
class DigitsSplit:
    images: list[Image.Image]
    labels: np.ndarray


def digit_image(
    pixels: np.ndarray,
) -> Image.Image:
    """One 8x8 digit (values 0..16) as an 8x8 RGB PIL image; the transform resizes it."""
    grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_split(
    split: str,
) -> DigitsSplit:
    """The fixed train or test split of scikit-learn's digits (stratified, seed 0, 25% test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target)
    chosen = train_idx if split == "train" else test_idx
    return DigitsSplit(
        images=[digit_image(digits.images[i]) for i in chosen],
        labels=digits.target[chosen].astype(np.int64),
    )
