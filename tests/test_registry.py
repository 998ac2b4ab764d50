"""Model loading: names, aliases, weights sources, and the refusals users hit."""

import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from colln.data import preprocess
from colln.errors import ModelNotFoundError, UsageError, WeightsError
from colln.models import registry


def test_aliases_resolve_to_timm_names() -> None:
    import timm

    for alias, name in registry.ALIASES.items():
        assert registry.resolve_name(alias) == name
        assert timm.is_model(name), name
    assert registry.resolve_name("vit_small_patch16_224") == "vit_small_patch16_224"
    assert registry.resolve_name("digits_vit") == "digits_vit"


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve_name("vit_bse")
    assert "unknown model 'vit_bse'" in str(info.value)
    assert "vit_base" in str(info.value)


def test_random_weights_and_img_size() -> None:
    model = registry.load_model("vit_tiny", weights="random", img_size=96)
    assert not model.training
    assert model.patch_embed.num_patches == 36
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)
    # Preprocessing follows the size the model was built at, not timm's pretrained 224.
    assert preprocess([Image.new("RGB", (300, 200))], model).shape == (1, 3, 96, 96)


def test_random_weights_are_seeded_and_leave_the_caller_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = registry.load_model("vit_tiny", weights="random", img_size=64).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = registry.load_model("vit_tiny", weights="random", img_size=64).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("size", [0, -16, 100])
def test_bad_img_size(size: int) -> None:
    with pytest.raises(UsageError):
        registry.load_model("vit_tiny", weights="random", img_size=size)


def _reference(tmp_path: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    model = registry.load_model("vit_tiny", weights="random", img_size=64)
    return model, model(torch.ones(1, 3, 64, 64))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_local_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    model, expected = _reference(tmp_path)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    loaded = registry.load_model("vit_tiny", weights=str(path), img_size=64)
    with torch.no_grad():
        assert torch.equal(loaded(torch.ones(1, 3, 64, 64)), expected.detach())


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": object()}, path)
    with pytest.raises(WeightsError, match="corrupt"):
        registry.load_model("vit_tiny", weights=str(path), img_size=64)


def test_missing_corrupt_and_foreign_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        registry.load_model("vit_tiny", weights=str(tmp_path / "nope.safetensors"), img_size=64)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(WeightsError, match="corrupt"):
        registry.load_model("vit_tiny", weights=str(junk), img_size=64)
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown suffix"):
        registry.load_model("vit_tiny", weights=str(odd), img_size=64)


def test_mismatched_checkpoint_names_first_keys(tmp_path: Path) -> None:
    small = registry.load_model("vit_small", weights="random", img_size=64)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    with pytest.raises(WeightsError) as info:
        registry.load_model("vit_tiny", weights=str(path), img_size=64)
    message = str(info.value)
    assert "does not match the model" in message and "shape of" in message
    assert "\n" not in message


def test_pretrained_offline_fails_fast_naming_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(registry, "HUB_HOST", ("hub.invalid", 443))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine has
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        registry.load_model("vit_tiny", weights="pretrained")
    assert "--weights" in str(info.value)
    assert time.monotonic() - start < 20


def test_digits_weights_sources() -> None:
    with pytest.raises(WeightsError, match="no hub weights"):
        registry.load_model("digits_vit", weights="pretrained")
    with pytest.raises(WeightsError, match="only digits_vit has bundled"):
        registry.load_model("vit_tiny", weights="bundled")
    random_model = registry.load_model("digits_vit", weights="random")
    assert random_model.patch_embed.num_patches == 64
