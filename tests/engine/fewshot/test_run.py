"""Few-shot engine: CI formula, episode accuracy, feature-cached evaluation, end-to-end run, resume, plot."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.samplers import EpisodeSampler
from engine.checkpoint import Checkpointer
from engine.config import load_config
from engine.fewshot.evaluator import evaluate_episodes, mean_confidence_interval, paired_episode_difference
from engine.fewshot.plots import plot_sap_stats
from engine.seed import seed_everything
from modeling import build_model
from tests.helpers.fewshot_data import tiny_fewshot_set
from tests.helpers.run_files import run_files

REPO = Path(__file__).resolve().parents[3]
TINY_CFG = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A 6/5/5-class synthetic few-shot set, 10 images of 32x32 per class, in the miniImageNet layout."""
    return tiny_fewshot_set(tmp_path_factory.mktemp("fewshot_data"), 6)


def tiny_overrides(data_root: Path, out: Path) -> list[str]:
    return ["DATASETS.ROOT_DIR", str(data_root), "MODEL.NUM_CLASSES", "6", "OUTPUT_DIR", str(out)]


# ------------------------------------------------------------------------------ statistics
def test_confidence_interval_formula() -> None:
    acc = [0.5, 0.8, 0.6, 0.9, 0.7, 0.65]
    mean, ci, std = mean_confidence_interval(acc)
    assert mean == pytest.approx(statistics.fmean(acc))
    assert std == pytest.approx(statistics.pstdev(acc))
    assert ci == pytest.approx(1.96 * statistics.pstdev(acc) / math.sqrt(len(acc)))
    d_mean, d_ci = paired_episode_difference([0.5, 0.7, 0.9], [0.4, 0.7, 0.6])
    assert d_mean == pytest.approx(0.4 / 3)
    assert d_ci == pytest.approx(1.96 * statistics.pstdev([0.1, 0.0, 0.3]) / math.sqrt(3))
    with pytest.raises(ValueError):
        mean_confidence_interval([])


def test_episode_accuracy_against_independent_nearest_prototype() -> None:
    """No-SAP model: accuracy = nearest cosine prototype; recomputed in numpy for the same fixed episodes."""
    torch.manual_seed(0)
    cfg = load_config(None, ["MODEL.NAME", "ExpB1", "MODEL.BACKBONE", "tiny_conv", "MODEL.BACKBONE_ARGS.CHANNELS",
                             "[4, 8]", "MODEL.SAP.ENABLED", "False"])
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(7, 8))
    labels = np.repeat(np.arange(7) + 20, 12)  # global class ids 20..26
    feats = centres[labels - 20] + 1.2 * rng.normal(size=(len(labels), 8))
    res = evaluate_episodes(model, torch.tensor(feats, dtype=torch.float32), torch.from_numpy(labels), n_way=5,
                            k_shot=2, n_query=4, n_episodes=60, seed=3)
    sampler = EpisodeSampler(labels.tolist(), 5, 2, 4, 60, seed=3, fixed=True, rank=0, world_size=1)
    accs = []
    for i in range(60):
        idx = np.asarray(sampler.episode(i)).reshape(5, 6)
        protos = feats[idx[:, :2]].mean(1)
        q = feats[idx[:, 2:]].reshape(20, 8)
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (protos / np.linalg.norm(protos, axis=1,
                                                                                        keepdims=True)).T
        accs.append(float((cos.argmax(1) == np.repeat(np.arange(5), 4)).mean()))
    assert res["episode_acc"] == pytest.approx(accs)
    assert res["acc"] == pytest.approx(np.mean(accs))
    assert res["ci95"] == pytest.approx(1.96 * np.std(accs) / math.sqrt(60))
    assert 0.2 < res["acc"] < 1.0


def test_feature_cached_evaluation_equals_the_episode_forward() -> None:
    torch.manual_seed(0)
    cfg = load_config(None, ["MODEL.NAME", "ExpB1", "MODEL.BACKBONE", "tiny_conv", "MODEL.BACKBONE_ARGS.CHANNELS",
                             "[4, 8]", "MODEL.SAP.ANCHOR_MODE", "prototype"])
    model = build_model(cfg)
    model.train()
    model(torch.randn(16, 3, 16, 16))  # move the BatchNorm running statistics away from their init
    model.eval()
    support, query = torch.randn(10, 3, 16, 16), torch.randn(15, 3, 16, 16)
    labels = torch.arange(5).repeat_interleave(2)
    with torch.no_grad():
        direct, _ = model(support, labels, query, torch.arange(5))
        cached, _ = model.episode_logits(model.backbone(support), labels, model.backbone(query), torch.arange(5))
    assert torch.allclose(direct, cached, atol=1e-5)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_train_then_eval_only_through_the_entry_script(tiny_data, tmp_path, tiny_rgbnt_root) -> None:
    out = tmp_path / "run"
    base = [sys.executable, "train_b1_improvement.py", "--config_file", str(TINY_CFG)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    res = subprocess.run([*base, *tiny_overrides(tiny_data, out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "eval_results.json", "eval_results.txt",
                 "sap_stats.png", "summary.json", "last_checkpoint"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"5way_1shot", "5way_5shot"}
    for r in results.values():
        assert r["n_episodes"] == 20 and len(r["episode_acc"]) == 20 and 0.0 <= r["acc"] <= 1.0
        assert r["ci95"] == pytest.approx(1.96 * np.std(r["episode_acc"]) / math.sqrt(20))
    line = (out / "eval_results.txt").read_text().strip()
    assert "5-way 1-shot" in line and "+-" in line and "\n" not in line
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*(r for r in records if any(k.startswith("train/") for k in r)))
    for key in ("loss", "acc", "lr", "grad_norm", "attn_entropy", "attn_max", "logit_scale", "logit_scale_clipped"):
        assert f"train/{key}" in train_keys, key
    assert any("pretrain/loss" in r for r in records) and any("val_meta/acc" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["5way_1shot/acc"] == pytest.approx(results["5way_1shot"]["acc"])
    assert summary["plot"] == "sap_stats.png"  # relative to the run folder: the summary names no folder

    # --eval-only on the last checkpoint reproduces the final test numbers (same fixed episodes) in a folder of
    # its own; the run's files are left as they were, and --resume of the finished run changes nothing either
    ckpt = out / (out / "last_checkpoint").read_text().strip()
    before = run_files(out)
    res = subprocess.run([*base, "--eval-only", "--resume", str(ckpt), *tiny_overrides(tiny_data, out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((out / "eval" / "eval_results.json").read_text())
    assert again["5way_1shot"]["episode_acc"] == results["5way_1shot"]["episode_acc"]
    assert again["5way_5shot"]["acc"] == pytest.approx(results["5way_5shot"]["acc"])
    assert any("test/5way_1shot/acc" in line for line in (out / "eval" / "metrics.jsonl").read_text().splitlines())
    resumed = subprocess.run([*base, "--resume", *tiny_overrides(tiny_data, out)], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "holds a finished run and --resume has nothing left to train (pretrain: 1 of 1 epochs; meta: 2 of 2 " \
           "epochs); nothing was changed" in resumed.stderr, repr(resumed.stderr[-600:])
    assert run_files(out) == before

    # the same checkpoint given to the ReID script: one line saying which run wrote it
    wrong = subprocess.run([sys.executable, "train_net.py", "--config_file", "configs/synthetic/DeMo_SDTPS_tiny.yml",
                            "--eval-only", "MODEL.WEIGHTS", str(ckpt), "OUTPUT_DIR", str(tmp_path / "reid"),
                            "WANDB.MODE", "disabled", "DATASETS.ROOT_DIR", str(tiny_rgbnt_root)],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr[-3000:]
    line = wrong.stderr.strip().splitlines()[-1]
    assert "written by a run of MODEL.NAME ExpB1 (few-shot: train_b1_improvement.py)" in line and len(line) < 1000


def test_killed_run_resumes_bit_identically(tiny_data, tmp_path, monkeypatch) -> None:
    from engine.fewshot import run_fewshot

    def run(out: Path, resume: str | None = None) -> None:
        cfg = load_config(TINY_CFG, tiny_overrides(tiny_data, out))
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:
            seed_everything(cfg.SEED)
        run_fewshot(cfg, resume=resume)

    run(tmp_path / "ref")

    class Killed(Exception):
        pass

    original = Checkpointer.save

    def save_then_die(self, tag, **kwargs):
        path = original(self, tag, **kwargs)
        if tag == "epoch0002":  # first meta-training epoch written: the process dies here
            raise Killed
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "crash")
    monkeypatch.setattr(Checkpointer, "save", original)
    assert not (tmp_path / "crash" / "summary.json").exists()
    run(tmp_path / "crash", resume="auto")

    ref = torch.load(tmp_path / "ref" / "checkpoint_epoch0003.pth", weights_only=True)
    got = torch.load(tmp_path / "crash" / "checkpoint_epoch0003.pth", weights_only=True)
    assert ref["step"] == got["step"] and ref["extra"]["run"] == got["extra"]["run"]
    for key, value in ref["model"].items():
        assert torch.equal(value, got["model"][key]), key
    a = json.loads((tmp_path / "ref" / "eval_results.json").read_text())
    b = json.loads((tmp_path / "crash" / "eval_results.json").read_text())
    assert a == b
    steps = [json.loads(x)["step"] for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == ref["step"]


def test_sap_plot_from_metrics(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/attn_entropy": 1.2 - 0.01 * s, "train/attn_max": 0.4 + 0.01 * s,
             "train/logit_scale": 25 - 0.1 * s, "train/logit_scale_clipped": 0.0} for s in range(1, 20)]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = plot_sap_stats(metrics, tmp_path / "sap.png", n_way=5)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    assert plot_sap_stats(metrics, tmp_path / "none.png", n_way=5) is None


@pytest.mark.parametrize("overrides, needle", [
    (["FEWSHOT.N_WAY", "7"], "FEWSHOT.N_WAY is 7 but the 'train' split has 6 classes"),
    (["FEWSHOT.TEST_WAY", "6"], "FEWSHOT.TEST_WAY is 6 but the 'val' split has 5 classes"),
    (["FEWSHOT.K_SHOT", "5", "FEWSHOT.N_QUERY", "6"], "FEWSHOT.K_SHOT + N_QUERY = 11 images per class"),
    (["FEWSHOT.TEST_SHOTS", "[1, 5]", "FEWSHOT.TEST_QUERY", "6"], "max(FEWSHOT.TEST_SHOTS) + TEST_QUERY = 11"),
])
def test_episodes_a_split_cannot_give_are_refused_before_training(tiny_data, tmp_path, overrides, needle) -> None:
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "train_b1_improvement.py", "--config_file", str(TINY_CFG),
                          *tiny_overrides(tiny_data, out), *overrides], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert needle in res.stderr.strip().splitlines()[-1]
    assert not list(out.glob("checkpoint_*.pth"))  # nothing trained
