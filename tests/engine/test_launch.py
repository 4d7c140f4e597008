"""launch() and the distributed helpers under torchrun with two CPU processes (Gloo)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

from engine.launch import launch, wrap_ddp
from utils.distributed import all_gather_with_grad, get_rank, get_world_size, is_main_process

REPO = Path(__file__).resolve().parents[2]


def test_single_process_is_a_plain_call() -> None:
    assert launch(lambda a, b: a + b, 2, 3) == 5
    assert get_world_size() == 1 and get_rank() == 0 and is_main_process()
    x = torch.ones(2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, torch.device("cpu")) is model


def test_two_ranks_gather_with_gradients(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "helpers" / "ddp_probe.py"), str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    _check_probe(tmp_path)


def test_two_nodes_meet_through_the_c10d_rendezvous(tmp_path: Path) -> None:
    """The several-hosts command (README, "Several hosts"): two torchrun agents, one process each, that find
    each other at a rendezvous endpoint, as two hosts would; here two "nodes" on this machine over Gloo."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "probe",
           "--max-restarts", "0", str(REPO / "tests" / "helpers" / "ddp_probe.py"), str(tmp_path)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=180)
        assert node.returncode == 0, err[-2000:]
    _check_probe(tmp_path)


def _check_probe(out: Path) -> None:
    """What both ranks of ``ddp_probe.py`` must have seen."""
    for rank in range(2):
        seen = json.loads((out / f"rank{rank}.json").read_text())
        assert seen["world"] == 2 and seen["ddp"] == "DistributedDataParallel"
        assert seen["gathered"] == [[1.0] * 3] * 2 + [[2.0] * 3] * 2  # rank order
        assert seen["labels"] == [0, 1, 10, 11]
        # both ranks' losses weight rank r's rows by (r + 1); summed over the 2 ranks: 2 * (r + 1)
        assert seen["grad"] == [[2.0 * (rank + 1)] * 3] * 2


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "helpers" / "ddp_stop.py"), str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 1 was signalled during step 1; the ranks agree at the next sync point (LOG_PERIOD 2): step 2
    assert [s["stopped"] for s in seen] == [True, True] and [s["step"] for s in seen] == [2, 2]
    assert seen[1]["why"] == "SIGINT" and seen[0]["why"] == "a signal to another rank"
    assert seen[0]["checkpoint"].endswith("checkpoint_interrupted.pth")
    assert (tmp_path / "checkpoint_interrupted.pth").is_file()
