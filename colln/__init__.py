"""colln: ship timm Vision Transformers token-pruned with the Col-Ln metric.

Every public name is loaded on first use, so ``import colln`` itself imports nothing heavy (the
Docker health probe, ``python3 -m colln.serve.health``, runs under a 5 s timeout). The pruning API
(``prune``, ``PruneConfig``, ``KeepPlan``...) imports torch and timm; the deployment API
(``export_model``, ``validate_export``, ``bench_export``, ``evaluate``) also ONNX, ONNX Runtime
and polygraphy.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "CollnError": "colln.errors",
    "PruneConfig": "colln.models.config",
    "KeepPlan": "colln.models.plan",
    "make_plan": "colln.models.plan",
    "load_model": "colln.models.registry",
    "get_plan": "colln.models.rewrite",
    "plan_for": "colln.models.rewrite",
    "prune": "colln.models.rewrite",
    "record_selections": "colln.models.rewrite",
    "tome": "colln.models.rewrite",
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
        value = getattr(_import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'colln' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
