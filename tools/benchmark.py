#!/usr/bin/env python
"""Training / evaluation throughput, peak memory and FLOP utilisation of a ReID model.

    python tools/benchmark.py --config_file configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml \
        [--precisions fp32,fp16,bf16] [--compile] [--parts train,eval] [--steps 30] [--warmup 10] [--append BENCHMARKS.md] [KEY VALUE ...]

Each precision gets a fresh model (same seed), the real objective (``ReIDCriterion``),
optimizer and guarded step (``engine.trainer.Trainer.advance``, as training steps) on random device-resident
batches of ``SOLVER.IMS_PER_BATCH`` samples (``DATALOADER.NUM_INSTANCE`` per id) x 3
modalities, so the numbers measure the model step, not the data pipeline
(``tools/bench_loader.py`` measures that). Evaluation runs at ``TEST.IMS_PER_BATCH``.
A "sample" is one multi-modal sample (three images). The table is printed and, with
``--append``, appended to a Markdown file with the device, torch version and command.
``DETERMINISTIC True`` (as a KEY VALUE) measures the step with deterministic kernels, i.e. what
determinism costs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from engine.config import load_config
from engine.device import build_amp_policy, resolve_device
from engine.monitor import NonFiniteGuard
from engine.reid import ReIDObjective, build_reid_model, build_reid_optimizer
from engine.seed import seed_everything
from engine.trainer import Stage, Trainer, compile_model
from losses.reid_criterion import MODALITY_ORDER, ReIDCriterion

# Dense bf16/fp16 tensor-core peak (FLOP/s) by device name fragment, for model FLOP utilisation.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _batch(cfg, device: torch.device, num_classes: int, num_cams: int, batch: int) -> tuple:
    h, w = cfg.INPUT.SIZE_TRAIN
    k = cfg.DATALOADER.NUM_INSTANCE
    g = torch.Generator(device="cpu").manual_seed(0)
    images = {m: torch.randn(batch, 3, h, w, generator=g).to(device) for m in MODALITY_ORDER}
    pids = (torch.arange(batch) // k % num_classes).to(device)
    camids = torch.randint(0, num_cams, (batch,), generator=g).to(device)
    masks = torch.ones(batch, len(MODALITY_ORDER), dtype=torch.bool, device=device)
    return {"images": images, "pids": pids, "camids": camids, "masks": masks}  # a device batch of the loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(cfg, precision: str, device: torch.device, args: argparse.Namespace, compiled: bool) -> tuple:
    """Fresh model (seed 0), objective, optimizer and step state for one measurement, as the trainer builds them."""
    seed_everything(0, deterministic=cfg.DETERMINISTIC)  # DETERMINISTIC True measures what determinism costs
    amp = build_amp_policy(precision, device)
    model = build_reid_model(cfg, args.num_classes, args.num_cameras).to(device)
    criterion = ReIDCriterion(cfg, bn_feat_dim=getattr(model, "bn_feat_dim", None)).to(device)
    optimizer = build_reid_optimizer(cfg, model, criterion)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # clipped together, as the trainer does
    batch = _batch(cfg, device, args.num_classes, args.num_cameras, cfg.SOLVER.IMS_PER_BATCH)

    trainer = Trainer(cfg, model, device, amp, ckpt=None, metrics=None, stages=("train",))
    trainer.guard = NonFiniteGuard(10**9)  # a benchmark never stops on non-finite steps
    stage = Stage("train", [batch], 1, ReIDObjective(criterion, device), optimizer, scheduler=None)
    # as the trainer compiles a stage (MODEL.COMPILE_SCOPE model: the model; step: forward and loss as one graph)
    run_model = trainer.compile_stage(stage, model) if compiled else model
    # evaluation runs the compiled model, as the trainer's evaluation does (compiled here when the step was)
    eval_model = compile_model(model, cfg.MODEL.COMPILE) if trainer.compiled_step is not None else run_model

    pending = [None]  # as in training: the host judges a step while the device runs the next one

    def step(net: torch.nn.Module = run_model, eager: bool = False) -> None:
        compiled_step = trainer.compiled_step
        if eager:  # the FLOP counter needs the eager aten ops
            trainer.compiled_step = None
        try:
            _, pending[0] = trainer.advance(net, stage, params, batch, 0.0, pending[0])
        finally:
            trainer.compiled_step = compiled_step

    return model, run_model, eval_model, amp, trainer.guard, step


def bench_precision(cfg, precision: str, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Train and eval throughput of one precision (fresh model and optimizer)."""
    model, run_model, eval_model, amp, guard, step = _setup(cfg, precision, device, args, args.compile)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    parts = set(args.parts.split(","))
    train_time = peak = flops = eval_time = math.nan
    if "train" in parts:
        train_time, peak, flops = _time_train(model, run_model, step, device, args)
    peak_flops = _peak_flops(device)
    mfu = flops / train_time / peak_flops if peak_flops and math.isfinite(flops) else math.nan
    if "eval" in parts:
        eval_time = _time_eval(cfg, eval_model, amp, device, args)
    return {
        "train_samples_per_s": cfg.SOLVER.IMS_PER_BATCH / train_time,
        "train_step_ms": 1000 * train_time,
        "peak_mem_gib": peak,
        "eval_samples_per_s": cfg.TEST.IMS_PER_BATCH / eval_time,
        "tflops_per_step": flops / 1e12,
        "mfu": mfu,
        "skipped_steps": float(guard.skipped),
    }


def _time_train(model: torch.nn.Module, run_model: torch.nn.Module, step, device: torch.device,
                args: argparse.Namespace) -> tuple[float, float, float]:
    """Seconds per training step, peak memory (GiB) and FLOP per step (NaN where not measurable)."""
    run_model.train()
    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    train_time = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan

    flops = math.nan
    with contextlib.suppress(Exception):  # FLOP counting is best effort (some ops have no formula)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(model, eager=True)
        flops = float(counter.get_total_flops())
    return train_time, peak, flops


def _time_eval(cfg, eval_model: torch.nn.Module, amp, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds per evaluation batch of ``TEST.IMS_PER_BATCH`` samples."""
    eval_batch = _batch(cfg, device, args.num_classes, args.num_cameras, cfg.TEST.IMS_PER_BATCH)
    eval_model.eval()
    with torch.no_grad():
        for _ in range(max(2, args.warmup // 2)):
            with amp.autocast():
                eval_model(eval_batch["images"], eval_batch["camids"], eval_batch["masks"])
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with amp.autocast():
                eval_model(eval_batch["images"], eval_batch["camids"], eval_batch["masks"])
        _sync(device)
    return (time.perf_counter() - t0) / args.steps


def profile_steps(cfg, precision: str, device: torch.device, args: argparse.Namespace, steps: int = 5) -> str:
    """torch.profiler table (top ops by device time, then by CPU time) over ``steps`` training steps."""
    from torch.profiler import ProfilerActivity, profile

    _, run_model, _, _, _, step = _setup(cfg, precision, device, args, args.compile)
    run_model.train()
    for _ in range(3):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    return f"{steps} steps, {precision}\n{table}\n\nby CPU time\n{table_cpu}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile for each precision (mode from MODEL.COMPILE)")
    parser.add_argument("--parts", default="train,eval", choices=("train,eval", "train", "eval"),
                        metavar="{train,eval | train | eval}",
                        help="what to measure: a compiled step and its compiled evaluation each take minutes to "
                             "compile on a fresh machine, so they can run as two processes (two GPUs) at once")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=171, help="identities of the classifier (RGBNT201: 171)")
    parser.add_argument("--num-cameras", type=int, default=4)
    parser.add_argument("--profile", default="", metavar="FILE",
                        help="also profile 5 training steps of the first precision; write the op table to FILE")
    parser.add_argument("--append", default="", help="Markdown file to append the table to (e.g. BENCHMARKS.md)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    device = resolve_device(cfg.DEVICE.NAME)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.profile:
        Path(args.profile).write_text(profile_steps(cfg, args.precisions.split(",")[0], device, args))
    rows = []
    for precision in args.precisions.split(","):
        for compiled in (False, True) if args.compile else (False,):
            args_run = argparse.Namespace(**{**vars(args), "compile": compiled})
            label = precision + (" + compile" if compiled else "")
            try:
                result = bench_precision(cfg, precision, device, args_run)
            except Exception as err:  # report and go on with the other rows
                print(f"{label}: failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            rows.append((label, result))
            print(f"{label}: {result}", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"\n### {cfg.MODEL.NAME} — {datetime.date.today().isoformat()} — {device_name}, torch {torch.__version__}\n\n"
        f"`python tools/benchmark.py {shlex.join(argv if argv is not None else sys.argv[1:])}`  \n"
        f"batch {cfg.SOLVER.IMS_PER_BATCH} ({cfg.DATALOADER.NUM_INSTANCE} per id) x 3 modalities x "
        f"{cfg.INPUT.SIZE_TRAIN[0]}x{cfg.INPUT.SIZE_TRAIN[1]}, eval batch {cfg.TEST.IMS_PER_BATCH}, "
        f"{args.steps} timed steps after {args.warmup} warm-up\n\n"
        "| precision | train samples/s | step ms | peak GiB | eval samples/s | TFLOP/step | MFU |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    def fmt(value: float, spec: str, scale: float = 1.0, suffix: str = "") -> str:
        return "–" if not math.isfinite(value) else f"{scale * value:{spec}}{suffix}"

    lines = [
        f"| {label} | {fmt(r['train_samples_per_s'], '.0f')} | {fmt(r['train_step_ms'], '.1f')} | "
        f"{fmt(r['peak_mem_gib'], '.2f')} | {fmt(r['eval_samples_per_s'], '.0f')} | "
        f"{fmt(r['tflops_per_step'], '.3f')} | {fmt(r['mfu'], '.1f', 100, '%')} |"
        for label, r in rows
    ]
    table = header + "\n".join(lines) + "\n"
    print(table)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write(table)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
