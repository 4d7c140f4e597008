"""ReID training and evaluation throughput, peak memory and FLOP utilisation, one row per precision.

Each precision gets a fresh model (same seed), the real objective, optimizer and step (:mod:`.train_step`) on
random device-resident batches; evaluation runs the model (compiled when the step is) on batches of
``TEST.IMS_PER_BATCH``. A "sample" is one multi-modal sample (three images). The table is Markdown, with the
device, torch version and command in its heading, so it can be appended to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import shlex
from collections.abc import Callable, Iterator

import torch
from yacs.config import CfgNode as CN

from engine.seed import forward_only_kernels
from modeling.layers.half_weights import matmul_weights_in
from tools.benchmarks.timing import device_name, peak_memory, repeat, reset_peak_memory, seconds_per_call
from tools.benchmarks.train_step import TrainStep, build_train_step, reid_batch

# Dense bf16/fp16 tensor-core peak (FLOP/s) by device name fragment, for model FLOP utilisation.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def measure_precision(cfg: CN, precision: str, device: torch.device, *, parts: set[str], steps: int, warmup: int,
                      compiled: bool = False, num_classes: int = 171, num_cameras: int = 4) -> dict[str, float]:
    """Train and/or eval (``parts``) throughput of one precision, fresh model and optimizer; NaN where not
    measured. Train: ``warmup`` then ``steps`` steps; eval: ``max(2, warmup // 2)`` then ``steps`` batches."""
    step = build_train_step(cfg, precision, device, compiled, num_classes=num_classes, num_cameras=num_cameras)
    reset_peak_memory(device, empty_cache=True)
    train_time = peak = flops = eval_time = math.nan
    if "train" in parts:
        train_time, peak, flops = _time_train(step, device, steps, warmup)
    peak_flops = _peak_flops(device)
    mfu = flops / train_time / peak_flops if peak_flops and math.isfinite(flops) else math.nan
    if "eval" in parts:
        eval_time = _time_eval(cfg, step, device, steps, warmup, num_classes, num_cameras)
    return {
        "train_samples_per_s": cfg.SOLVER.IMS_PER_BATCH / train_time,
        "train_step_ms": 1000 * train_time,
        "peak_mem_gib": peak,
        "eval_samples_per_s": cfg.TEST.IMS_PER_BATCH / eval_time,
        "tflops_per_step": flops / 1e12,
        "mfu": mfu,
        "skipped_steps": float(step.trainer.guard.skipped),
    }


def _time_train(step: TrainStep, device: torch.device, steps: int, warmup: int) -> tuple[float, float, float]:
    """Seconds per training step, peak memory (GiB) and FLOP per step (NaN where not measurable)."""
    step.run_model.train()
    repeat(step, warmup, device)
    train_time = seconds_per_call(step, steps, device)
    step.finish()
    peak = peak_memory(device)
    flops = math.nan
    with contextlib.suppress(Exception):  # FLOP counting is best effort (some ops have no formula)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(eager=True)
            step.finish()
        flops = float(counter.get_total_flops())
    return train_time, peak, flops


def _time_eval(cfg: CN, step: TrainStep, device: torch.device, steps: int, warmup: int, num_classes: int,
               num_cameras: int) -> float:
    """Seconds per evaluation batch of ``TEST.IMS_PER_BATCH`` samples."""
    with eval_forward(cfg, step, device, num_classes, num_cameras) as forward:
        repeat(forward, max(2, warmup // 2), device)
        return seconds_per_call(forward, steps, device)


@contextlib.contextmanager
def eval_forward(cfg: CN, step: TrainStep, device: torch.device, num_classes: int,
                 num_cameras: int) -> Iterator[Callable[[], None]]:
    """Inside, a call that runs one evaluation batch of ``TEST.IMS_PER_BATCH`` samples through the step's
    evaluation model as the trainer's evaluation runs it: eval mode, no grad, forward-only kernels, the matmul
    weights cast once (:func:`~modeling.layers.half_weights.matmul_weights_in`), the step's autocast per batch."""
    batch = reid_batch(cfg, device, num_classes, num_cameras, cfg.TEST.IMS_PER_BATCH)
    model, amp = step.eval_model, step.amp
    model.eval()

    def forward() -> None:
        with amp.autocast():
            model(batch["images"], batch["camids"], batch["masks"])

    with torch.no_grad(), forward_only_kernels(), matmul_weights_in(model, amp.dtype):
        yield forward


def _cell(value: float, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "–" if not math.isfinite(value) else f"{scale * value:{spec}}{suffix}"


def markdown_table(cfg: CN, rows: list[tuple[str, dict[str, float]]], device: torch.device, command: list[str],
                   steps: int, warmup: int) -> str:
    """The rows as a Markdown section: heading (model, date, device, torch), the command, the batch, the table."""
    header = (
        f"\n### {cfg.MODEL.NAME} — {datetime.date.today().isoformat()} — {device_name(device)}, "
        f"torch {torch.__version__}\n\n"
        f"`python tools/benchmark.py {shlex.join(command)}`  \n"
        f"batch {cfg.SOLVER.IMS_PER_BATCH} ({cfg.DATALOADER.NUM_INSTANCE} per id) x 3 modalities x "
        f"{cfg.INPUT.SIZE_TRAIN[0]}x{cfg.INPUT.SIZE_TRAIN[1]}, eval batch {cfg.TEST.IMS_PER_BATCH}, "
        f"{steps} timed steps after {warmup} warm-up\n\n"
        "| precision | train samples/s | step ms | peak GiB | eval samples/s | TFLOP/step | MFU |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {label} | {_cell(r['train_samples_per_s'], '.0f')} | {_cell(r['train_step_ms'], '.1f')} | "
        f"{_cell(r['peak_mem_gib'], '.2f')} | {_cell(r['eval_samples_per_s'], '.0f')} | "
        f"{_cell(r['tflops_per_step'], '.3f')} | {_cell(r['mfu'], '.1f', 100, '%')} |"
        for label, r in rows
    ]
    return header + "\n".join(lines) + "\n"
