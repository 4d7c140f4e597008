"""Dependency-free helpers every package may import (registry, distributed queries, atomic files)."""
