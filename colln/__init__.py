"""colln: ship timm Vision Transformers token-pruned with the Col-Ln metric.

The pruning API (``prune``, ``PruneConfig``, ``KeepPlan``...) imports only torch and timm; the
deployment API (``export_model``, ``validate_export``, ``bench_export``, ``evaluate``) loads ONNX,
ONNX Runtime and polygraphy on first use.
"""

from importlib import import_module as _import_module

from colln.errors import CollnError
from colln.models.config import PruneConfig
from colln.models.plan import KeepPlan, make_plan
from colln.models.registry import load_model
from colln.models.rewrite import get_plan, plan_for, prune, record_selections, tome

__version__ = "0.1.0"

_LAZY = {
    "ExportSpec": "colln.export.spec",
    "export_model": "colln.jobs.export",
    "evaluate": "colln.jobs.evaluate",
    "validate_export": "colln.verify.validate",
    "bench_export": "colln.measure.bench",
    "open_runner": "colln.infer.runners",
    "finetune": "colln.train.finetune",
    "Recipe": "colln.train.finetune",
}

__all__ = [
    "CollnError",
    "ExportSpec",
    "KeepPlan",
    "PruneConfig",
    "Recipe",
    "bench_export",
    "evaluate",
    "export_model",
    "finetune",
    "get_plan",
    "load_model",
    "make_plan",
    "open_runner",
    "plan_for",
    "prune",
    "record_selections",
    "tome",
    "validate_export",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'colln' has no attribute {name!r}")
