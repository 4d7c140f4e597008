"""Task ``loader``: throughput of the ReID training loader (decode + shared augmentation + collate).

Prints samples/s (one sample = one identity sighting, all modalities) and images/s (one image per modality
file) per worker count. The default data set is the synthetic one, generated under ``--root`` if absent. No
GPU is used: this is the input pipeline alone.
"""

from __future__ import annotations

import argparse
import os
import time

from datasets import build_dataset, build_reid_train_loader, default_num_workers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="synthetic_rgbnt")
    parser.add_argument("--root", default="data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-instance", type=int, default=8)
    parser.add_argument("--num-workers", type=int, nargs="*", default=None,
                        help=f"worker counts to try (default: 0 and {default_num_workers(1)})")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"),
                        help="training image size (INPUT.SIZE_TRAIN)")


def bench(items, *, batch_size: int, num_instance: int, num_workers: int, batches: int, warmup: int,
          size: tuple[int, int] = (256, 128)) -> tuple[float, float]:
    """``(samples_per_s, images_per_s)`` over ``batches`` batches after ``warmup`` batches."""
    loader = build_reid_train_loader(items, batch_size=batch_size, num_instance=num_instance,
                                     num_workers=num_workers, size=size)
    samples = images = done = epoch = 0
    start = None
    while done < warmup + batches:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            done += 1
            if done == warmup + 1:
                start = time.perf_counter()
            if done > warmup:
                samples += batch["pids"].numel()
                images += int(batch["masks"].sum())
            if done >= warmup + batches:
                break
        epoch += 1
    took = time.perf_counter() - start
    return samples / took, images / took


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    data = build_dataset(args.dataset, args.root, verbose=False)
    workers = args.num_workers if args.num_workers is not None else sorted({0, default_num_workers(1)})
    print(f"{args.dataset}: {len(data.train)} train samples, batch {args.batch_size} "
          f"(P={args.batch_size // args.num_instance} x K={args.num_instance}), {args.size[0]}x{args.size[1]}, "
          f"{os.cpu_count()} CPUs")
    for w in workers:
        sps, ips = bench(data.train, batch_size=args.batch_size, num_instance=args.num_instance, num_workers=w,
                         batches=args.batches, warmup=args.warmup, size=args.size)
        print(f"  num_workers={w}: {sps:8.1f} samples/s  {ips:8.1f} images/s")
    return 0
