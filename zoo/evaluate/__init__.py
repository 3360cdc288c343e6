"""Evaluation: the measurements (`metrics`), the multi-domain suite (`suite`) and the reports built
from them (`evaluation`)."""

from .evaluation import EvalComparison, EvalReport, EvalSettings, compare, evaluate, evaluate_suite, load_model
from .metrics import perplexity
from .suite import SuiteReport, format_suite

__all__ = ["EvalComparison", "EvalReport", "EvalSettings", "SuiteReport", "compare", "evaluate", "evaluate_suite",
           "format_suite", "load_model", "perplexity"]
