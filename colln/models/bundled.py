"""``digits_vit`` and ``digits_eva``: small timm models trained on scikit-learn's digits (real
handwritten images that install offline). ``digits_vit`` is a timm VisionTransformer;
``digits_eva`` a timm Eva with rotary positions (EVA-02's kind: separate q/k/v, SwiGLU with its
norm, LayerScale, a register token), for the RoPE families. The weights ship in the package;
``python -m colln.train.digits [--model NAME]`` rebuilds them deterministically.

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
EVA_NAME = "digits_eva"
NAMES = (NAME, EVA_NAME)
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


def weights_path(
    name: str = NAME,
) -> Path:
    return Path(str(resources.files("colln.models") / "weights" / f"{name}.safetensors"))


def card(
    name: str = NAME,
) -> dict:
    """The bundled weights' card: training settings and measured test accuracy."""
    return json.loads(weights_path(name).with_suffix(".json").read_text())


def create_model(
    img_size: int | None = None,
    name: str = NAME,
):
    """A bundled architecture with random weights: ``digits_vit`` (timm VisionTransformer, 8 blocks,
    64 dims) or ``digits_eva`` (timm Eva, the same size, rotary positions)."""
    size = img_size or IMG_SIZE
    common = dict(img_size=size, patch_size=PATCH_SIZE, num_classes=NUM_CLASSES, embed_dim=64, depth=8, num_heads=4)
    if name == EVA_NAME:
        from timm.models.eva import Eva

        model = Eva(
            **common,
            mlp_ratio=4 * 2 / 3,
            qkv_fused=False,
            swiglu_mlp=True,
            scale_mlp=True,
            init_values=0.1,
            num_reg_tokens=1,
            use_rot_pos_emb=True,
            ref_feat_shape=(IMG_SIZE // PATCH_SIZE, IMG_SIZE // PATCH_SIZE),
        )
    else:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**common, mlp_ratio=4.0, qkv_bias=True)
    model.pretrained_cfg = {**PRETRAINED_CFG, "input_size": (3, size, size), "architecture": name}
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
