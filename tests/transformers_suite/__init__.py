"""Helpers of tests/test_transformers_suite.py: transformers' own test files at the installed version."""
