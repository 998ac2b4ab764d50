"""Which timm models colln runs: every model of the ViT modules, built on the meta device (no
weights, milliseconds each), accepted or refused with its one-line reason.
``python -m colln.models.coverage`` prints the table of docs/reference/models.md."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from colln.errors import CollnError

# The timm modules of global-attention ViT backbones (the VLM towers are listed separately).
BACKBONE_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid", "eva", "naflexvit")
TOWER_MODULES = ("qwen3_vit", "gemma4_vit", "deepseek_vit")
# Modules whose models take timm's ``weight_init="skip"``: a plan needs shapes, not values, and the
# init's trunc_normal_ on the meta device is most of the time of building them.
SKIP_INIT_MODULES = frozenset({"vision_transformer", "deit", "vision_transformer_hybrid", "gemma4_vit"})


@dataclass(frozen=True)
class Verdict:
    module: str
    model: str
    accepted: bool
    reason: str = ""


def verdicts(
    modules: tuple[str, ...] = BACKBONE_MODULES,
) -> Iterator[Verdict]:
    """Each model of ``modules`` with keep 0.7 at its quarter-depth blocks (EViT's 3, 6, 9 of 12);
    the VLM towers with ``--output tokens`` (what they are for), that inner pruning and a final
    selection of 0.3 of the tower's output tokens. A model colln cannot build a plan for is refused
    with its reason; anything else raised is a bug and propagates."""
    import timm
    import torch

    from colln.models.adapters import model_adapter
    from colln.models.plan import default_layers
    from colln.models.rewrite import plan_for

    for module in modules:
        for name in timm.list_models(module=module):
            options = {"weight_init": "skip"} if module in SKIP_INIT_MODULES else {}
            with torch.device("meta"):
                model = timm.create_model(name, **options)
            try:
                settings: dict = {"keep": 0.7}
                if module in TOWER_MODULES:
                    layers = default_layers(len(model_adapter(model).blocks(model)))
                    settings = {"keep": (0.7,) * len(layers) + (0.3,), "layers": layers, "output": "tokens"}
                plan_for(model, **settings)
            except CollnError as exc:
                yield Verdict(module, name, False, str(exc))
            else:
                yield Verdict(module, name, True)


def undocumented(
    found: list[Verdict],
    page: str,
) -> list[str]:
    """What ``page`` (a docs page holding :func:`markdown`'s tables) does not say of ``found``: a
    module's counts row or a refused model's row with its reason."""
    missing = [f"| `{v.model}` | {v.reason} |" for v in found if not v.accepted and f"| `{v.model}` | {v.reason} |" not in page]
    for module in dict.fromkeys(v.module for v in found):
        mine = [v for v in found if v.module == module]
        row = f"| {module} | {len(mine)} | {sum(v.accepted for v in mine)} |"
        if row not in page.splitlines():
            missing.append(row)
    return missing


def markdown(
    found: list[Verdict],
) -> str:
    """The coverage table (module, models, accepted) and the refused models with their reasons."""
    lines = ["| timm module | models | accepted |", "|---|---|---|"]
    for module in dict.fromkeys(v.module for v in found):
        mine = [v for v in found if v.module == module]
        lines.append(f"| {module} | {len(mine)} | {sum(v.accepted for v in mine)} |")
    refused = [v for v in found if not v.accepted]
    if refused:
        lines += ["", "| refused model | why |", "|---|---|"]
        lines += [f"| `{v.model}` | {v.reason} |" for v in refused]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(list(verdicts(BACKBONE_MODULES + TOWER_MODULES))))
