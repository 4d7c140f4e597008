"""The runner shared by the verify_*.py scripts: check lines, ``--inject-bug``, exit codes.

Two styles of script use it:

* stop at the first broken invariant: each check calls :func:`report`, which prints
  ``[ok] name: value`` / ``[FAIL] name: value`` and raises :class:`CheckFailed` on a failure;
  :func:`run` parses ``--inject-bug``, runs the checks in order and returns the exit code;
* check everything, then judge: the script builds a list of :class:`Check` and
  :func:`run_collected` prints them all with a ``N passed, M failed`` summary.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

BUG_HELP = "break the code in memory to show the checks catch it (must exit 1)"


class CheckFailed(Exception):
    """An invariant does not hold."""


@dataclass
class Check:
    """One invariant's outcome, for the scripts that report every check before judging."""

    name: str
    ok: bool
    value: str

    def __post_init__(self) -> None:
        self.ok = bool(self.ok)


def _print_line(name: str, ok: bool, value: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {value}", flush=True)


def report(name: str, ok: bool, value: str) -> None:
    """Print one check with its measured value; raise :class:`CheckFailed` if it does not hold."""
    _print_line(name, ok, value)
    if not ok:
        raise CheckFailed(name)


def _parse(doc: str | None, bugs: Iterable[str], argv: Sequence[str] | None, bug_help: str,
           config_file: str | Path | None = None) -> argparse.Namespace:
    """``--inject-bug`` with the script's choices (and ``--config_file`` where one is given); say what is injected."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_file is not None:
        parser.add_argument("--config_file", default=str(config_file), help="few-shot config to build the model from")
    parser.add_argument("--inject-bug", choices=list(bugs), default=None, help=bug_help)
    args = parser.parse_args(argv)
    if args.inject_bug:
        print(f"!! injected bug: {args.inject_bug} (this run must fail)", flush=True)
    return args


def run(name: str, checks: Iterable[Callable[[], object]], argv: Sequence[str] | None = None, *,
        doc: str | None, bugs: Iterable[str], injected: set[str] | None = None,
        context: Callable[[str | None], AbstractContextManager[object]] | None = None,
        threads: int | None = None, bug_help: str = BUG_HELP) -> int:
    """Main of a stop-at-the-first-failure script; returns its exit code (0 all pass, 1 a check failed).

    The injected bug is added to ``injected`` (the set the script's checks consult) and/or
    handed to ``context`` (entered around the checks, e.g. to patch a library and restore it).
    ``threads``: ``torch.set_num_threads`` for the run (``None`` leaves it alone).
    """
    args = _parse(doc, bugs, argv, bug_help)
    if args.inject_bug and injected is not None:
        injected.add(args.inject_bug)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        with context(args.inject_bug) if context is not None else contextlib.nullcontext():
            for check in checks:
                check()
    except CheckFailed as exc:
        print(f"{name}: FAILED at '{exc}'", flush=True)
        return 1
    finally:
        if args.inject_bug and injected is not None:
            injected.discard(args.inject_bug)
    print(f"{name}: all checks passed in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def run_collected(name: str, prepare: Callable[[str, str | None], list[Check]], argv: Sequence[str] | None = None, *,
                  doc: str | None, bugs: Iterable[str], config_file: str | Path,
                  bug_help: str = BUG_HELP) -> int:
    """Main of a check-everything script: ``prepare(config_file, bug)`` builds (and breaks) the
    model and returns its checks; print each and a ``N passed, M failed`` line; 1 if any failed."""
    args = _parse(doc, bugs, argv, bug_help, config_file=config_file)
    checks = prepare(args.config_file, args.inject_bug)
    for c in checks:
        _print_line(c.name, c.ok, c.value)
    failed = [c.name for c in checks if not c.ok]
    print(f"{name}: {len(checks) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0
