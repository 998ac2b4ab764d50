"""Images in, model-ready tensors out; the labelled sets (the bundled digits split or an ImageFolder)
and the validation images every command uses. Preprocessing always comes from the model's timm data
config."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from colln.errors import DataError, UsageError
from colln.models import bundled

DIGITS = "digits"
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


def top1_correct(
    scores: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
) -> int:
    """How many rows of ``scores`` (``[N, classes]``, numpy or torch) have their largest score at
    their label (``[N]``, the same kind): the one definition of top-1 every command reports."""
    return int((scores.argmax(-1) == labels).sum())


def top1_accuracy(
    scores: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
) -> float:
    """The fraction of rows right by :func:`top1_correct`."""
    if len(labels) == 0:
        raise DataError("no images to score: top-1 accuracy needs at least one labelled image")
    return top1_correct(scores, labels) / len(labels)


def pick(
    count: int,
    limit: int | None,
    option: str = "--limit",
) -> np.ndarray:
    """The one meaning of an image limit (``--limit``, ``--val-limit``, ``--calib-limit``):
    ``limit`` of the ``count`` images evenly spread over the set in its order, the first and the
    last included (so every class of a set listed class by class keeps its share); all of them when
    ``limit`` is None or not below ``count``. Indices, ascending; ``option`` names the limit in
    the error for one below 1."""
    if limit is not None and limit < 1:
        raise UsageError(f"{option} must be >= 1, got {limit}")
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


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


def _hidden_name(
    name: str,
) -> bool:
    """``.ipynb_checkpoints/``, ``._x.jpg``: never a class and never an image."""
    return name.startswith(".")


def image_files(
    directory: Path,
) -> list[Path]:
    """Image files under ``directory`` (recursive, sorted; hidden files and folders left out)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory of images")
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(map(_hidden_name, p.relative_to(directory).parts))
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {directory}")
    return files


def class_folders(
    root: Path,
) -> list[str]:
    """The class subfolders of an ImageFolder directory, sorted (refuses a missing or empty one)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory: give an ImageFolder directory (DIR/<class>/<image>) or 'digits'")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden_name(p.name))
    if not classes:
        raise DataError(f"{root} has no class subfolders: expected the ImageFolder layout DIR/<class>/<image>")
    return classes


def model_class_names(
    model: torch.nn.Module,
) -> list[str] | None:
    """What the model's outputs are, where colln knows it: the class names its weights came with
    (``label_names``, e.g. a checkpoint re-headed by colln-finetune), the digits, or the ImageNet
    synsets (n01440764, ...) of a 1k/12k/21k/22k head (timm's ImageNetInfo)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_classes = getattr(model, "num_classes", None)
    names = cfg.get("label_names")
    # A stale list (a hub config's 1000 names on a re-headed model) describes another head.
    if names and len(names) == num_classes:
        return list(names)
    if cfg.get("architecture") in bundled.NAMES and num_classes == bundled.NUM_CLASSES:
        return [str(i) for i in range(bundled.NUM_CLASSES)]
    subset = infer_imagenet_subset(model)
    return list(ImageNetInfo(subset).label_names()) if subset else None


def _is_index(
    name: str,
) -> bool:
    # ASCII only: "³".isdigit() is true but int("³") fails.
    return re.fullmatch(r"[0-9]+", name) is not None


def label_map(
    root: Path,
    classes: Sequence[str],
    class_names: Sequence[str] | None,
    num_classes: int,
) -> dict[str, int]:
    """Class folder -> the model's output index (the label rule every command uses).

    Folders named by the model's class names (any subset) get those indices; folders named by
    integers are those indices (unless the class names are themselves integers: then they must be
    names); otherwise the sorted position, but only when there are as many folders as outputs.
    Anything else is refused."""
    names = list(class_names) if class_names is not None else None
    # A head whose class names are integers ("3", "7" re-headed to 0, 1) is matched by name only.
    numbered = names is not None and all(_is_index(n) for n in names)
    indices = "" if numbered else f" or to class indices (0/ .. {num_classes - 1}/)"
    fix = (
        f"rename the folders to the model's class names{_examples(names)}{indices}, "
        f"or fine-tune a model re-headed for these {len(classes)} classes (colln-finetune --num-classes {len(classes)})"
    )
    if names is not None:
        index: dict[str, int] = {}
        for i, n in enumerate(names):
            index.setdefault(n, i)
        known = [c for c in classes if c in index]
        if len(known) == len(classes):
            return {c: index[c] for c in classes}
        if known or numbered:
            unknown = [c for c in classes if c not in index]
            raise DataError(f"class folders {_folders(unknown)} of {root} are not classes of the model: {fix}")
    if all(_is_index(c) for c in classes):
        beyond = [c for c in classes if int(c) >= num_classes]
        if beyond:
            raise DataError(f"class folder {beyond[-1]}/ of {root} is beyond the model's {num_classes} classes: {fix}")
        return {c: int(c) for c in classes}
    if len(classes) == num_classes:
        return {c: i for i, c in enumerate(classes)}
    raise DataError(
        f"{root} has {len(classes)} class folders ({_folders(classes)}) that are neither the model's class names nor indices, "
        f"and the model has {num_classes} classes: {fix}"
    )


def _folders(
    names: Sequence[str],
) -> str:
    return ", ".join(f"{c}/" for c in names[:3]) + (", ..." if len(names) > 3 else "")


def _examples(
    class_names: Sequence[str] | None,
) -> str:
    if not class_names:
        return ""
    return f" ({', '.join(class_names[:2])}, ...)" if len(class_names) > 2 else f" ({', '.join(class_names)})"


@dataclass(frozen=True)
class ImageFolder:
    """An ImageFolder directory (``DIR/<class>/<image>``) read by the label rule: ``labels`` maps
    each class folder to the model's output index, ``files`` lists ``(image path, label)``."""

    root: Path
    labels: dict[str, int]
    files: list[tuple[Path, int]]


def image_folder(
    root: Path,
    class_names: Sequence[str] | None,
    num_classes: int,
) -> ImageFolder:
    """Read the layout of ``root`` (files are listed, not opened): see :func:`label_map`."""
    root = Path(root)
    labels = label_map(root, class_folders(root), class_names, num_classes)
    files = [
        (p, label)
        for c, label in labels.items()
        for p in sorted((root / c).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _hidden_name(p.name)
    ]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    return ImageFolder(root=root, labels=labels, files=files)


@dataclass(frozen=True)
class Labelled:
    """Images with labels in the model's class indices."""

    name: str
    images: list[Image.Image]
    labels: np.ndarray


@dataclass(frozen=True)
class Images:
    """What :func:`read_images` read: the images, their labels in the model's class indices (None
    for unlabelled images), a short ``name`` (``digits``, the folder's name) and the ``source`` in
    words for reports."""

    name: str
    source: str
    images: list[Image.Image]
    labels: np.ndarray | None


def digits_fit(
    model: torch.nn.Module,
    *,
    labelled: bool,
) -> bool:
    """The one check that ``digits`` (the bundled splits) fits ``model``, for every command: only a
    digits model takes them (another model's input and classes are not 8x8 handwritten digits).
    Returns whether the digits' labels are indices of its head (not of a head re-headed to fewer
    classes); with ``labelled`` (training, accuracy) they must be."""
    if getattr(model, "pretrained_cfg", {}).get("architecture") not in bundled.NAMES:
        raise DataError("'digits' data only fits the digits models: give an ImageFolder directory with --data DIR")
    num_classes = model.num_classes
    fits = num_classes >= bundled.NUM_CLASSES
    if labelled and not fits:
        classes = f"{bundled.NUM_CLASSES} classes but the model has {num_classes}"
        raise DataError(f"'digits' has {classes}: give an ImageFolder with --data DIR")
    return fits


def read_images(
    data: str | Path | None,
    model: torch.nn.Module,
    *,
    labelled: bool,
    limit: int | None = None,
    option: str = "--limit",
) -> Images:
    """The one way to images from ``digits`` (the bundled test split), a directory or, for None,
    the model's default images (the digits test split for the digits models, else the photos of
    ``skimage.data``). A directory in ImageFolder layout is labelled by :func:`label_map` for
    ``model``; with ``labelled`` it must be one (the label rule's error otherwise), without, any
    other directory is read as unlabelled images (recursively). ``limit``: see :func:`pick`; only
    the picked files are opened."""
    if data is None:
        default = getattr(model, "pretrained_cfg", {}).get("architecture") in bundled.NAMES
        if not default and labelled:
            raise DataError("the model's default images (skimage.data photos) have no labels: give an ImageFolder directory")
        if not default:
            names = [SKIMAGE_PHOTOS[i] for i in pick(len(SKIMAGE_PHOTOS), limit, option)]
            return Images(name="skimage", source="skimage.data photos", images=skimage_photos(names), labels=None)
        data = DIGITS
    if isinstance(data, str) and data == DIGITS:
        fits = digits_fit(model, labelled=labelled)
        split = bundled.load_split("test")
        chosen = pick(len(split.labels), limit, option)
        labels = split.labels[chosen].astype(np.int64) if fits else None  # a re-headed digits model: other classes
        return Images(name=DIGITS, source="digits test split", images=[split.images[i] for i in chosen], labels=labels)
    directory = Path(data)
    folder = (
        image_folder(directory, model_class_names(model), model.num_classes) if labelled else _labelled_folder(directory, model)
    )
    if folder is None:
        files = image_files(directory)
        images = [open_image(files[i]) for i in pick(len(files), limit, option)]
        return Images(name=directory.resolve().name, source=str(data), images=images, labels=None)
    files = [folder.files[i] for i in pick(len(folder.files), limit, option)]
    return Images(
        name=directory.resolve().name,
        source=f"{data} (labelled by folder)",
        images=[open_image(p) for p, _ in files],
        labels=np.asarray([label for _, label in files], dtype=np.int64),
    )


def load_labelled(
    data: str,
    model: torch.nn.Module,
    limit: int | None = None,
) -> Labelled:
    """``digits`` (the bundled test split) or an ImageFolder directory, labelled by
    :func:`label_map` for ``model``; ``limit``: see :func:`pick`."""
    found = read_images(data, model, labelled=True, limit=limit)
    assert found.labels is not None
    return Labelled(name=found.name, images=found.images, labels=found.labels)


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
    ``skimage.data`` (:func:`read_images`, labels where the directory's layout brings them, and
    the digits' unless the model was re-headed for other classes);
    preprocessed with ``model``'s data config. ``limit``: see :func:`pick`."""
    data = DIGITS if directory is None and model_name in bundled.NAMES else None if directory is None else Path(directory)
    found = read_images(data, model, labelled=False, limit=limit, option="--val-limit")
    return ValImages(images=preprocess(found.images, model).numpy(), labels=found.labels, source=found.source)


def _labelled_folder(
    directory: Path,
    model: torch.nn.Module,
) -> ImageFolder | None:
    """``directory`` as a labelled ImageFolder: class folders only (no images beside them), mapped
    by the label rule; None when it is not one (validation needs no labels)."""
    if not directory.is_dir() or any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in directory.iterdir()):
        return None
    try:
        return image_folder(directory, model_class_names(model), model.num_classes)
    except DataError:
        return None
