"""The ReID family's keys (``MODEL.NAME`` DeMo, DeMo_SDTPS): DeMo's modules, SDTPS, DGAF, the CLIP image
tower, the multi-modal data and augmentation, the losses, and retrieval evaluation."""

from __future__ import annotations

from yacs.config import CfgNode as CN


def add_reid_config(cfg: CN) -> None:
    """Add the ReID keys to ``cfg`` (a :func:`engine.config.base_config`), with their defaults."""
    m = cfg.MODEL
    # Local path to CLIP image-tower weights (OpenAI ViT-B-16.pt or an open_clip checkpoint); "" = random init.
    # MODEL.BACKBONE "" means clip_vit_b16; clip_vit_tiny is the CPU test tower, clip_vit_small the GPU-ablation
    # tower (random init). The patch grid follows INPUT.SIZE_TRAIN (256x128 -> 16x8 patches of 16 px).
    m.PRETRAIN_PATH = ""
    # A tower-pretraining config (e.g. configs/synthetic/Pretrain_tower_small.yml): when MODEL.PRETRAIN_PATH does not
    # exist yet, it is made first by `python tools/pretrain_tower.py --config_file <this> --out <PRETRAIN_PATH>`
    # (engine/reid/tower_pretrain.py), then reused. "" = PRETRAIN_PATH must exist (or be "").
    m.PRETRAIN_RECIPE = ""
    m.NUM_CAMERAS = 0  # rows of the SIE table; 0 = set by the trainer from the dataset
    m.SIE_CAMERA = True  # learnable camera embedding (SIE) added to the tokens
    m.SIE_COE = 1.0  # SIE coefficient (DeMo's RGBNT201/RGBNT100/MSVR310 configs: 1.0)
    m.SIE_TOKENS = "cls"  # cls (DeMo, CLIP-ReID) | all (TransReID style)
    m.DEMO = CN()
    m.DEMO.GLOBAL_LOCAL = True  # [CLS, mean(patches)] -> LN -> Linear(2D, D) -> QuickGELU per modality
    m.DEMO.HDM = True  # seven subset queries (R, N, T, RN, RT, NT, RNT)
    m.DEMO.ATM = True  # mixture of experts over the seven HDM features (needs HDM)
    m.DEMO.HEAD = 4  # ATM chunks (DeMo RGBNT201: 4; RGBNT100/MSVR310: 8)
    m.DEMO.DIRECT = True  # one head on the concatenated modality features (False: one per modality)
    m.DEMO.HDM_DROPOUT = 0.1  # attention dropout of the HDM queries (DeMo's nn.MultiheadAttention)
    m.DGAF = CN()
    m.DGAF.ENABLED = False  # dual-gated fusion of the modality features instead of concatenation
    m.SDTPS = CN()
    m.SDTPS.ENABLED = True
    m.SDTPS.NUM_HEADS = 4
    m.SDTPS.KEEP_RATIO = 0.5
    # The cosine gate's initial scale and bias: 0.5 / 0.5 starts the gate in [0.50, 0.73] (1.0 / 0.0: [0.27, 0.73]).
    m.SDTPS.GATE_INIT_SCALE = 0.5
    m.SDTPS.GATE_INIT_BIAS = 0.5
    m.SDTPS.USE_GATE_NORM = False
    m.SDTPS.RENORMALIZE_ATTN = False
    # Gate scale and bias are clamped to [-bound, bound] in the forward (beyond 5 the sigmoid saturates).
    m.SDTPS.GATE_PARAM_BOUND = 5.0

    d = cfg.DATASETS
    # Keep samples whose NI/TI file is missing (zero image, False in the modality mask) instead of failing.
    d.ALLOW_MISSING_MODALITY = False
    # Generator settings of the synthetic sets (used only by synthetic_rgbnt): a preset ("" = small,
    # "gpu", "ablation", "pretrain"; see datasets.synthetic_generators.RGBNT_PRESETS) and the probability that a
    # sample's NI or TI file is missing (< 0: the preset's, 0).
    d.SYNTHETIC = CN()
    d.SYNTHETIC.PRESET = ""
    d.SYNTHETIC.MISSING_MODALITY_PROB = -1.0
    # Generator seed (< 0: 0). Identities are drawn from (seed, pid): another seed gives identities never seen
    # with seed 0, e.g. the tower-pretraining set of configs/synthetic/Pretrain_tower_small.yml.
    d.SYNTHETIC.SEED = -1

    cfg.DATALOADER.NUM_INSTANCE = 8  # K of the P x K identity sampler
    # When fewer than P identities have K images left, deal every identity's images anew and go on, so each epoch
    # has the same number of batches; False: the epoch ends there (DeMo's sampler), and its length varies with
    # the draw (needs SOLVER.SCHEDULER timm_cosine)
    cfg.DATALOADER.REDEAL_LEFTOVERS = True

    s = cfg.SOLVER
    # Per-tensor rules (modeling/param_groups.py). A tensor whose name contains "bias" trains at BIAS_LR_FACTOR x
    # BASE_LR (in the backbone: at BACKBONE_LR) with WEIGHT_DECAY_BIAS; DECAY_ALL_TENSORS decays every other
    # tensor (False: none on 1-D tensors and embeddings / learned tokens); LARGE_FC_LR trains the classifiers at
    # 2 x BASE_LR. DeMo: 2, 1e-4, True, False.
    s.BIAS_LR_FACTOR = 1.0
    s.WEIGHT_DECAY_BIAS = 0.0
    s.DECAY_ALL_TENSORS = False
    s.LARGE_FC_LR = False

    cfg.INPUT = CN()
    cfg.INPUT.SIZE_TRAIN = [256, 128]
    cfg.INPUT.SIZE_TEST = [256, 128]
    cfg.INPUT.PROB = 0.5  # horizontal flip
    cfg.INPUT.PADDING = 10
    cfg.INPUT.RE_PROB = 0.5  # random erasing
    cfg.INPUT.PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's
    cfg.INPUT.PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]
    # Training flip, crop and erasing drawn once per sample and applied to all its modalities (False), or drawn
    # for each modality on its own (True, DeMo)
    cfg.INPUT.AUGMENT_PER_MODALITY = False
    cfg.INPUT.TEST_INTERPOLATION = "bicubic"  # resize of test images: bicubic | bilinear (DeMo's T.Resize default)

    loss = cfg.LOSS = CN()
    loss.ID_WEIGHT = 0.25  # DeMo
    loss.ID_LABEL_SMOOTHING = 0.1
    loss.TRIPLET_WEIGHT = 1.0
    loss.TRIPLET_MARGIN = 0.3  # used when TRIPLET_SOFT_MARGIN is False
    loss.TRIPLET_SOFT_MARGIN = True  # DeMo's soft-margin triplet
    # Similarity distribution matching between modalities (symmetric KL), missing modalities masked.
    loss.SDM = CN()
    loss.SDM.ENABLED = True
    loss.SDM.WEIGHT = 1.0
    loss.SDM.INIT_TEMPERATURE = 0.20
    loss.SDM.FINAL_TEMPERATURE = 0.18
    loss.SDM.FALLBACK_TEMPERATURE = 0.25
    loss.SDM.ANNEAL_EPOCHS = 10.0  # epochs from INIT to FINAL temperature
    loss.SDM.FALLBACK_STEPS = 100  # steps at the fallback temperature after a non-finite SDM loss
    loss.SDM.MIN_TEMPERATURE = 0.15
    loss.SDM.MAX_TEMPERATURE = 0.5
    # fixed (symmetric KL) | legacy (the ce - h formula it corrects; ablation only: can go negative)
    loss.SDM.FORMULA = "fixed"
    # exclude missing modalities' placeholder features from SDM; False = ablation row
    loss.SDM.USE_MASKS = True
    # subtract each modality's batch mean before SDM normalises: features that share one dominant direction
    # per modality otherwise give SDM a uniform softmax (ln 8 in an 8 x 8 batch) and nothing to learn
    loss.SDM.CENTER = False
    # Feature-norm band regulariser on the BN-neck features (1e-2 is the stricter weight for runs whose
    # norms still leave the band).
    loss.FEAT_NORM = CN()
    loss.FEAT_NORM.ENABLED = True
    loss.FEAT_NORM.TARGET = 8.0
    loss.FEAT_NORM.BAND = 2.0
    loss.FEAT_NORM.WEIGHT = 5e-3
    # Gated-attention conditional-entropy regulariser on the BN-neck features.
    loss.CEM = CN()
    loss.CEM.ENABLED = False
    loss.CEM.ATTN_HIDDEN = 128
    loss.CEM.TAU = 0.1
    loss.CEM.MARGIN = 0.1
    loss.CEM.BETA = 1.0
    loss.CEM.SNR_THRESH = 0.3
    loss.CEM.SNR_SHARP = 10.0
    loss.CEM.CLASS_GATE_A = 10.0
    loss.CEM.CLASS_GATE_B = 0.05
    loss.CEM.SLOT_POWER = 2.0
    loss.CEM.LOSS_SCALE = 0.1
    loss.CEM.WARMUP_EPOCHS = 5.0
    loss.CEM.LR = 1e-3  # its own parameter group

    t = cfg.TEST
    t.FEAT_NORM = True  # L2-normalise retrieval features before distances
    t.METRIC = "euclidean"  # euclidean | cosine
    t.RE_RANKING = False
    # k-reciprocal re-ranking's neighbourhood, query expansion and distance weight (DeMo's values)
    t.RE_RANKING_K1 = 50
    t.RE_RANKING_K2 = 15
    t.RE_RANKING_LAMBDA = 0.3
    t.MAX_RANK = 50
    # Missing-modality test setting, DeMo's meaning: the letters name the modalities MISSING at test time
    # (r = RGB, n = NI, t = TI: "r", "n", "t", "rn", "rt", "nt"); "nothing" (or "") = all present.
    t.MISS = "nothing"
    # What a missing test modality becomes: "mask" (null token, excluded from fusion) or "zero" (DeMo's zero image).
    t.MISS_MODE = "mask"
    t.VIS_QUERIES = 4  # queries drawn in the top-10 retrieval figure
    # Evaluation in fp16/bf16 on a GPU (Ampere or newer): the CLIP tower's attention on the fixed-order Triton
    # kernels' forward pass, faster than cuDNN's at 129 tokens (modeling/layers/fixed_order_attention.py,
    # BENCHMARKS.md); False = torch's SDPA.
    t.TRITON_ATTENTION = True
    # Evaluation likewise, on Hopper or newer GPUs: the tower's MLP's first layer and QuickGELU as one Triton
    # kernel (modeling/layers/quick_gelu_linear.py; +5.5% end to end on an H100, BENCHMARKS.md); False = torch's.
    t.FUSED_MLP = True
