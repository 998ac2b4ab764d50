"""Model loading: timm names, short aliases, the bundled ``digits_vit``; weights pretrained, random,
or a local file."""

from __future__ import annotations

import difflib
import re
import socket
from pathlib import Path

import torch
from torch import nn

from colln.errors import ModelNotFoundError, UsageError, WeightsError
from colln.models import digits

ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_small_distilled": "deit_small_distilled_patch16_224",
    "deit3_small": "deit3_small_patch16_224",
    "vit_base_reg": "vit_base_patch16_reg4_gap_256",
}

HUB_HOST = ("huggingface.co", 443)
RANDOM_SEED = 0


def resolve_name(
    name: str,
) -> str:
    """Alias or timm name -> canonical name; unknown names suggest close ones."""
    import timm

    if name == digits.NAME:
        return name
    canonical = ALIASES.get(name, name)
    if timm.is_model(canonical):
        return canonical
    known = [digits.NAME, *ALIASES, *timm.list_models("vit_*"), *timm.list_models("deit*")]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models('vit_*')`"
    raise ModelNotFoundError(f"unknown model {name!r}{hint}")


def default_weights(
    name: str,
) -> str:
    """``bundled`` for digits_vit, ``pretrained`` for timm models."""
    return "bundled" if resolve_name(name) == digits.NAME else "pretrained"


def load_model(
    name: str,
    weights: str | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Create a model in eval mode.

    ``weights``: ``None`` (the model default: bundled for digits_vit, pretrained otherwise),
    ``pretrained`` (timm's hub, via its cache), ``random`` (timm's init under a fixed seed, so an
    export's PyTorch reference can be rebuilt), ``bundled`` (digits_vit only), or a path to
    ``.safetensors`` / ``.pth`` / ``.pt``. ``img_size``: ``None`` means the model default.
    """
    canonical = resolve_name(name)
    weights = weights or default_weights(canonical)
    if img_size is not None and (not isinstance(img_size, int) or img_size <= 0):
        raise UsageError(f"image size {img_size!r} must be a positive integer")
    # The global RNG is forked so that loading a model never changes the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = _create(canonical, weights, img_size)
    _check_img_size(model, img_size)
    if img_size is not None:
        # timm builds the model at img_size but keeps the pretrained input size in its data config,
        # which every colln command preprocesses with: images would come at the wrong resolution.
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
    if weights not in ("random", "pretrained", "bundled"):
        load_weights(model, Path(weights))
    elif weights == "bundled":
        load_weights(model, digits.weights_path())
    return model.eval()


def _create(
    canonical: str,
    weights: str,
    img_size: int | None,
) -> nn.Module:
    if canonical == digits.NAME:
        if weights == "pretrained":
            raise WeightsError("digits_vit has no hub weights: use --weights bundled (the default), random, or a file")
        return digits.create_model(img_size)
    if weights == "bundled":
        raise WeightsError(f"only digits_vit has bundled weights; for {canonical} use pretrained, random, or a file")
    if weights == "pretrained":
        return _create_pretrained(canonical, img_size)
    return _create_timm(canonical, img_size, pretrained=False)


def _create_timm(
    name: str,
    img_size: int | None,
    pretrained: bool,
) -> nn.Module:
    import timm

    kwargs = {"img_size": img_size} if img_size is not None else {}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"cannot create {name} with img_size={img_size}: {exc}") from exc


def _hub_reachable(
    timeout: float = 3.0,
) -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_pretrained(
    name: str,
    img_size: int | None,
) -> nn.Module:
    """timm's pretrained weights; offline, only its local cache is tried (no minute of retries)."""
    from huggingface_hub import constants

    was_offline = constants.HF_HUB_OFFLINE
    if not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        return _create_timm(name, img_size, pretrained=True)
    except (OSError, RuntimeError) as exc:
        raise WeightsError(
            f"cannot get pretrained weights for {name} (offline and not in the cache?): "
            "pass --weights PATH to a local .safetensors/.pth file, or --weights random"
        ) from exc
    finally:
        constants.HF_HUB_OFFLINE = was_offline


def _check_img_size(
    model: nn.Module,
    img_size: int | None,
) -> None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and patch is not None and img_size % patch[0]:
        raise UsageError(f"image size {img_size} is not a multiple of the patch size {patch[0]}")


def read_state_dict(
    path: Path,
) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"weights file {path} has an unknown suffix: use .safetensors, .pth or .pt")
    except WeightsError:
        raise
    except Exception as exc:
        # weights_only refuses a pickle that rebuilds Python objects: "Unsupported global: GLOBAL x.Y".
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found and re.search(r"(^|\.)(nn|models?|timm|torchvision)(\.|$)", found[1]):
            raise WeightsError(
                f"{path} is a pickled whole model ({found[1]}), not a state dict: save "
                "torch.save(model.state_dict(), PATH) and pass that file (colln never unpickles code)"
            ) from exc
        raise WeightsError(f"cannot read weights file {path} ({exc.__class__.__name__}): is it corrupt?") from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    # NaN/Inf weights make every output NaN: say so here rather than fail somewhere downstream.
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise WeightsError(
            f"weights file {path} holds NaN or Inf in {len(broken)} tensors (first: {broken[0]}): use finite weights"
        )
    return state


def load_weights(
    model: nn.Module,
    path: Path,
) -> None:
    """Load a local checkpoint strictly; pos-embed resampling and conversions via timm's filter. A
    checkpoint whose head has another number of classes re-heads the model to fit it."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    head = state.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != getattr(model, "num_classes", head.shape[0]):
        # Weights re-headed for other classes (colln-finetune --num-classes): they define the head.
        model.reset_classifier(head.shape[0])
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as exc:
        raise WeightsError(f"weights file {path} does not fit {type(model).__name__}: {exc}") from exc
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}")
    if shapes:
        k = shapes[0]
        problems.append(f"shape of {k} is {tuple(state[k].shape)}, model wants {tuple(expected[k].shape)}")
    if problems:
        raise WeightsError(f"weights file {path} does not match the model: {'; '.join(problems)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
