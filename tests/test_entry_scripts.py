"""The two entry scripts: argument handling, run-folder protection, registry errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_train_net_writes_resolved_config_with_gate_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yml"
    cfg_file.write_text("MODEL:\n  NAME: NoSuchModel\n")
    out = tmp_path / "run"
    res = _run("train_net.py", "--config_file", str(cfg_file), "--init_scale", "0.3", "--init_bias", "0.7",
               "OUTPUT_DIR", str(out), "WANDB.MODE", "disabled")
    assert res.returncode == 2
    assert "not implemented yet: model 'NoSuchModel'" in res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["MODEL"]["SDTPS"]["GATE_INIT_SCALE"] == 0.3 and saved["MODEL"]["SDTPS"]["GATE_INIT_BIAS"] == 0.7
    assert (out / "log.txt").is_file()


def test_bad_inputs_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    res = _run("train_b1_improvement.py", "--config_file", str(tmp_path / "missing.yml"))
    assert res.returncode == 2 and "config file not found" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("SOLVER:\n  BASE_LRR: 1.0\n")
    res = _run("train_b1_improvement.py", "--config_file", str(bad))
    assert res.returncode == 2 and "SOLVER.BASE_LRR" in res.stderr and str(bad) in res.stderr


def test_finished_or_unfinished_run_folder_is_protected(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    res = _run("train_net.py", "OUTPUT_DIR", str(out))
    assert res.returncode == 2 and "already holds a finished run" in res.stderr
    (out / "summary.json").unlink()
    (out / "checkpoint_epoch0003.pth").write_bytes(b"x")
    res = _run("train_net.py", "OUTPUT_DIR", str(out))
    assert res.returncode == 2 and "unfinished run" in res.stderr and "--resume" in res.stderr
    assert (out / "checkpoint_epoch0003.pth").read_bytes() == b"x"


def _tiny_reid(tmp_path: Path, data: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [*flags, "--config_file", "configs/synthetic/DeMo_SDTPS_tiny.yml", "OUTPUT_DIR", str(tmp_path / "run"),
            "WANDB.MODE", "disabled", "DATASETS.ROOT_DIR", str(data), "SOLVER.IMS_PER_BATCH", "16",
            "DATALOADER.NUM_INSTANCE", "4", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_EPOCHS", "1",
            "TEST.IMS_PER_BATCH", "32", "TEST.VIS_QUERIES", "2", *overrides]
    return subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in res.stderr, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_input_mistakes_are_one_line_before_training(tmp_path: Path, tiny_rgbnt_root: Path) -> None:
    _one_line(_tiny_reid(tmp_path / "a", tiny_rgbnt_root, "SOLVER.IMS_PER_BATCH", "18"),
              "SOLVER.IMS_PER_BATCH (18) must be a multiple of DATALOADER.NUM_INSTANCE (4)")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    res = subprocess.run([sys.executable, "train_net.py", "OUTPUT_DIR", str(a_file), "WANDB.MODE", "disabled"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    _one_line(res, "is a file")
    import torch

    if not torch.cuda.is_available():
        _one_line(_tiny_reid(tmp_path / "b", tiny_rgbnt_root, "DEVICE.NAME", "cuda"), "no CUDA device")
        assert not (tmp_path / "b" / "run").exists()  # refused before the run folder exists
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not weights" * 50)
    _one_line(_tiny_reid(tmp_path / "c", tiny_rgbnt_root, "MODEL.PRETRAIN_PATH", str(garbage)),
              "not a readable weights file")


def test_a_broken_image_read_in_a_loader_worker_is_one_line_and_debug_shows_the_traceback(
        tmp_path: Path, tiny_rgbnt_root: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_rgbnt_root, data)
    victim = sorted((data / "synthetic_rgbnt" / "train_171" / "NI").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # a truncated JPEG
    res = _tiny_reid(tmp_path, data, "DATALOADER.NUM_WORKERS", "1")
    _one_line(res, victim.name, "DATASETS.SKIP_CORRUPT True", "DATASETS.VERIFY_IMAGES True")
    assert "DataLoader worker" not in res.stderr
    shown = _tiny_reid(tmp_path / "d", data, "DATALOADER.NUM_WORKERS", "1", flags=("--debug",))
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "ImageReadError" in shown.stderr


def test_a_missing_modality_file_is_one_line(tmp_path: Path, tiny_rgbnt_root: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_rgbnt_root, data)
    sorted((data / "synthetic_rgbnt" / "train_171" / "TI").glob("*.jpg"))[0].unlink()
    _one_line(_tiny_reid(tmp_path, data), "modality file(s) missing", "DATASETS.ALLOW_MISSING_MODALITY True")


def test_an_option_after_the_overrides_says_options_come_first(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _run("train_net.py", "--config_file", "configs/synthetic/DeMo_SDTPS_tiny.yml", "OUTPUT_DIR", str(out),
               "--eval-only")
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    assert "'--eval-only' comes after the KEY VALUE overrides" in res.stderr and "put options first" in res.stderr
    assert not out.exists()


def test_a_garbled_last_checkpoint_names_what_is_there(tmp_path: Path) -> None:
    import torch

    from engine.checkpoint import Checkpointer

    out = tmp_path / "run"
    ckpt = Checkpointer(out)
    for tag in ("epoch0001", "epoch0002"):
        ckpt.save(tag, model=torch.nn.Linear(2, 2), epoch=1)
    (out / "last_checkpoint").write_bytes(b"\x00\xffgarbage\n")
    res = _run("train_net.py", "--config_file", "configs/synthetic/DeMo_SDTPS_tiny.yml", "--resume", "OUTPUT_DIR",
               str(out), "WANDB.MODE", "disabled")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "last_checkpoint names '" in res.stderr and "which is not a checkpoint file in" in res.stderr
    assert "checkpoint_epoch0001.pth" in res.stderr and "checkpoint_epoch0002.pth" in res.stderr
    assert "pass one with --resume PATH" in res.stderr and "no 'last_checkpoint' file" not in res.stderr


def test_a_pinned_cpu_thread_count_gives_the_same_run_whatever_the_machine_offers(tmp_path: Path) -> None:
    """``DEVICE.CPU_THREADS 1``: the tiny few-shot run started with 1 and with 2 OpenMP threads writes the same
    summary.json, byte for byte (unpinned, the convolutions' weight gradients differ between the two)."""
    import os

    written = []
    for threads in ("1", "2"):
        out = tmp_path / f"omp{threads}"
        res = subprocess.run([sys.executable, "train_b1_improvement.py", "--config_file",
                              "configs/synthetic/ExpB1_SAP_tiny.yml", "WANDB.MODE", "disabled", "DEVICE.CPU_THREADS",
                              "1", "OUTPUT_DIR", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": threads})
        assert res.returncode == 0, res.stderr[-2000:]
        written.append((out / "summary.json").read_bytes())
    assert written[0] == written[1]
