"""Executable invariant checks: each verify_*.py exits 1 on the first broken invariant."""
