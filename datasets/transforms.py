"""Every image transform of the repository, built on ``torchvision.transforms.v2``.

* :class:`MultiModalTransform` - ReID: resize to 256 x 128 (train: bicubic; test: bicubic or
  bilinear), then (train) horizontal flip 0.5, pad 10 + random crop, normalise (CLIP mean/std by
  default) and random erasing 0.5. By default **one** random draw is applied to all modalities of a
  sample (the modalities are stacked into one ``(M, 3, H, W)`` tensor before the random ops, so flip,
  crop box and erased box are shared); ``per_modality`` draws for each modality on its own, as DeMo's
  ``make_dataloader`` does (Resize bicubic, RandomHorizontalFlip, Pad, RandomCrop, Normalize,
  pixel-mode RandomErasing after normalisation; its test Resize is bilinear).
* :func:`build_fewshot_transform` - few-shot: 84 x 84; train = resize, random crop with
  padding 8 (RFS / MetaOptNet) or random-resized crop, colour jitter 0.4, flip, normalise;
  test = resize + centre crop, normalise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from utils.modalities import MODALITIES

#: CLIP's normalisation (open_clip OPENAI_DATASET_MEAN / STD), the default for the ViT-B/16 ReID backbone.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: miniImageNet pixel statistics used by MetaOptNet / RFS / FEAT for few-shot backbones.
MINI_IMAGENET_MEAN: tuple[float, float, float] = (120.39586422 / 255.0, 115.59361427 / 255.0, 104.54012653 / 255.0)
MINI_IMAGENET_STD: tuple[float, float, float] = (70.68188272 / 255.0, 68.27635443 / 255.0, 72.54505529 / 255.0)


class MultiModalTransform:
    """Transform the modality images of one ReID sample, with one random draw for all of them
    (``per_modality=False``) or one per modality.

    Call with ``{modality: PIL image or None}``; returns ``(images, mask)`` where
    ``images[m]`` is a float tensor (3, H, W) for every modality of ``modalities`` (zeros for
    a missing one) and ``mask`` a bool tensor (M,) in ``modalities`` order. Images not of ``size``
    are resized with ``interpolation`` (``bicubic`` | ``bilinear``).
    """

    INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

    def __init__(
        self,
        size: Sequence[int] = (256, 128),
        *,
        train: bool = True,
        flip_prob: float = 0.5,
        padding: int = 10,
        re_prob: float = 0.5,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        modalities: Sequence[str] = MODALITIES,
        per_modality: bool = False,
        interpolation: str = "bicubic",
    ) -> None:
        if interpolation not in self.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(self.INTERPOLATIONS)}, got '{interpolation}'")
        self.size = (int(size[0]), int(size[1]))
        self.train = train
        self.modalities = tuple(modalities)
        self.per_modality = per_modality
        self.interpolation = interpolation
        ops: list[v2.Transform] = []
        if train:
            if flip_prob > 0:
                ops.append(v2.RandomHorizontalFlip(p=flip_prob))
            if padding > 0:
                ops += [v2.Pad(padding), v2.RandomCrop(self.size)]
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        if train and re_prob > 0:
            # DeMo: RandomErasing(probability, mode='pixel'): area 2%..1/3, aspect 0.3..1/0.3 (here ..3.3), N(0,1) pixels
            ops.append(v2.RandomErasing(p=re_prob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random"))
        self.ops = v2.Compose(ops)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), self.INTERPOLATIONS[self.interpolation])
        return TF.pil_to_tensor(img)

    def __call__(self, images: Mapping[str, Image.Image | None]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        mask = torch.tensor([images.get(m) is not None for m in self.modalities], dtype=torch.bool)
        if not bool(mask.any()):
            raise ValueError("a ReID sample needs at least one modality image")
        h, w = self.size
        stack = torch.zeros((len(self.modalities), 3, h, w), dtype=torch.uint8)
        for i, m in enumerate(self.modalities):
            img = images.get(m)
            if img is not None:
                stack[i] = self._to_tensor(img)
        if self.per_modality:  # each modality its own flip, crop box and erased box
            out = torch.stack([self.ops(tv_tensors.Image(x)).as_subclass(torch.Tensor) for x in stack])
        else:
            out = self.ops(tv_tensors.Image(stack)).as_subclass(torch.Tensor)
        out[~mask] = 0.0
        return {m: out[i] for i, m in enumerate(self.modalities)}, mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, train={self.train}, per_modality={self.per_modality}, "
                f"interpolation={self.interpolation}, ops={self.ops})")


def build_reid_transform(
    size: Sequence[int] = (256, 128),
    *,
    train: bool = True,
    flip_prob: float = 0.5,
    padding: int = 10,
    re_prob: float = 0.5,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    per_modality: bool = False,
    interpolation: str = "bicubic",
) -> MultiModalTransform:
    """ReID train (``train=True``) or test transform; keys ``INPUT.SIZE_TRAIN/SIZE_TEST``,
    ``INPUT.PROB``, ``INPUT.PADDING``, ``INPUT.RE_PROB``, ``INPUT.PIXEL_MEAN/STD``,
    ``INPUT.AUGMENT_PER_MODALITY`` (train), ``INPUT.TEST_INTERPOLATION`` (test)."""
    return MultiModalTransform(size, train=train, flip_prob=flip_prob, padding=padding, re_prob=re_prob,
                               mean=mean, std=std, per_modality=per_modality, interpolation=interpolation)


def build_fewshot_transform(
    size: int = 84,
    *,
    train: bool = True,
    augmentation: str = "pad_crop",
    padding: int = 8,
    jitter: float = 0.4,
    flip_prob: float = 0.5,
    resize_ratio: float = 1.0,
    mean: Sequence[float] = MINI_IMAGENET_MEAN,
    std: Sequence[float] = MINI_IMAGENET_STD,
) -> v2.Compose:
    """Few-shot transform: PIL image -> float tensor (3, size, size).

    Args:
        augmentation: ``'pad_crop'`` (resize to size x size, random crop with ``padding``; RFS,
            MetaOptNet) or ``'random_resized_crop'`` (CloserLook, FEAT).
        resize_ratio: test-time resize of the shorter side to ``round(size * resize_ratio)``
            before the centre crop (1.0: plain resize; FEAT and CloserLook use about 1.15).
    """
    ops: list[v2.Transform] = [v2.ToImage()]
    if train:
        if augmentation == "pad_crop":
            ops += [v2.Resize((size, size), antialias=True), v2.RandomCrop(size, padding=padding)]
        elif augmentation == "random_resized_crop":
            ops += [v2.RandomResizedCrop(size, antialias=True)]
        else:
            raise ValueError(f"unknown few-shot augmentation '{augmentation}' (pad_crop, random_resized_crop)")
        if jitter > 0:
            ops.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        if flip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(p=flip_prob))
    else:
        ops += [
            v2.Resize(int(round(size * resize_ratio)), interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)
