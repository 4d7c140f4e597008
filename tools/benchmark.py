#!/usr/bin/env python
"""One command for every performance probe: ``python tools/benchmark.py --task TASK [options]``.

    python tools/benchmark.py --task train --config_file configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml \
        [--precisions fp32,fp16,bf16] [--compile] [--steps 30] [--warmup 10] [--profile FILE] [--append BENCHMARKS.md] [KEY VALUE ...]
    python tools/benchmark.py --task train,eval --config_file configs/miniImageNet/ExpB1_SAP.yml [--shots 1 5]
    python tools/benchmark.py --task loader [--root data --num-workers 1 2]
    python tools/benchmark.py --task losses [--threads 2 --gmm]
    python tools/benchmark.py --task rerank [--num-query 20000 --num-gallery 20000 --deterministic]
    python tools/benchmark.py --task ops --config_file configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml
    python tools/benchmark.py --task memory --config_file configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml
    python tools/benchmark.py --task attention [--precision bf16 --deterministic --kernels math,flash,cudnn,explicit,flex,flex:64]

``python tools/benchmark.py --task TASK --help`` lists a task's own options.
"""

from __future__ import annotations

import argparse
import sys

from tools.benchmarks import TASKS, task_module


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``task``'s options (just ``--task`` without one)."""
    epilog = "tasks:\n" + "\n".join(f"  {name:<11} {what}" for name, (_, what) in TASKS.items())
    parser = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK", help="what to measure (below)")
    if task is not None:
        task_module(task).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argparse.ArgumentParser(prog="tools/benchmark.py", add_help=False)
    chosen.add_argument("--task", choices=list(TASKS))
    task = chosen.parse_known_args(argv)[0].task
    parser = build_parser(task)
    args = parser.parse_args(argv)
    return task_module(args.task).run(args, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
