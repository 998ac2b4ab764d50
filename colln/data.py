"""Images in, model-ready tensors out; the labelled sets (the bundled digits split or an ImageFolder)
and the validation images every command uses. Preprocessing always comes from the model's timm data
config."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from colln.errors import DataError, UsageError
from colln.models import digits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Real photos that ship with scikit-image (no download).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "camera", "immunohistochemistry")


def data_config(
    model: torch.nn.Module,
) -> dict:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def preprocess(
    images: Sequence[Image.Image],
    model: torch.nn.Module,
) -> torch.Tensor:
    """Apply the model's timm eval transform: ``[len(images), 3, H, W]`` float32."""
    from timm.data import create_transform

    if not images:
        raise DataError("no images to preprocess")
    transform = create_transform(**data_config(model), is_training=False)
    return torch.stack([transform(to_rgb(img)) for img in images])


def skimage_photos(
    names: Sequence[str] = SKIMAGE_PHOTOS,
) -> list[Image.Image]:
    """Real photos from ``skimage.data`` as RGB PIL images."""
    from skimage import data as skdata

    photos = []
    for name in names:
        arr = np.asarray(getattr(skdata, name)())
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        photos.append(Image.fromarray(arr[..., :3].astype(np.uint8)))
    return photos


def to_rgb(
    img: Image.Image,
) -> Image.Image:
    """8-bit RGB. 16-bit and 32-bit integer images are scaled from their bit depth, float images from
    0..1 (PIL's own ``convert("RGB")`` clips them to 255 or 0: white or black images)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        data = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if np.nanmax(data, initial=0.0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or np.max(data, initial=0) > 255 else 1.0
        gray = np.clip(np.nan_to_num(data * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def open_image(
    path: Path,
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Far beyond any ViT input, and decoding it could exhaust memory (a decompression bomb).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"image {path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels): downscale it"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc.__class__.__name__}; remove it or fix the file") from exc


def image_files(
    directory: Path,
) -> list[Path]:
    """Image files under ``directory`` (recursive, sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory of images")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {directory}")
    return files


def load_images(
    directory: Path,
    limit: int | None = None,
) -> list[Image.Image]:
    return [open_image(p) for p in image_files(directory)[:limit]]


def image_folder(
    directory: Path,
) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """An ImageFolder: one subfolder per class, classes sorted by name. Returns (images, labels, classes)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory (expected one subfolder per class)")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{directory} has no class subfolders (expected DIR/<class>/<image>)")
    images: list[Image.Image] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = [p for p in sorted((directory / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        images.extend(open_image(p) for p in files)
        labels.extend([label] * len(files))
    if not images:
        raise DataError(f"no images found in the class subfolders of {directory}")
    return images, np.asarray(labels, dtype=np.int64), classes


@dataclass(frozen=True)
class Labelled:
    """Images with labels in the model's class indices."""

    name: str
    images: list[Image.Image]
    labels: np.ndarray


def load_labelled(
    data: str,
    num_classes: int,
    limit: int | None = None,
) -> Labelled:
    """``digits`` (the bundled test split) or an ImageFolder directory.

    ImageFolder classes named by integers (``0/``, ``1/``, ...) are those class indices of the model;
    otherwise the sorted class names are indices 0, 1, ... (torchvision's convention, which is
    ImageNet's order for its synset folders). ``limit`` takes that many images evenly spread over
    the set, so every class stays represented.
    """
    if data == "digits":
        split = digits.load_split("test")
        images, labels, name = split.images, split.labels, "digits"
    else:
        images, labels, classes = image_folder(Path(data))
        if all(c.isdigit() for c in classes):
            labels = np.asarray([int(classes[i]) for i in labels], dtype=np.int64)
        name = Path(data).resolve().name
    if labels.max() >= num_classes:
        raise DataError(
            f"class index {int(labels.max())} in {data} is beyond the model's {num_classes} classes: check the class folders"
        )
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit {limit} must be a positive number of images")
        if limit < len(images):
            chosen = np.linspace(0, len(images) - 1, limit).round().astype(int)
            images, labels = [images[i] for i in chosen], labels[chosen]
    return Labelled(name=name, images=list(images), labels=np.asarray(labels, dtype=np.int64))


@dataclass(frozen=True)
class ValImages:
    """Preprocessed validation images ``[N, 3, H, W]`` float32, with labels when known."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def validation_images(
    model_name: str,
    model: torch.nn.Module,
    directory: Path | None = None,
    limit: int | None = None,
) -> ValImages:
    """``directory``'s images, else the digits test split for ``digits_vit``, else the photos of
    ``skimage.data``; preprocessed with ``model``'s data config."""
    if limit is not None and limit < 1:
        raise UsageError(f"the validation image limit must be >= 1, got {limit}")
    labels = None
    if directory is not None:
        photos, source = load_images(Path(directory), limit), str(directory)
    elif model_name == digits.NAME:
        split = digits.load_split("test")
        photos, labels, source = split.images[:limit], split.labels[:limit], "digits test split"
    else:
        photos, source = skimage_photos()[:limit], "skimage.data photos"
    return ValImages(images=preprocess(photos, model).numpy(), labels=labels, source=source)
