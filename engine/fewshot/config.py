"""The few-shot family's keys (``MODEL.NAME`` ExpB1): the ExpB1 model (backbone, metric, SAP and its
anchors) under ``MODEL``, episodes, stages and evaluation under ``FEWSHOT``."""

from __future__ import annotations

from yacs.config import CfgNode as CN


def add_fewshot_config(cfg: CN) -> None:
    """Add the few-shot keys to ``cfg`` (a :func:`engine.config.base_config`), with their defaults."""
    m = cfg.MODEL
    if m.NUM_CLASSES == 0:  # the pre-training head and learned anchors (miniImageNet: 64 training classes)
        m.NUM_CLASSES = 64
    # Local path to CLIP weights whose text tower gives SAP's semantic anchors; "" = no text tower.
    m.CLIP_WEIGHTS = ""
    m.BACKBONE_ARGS = CN()  # arguments of MODEL.BACKBONE (resnet12 | tiny_conv | timm)
    m.BACKBONE_ARGS.CHANNELS = [64, 160, 320, 640]  # stage widths; the last is SAP's phy_dim
    m.BACKBONE_ARGS.DROP_RATE = 0.1  # dropout (stages 1-2) / DropBlock (stages 3-4)
    m.BACKBONE_ARGS.DROPBLOCK_SIZE = 5
    m.BACKBONE_ARGS.DROPBLOCK_RAMP_STEPS = 40000  # FEAT: 20 * 2000 forward calls
    m.BACKBONE_ARGS.TIMM_NAME = ""  # MODEL.BACKBONE timm: any timm model name
    m.BACKBONE_ARGS.WEIGHTS = ""  # local backbone weights file ("" = random init)
    # Scaled-cosine classifier of the episode: logits = METRIC_SCALE * cos(query, prototype).
    m.METRIC_SCALE = 10.0
    m.METRIC_SCALE_LEARNABLE = False
    # The episode head: cosine (METRIC_SCALE * cos, ExpB1's) | euclidean (ProtoNet's and FEAT's:
    # -||query - prototype||^2 / METRIC_TEMPERATURE; FEAT's ResNet-12 commands use 64)
    m.METRIC = "cosine"
    m.METRIC_TEMPERATURE = 64.0

    m.SAP = CN()
    m.SAP.LOGIT_SCALE_INIT = 25.0  # about the sqrt(640) = 25.3 that SCALE_MODE fixed divides by
    m.SAP.LOGIT_SCALE_MAX = 100.0  # CLIP's ceiling
    m.SAP.ENABLED = True  # False: ExpB1 without SAP (scaled cosine to the raw prototypes)
    # learnable (bounded) | fixed (cosine logits / sqrt(phy_dim), the ablation baseline) | constant (frozen at INIT)
    m.SAP.SCALE_MODE = "learnable"
    # logit_scale_log in its own group with weight decay 0.0; False = ablation: decayed like the rest
    m.SAP.SCALE_NO_DECAY = True
    m.SAP.PURIFY_INIT = 0.5  # initial residual weight of the attended anchor, in (0, 1)
    m.SAP.PROJECTIONS = True  # learn D x D query/key/value maps (identity init)
    m.SAP.ANCHOR_MODE = "text"  # text (CLIP class names) | learned (per train class) | words (per name word) | prototype
    # what "text" becomes without MODEL.CLIP_WEIGHTS: prototype | learned | error (the choice is logged)
    m.SAP.ANCHOR_FALLBACK = "prototype"
    m.SAP.ANCHOR_PROTO_WEIGHT = 0.5  # anchor = normalize((1 - w) * semantic + w * prototype)
    m.SAP.PROMPT_TEMPLATE = "a photo of a {}."
    m.SAP.CLIP_MODEL = "ViT-B-16"  # open_clip architecture of MODEL.CLIP_WEIGHTS, or a .json model config
    m.SAP.LEARNED_DIM = 512  # width of learned class / word embeddings
    m.SAP.WORD_VOCAB_SIZE = 1024  # words mode: most distinct words in the training class names
    m.SAP.ANCHOR_CACHE_DIR = "outputs/cache/semantic_anchors"  # text embeddings, keyed by weights + template
    # A name-tower file (modeling/module/name_tower.py): the stand-in for CLIP's text tower on data sets with
    # compositional class names; "text" anchors read from it when MODEL.CLIP_WEIGHTS is empty. "" = none.
    m.SAP.TEXT_TOWER = ""
    # A few-shot config that makes MODEL.SAP.TEXT_TOWER on first use (engine/fewshot/text_tower.py); "" = the
    # file must exist (or be "").
    m.SAP.TEXT_TOWER_RECIPE = ""

    # The synthetic few-shot set's generator preset (datasets/synthetic_generators.FEWSHOT_PRESETS: small | gpu |
    # gpu_hard); "" = small. A preset other than the folder's regenerates it: give each its own DATASETS.ROOT_DIR.
    if "SYNTHETIC" not in cfg.DATASETS:  # the ReID family has the section too (a config of both families)
        cfg.DATASETS.SYNTHETIC = CN()
    cfg.DATASETS.SYNTHETIC.setdefault("PRESET", "")

    f = cfg.FEWSHOT = CN()
    # Stages run in order: pretrain (batch classification over the train classes) and/or meta (episodes).
    f.STAGES = ["pretrain", "meta"]
    f.IMAGE_SIZE = 84
    f.TRAIN_SPLIT = "train"
    f.VAL_SPLIT = "val"
    f.TEST_SPLIT = "test"
    # training episodes (meta stage); SOLVER.MAX_EPOCHS epochs of EPISODES_PER_EPOCH episodes
    f.N_WAY = 5
    f.K_SHOT = 1
    f.N_QUERY = 15
    f.EPISODES_PER_EPOCH = 100
    # evaluation: fixed-seed episodes, mean accuracy and 95% CI = CI_Z * std / sqrt(n)
    f.TEST_WAY = 5
    f.TEST_SHOTS = [1, 5]
    f.TEST_QUERY = 15
    f.TEST_EPISODES = 2000
    f.VAL_EPISODES = 200  # validation every SOLVER.EVAL_PERIOD epochs, K_SHOT shots
    f.EVAL_SEED = 1  # test/val episodes are drawn from this seed, identical across runs
    f.CI_Z = 1.96
    f.TEST_CHECKPOINT = "last"  # last | best (the best validation checkpoint of the last stage)
    f.PLOT = True  # PNG of the SAP stats over training (and to W&B)
    # How a recipe (MODEL.SAP.TEXT_TOWER_RECIPE) fits the name tower to its backbone's features of the training
    # classes: AdamW on the cross-entropy of each image against every training class name (CLIP's loss, one way)
    f.TEXT_TOWER = CN()
    f.TEXT_TOWER.EMBED_DIM = 128  # width of the joint space of names and image features
    f.TEXT_TOWER.WIDTH = 128  # word-embedding width
    f.TEXT_TOWER.HIDDEN = 256  # MLP hidden width
    f.TEXT_TOWER.STEPS = 1000
    f.TEXT_TOWER.BATCH_SIZE = 256
    f.TEXT_TOWER.LR = 1e-3
    f.TEXT_TOWER.WEIGHT_DECAY = 1e-4
    f.TEXT_TOWER.TEMPERATURE = 0.07  # initial softmax temperature (learned, as CLIP's; at least 0.01)
    f.TEXT_TOWER.SEED = 0
    f.TEXT_TOWER.EPISODES = 2000  # zero-shot test episodes measured when the tower is made
    f.PRETRAIN = CN()  # pre-training stage; optimizer settings otherwise from SOLVER
    f.PRETRAIN.EPOCHS = 0
    f.PRETRAIN.BASE_LR = 0.1
    f.PRETRAIN.BATCH_SIZE = 128
    f.PRETRAIN.WARMUP_EPOCHS = 1
    # A few-shot config of the pretrain stage alone whose network this run starts from (engine/fewshot/pretrained.py):
    # trained once per SEED into CACHE_DIR on first use and shared by every run of that seed that names it, so the
    # rows of an ablation differ only in their meta stage. "" = the run pre-trains itself (FEWSHOT.STAGES).
    f.PRETRAIN.RECIPE = ""
    f.PRETRAIN.CACHE_DIR = ""  # <CACHE_DIR>/seed<SEED>/weights.pth, the recipe's run in .../run/
