"""Training and validation data as torch Datasets of ``(image tensor, label)``: the bundled digits
splits, or a directory in ImageFolder layout through the model's timm transforms."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from colln.data import DIGITS, data_config, digits_fit, image_folder, model_class_names, open_image, preprocess
from colln.errors import DataError
from colln.models import bundled
from colln.train.digits import SHIFT, shift

MAX_BAD_FRACTION = 0.01


class DigitsDataset(Dataset):
    """A digits split through the model's eval transform; training adds the random translation the
    bundled model was trained with (timm's train transform would flip and crop digits into others)."""

    def __init__(
        self,
        split: str,
        model: torch.nn.Module,
        augment: bool,
    ) -> None:
        data = bundled.load_split(split)
        self.images = preprocess(data.images, model)
        self.labels = torch.from_numpy(data.labels)
        self.augment = augment
        self.description = f"digits ({split} split)"
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.augment:
            dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,)).tolist()
            x = shift(x, dy, dx, float(x.min()))
        return x, int(self.labels[i])


class FolderDataset(Dataset):
    """ImageFolder layout (``DIR/<class>/<image>``), labelled by :func:`colln.data.label_map`. Every
    file is checked once up front (verified and decoded); unreadable ones are skipped and listed in
    ``skipped``."""

    def __init__(
        self,
        root: Path,
        transform: object,
        class_names: list[str] | None,
        num_outputs: int,
        max_bad_fraction: float = MAX_BAD_FRACTION,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        folder = image_folder(self.root, class_names, num_outputs)
        self.labels = folder.labels
        files = folder.files
        checked = [(p, y, _readable(p)) for p, y in files]
        self.samples = [(p, y) for p, y, ok in checked if ok]
        self.skipped = [str(p) for p, _, ok in checked if not ok]
        if len(self.skipped) > max_bad_fraction * len(files):
            raise DataError(
                f"{len(self.skipped)} of {len(files)} images under {self.root} are unreadable (e.g. {self.skipped[0]}): "
                f"fix or remove them (up to {max_bad_fraction:.0%} are skipped)"
            )
        self.description = str(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(open_image(path)), label


def _readable(
    path: Path,
) -> bool:
    """Whether ``path`` decodes as training will decode it: ``verify`` checks the container (chunk
    CRCs), only a full decode finds damaged pixel data (a scrambled IDAT with valid CRCs passes it)."""
    try:
        with Image.open(path) as img:
            img.verify()
        open_image(path)
    except Exception:  # noqa: BLE001 - PIL raises many types for a corrupt file
        return False
    return True


def open_dataset(
    source: str | Path | Dataset,
    model: torch.nn.Module,
    training: bool,
) -> Dataset:
    """``'digits'`` (train split when ``training``, else test), an ImageFolder directory through the
    model's timm train or eval transform (folders matched to the model's classes), or a Dataset
    (used as it is)."""
    if isinstance(source, Dataset):
        return source
    if str(source) == DIGITS:
        digits_fit(model, labelled=True)
        return DigitsDataset("train" if training else "test", model, augment=training)
    from timm.data import create_transform

    transform = create_transform(**data_config(model), is_training=training)
    return FolderDataset(Path(source), transform, model_class_names(model), model.num_classes)


def data_identity(
    dataset: Dataset,
) -> str:
    """What a resumed run must train on to be the same run: ``digits (train split)``, or a hash of
    an ImageFolder's files (relative path, size, label, skipped ones included), of a subset's
    indices into such, or the description and length of any other Dataset."""
    if isinstance(dataset, Subset):
        indices = ",".join(map(str, dataset.indices))
        return _sha256(f"{data_identity(dataset.dataset)}|{indices}")
    if isinstance(dataset, FolderDataset):
        listing = [(str(p.relative_to(dataset.root)), p.stat().st_size, y) for p, y in dataset.samples]
        skipped = sorted(str(Path(p).relative_to(dataset.root)) for p in dataset.skipped)
        return _sha256(repr((listing, skipped)))
    return f"{describe(dataset)} ({len(dataset)} items)"


def _sha256(
    text: str,
) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def describe(
    dataset: Dataset,
) -> str:
    return getattr(dataset, "description", type(dataset).__name__)
