"""Model loading: timm names, short aliases, the bundled ``digits_vit`` and ``digits_eva``; weights
pretrained, random, or a local file."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from colln.errors import ModelNotFoundError, UsageError, WeightsError
from colln.models import bundled

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

RANDOM_SEED = 0
# safetensors metadata of a checkpoint: the class names of its head, as JSON (colln-finetune writes it).
CLASS_NAMES_KEY = "colln.class_names"


def resolve_name(
    name: str,
) -> str:
    """Alias or timm name -> canonical name; unknown names suggest close ones."""
    import timm

    if name in bundled.NAMES:
        return name
    canonical = ALIASES.get(name, name)
    if timm.is_model(canonical):
        return canonical
    known = [*bundled.NAMES, *ALIASES, *timm.list_models("vit_*"), *timm.list_models("deit*")]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models('vit_*')`"
    raise ModelNotFoundError(f"unknown model {name!r}{hint}")


def default_weights(
    name: str,
) -> str:
    """``bundled`` for the digits models, ``pretrained`` for timm models."""
    return "bundled" if resolve_name(name) in bundled.NAMES else "pretrained"


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
        load_weights(model, bundled.weights_path(canonical))
    return model.eval()


def _create(
    canonical: str,
    weights: str,
    img_size: int | None,
) -> nn.Module:
    if canonical in bundled.NAMES:
        if weights == "pretrained":
            raise WeightsError(f"{canonical} has no hub weights: use --weights bundled (the default), random, or a file")
        return bundled.create_model(img_size, name=canonical)
    if weights == "bundled":
        raise WeightsError(
            f"only {' and '.join(bundled.NAMES)} have bundled weights; for {canonical} use pretrained, random, or a file"
        )
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


def _create_pretrained(
    name: str,
    img_size: int | None,
) -> nn.Module:
    """timm's pretrained weights through huggingface_hub, on its own terms: its cache, HF_ENDPOINT,
    HF_HUB_OFFLINE and the proxy settings; what it cannot get is one line saying what to do."""
    from huggingface_hub import errors

    try:
        return _create_timm(name, img_size, pretrained=True)
    except (OSError, RuntimeError, errors.HTTPError) as exc:
        raise WeightsError(f"cannot get pretrained weights for {name}: {_hub_problem(exc)}") from exc


def _hub_problem(
    exc: BaseException,
) -> str:
    """What went wrong with the hub, and the ways out."""
    from huggingface_hub import constants, errors

    where = f"the hub at {constants.ENDPOINT}"
    cache = f"the hub cache ({constants.HF_HUB_CACHE})"
    instead = "or pass --weights PATH to a local .safetensors/.pth file, or --weights random"
    # huggingface_hub reports an HTTP answer it could not use as "not in the local cache": the answer is its cause.
    cause = _http_cause(exc) or exc
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if isinstance(cause, errors.GatedRepoError):
        return f"{where} says they are gated (HTTP {status}): accept their terms on the hub and set HF_TOKEN, {instead}"
    if isinstance(cause, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError)):
        return (
            f"{where} does not have them (HTTP {status}): check HF_ENDPOINT (a mirror must hold timm's repositories), {instead}"
        )
    if isinstance(cause, errors.HfHubHTTPError) and status is not None:
        return f"{where} answered HTTP {status}: check HF_ENDPOINT and HF_TOKEN, {instead}"
    if constants.is_offline_mode():
        return f"offline (HF_HUB_OFFLINE is set) and not in {cache}: unset HF_HUB_OFFLINE to download them, {instead}"
    if isinstance(cause, (errors.LocalEntryNotFoundError, errors.HTTPError)):
        return (
            f"no connection to {where} and not in {cache}: check the network, the proxy (HTTPS_PROXY) or HF_ENDPOINT, "
            f"set HF_HUB_OFFLINE=1 to use the cache alone, {instead}"
        )
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no detail"
    return f"{exc.__class__.__name__} ({detail}): check the network and the cache, {instead}"


def _http_cause(
    exc: BaseException,
) -> BaseException | None:
    """The first HTTP error with a response in ``exc``'s chain of causes (a few links deep)."""
    from huggingface_hub import errors

    for _ in range(8):
        if isinstance(exc, errors.HfHubHTTPError) and getattr(exc, "response", None) is not None:
            return exc
        if exc.__cause__ is None and exc.__context__ is None:
            return None
        exc = exc.__cause__ or exc.__context__
    return None


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


def set_class_names(
    model: nn.Module,
    names: Sequence[str] | None,
) -> None:
    """Record what the model's outputs are, in timm's ``label_names`` field of its pretrained
    config (``None`` drops names that describe another head)."""
    cfg = {k: v for k, v in getattr(model, "pretrained_cfg", {}).items() if k != "label_names"}
    model.pretrained_cfg = {**cfg, "label_names": tuple(names)} if names is not None else cfg


def stored_class_names(
    path: Path,
) -> list[str] | None:
    """The class names a ``.safetensors`` checkpoint carries in its metadata, if any."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(CLASS_NAMES_KEY)
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeightsError(f"weights file {path} has malformed {CLASS_NAMES_KEY} metadata: re-save it with colln-finetune")
    return names


def load_weights(
    model: nn.Module,
    path: Path,
) -> None:
    """Load a local checkpoint strictly; pos-embed resampling and conversions via timm's filter. A
    checkpoint whose head has another number of classes re-heads the model to fit it; the class
    names stored with it (:func:`stored_class_names`) become the model's."""
    import sys

    # Each timm family converts checkpoints with the filter of its own module (Eva's is not ViT's).
    checkpoint_filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", lambda state, model: state)
    state = read_state_dict(path)
    names = stored_class_names(path)
    head = state.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != getattr(model, "num_classes", head.shape[0]):
        # Weights re-headed for other classes (colln-finetune --num-classes): they define the head.
        model.reset_classifier(head.shape[0])
        set_class_names(model, None)
    if names is not None and head is not None and len(names) != head.shape[0]:
        raise WeightsError(
            f"weights file {path} names {len(names)} classes for a head of {head.shape[0]}: re-save it with colln-finetune"
        )
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
    if names is not None:
        set_class_names(model, names)
