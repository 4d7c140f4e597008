"""Tasks ``train``, ``eval`` and ``train,eval``: the configured model's step and evaluation, timed.

The config's family decides the table: a ReID config gives one Markdown row per precision (train samples/s,
step ms, peak GiB, eval samples/s, TFLOP/step, MFU; :mod:`.reid_throughput`), a few-shot config one row per
phase and shot (episodes/s, images/s, peak MiB; :mod:`.episode_throughput`). Both train through the
trainer's own step (:mod:`.train_step`). ``--task train`` and ``--task eval`` measure one half: a compiled
step and its compiled evaluation each take minutes to compile on a fresh machine, so they can run as two
processes (two GPUs) at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from yacs.config import CfgNode as CN

from engine.config import load_config
from engine.device import resolve_device
from tools.benchmarks.episode_throughput import episode_rows, text_table
from tools.benchmarks.kernel_mix import kernel_mix, mix_table
from tools.benchmarks.reid_throughput import eval_forward, markdown_table, measure_precision
from tools.benchmarks.timing import device_name, repeat
from tools.benchmarks.train_step import build_train_step, is_fewshot

REID_ONLY = ("num_classes", "num_cameras", "append")
FEWSHOT_ONLY = ("shots", "test_images", "test_episodes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--precisions", default=None,
                        help="comma-separated (default: fp32,fp16,bf16 for ReID, DEVICE.PRECISION for few-shot)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile for each precision (mode from MODEL.COMPILE, else default)")
    parser.add_argument("--steps", "--iters", dest="steps", type=int, default=30, help="timed steps (episodes)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: ReID 10, few-shot 5)")
    parser.add_argument("--num-classes", type=int, default=None, help="ReID: identities of the classifier (171)")
    parser.add_argument("--num-cameras", type=int, default=None, help="ReID: cameras (4)")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="few-shot: shots per episode (1 5; not right before KEY VALUE)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="few-shot: images of the test split the timed test runs over (12000, miniImageNet's)")
    parser.add_argument("--test-episodes", type=int, default=None, help="few-shot: episodes of the timed test (2000)")
    parser.add_argument("--profile", default="", metavar="FILE",
                        help="also profile 5 training steps and (ReID) 5 evaluation batches of the first precision, as "
                             "--task asks; write device time by kernel kind and the op tables to FILE")
    parser.add_argument("--append", default="", help="ReID: Markdown file to append the table to (BENCHMARKS.md)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    cfg = load_config(args.config_file, args.opts)
    fewshot = is_fewshot(cfg)
    misplaced = [name for name in (REID_ONLY if fewshot else FEWSHOT_ONLY) if getattr(args, name)]
    if misplaced:
        flags = ", ".join("--" + name.replace("_", "-") for name in misplaced)
        parser.error(f"{flags} {'is' if len(misplaced) == 1 else 'are'} for {'ReID' if fewshot else 'few-shot'} "
                     f"configs; {args.config_file} is a {'few-shot' if fewshot else 'ReID'} config")
    device = resolve_device(cfg.DEVICE.NAME)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    default = cfg.DEVICE.PRECISION if fewshot else "fp32,fp16,bf16"
    precisions = (args.precisions or default).split(",")
    parts = set(args.task.split(","))
    args.warmup = args.warmup if args.warmup is not None else 5 if fewshot else 10
    if args.profile:
        Path(args.profile).write_text(profile_steps(cfg, precisions[0], device, args, parts))
    if fewshot:
        return _fewshot(cfg, precisions, parts, device, args)
    return _reid(cfg, precisions, parts, device, args, argv)


def _reid(cfg: CN, precisions: list[str], parts: set[str], device: torch.device, args: argparse.Namespace,
          argv: list[str]) -> int:
    rows = []
    for precision in precisions:
        for compiled in (False, True) if args.compile else (False,):
            label = precision + (" + compile" if compiled else "")
            try:
                result = measure_precision(cfg, precision, device, parts=parts, steps=args.steps, warmup=args.warmup,
                                           compiled=compiled, num_classes=args.num_classes or 171,
                                           num_cameras=args.num_cameras or 4)
            except Exception as err:  # report and go on with the other rows
                print(f"{label}: failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            rows.append((label, result))
            print(f"{label}: {result}", flush=True)
    table = markdown_table(cfg, rows, device, argv, args.steps, args.warmup)
    print(table)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write(table)
    if args.json:
        _write_json(args.json, device_name(device), [{"precision": label, **r} for label, r in rows])
    return 0 if rows else 1


def _fewshot(cfg: CN, precisions: list[str], parts: set[str], device: torch.device, args: argparse.Namespace) -> int:
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    all_rows = []
    for precision in precisions:
        for compiled in (False, True) if args.compile else (False,):
            rows = episode_rows(cfg, precision, device, shots=args.shots or [1, 5], parts=parts, iters=args.steps,
                                warmup=args.warmup, compiled=compiled, test_images=args.test_images or 12000,
                                test_episodes=args.test_episodes or 2000)
            print(text_table(cfg, rows, label, precision + (" + compile" if compiled else "")))
            all_rows += [{"precision": precision, "compiled": compiled, **r} for r in rows]
    if args.json:
        _write_json(args.json, label, all_rows)
    return 0


def _write_json(path: str, device: str, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps({"device": device, "rows": rows}, indent=2))


def profile_steps(cfg: CN, precision: str, device: torch.device, args: argparse.Namespace, parts: set[str],
                  steps: int = 5) -> str:
    """torch.profiler tables over ``steps`` training steps and (ReID) ``steps`` evaluation batches, as ``parts``
    asks: device time by kernel kind (:mod:`.kernel_mix`), then the top ops by device time and by CPU time."""
    step = build_train_step(cfg, precision, device, args.compile, num_classes=args.num_classes or 171,
                            num_cameras=args.num_cameras or 4, k_shot=(args.shots or [None])[0])
    sections = []
    if "train" in parts:
        step.run_model.train()
        sections.append(_profile(step, steps, device, f"{steps} training steps, {precision}"))
        step.finish()
    if "eval" in parts and not is_fewshot(cfg):
        with eval_forward(cfg, step, device, args.num_classes or 171, args.num_cameras or 4) as forward:
            sections.append(_profile(forward, steps, device,
                                     f"{steps} evaluation batches of {cfg.TEST.IMS_PER_BATCH}, {precision}"))
    return "\n\n".join(sections)


def _profile(fn: Callable[[], object], calls: int, device: torch.device, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    repeat(fn, 3, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        repeat(fn, calls, device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"{mix_table(kernel_mix(events), calls, title)}\n{events.table(sort_by=sort, row_limit=40)}\n\n"
            f"by CPU time\n{events.table(sort_by='cpu_time_total', row_limit=25)}\n")
