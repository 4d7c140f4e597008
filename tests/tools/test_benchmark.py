"""tools/benchmark.py --task: every task runs at its smallest CPU size; train and eval time the trainer's own step
(ReID and few-shot), with DETERMINISTIC True under deterministic kernels; ops counts what one step dispatches, per
part; memory adds up the bytes saved for the backward, per part."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.seed import seed_everything
from engine.trainer import Trainer
from tools import benchmark
from tools.benchmarks import TASKS, op_count, reid_throughput, saved_memory
from tools.benchmarks.kernel_mix import kernel_kind, kernel_mix, mix_table
from tools.benchmarks.op_count import PartStack
from tools.benchmarks.train_step import build_train_step

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"
FEWSHOT_TINY = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"
SMALL_REID = ["SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "4", "DEVICE.NAME", "cpu"]


# ---- train / eval: the trainer's step --------------------------------------------------------------------
def test_deterministic_key_reaches_the_measured_step() -> None:
    cpu = torch.device("cpu")
    try:
        for deterministic in (True, False):
            cfg = load_config(TINY, ["DETERMINISTIC", str(deterministic), *SMALL_REID])
            step = build_train_step(cfg, "fp32", cpu, num_classes=4, num_cameras=2)
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            step()  # one real step under that setting
    finally:
        torch.use_deterministic_algorithms(False)


def test_parts_measure_only_what_was_asked() -> None:
    """``--task eval`` times the evaluation alone (the train figures are NaN), ``--task train`` the step alone."""
    cfg = load_config(TINY, [*SMALL_REID, "TEST.IMS_PER_BATCH", "8"])
    cpu = torch.device("cpu")
    base = dict(steps=1, warmup=1, num_classes=4, num_cameras=2)
    only_eval = reid_throughput.measure_precision(cfg, "fp32", cpu, parts={"eval"}, **base)
    assert math.isnan(only_eval["train_samples_per_s"]) and only_eval["eval_samples_per_s"] > 0
    only_train = reid_throughput.measure_precision(cfg, "fp32", cpu, parts={"train"}, **base)
    assert only_train["train_samples_per_s"] > 0 and math.isnan(only_train["eval_samples_per_s"])


@pytest.mark.parametrize("config, overrides", [(TINY, SMALL_REID), (FEWSHOT_TINY, ["DEVICE.NAME", "cpu"])],
                         ids=["reid", "fewshot"])
def test_train_step_is_the_trainers_step_and_trains(config: Path, overrides: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Both families' benchmarked step goes through Trainer.launch_step and Trainer.settle, and moves the weights."""
    calls = {"launch_step": 0, "settle": 0}
    for name in calls:
        original = getattr(Trainer, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, name, counted)
    step = build_train_step(load_config(config, overrides), "fp32", torch.device("cpu"), num_classes=4, num_cameras=2)
    before = [p.detach().clone() for p in step.params]
    step.run_model.train()
    step()
    step()
    step.finish()
    assert calls == {"launch_step": 2, "settle": 2}
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, step.params))


def test_fewshot_train_and_eval_rows_from_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    assert benchmark.main(["--task", "train,eval", "--config_file", str(FEWSHOT_TINY), "--shots", "1", "--steps", "1",
                           "--warmup", "0", "--test-images", "200", "--test-episodes", "30", "--json", str(out),
                           "DEVICE.NAME", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "episodes/s" in printed and "eval (cached)" in printed and "batch 32@32" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == ["pretrain", "train", "eval (forward)", "eval (cached)", "test (30 ep.)"]
    assert all(r["episodes_per_s"] > 0 for r in rows) and all(r["shot"] == 1 for r in rows[1:])
    pretrain, test = rows[0], rows[-1]
    assert pretrain["images_per_s"] == pytest.approx(32 * pretrain["episodes_per_s"])  # a batch of 32 a step
    # the test's time is its backbone pass over the 200 images plus the 30 episodes
    assert test["backbone_seconds"] == pytest.approx(200 / test["images_per_s"])
    assert test["test_seconds"] > test["backbone_seconds"]
    assert test["episodes_per_s"] == pytest.approx(30 / test["test_seconds"])


def test_reid_table_from_the_command_names_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "BENCH.md"
    argv = ["--task", "train", "--config_file", str(TINY), "--precisions", "fp32", "--steps", "1", "--warmup", "0",
            "--num-classes", "4", "--num-cameras", "2", "--append", str(table), *SMALL_REID]
    assert benchmark.main(argv) == 0
    text = table.read_text()
    assert "`python tools/benchmark.py --task train --config_file" in text and "| fp32 |" in text
    assert "| – |" in text  # eval not measured: its cells are empty


def test_a_family_s_own_option_is_refused_for_the_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["--task", "train", "--shots", "1", "--config_file", str(TINY), *SMALL_REID])
    assert "--shots is for few-shot configs" in capsys.readouterr().err


def test_every_task_has_its_options_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(TASKS) == {"train", "eval", "train,eval", "loader", "losses", "rerank", "ops", "memory", "attention"}
    with pytest.raises(SystemExit):
        benchmark.main(["--task", "loader", "--help"])
    assert "--num-workers" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.main(["--task", "nope"])
    assert "invalid choice" in capsys.readouterr().err


# ---- losses, rerank, loader ------------------------------------------------------------------------------
def test_losses_task_prints_every_loss(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark.main(["--task", "losses", "--batch", "16", "--dim", "8", "--ids", "4", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "B=16, D=8, 4 ids x 4" in out and "sdm_multimodal (3 modalities)" in out and "cem (GatedAttentionCEM)" in out


def test_rerank_task_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark.main(["--task", "rerank", "--num-query", "40", "--num-gallery", "50", "--dim", "16", "--ids", "5",
                           "--k1", "5", "--k2", "3", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_query"] == 40 and result["num_gallery"] == 50 and result["finite"] is True
    assert result["deterministic"] is False and result["seconds"] >= 0


def test_loader_task_measures_the_synthetic_loader(tiny_rgbnt_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark.main(["--task", "loader", "--root", str(tiny_rgbnt_root), "--batch-size", "8",
                           "--num-instance", "2", "--num-workers", "0", "--batches", "2", "--warmup", "1",
                           "--size", "32", "16"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_rgbnt:" in out and "num_workers=0:" in out and "images/s" in out


# ---- ops ------------------------------------------------------------------------------------------------
def test_ops_of_a_known_function_are_counted_by_part_and_phase() -> None:
    counter = op_count.OpCounter()
    x = torch.randn(4, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 2)
    counter.label("linear", lin)
    with counter:
        y = lin(x).reshape(8)  # linear's ops, then one view outside it
        with counter.part("tail"):
            z = (y * 2).sum()
        z.backward()
    counts = counter.counts
    assert counts[("tail", "forward", False)] == 2  # mul, sum
    assert counts[("other", "forward", True)] >= 1  # the reshape is a view
    assert counts[("linear", "forward", False)] >= 1 and sum(v for (p, f, _), v in counts.items() if f == "backward")


def test_step_count_has_every_part_of_demo_sdtps_and_changes_with_the_model() -> None:
    cfg = load_config(TINY, SMALL_REID)
    counts = op_count.count_step(cfg)
    parts = {p for p, _, _ in counts}
    assert {"backbone", "sdtps", "hdm", "loss", "optimizer", "clip"} <= parts
    without_sdtps = op_count.count_step(load_config(TINY, [*SMALL_REID, "MODEL.SDTPS.ENABLED", "False"]))
    assert "sdtps" not in {p for p, _, _ in without_sdtps}
    assert "| total |" in op_count.table(counts)


# ---- memory ---------------------------------------------------------------------------------------------
class _Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp()  # saves its result: 5 x 7 float32 = 140 bytes


def test_saved_storages_are_counted_once_by_the_part_that_saved_them() -> None:
    parts = PartStack(default="rest")
    exp = _Exp()
    parts.label("exp", exp)
    x = torch.randn(5, 7, requires_grad=True)
    with saved_memory.SavedBytes(parts) as saved:
        y = exp(x)
        with parts.part("tail"):
            y.sin()  # saves y again: already counted for "exp"
            (y + 1).cos()  # saves y + 1: a new 140-byte storage
    assert dict(saved.bytes) == {"exp": 140, "tail": 140}


def test_demo_sdtps_parts_and_hdm_saves_per_sample_no_more_than_its_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per sample, HDM keeps for its backward at most three times the bf16 tokens it attends over (a weight
    copied once per sample, as a broadcast matmul does, is 7 x 64 x 64 x 2 bytes here: 8 times the tokens)."""
    cfg = load_config(TINY, ["DEVICE.NAME", "cpu"])
    shapes: list[tuple[int, ...]] = []
    build = saved_memory.build_reid_model

    def build_and_watch_hdm(*args, **kwargs) -> nn.Module:
        model = build(*args, **kwargs)
        model.hdm.register_forward_pre_hook(lambda _module, inputs: shapes.append(tuple(inputs[0].shape)))
        return model

    monkeypatch.setattr(saved_memory, "build_reid_model", build_and_watch_hdm)
    k = cfg.DATALOADER.NUM_INSTANCE
    small, large = saved_memory.saved_by_part(cfg, k), saved_memory.saved_by_part(cfg, 2 * k)
    assert {"backbone", "sdtps", "hdm", "loss"} <= set(small)
    assert all(large[p] > small[p] for p in ("backbone", "sdtps", "loss"))
    modalities, batch, length, dim = shapes[0]
    assert batch == k and shapes[1][1] == 2 * k
    assert (large["hdm"] - small["hdm"]) / k <= 3 * modalities * length * dim * 2
    assert "| total |" in saved_memory.table((k, small), (2 * k, large), cfg.SOLVER.IMS_PER_BATCH)


def test_memory_task_refuses_batches_that_are_not_multiples_of_k(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["--task", "memory", "--config_file", str(TINY), "--batches", "3", "5"])
    assert "--batches needs two different multiples of DATALOADER.NUM_INSTANCE" in capsys.readouterr().err


def test_attention_kernels_against_float64_and_repeated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "attention.json"
    assert benchmark.main(["--task", "attention", "--batch", "3", "--heads", "2", "--tokens", "9", "--head-dim", "8",
                           "--precision", "fp32", "--steps", "1", "--warmup", "0", "--kernels", "math,explicit,cudnn,triton",
                           "--deterministic", "--device", "cpu", "--json", str(out)]) == 0
    seed_everything(0, deterministic=False)
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    for kernel in ("math", "explicit"):  # float32 against the float64 formula: round-off only
        r = rows[kernel]
        assert r["available"] and r["bitwise_repeatable"] and r["forward_backward_ms"] > 0
        assert r["out_rel_error"] < 1e-6 and r["dq_rel_error"] < 1e-5
    assert not rows["cudnn"]["available"] and rows["cudnn"]["reason"]  # no cuDNN attention on a CPU
    assert not rows["triton"]["available"] and "fp16 or bf16" in rows["triton"]["reason"]  # the kernels' own refusal
    assert "unavailable" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--task", "attention", "--kernels", "math,flashy,flex:48,triton:48,triton:32", "--device", "cpu"])
    assert refused.value.code == 2 and "unknown ['flashy', 'flex:48', 'triton:48']" in capsys.readouterr().err


def test_flex_attention_rows_compute_attention(tmp_path: Path) -> None:
    """Compiled flex attention, torch's tiles and 16 x 16 ones, against float64 (its backward runs on CUDA only:
    on the CPU the row says so)."""
    out = tmp_path / "attention.json"
    assert benchmark.main(["--task", "attention", "--batch", "2", "--heads", "2", "--tokens", "9", "--head-dim", "16",
                           "--precision", "fp32", "--steps", "1", "--warmup", "0", "--kernels", "flex,flex:16",
                           "--device", "cpu", "--json", str(out)]) == 0
    for r in json.loads(out.read_text())["rows"]:
        assert r["available"] and r["forward_ms"] > 0, r
        assert r.get("backward") or "CPU" in r["reason"]
    q, k, v = (torch.randn(2, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    from tools.benchmarks.attention_backends import flex_fn

    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1) @ v
    for kernel in ("flex", "flex:16"):
        got = flex_fn(kernel)(q.float(), k.float(), v.float()).double()
        assert (got - expected).abs().max() < 1e-5


# ---- --profile: device time by kernel kind --------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNT", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("triton_per_fused__scaled_dot_product_flash_attention_native_layer_norm_0", "compiled (triton)"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "normalisation"),
    ("void (anonymous namespace)::softmax_warp_forward<c10::BFloat16, c10::BFloat16, float, 8, false, false>", "softmax"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise / reduce"),
    ("Memcpy HtoD (Pageable -> Device)", "copy / fill"),
    ("some_kernel_nobody_named", "other"),
])
def test_kernels_are_sorted_by_kind(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_kernel_mix_sums_device_kernels_own_time_and_the_table_shares_it() -> None:
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key: str, us: float, device: DeviceType) -> SimpleNamespace:
        return SimpleNamespace(key=key, self_device_time_total=us, device_type=device)

    events = [event("nvjet_tst_a", 300.0, DeviceType.CUDA), event("sm90_xmma_gemm_b", 100.0, DeviceType.CUDA),
              event("flash_fwd_kernel", 100.0, DeviceType.CUDA),
              event("aten::mm", 400.0, DeviceType.CPU)]  # an op, not a kernel: its time is its kernels'
    mix = kernel_mix(events)
    assert mix == {"matmul": 400.0, "attention": 100.0}
    table = mix_table(mix, calls=2, title="t")
    assert "| matmul | 0.20 | 80.0% |" in table and "| attention | 0.05 | 20.0% |" in table
    assert "| all | 0.25 | 100% |" in table
    assert "no device kernels" in mix_table({}, calls=2, title="t")


def test_profile_covers_training_and_evaluation_as_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "profile.md"
    argv = ["--task", "train,eval", "--config_file", str(TINY), "--precisions", "fp32", "--steps", "1", "--warmup",
            "0", "--num-classes", "4", "--num-cameras", "2", "--profile", str(out), *SMALL_REID]
    assert benchmark.main(argv) == 0
    text = out.read_text()
    assert "5 training steps, fp32" in text and "5 evaluation batches of" in text
    assert text.count("by CPU time") == 2 and "aten::" in text
