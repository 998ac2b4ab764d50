"""Session-scoped fixtures shared by the test files (add yours; don't rewrite others')."""

from __future__ import annotations

from pathlib import Path

import pytest

# Importing colln sets nothing process-wide: polygraphy is pointed at TensorRT-RTX (where that is
# the only TensorRT) by colln.export.tensorrt.trt_module, which every use of TensorRT calls before
# importing polygraphy's TensorRT backend; a test that imports that backend itself calls it first.


@pytest.fixture(scope="session")
def digits_weights() -> str:
    """``--weights`` for digits_vit: the bundled trained weights."""
    return "bundled"


@pytest.fixture(scope="session")
def digits_export(
    tmp_path_factory: pytest.TempPathFactory,
    digits_weights: str,
) -> Path:
    """``colln-export digits_vit --keep 0.7`` (validated, timed, report written) in a temp dir."""
    from colln.app.export_cli import main

    out = tmp_path_factory.mktemp("digits_export") / "digits_vit-colln-keep0.7"
    argv = ["digits_vit", "--keep", "0.7", "--weights", digits_weights, "--out", str(out)]
    assert main([*argv, "--latency-batches", "1,4", "--latency-rounds", "5"]) == 0
    return out


@pytest.fixture(scope="session")
def trained_digits_vit():
    """digits_vit with its bundled trained weights, in eval mode (test_merge, test_tome: the merge
    choices of random weights are near-ties)."""
    from colln.models.registry import load_model

    return load_model("digits_vit", "bundled").eval()


@pytest.fixture(scope="session")
def digits_test_images(trained_digits_vit):
    """The first 24 digits test images, preprocessed ``[24, 3, 32, 32]``."""
    import torch

    from colln.data import validation_images

    return torch.from_numpy(validation_images("digits_vit", trained_digits_vit, limit=24).images)
