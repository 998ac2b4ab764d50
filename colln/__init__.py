"""colln: ship timm Vision Transformers token-pruned with the Col-Ln metric."""

import os as _os
from importlib.util import find_spec as _find_spec

# polygraphy picks its TensorRT module once, when first imported: point it at TensorRT-RTX (which
# builds engines without a GPU) when that is the only TensorRT installed. An explicit setting wins.
if "POLYGRAPHY_USE_TENSORRT_RTX" not in _os.environ and _find_spec("tensorrt") is None and _find_spec("tensorrt_rtx") is not None:
    _os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"

from colln.errors import CollnError
from colln.models.config import PruneConfig
from colln.models.plan import KeepPlan, make_plan
from colln.models.registry import load_model
from colln.models.rewrite import get_plan, plan_for, prune, record_selections

__version__ = "0.1.0"
__all__ = ["CollnError", "KeepPlan", "PruneConfig", "finetune", "get_plan", "load_model", "make_plan", "plan_for", "prune", "record_selections"]


def __getattr__(name: str) -> object:
    # colln.finetune on first use: importing colln stays free of the training stack.
    if name == "finetune":
        from colln.train.finetune import finetune

        return finetune
    raise AttributeError(f"module 'colln' has no attribute {name!r}")
