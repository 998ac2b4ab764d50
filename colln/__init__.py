"""colln: ship timm Vision Transformers token-pruned with the Col-Ln metric."""

from colln.errors import CollnError
from colln.models.plan import KeepPlan, make_plan
from colln.models.registry import load_model
from colln.models.rewrite import get_plan, plan_for, prune, record_selections

__version__ = "0.1.0"
__all__ = ["CollnError", "KeepPlan", "get_plan", "load_model", "make_plan", "plan_for", "prune", "record_selections"]
