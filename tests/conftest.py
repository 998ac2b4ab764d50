"""Session-scoped fixtures shared by the test files (add yours; don't rewrite others')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``--weights`` for digits_vit: the bundled trained weights once they exist, else a seeded
    random-init checkpoint file (still reproducible, so the PyTorch reference can be rebuilt)."""
    from safetensors.torch import save_file

    from colln.models import digits

    if digits.weights_path().is_file():
        return "bundled"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("digits_weights") / "digits_vit_seed0.safetensors"
    save_file({k: v.contiguous() for k, v in digits.create_model().state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def digits_export(
    tmp_path_factory: pytest.TempPathFactory,
    digits_weights: str,
) -> Path:
    """``colln-export digits_vit --keep 0.7`` (validated, timed, report written) in a temp dir."""
    from colln.export.cli import main

    out = tmp_path_factory.mktemp("digits_export") / "digits_vit-colln-keep0.7"
    argv = ["digits_vit", "--keep", "0.7", "--weights", digits_weights, "--out", str(out)]
    assert main([*argv, "--latency-batches", "1,4", "--latency-rounds", "5"]) == 0
    return out
