"""Run a script in a fresh process under Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton compiles a
kernel, so only a new process sees it) and read the JSON object it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def interpreter_reads_loop_bounds() -> bool:
    """Triton's interpreter before 3.8 reads a runtime loop bound with ``int()`` of a one-element array, which numpy
    2.4 and 2.5 refuse ("only 0-dimensional arrays ..."): on such a pair (torch 2.11's Triton 3.6) the interpreted
    tests skip; the kernels themselves are checked on the GPU."""
    import numpy
    import triton

    try:
        int(numpy.array([1]))
    except TypeError:
        return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8)
    return True


def run_interpreted(script: str, timeout: float = 300) -> dict:
    """``script``'s last printed line, parsed; skips the calling test where the interpreter cannot run loops."""
    if not interpreter_reads_loop_bounds():
        pytest.skip("this Triton's interpreter cannot run loops under this numpy (fixed in Triton 3.8)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
