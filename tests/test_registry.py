"""Model loading: names, aliases, weights sources, and the refusals users hit."""

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


class _Hub:
    """A stand-in hub (or proxy) on 127.0.0.1 that answers every request with ``status`` and
    records what it was asked."""

    def __init__(
        self,
        status: int,
    ) -> None:
        import http.server

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                requests.append(f"{self.command} {self.path}")
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_CONNECT = answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "_Hub":
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pretrained_export(
    tmp_path: Path,
    **env: str,
) -> str:
    """``colln-export vit_tiny`` (pretrained weights) in a fresh process with an empty hub cache and
    only ``env``'s hub and proxy settings; asserts exit 2 with one line and returns it."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")}
    clean.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env)
    argv = [sys.executable, "-m", "colln.app.export_cli", "vit_tiny", "--no-validate", "--out", str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, env=clean, timeout=240, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("colln: error: weights: cannot get pretrained weights for vit_tiny_patch16_224: ")
    assert "--weights random" in lines[0] and not (tmp_path / "out").exists()
    return lines[0]


def test_pretrained_weights_come_from_the_hub_in_hf_endpoint(tmp_path: Path) -> None:
    with _Hub(404) as hub:
        line = _pretrained_export(tmp_path, HF_ENDPOINT=hub.url)
    assert any(r.startswith("HEAD /timm/vit_tiny_patch16_224") for r in hub.requests), hub.requests
    assert f"the hub at {hub.url} answered HTTP 404" in line


def test_pretrained_weights_offline_ask_nobody(tmp_path: Path) -> None:
    with _Hub(404) as hub:
        line = _pretrained_export(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    assert hub.requests == []
    assert "offline (HF_HUB_OFFLINE is set) and not in the hub cache" in line and str(tmp_path / "hf") in line


def test_pretrained_weights_go_through_the_proxy(tmp_path: Path) -> None:
    with _Hub(502) as proxy:
        line = _pretrained_export(tmp_path, HTTPS_PROXY=proxy.url)
    assert proxy.requests and all(r == "CONNECT huggingface.co:443" for r in proxy.requests), proxy.requests
    assert "no connection to the hub at https://huggingface.co" in line and "HTTPS_PROXY" in line


def test_digits_weights_sources() -> None:
    with pytest.raises(WeightsError, match="no hub weights"):
        registry.load_model("digits_vit", weights="pretrained")
    with pytest.raises(WeightsError, match="only digits_vit and digits_eva have bundled"):
        registry.load_model("vit_tiny", weights="bundled")
    with pytest.raises(WeightsError, match="digits_eva has no hub weights"):
        registry.load_model("digits_eva", weights="pretrained")
    random_model = registry.load_model("digits_vit", weights="random")
    assert random_model.patch_embed.num_patches == 64


def test_class_names_travel_in_the_weights_file(tmp_path: Path) -> None:
    from colln.data import model_class_names

    model = registry.load_model("digits_vit", weights="random")
    model.reset_classifier(2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    named = tmp_path / "named.safetensors"
    save_file(state, str(named), metadata={registry.CLASS_NAMES_KEY: '["cat", "dog"]'})
    loaded = registry.load_model("digits_vit", weights=str(named))
    assert loaded.num_classes == 2 and model_class_names(loaded) == ["cat", "dog"]
    # Without stored names a re-headed model's classes are unknown (not the digits).
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert model_class_names(registry.load_model("digits_vit", weights=str(tmp_path / "plain.safetensors"))) is None
    for bad, words in (('["cat"]', "names 1 classes for a head of 2"), ('{"a": 1}', "malformed")):
        save_file(state, str(tmp_path / "bad.safetensors"), metadata={registry.CLASS_NAMES_KEY: bad})
        with pytest.raises(WeightsError, match=words):
            registry.load_model("digits_vit", weights=str(tmp_path / "bad.safetensors"))
