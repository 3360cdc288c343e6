"""Evaluation. `reports` holds the stage's settings and reports (no torch: the card and the Hub commands
read them); `metrics` the measurements, `suite` the multi-domain suite, `evaluation` the runs that put
them together (`evaluate`, `evaluate_suite`, `compare`). Import the functions from their modules."""

from .reports import EvalComparison, EvalReport, EvalSettings, SuiteReport, format_suite, suite_dir

__all__ = ["EvalComparison", "EvalReport", "EvalSettings", "SuiteReport", "format_suite", "suite_dir"]
