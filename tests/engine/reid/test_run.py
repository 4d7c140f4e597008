"""ReID engine end to end on a tiny generated set: train, evaluate, resume, eval-only, missing modalities."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.reid import resolve_test_modalities
from losses.reid_criterion import ReIDCriterion
from tests.helpers.run_files import run_files

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"


def _overrides(data: Path, out: Path, epochs: int = 2) -> list[str]:
    return [
        "DATASETS.ROOT_DIR", str(data), "OUTPUT_DIR", str(out), "WANDB.MODE", "disabled",
        "SOLVER.MAX_EPOCHS", str(epochs), "SOLVER.EVAL_PERIOD", "1", "SOLVER.WARMUP_EPOCHS", "1",
        "SOLVER.IMS_PER_BATCH", "16", "DATALOADER.NUM_INSTANCE", "4", "DATALOADER.NUM_WORKERS", "0",
        "TEST.IMS_PER_BATCH", "32", "SOLVER.LOG_PERIOD", "2", "TEST.VIS_QUERIES", "2",
    ]


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_net.py", "--config_file", str(TINY), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.slow
def test_train_evaluate_resume_and_eval_only(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _train(*_overrides(tiny_rgbnt_root, out, epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    # continue the same run to 2 epochs: resume restores the step counter and appends metrics
    cont = _train("--resume", *_overrides(tiny_rgbnt_root, out, epochs=2))
    assert cont.returncode == 0, cont.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert 0.0 <= summary[key] <= 1.0
    results = json.loads((out / "results_final.json").read_text())["metrics"]
    assert {"feat", "modality_concat", "moe", "RGB", "NI", "TI"} <= set(results)
    assert len(results["feat"]["cmc"]) == min(50, 4 * 2 * 2)  # gallery size caps max_rank
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(train_steps) and train_steps[-1] == summary["steps"]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any("train/loss/sdm" in r and "train/lr/backbone" in r for r in rows)
    assert any("train/model/sdtps/kept_ratio" in r for r in rows)
    assert (out / "top10_retrievals.png").stat().st_size > 0 and (out / "kept_tokens.png").stat().st_size > 0
    assert json.loads((out / "results_final.json").read_text())["missing_modalities"] == []
    # a finished run is protected: a fresh run, and --resume with nothing left to train, are refused; --eval-only
    # re-evaluates it, here with RGB and NI missing (DeMo's "rn"), into a folder of its own
    before = run_files(out)
    again = _train(*_overrides(tiny_rgbnt_root, out))
    assert again.returncode == 2 and "finished run" in again.stderr
    resumed = _train("--resume", *_overrides(tiny_rgbnt_root, out))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "holds a finished run and --resume has nothing left to train (train: 2 of 2 epochs); nothing was " \
           "changed" in resumed.stderr
    ev = _train("--eval-only", *_overrides(tiny_rgbnt_root, out), "TEST.MISS", "rn")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert run_files(out) == before  # the run's results, figures, metrics and checkpoints as they were
    assert (out / "eval_miss_rn" / "top10_retrievals.png").is_file()
    record = json.loads((out / "eval_miss_rn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test/TI/mAP" in record and "test/RGB/mAP" not in record
    ev2 = _train("--eval-only", *_overrides(tiny_rgbnt_root, out), "TEST.MISS", "rn")
    assert ev2.returncode == 0 and (out / "eval_miss_rn-2" / "results_eval.json").is_file()  # the first one kept
    evaluated = json.loads((out / "eval_miss_rn" / "results_eval.json").read_text())
    assert evaluated["missing_modalities"] == ["RGB", "NI"] and evaluated["miss_mode"] == "mask"
    assert "TI" in evaluated["metrics"] and not {"RGB", "NI"} & set(evaluated["metrics"])
    printed = ev.stdout + ev.stderr
    assert "RGB: mAP" not in printed and "NI: mAP" not in printed and "TI: mAP" in printed
    assert "evaluating with RGB + NI missing" in printed


def test_test_modalities_parsing() -> None:
    # TEST.MISS names the MISSING modalities, as in DeMo
    cfg = load_config(None, ["TEST.MISS", "rt"])
    assert resolve_test_modalities(cfg) == ("NI",)
    assert resolve_test_modalities(load_config(None)) == ("RGB", "NI", "TI")
    assert resolve_test_modalities(load_config(None, ["TEST.MISS", ""])) == ("RGB", "NI", "TI")
    with pytest.raises(ConfigError, match="TEST.MISS"):
        load_config(None, ["TEST.MISS", "rx"])


def test_criterion_terms_sum_to_total_and_mask_sdm() -> None:
    cfg = load_config(None)
    crit = ReIDCriterion(cfg)
    g = torch.Generator().manual_seed(0)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    feats = {m: torch.randn(6, 8, generator=g, requires_grad=True) for m in ("RGB", "NI", "TI")}
    outputs = {
        "branches": [{"name": "direct", "logits": torch.randn(6, 3, generator=g, requires_grad=True),
                      "feat": torch.randn(6, 8, generator=g, requires_grad=True)}],
        "modality_feats": feats,
        "bn_feats": (torch.randn(6, 8, generator=g) * 5).requires_grad_(),
    }
    mask = torch.ones(6, 3, dtype=torch.bool)
    total, terms = crit(outputs, pids, mask, epoch=0.0)
    assert set(terms) == {"id/direct", "triplet/direct", "sdm", "feat_norm"}
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    total.backward()
    assert all(f.grad is not None for f in feats.values())
    # a modality missing everywhere contributes nothing to SDM: its features get no gradient
    for f in feats.values():
        f.grad = None
    mask[:, 2] = False
    total, terms = crit(outputs, pids, mask, epoch=0.0)
    total.backward()
    assert feats["TI"].grad is None or torch.count_nonzero(feats["TI"].grad) == 0
    assert torch.count_nonzero(feats["RGB"].grad) > 0


def test_sdm_ablation_switches() -> None:
    """LOSS.SDM.USE_MASKS False aligns missing modalities too; FORMULA legacy uses the old formula."""
    g = torch.Generator().manual_seed(1)
    pids = torch.tensor([0, 0, 1, 1])
    feats = {m: torch.randn(4, 6, generator=g, requires_grad=True) for m in ("RGB", "NI", "TI")}
    outputs = {"branches": [], "modality_feats": feats}
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[:, 2] = False  # TI missing everywhere
    for overrides, ti_gets_grad in (([], False), (["LOSS.SDM.USE_MASKS", "False"], True),
                                    (["LOSS.SDM.FORMULA", "legacy"], True)):
        crit = ReIDCriterion(load_config(None, ["LOSS.FEAT_NORM.ENABLED", "False", *overrides]))
        for f in feats.values():
            f.grad = None
        total, terms = crit(outputs, pids, mask, epoch=0.0)
        total.backward()
        got = feats["TI"].grad is not None and bool(torch.count_nonzero(feats["TI"].grad))
        assert got is ti_gets_grad, overrides
    with pytest.raises(ValueError, match="LOSS.SDM.FORMULA"):
        ReIDCriterion(load_config(None, ["LOSS.SDM.FORMULA", "buggy"]))


def test_synthetic_generator_settings_reach_only_the_synthetic_set() -> None:
    from engine.reid import synthetic_kwargs

    cfg = load_config(None, ["DATASETS.NAMES", "synthetic_rgbnt", "DATASETS.SYNTHETIC.MISSING_MODALITY_PROB", "0.3"])
    assert synthetic_kwargs(cfg) == {"missing_modality_prob": 0.3}
    assert synthetic_kwargs(load_config(None, ["DATASETS.NAMES", "RGBNT201"])) == {}


@pytest.mark.slow
def test_training_starts_from_model_weights(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    from engine.checkpoint import Checkpointer
    from engine.reid import build_reid_model

    cfg = load_config(TINY, _overrides(tiny_rgbnt_root, tmp_path / "unused"))
    torch.manual_seed(123)
    start = build_reid_model(cfg, 8, 2)
    weights = Checkpointer(tmp_path / "pretrained").save("epoch0003", model=start, epoch=3)
    out = tmp_path / "finetune"
    # learning rate 0: the parameters the run ends with are the ones it started from
    run = _train(*_overrides(tiny_rgbnt_root, out, epochs=1), "MODEL.WEIGHTS", str(weights),
                 "SOLVER.BASE_LR", "0.0", "SOLVER.BACKBONE_LR", "0.0", "LOSS.CEM.LR", "0.0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "starting from the weights of" in run.stdout + run.stderr
    final = torch.load(out / "checkpoint_epoch0001.pth", weights_only=True)["model"]
    for name, value in start.state_dict().items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(final[name], value), name


@pytest.mark.slow
def test_loader_workers_and_resume_do_not_change_the_numbers(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    """Augmentation comes from each sample's own seed: 0 or 2 workers, straight or resumed, same weights."""
    def run(out: Path, workers: int, epochs: int, *extra: str) -> dict:
        res = _train(*extra, *_overrides(tiny_rgbnt_root, out, epochs=epochs), "DATALOADER.NUM_WORKERS", str(workers),
                     "SOLVER.EVAL_PERIOD", "5", "TEST.VIS_QUERIES", "1")
        assert res.returncode == 0, res.stderr[-3000:]
        return torch.load(out / f"checkpoint_epoch{epochs:04d}.pth", weights_only=True)["model"]

    straight = run(tmp_path / "w2", 2, 2)
    # the same run stopped after its first epoch: its folder as it was then, resumed
    stopped = tmp_path / "resumed"
    shutil.copytree(tmp_path / "w2", stopped)
    for name in ("summary.json", "checkpoint_epoch0002.pth", "checkpoint_best.pth"):
        (stopped / name).unlink(missing_ok=True)
    (stopped / "last_checkpoint").write_text("checkpoint_epoch0001.pth\n")
    resumed = run(stopped, 2, 2, "--resume")
    single = run(tmp_path / "w0", 0, 2)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
        assert torch.equal(value, single[key]), key


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_the_printed_command_finishes_the_run_identically(
        tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    import shlex
    import signal
    import time

    def overrides(out: Path) -> list[str]:
        return [*_overrides(tiny_rgbnt_root, out, epochs=6), "SOLVER.LOG_PERIOD", "1", "DETERMINISTIC", "True"]

    straight = _train(*overrides(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "stopped"
    cmd = [sys.executable, "train_net.py", "--config_file", str(TINY), *overrides(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and "train/loss" in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT at epoch" in err
    resume_line = err.strip().splitlines()[-1].strip()
    assert resume_line.startswith("python train_net.py --config_file") and " --resume " in resume_line
    assert not (out / "summary.json").exists() and (out / "last_checkpoint").is_file()

    resumed = subprocess.run([sys.executable, *shlex.split(resume_line)[1:]], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a == b  # every metric, the step count and the stability score


#: DeMo's recipe keys (configs/Base-DeMo.yml) on the tiny model
DEMO_RECIPE = ["SOLVER.SCHEDULER", "timm_cosine", "SOLVER.LR_NOISE", "0.67", "SOLVER.WARMUP_FACTOR", "0.1",
               "SOLVER.MIN_LR_FACTOR", "0.001", "SOLVER.BIAS_LR_FACTOR", "2.0", "SOLVER.WEIGHT_DECAY_BIAS", "1e-4",
               "SOLVER.DECAY_ALL_TENSORS", "True", "DATALOADER.REDEAL_LEFTOVERS", "False",
               "INPUT.AUGMENT_PER_MODALITY", "True", "INPUT.TEST_INTERPOLATION", "bilinear",
               "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2", "SOLVER.LOG_PERIOD", "1"]


@pytest.mark.slow
def test_demo_recipe_trains_by_epoch_and_resumes_identically(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    """Per-epoch rates (cosine from epoch 0, noise, the same absolute floor for every group) reach the optimizer
    at each epoch's first step, epochs end when fewer than P identities are left (their lengths vary), and a run
    resumed after its second epoch ends with the same weights."""
    def run(out: Path, epochs: int, *extra: str) -> dict:
        res = _train(*extra, *_overrides(tiny_rgbnt_root, out, epochs=epochs), *DEMO_RECIPE,
                     "SOLVER.EVAL_PERIOD", "5", "TEST.VIS_QUERIES", "1")
        assert res.returncode == 0, res.stderr[-3000:]
        return torch.load(out / f"checkpoint_epoch{epochs:04d}.pth", weights_only=True)["model"]

    straight = run(tmp_path / "straight", 3)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    by_epoch: dict[int, list[dict]] = {}
    for r in rows:
        if "train/loss" in r:
            by_epoch.setdefault(math.ceil(r["train/epoch"] - 1e-9), []).append(r)  # 1-based
    assert len({len(v) for v in by_epoch.values()}) > 1  # epoch lengths follow the draw
    cfg = load_config(TINY, DEMO_RECIPE)
    base, floor = cfg.SOLVER.BASE_LR, 0.001 * cfg.SOLVER.BASE_LR
    for t, records in by_epoch.items():  # WARMUP_EPOCHS 1 of 3: every epoch is past the warm-up
        g = torch.Generator().manual_seed(42 + t)
        while abs(n := torch.randn(1, generator=g).item()) >= 0.67:
            pass

        def rate(group_lr: float, t: int = t, n: float = n) -> float:
            if t >= 3:
                return floor
            return (floor + 0.5 * (group_lr - floor) * (1 + math.cos(math.pi * t / 3))) * (1 + n)

        for group, group_lr in (("new", base), ("new_bias", 2 * base)):
            got = [r[f"train/lr/{group}"] for r in records]
            assert got == pytest.approx([rate(group_lr)] * len(records), rel=1e-9), (t, group)
    stopped = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", stopped)
    for name in ("summary.json", "checkpoint_epoch0003.pth", "checkpoint_best.pth"):  # as it was after epoch 2
        (stopped / name).unlink(missing_ok=True)
    (stopped / "last_checkpoint").write_text("checkpoint_epoch0002.pth\n")
    resumed = run(stopped, 3, "--resume")
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
