"""Evaluation: the measurements (`metrics`) and the reports built from them (`evaluation`)."""

from .evaluation import EvalComparison, EvalReport, EvalSettings, compare, evaluate, load_model
from .metrics import perplexity

__all__ = ["EvalComparison", "EvalReport", "EvalSettings", "compare", "evaluate", "load_model", "perplexity"]
