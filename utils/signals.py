"""The signals that ask a training run to stop, shared by the loop (which stops at a step boundary) and the data
loader's workers (which leave the stopping to the main process)."""

from __future__ import annotations

import signal

#: signals that ask a training run to stop (Ctrl-C, a cluster's kill, SLURM's ``--signal`` warning before a
#: time limit); those this platform lacks are left out
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
