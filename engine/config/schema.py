"""The keys every run has (:func:`base_config`); each model family adds its own (``engine/<family>/config.py``).

Why here and not in ``configs/``: the schema is code that the engine owns and every tool imports, while
``configs/`` holds only data (YAML files, one folder per dataset, plus ``sweeps/``). Every magic number of
the design lives in a key with its value.
"""

from __future__ import annotations

from yacs.config import CfgNode as CN

from engine.family import families, get_family


def get_default_config(family: str | None = None) -> CN:
    """A fresh, mutable config with every key of ``family`` (a registered family's name: ``reid``, ``fewshot``)
    at its default; ``None``: the keys of every family (a tool that names no model)."""
    chosen = families() if family is None else (get_family(family),)
    cfg = base_config()
    for each in chosen:
        each.add_config(cfg)
    return cfg


def base_config() -> CN:
    """The keys shared by both families: run folder, seed, device, model name, data, solver, monitors, W&B."""
    _C = CN()
    _C.OUTPUT_DIR = "outputs/default"
    _C.SEED = 0
    # Deterministic kernels (torch's deterministic algorithms, strict: an operation without a deterministic
    # implementation raises; cuDNN deterministic; inductor's deterministic mode when compiled): a run repeats
    # bit for bit on the same machine, side by side with others and across a resume (BENCHMARKS.md).
    _C.DETERMINISTIC = False
    # The attention kernels under DETERMINISTIC: triton (the CLIP tower runs the repository's fixed-order Triton
    # kernels on CUDA in half precision, modeling/layers/fixed_order_attention.py; every other attention as with
    # fused; BENCHMARKS.md: 90% of the free compiled step on an H100) | fused (flash and memory-efficient, whose
    # backward passes run deterministic variants under strict deterministic algorithms; evaluation also cuDNN's,
    # whose forward is deterministic; engine/seed.py) | math (SDPA's math kernel alone: slower on ViT-B/16)
    _C.DETERMINISTIC_ATTENTION = "triton"
    # Under DETERMINISTIC, fill every new uninitialised tensor (torch's default there): a read of memory never
    # written then gives NaN every run. Off, thousands of fill kernels a step are skipped (BENCHMARKS.md).
    _C.DETERMINISTIC_FILL_UNINITIALIZED = False

    _C.DEVICE = CN()
    _C.DEVICE.NAME = "auto"  # auto | cpu | cuda
    # Autocast precision: auto (bf16 on CUDA with bf16 support, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    _C.DEVICE.PRECISION = "auto"
    # torch's intra-op CPU threads: 0 = torch's default (the CPUs this process may use, or OMP_NUM_THREADS); N pins
    # it. On a CPU a run's numbers depend on it (convolution weight gradients are summed in per-thread blocks), so a
    # pinned count gives the same numbers on any machine and under any tools/ablate.py --jobs.
    _C.DEVICE.CPU_THREADS = 0

    _C.MODEL = CN()
    _C.MODEL.NAME = ""  # ExpB1 | DeMo | DeMo_SDTPS
    _C.MODEL.BACKBONE = ""
    # Training classes (ReID: identities): the classifier's size; 0 = set by the trainer from the dataset.
    _C.MODEL.NUM_CLASSES = 0
    # Activation the CLIP towers are built with: auto (read from the weights file: QuickGELU for OpenAI's
    # files, an open_clip_config.json's quick_gelu; QuickGELU at random init) | quick_gelu | gelu.
    _C.MODEL.CLIP_ACTIVATION = "auto"
    # A checkpoint of this repository (or one tools/convert_demo_checkpoint.py wrote): evaluated by --eval-only
    # when no --resume checkpoint is given; the starting weights of a training run (fine-tuning) otherwise.
    _C.MODEL.WEIGHTS = ""
    # torch.compile the training model: "" (eager) | default | max-autotune-no-cudagraphs | reduce-overhead
    _C.MODEL.COMPILE = ""
    # what MODEL.COMPILE compiles for training: "step" (the forward and the loss as one graph, where the
    # objective supports it: ReID without LOSS.CEM; others fall back to "model") | "model" (the model's forward;
    # the loss then runs eagerly, and its launches cost host time that the data loader's workers also need)
    _C.MODEL.COMPILE_SCOPE = "step"
    # where compiled kernels are kept between runs (engine/compile_cache.py); "" = torch's local cache only
    _C.MODEL.COMPILE_CACHE_DIR = "outputs/cache/compile"

    _C.DATASETS = CN()
    _C.DATASETS.NAMES = ""
    _C.DATASETS.ROOT_DIR = "data"
    # Replace unreadable images by another of the same id/class and count them, instead of failing.
    _C.DATASETS.SKIP_CORRUPT = False
    # Open every image once while parsing (slow on big sets; catches corrupt files before training).
    _C.DATASETS.VERIFY_IMAGES = False

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = -1  # -1: CPUs available / local ranks, at most 8
    _C.DATALOADER.PREFETCH_FACTOR = 4
    # copy the next batch to the GPU on a side stream while the current step runs (engine/prefetch.py)
    _C.DATALOADER.PREFETCH_TO_DEVICE = True

    _C.SOLVER = CN()
    _C.SOLVER.OPTIMIZER = "SGD"  # SGD | Adam | AdamW
    _C.SOLVER.BASE_LR = 0.05
    # ReID: learning rate of the pretrained backbone (new modules use BASE_LR); <= 0 means BASE_LR.
    _C.SOLVER.BACKBONE_LR = -1.0
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = True
    _C.SOLVER.WEIGHT_DECAY = 5e-4
    _C.SOLVER.MAX_EPOCHS = 50
    _C.SOLVER.IMS_PER_BATCH = 64
    # cosine | step: set after every optimizer step, each group from its own rate (engine/solver.WarmupScheduler);
    # timm_cosine: timm's CosineLRScheduler set at the start of each epoch, DeMo's schedule: warm-up from
    # WARMUP_FACTOR x BASE_LR and floor MIN_LR_FACTOR x BASE_LR, both the same absolute rate for every group, the
    # cosine counted from epoch 0 (engine/solver.EpochCosineScheduler)
    _C.SOLVER.SCHEDULER = "cosine"
    _C.SOLVER.WARMUP_EPOCHS = 5
    _C.SOLVER.WARMUP_FACTOR = 0.01  # lr at step 0 = BASE_LR * WARMUP_FACTOR, linear to BASE_LR
    _C.SOLVER.STEPS = [30, 40]  # epochs at which the step scheduler multiplies by GAMMA
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.MIN_LR_FACTOR = 0.0  # cosine floor as a fraction of BASE_LR
    # timm_cosine only: each epoch before MAX_EPOCHS has its rates multiplied by 1 + n, n ~ N(0, LR_NOISE_STD)
    # redrawn until |n| < LR_NOISE, from a generator seeded LR_NOISE_SEED + epoch (DeMo: 0.67, 1.0, 42); 0 = off
    _C.SOLVER.LR_NOISE = 0.0
    _C.SOLVER.LR_NOISE_STD = 1.0
    _C.SOLVER.LR_NOISE_SEED = 42
    _C.SOLVER.GRAD_CLIP = 5.0  # max global grad norm; <= 0 disables clipping
    _C.SOLVER.CHECKPOINT_PERIOD = 1  # epochs
    _C.SOLVER.EVAL_PERIOD = 5  # epochs
    _C.SOLVER.LOG_PERIOD = 20  # steps
    # write checkpoints from a background thread: the state is copied to host memory, the step goes on
    _C.SOLVER.CHECKPOINT_ASYNC = True

    # Training monitors: the robust loss-spike detector and the non-finite step guard.
    _C.MONITOR = CN()
    _C.MONITOR.SPIKE_WINDOW = 100
    _C.MONITOR.SPIKE_WARMUP = 20
    _C.MONITOR.SPIKE_MAD_FLOOR = 0.05
    _C.MONITOR.SPIKE_REL_FLOOR = 0.15
    _C.MONITOR.SPIKE_SIGMAS = 6.0
    # Non-finite loss/gradient steps are skipped; this many in a row stop the run (last good checkpoint kept).
    _C.MONITOR.MAX_NONFINITE_STEPS = 5
    # > 0: a step whose loss lies more than this many spike bands (threshold - median) above the median is not
    # applied either (a blow-up: e.g. a learning rate far too large); counted with the non-finite steps.
    _C.MONITOR.BLOWUP_FACTOR = 0.0
    # True: the host judges each step (the non-finite guard, blow-ups, spikes) one step later, while the GPU runs
    # the next, and the fused optimizer applies or skips the step on the device by the same rule: the host never
    # waits for the GPU. Needs a fused optimizer and no fp16 loss scaling (else each step is waited for). False:
    # wait for every step. The applied updates are the same; a blow-up's band then lags by one step.
    _C.MONITOR.DEFER_CHECKS = True
    # > 0: record a torch.profiler trace of MONITOR.PROFILE_STEPS steps of each stage's epoch PROFILE_EPOCH (1-based,
    # after one warm-up step), host and GPU, into OUTPUT_DIR/profile/ (engine/profiling.py); 0: off.
    _C.MONITOR.PROFILE_EPOCH = 0
    _C.MONITOR.PROFILE_STEPS = 10

    _C.TEST = CN()
    _C.TEST.IMS_PER_BATCH = 128

    _C.WANDB = CN()
    # auto = online when a W&B login is found, else offline | online | offline | disabled
    _C.WANDB.MODE = "auto"
    _C.WANDB.PROJECT = "demo-sdtps-expb1"
    _C.WANDB.ENTITY = ""
    _C.WANDB.NAME = ""
    _C.WANDB.GROUP = ""
    _C.WANDB.TAGS = []
    _C.WANDB.INIT_TIMEOUT = 60.0  # seconds before an unreachable server makes the run fall back to offline
    return _C

