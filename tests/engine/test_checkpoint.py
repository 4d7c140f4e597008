"""Checkpoint round-trip, kill-and-resume bit-identity, atomic writes and damaged files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.checkpoint import Checkpointer, CheckpointError

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "tests" / "helpers" / "toy_run.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOY), *args], cwd=REPO, capture_output=True, text=True)


def _assert_same_state(a: dict, b: dict) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for idx in sa:
        for name in sa[idx]:
            assert torch.equal(sa[idx][name], sb[idx][name]), (idx, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def test_kill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(str(straight), "--steps", "20").returncode == 0
    died = _run(str(killed), "--steps", "20", "--die-at", "13")
    assert died.returncode != 0 and not (killed / "final.pt").exists()
    assert (killed / "checkpoint_epoch0010.pth").is_file()
    resumed = _run(str(killed), "--steps", "20", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(killed / "final.pt", weights_only=True)
    _assert_same_state(a, b)
    lrs_a = json.loads((straight / "lrs.json").read_text())
    lrs_b = json.loads((killed / "lrs.json").read_text())
    assert lrs_a == lrs_b and len(lrs_a) == 20  # the LR schedule continued where it stopped
    # keep=2 pruned the oldest periodic checkpoint
    assert sorted(p.name for p in killed.glob("checkpoint_*.pth")) == [
        "checkpoint_epoch0015.pth", "checkpoint_epoch0020.pth"]


def _tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _tiny()
    ckpt = Checkpointer(tmp_path)
    good = ckpt.save("last", model=model, optimizer=opt, epoch=1, step=10, periodic=False)
    before = good.read_bytes()
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    real_save = torch.save

    def half_then_crash(obj, handle, *a, **k):  # write some bytes, then die mid-write
        handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("last", model=model, optimizer=opt, epoch=2, step=20, periodic=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    fresh, fresh_opt = _tiny()
    state = ckpt.load(ckpt.latest(), model=fresh, optimizer=fresh_opt)
    assert state["epoch"] == 1 and state["step"] == 10
    assert torch.equal(fresh.weight, saved_weight)


def test_truncated_and_corrupt_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    model, opt = _tiny()
    ckpt = Checkpointer(tmp_path)
    good = ckpt.save("epoch0001", model=model, optimizer=opt, epoch=1, step=5)
    bad = tmp_path / "checkpoint_epoch0002.pth"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="unreadable") as info:
        ckpt.load(bad, model=model)
    assert str(bad) in str(info.value) and str(good) in str(info.value)  # names the file and the fallback
    garbage = tmp_path / "checkpoint_junk.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load(garbage, model=model)
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load(tmp_path / "nope.pth", model=model)
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        ckpt.load(tmp_path / "other.pth", model=model)
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.load(good, model=nn.Linear(5, 2))
    assert good.is_file()  # nothing good was touched


def test_a_full_disk_is_one_clear_error_and_the_old_file_survives(tmp_path: Path) -> None:
    import errno

    from engine.defaults import USER_ERRORS
    from utils.io import DiskFullError, atomic_write

    path = tmp_path / "checkpoint_epoch0001.pth"
    path.write_bytes(b"the good checkpoint")

    def full(_handle: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="no space left on the device while writing .*--resume") as info:
        atomic_write(path, full)
    assert isinstance(info.value, USER_ERRORS)
    assert path.read_bytes() == b"the good checkpoint" and list(tmp_path.iterdir()) == [path]


def test_wrong_checkpoint_says_where_it_comes_from_and_config_differences_are_listed() -> None:
    from engine.checkpoint import checkpoint_meta, config_differences, mismatch_message
    from engine.config import load_config

    fewshot_cfg = load_config(None, ["MODEL.NAME", "ExpB1"])
    state = {"model": {"backbone.layer1.weight": torch.zeros(2)}, "extra": {"meta": checkpoint_meta(fewshot_cfg)}}
    text = mismatch_message(state, "ckpt.pth", nn.Linear(2, 2))
    assert "written by a run of MODEL.NAME ExpB1 (few-shot: train_b1_improvement.py)" in text
    assert "2 missing (e.g. weight, bias)" in text and "1 unexpected (e.g. backbone.layer1.weight)" in text

    trained = load_config(None, ["MODEL.NAME", "DeMo_SDTPS"])
    now = load_config(None, ["MODEL.NAME", "DeMo_SDTPS", "MODEL.SDTPS.KEEP_RATIO", "0.25", "SOLVER.BASE_LR", "1.0"])
    state = {"extra": {"meta": checkpoint_meta(trained)}}
    assert config_differences(state, now) == ["MODEL.SDTPS.KEEP_RATIO: 0.5 -> 0.25"]  # training keys do not count
    assert config_differences({"extra": {}}, now) == []  # an old checkpoint records nothing


def test_background_writes_hold_the_moment_of_save_and_surface_their_errors(tmp_path: Path, monkeypatch) -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    ckpt = Checkpointer(tmp_path, background=True)
    path = ckpt.save("epoch0001", model=model, optimizer=opt, epoch=1, step=1)
    with torch.no_grad():  # the training goes on at once and changes every live tensor
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert ckpt.latest() == path  # waits for the write
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state["model"][k], v) for k, v in before.items())
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], moments)

    def no_space(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    ckpt.save("epoch0002", model=model, epoch=2, step=2)
    with pytest.raises(OSError, match="no space left on the device"):
        ckpt.wait()
    assert ckpt.latest() == path and torch.load(path, weights_only=True)["epoch"] == 1  # the good one is intact
