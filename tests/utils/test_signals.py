"""Stop signals from a cluster: SIGTERM / SIGUSR1 to the whole process group stop a run with 2 loader
workers at the next step, with a checkpoint and the command that finishes it as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.loader import STOP_SIGNALS, SignalSafeLoader, ignore_stop_signals

REPO = Path(__file__).resolve().parents[2]
REID_TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"
FEWSHOT_TINY = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"
ENV = {**os.environ, "TQDM_DISABLE": "1"}

needs_sigwaitinfo = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo") or not hasattr(signal, "SIGUSR1"),
                                       reason="workers read SIGTERM with sigwaitinfo (Linux)")


class _WorkerSignals(torch.utils.data.Dataset):
    """Item ``i``: ``i``, the worker's pid, whether SIGINT and SIGUSR1 are ignored, the blocked stop signals."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, int, bool, bool, list[int]]:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        ignored = [signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGINT, signal.SIGUSR1)]
        return (i, os.getpid(), *ignored, sorted(int(s) for s in STOP_SIGNALS if s in blocked))


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (``Z``: exited, not yet reaped), or ``gone``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@needs_sigwaitinfo
def test_workers_ignore_stop_signals_from_others_and_end_on_sigterm_from_the_main_process() -> None:
    loader = SignalSafeLoader(_WorkerSignals(), batch_size=None, num_workers=2, persistent_workers=True,
                              prefetch_factor=1, worker_init_fn=ignore_stop_signals)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    pids = sorted({row[1] for row in first})
    assert len(pids) == 2 and os.getpid() not in pids
    for _, _, int_ignored, usr1_ignored, blocked in first:
        assert int_ignored and usr1_ignored and blocked == [int(signal.SIGTERM)]  # SIGTERM: read by a thread
    # a signal to the process group comes from someone else (a shell, slurmstepd): the workers carry on
    sends = "; ".join(f"os.kill({p}, {int(s)})" for p in pids for s in STOP_SIGNALS)
    subprocess.run([sys.executable, "-c", f"import os; {sends}"], check=True)
    rest = list(it)
    assert [row[0] for row in first + rest] == list(range(8)) and {row[1] for row in rest} <= set(pids)
    # SIGTERM from the main process (PyTorch's terminate() of a stuck worker, multiprocessing's at exit) ends it:
    os.kill(pids[0], signal.SIGTERM)
    deadline = time.time() + 10
    while time.time() < deadline and _state(pids[0]) not in ("Z", "gone"):
        time.sleep(0.02)
    assert _state(pids[0]) in ("Z", "gone") and _state(pids[1]) not in ("Z", "gone")
    del it, loader


@needs_sigwaitinfo
def test_a_run_failing_with_live_workers_still_exits() -> None:
    """Multiprocessing ends live workers at exit with SIGTERM and waits for them: they must obey it."""
    script = ("from datasets.loader import SignalSafeLoader, ignore_stop_signals\n"
              "it = iter(SignalSafeLoader(list(range(64)), batch_size=4, num_workers=2, persistent_workers=True, "
              "worker_init_fn=ignore_stop_signals))\n"
              "next(it)\n"
              "raise RuntimeError('a failure while the workers are alive')\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # not hanging at exit
    assert res.returncode == 1 and "a failure while the workers are alive" in res.stderr


# ------------------------------------------------------------------------------ whole runs
def _run(script: str, config: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, "--config_file", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=ENV)


def _signal_group_mid_run(script: str, config: Path, args: list[str], out: Path,
                          sig: signal.Signals) -> tuple[int, str]:
    """Start a run in its own process group, send ``sig`` to the group once a training step is logged;
    ``(exit code, stderr)``."""
    proc = subprocess.Popen([sys.executable, script, "--config_file", str(config), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and '"train/loss"' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.02)
    os.killpg(proc.pid, sig)  # the main process and its loader workers, as a cluster does
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _resume_line(err: str, sig: signal.Signals, script: str) -> str:
    """Check the stop's report on stderr (one line naming the signal, no traceback); the resume command."""
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert f"stopped by {sig.name} at epoch" in lines[-2] and ": saved " in lines[-2], err[-3000:]
    resume = lines[-1].strip()
    assert resume.startswith(f"python {script} --config_file") and " --resume " in resume
    return resume


def _finish(resume: str) -> None:
    done = subprocess.run([sys.executable, *shlex.split(resume)[1:]], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def _reid_args(data: Path, out: Path) -> list[str]:
    """The tiny ReID run: 3 epochs of 4 steps, 2 loader workers, evaluated at the end."""
    return ["DATASETS.ROOT_DIR", str(data), "OUTPUT_DIR", str(out), "WANDB.MODE", "disabled",
            "SOLVER.MAX_EPOCHS", "3", "SOLVER.EVAL_PERIOD", "3", "SOLVER.WARMUP_EPOCHS", "1",
            "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2", "DATALOADER.NUM_WORKERS", "2",
            "TEST.IMS_PER_BATCH", "32", "SOLVER.LOG_PERIOD", "1", "TEST.VIS_QUERIES", "1",
            "DETERMINISTIC", "True"]


@pytest.fixture(scope="module")
def reid_straight(tiny_rgbnt_root: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """``summary.json`` of the uninterrupted tiny ReID run."""
    out = tmp_path_factory.mktemp("signals") / "straight"
    res = _run("train_net.py", REID_TINY, _reid_args(tiny_rgbnt_root, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return (out / "summary.json").read_bytes()


@pytest.mark.slow
@needs_sigwaitinfo
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_group_signal_stops_reid_run_with_a_checkpoint_and_resume_ends_identically(
        name: str, reid_straight: bytes, tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    sig = getattr(signal, name)
    out = tmp_path / "stopped"
    code, err = _signal_group_mid_run("train_net.py", REID_TINY, _reid_args(tiny_rgbnt_root, out), out, sig)
    assert code == 130, err[-3000:]
    resume = _resume_line(err, sig, "train_net.py")
    assert "checkpoint_interrupted.pth" in err and (out / "checkpoint_interrupted.pth").is_file()
    assert not (out / "summary.json").exists()
    _finish(resume)
    assert (out / "summary.json").read_bytes() == reid_straight  # every metric, the step count, the stability


@pytest.mark.slow
@needs_sigwaitinfo
def test_group_sigterm_stops_fewshot_run_and_resume_ends_identically(tmp_path: Path) -> None:
    """train_b1_improvement.py: the same Trainer and loaders, two stages (pretrain, then meta)."""
    from tests.helpers.fewshot_data import tiny_fewshot_set

    data = tiny_fewshot_set(tmp_path / "data", 6)

    def args(out: Path) -> list[str]:
        return ["DATASETS.ROOT_DIR", str(data), "MODEL.NUM_CLASSES", "6", "OUTPUT_DIR", str(out),
                "DATALOADER.NUM_WORKERS", "2", "SOLVER.LOG_PERIOD", "1", "FEWSHOT.EPISODES_PER_EPOCH", "8",
                "DETERMINISTIC", "True"]

    straight = _run("train_b1_improvement.py", FEWSHOT_TINY, args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "stopped"
    code, err = _signal_group_mid_run("train_b1_improvement.py", FEWSHOT_TINY, args(out), out, signal.SIGTERM)
    assert code == 130, err[-3000:]
    _finish(_resume_line(err, signal.SIGTERM, "train_b1_improvement.py"))
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a == b  # every entry, the figure's too: it is named relative to the run folder
