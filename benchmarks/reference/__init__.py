"""Drivers that time the reference implementations for benchmarks/compare.py (see its docstring).

They run with a throwaway virtual environment's Python, outside this project: none of them
imports `algorithms`, `common` or `benchmarks`, only `timing.py` beside them (standard library).
"""
