"""Reading images named by a file path or by a *virtual path* into an in-memory array.

Every sample in this package names its image by a string so that dataset lists stay
plain ``(path, label)`` / ``(paths, pid, camid, trackid)`` tuples. Three forms exist:

* ``/data/RGBNT201/test/RGB/000171_cam1_0_00.jpg`` - an ordinary image file;
* ``/data/RGBNT100/rgbir/query/0001_c003_00031.jpg#crop=256,0,512,128`` - a box
  ``(left, upper, right, lower)`` of a file: RGBNT100 stores the three modalities side by
  side in one image and the public loader crops them (see ``datasets/rgbnt100.py``);
* ``pkl:///data/mini/mini-imagenet-cache-train.pkl#17`` - row 17 of an image array kept in
  a pickle/npz release (few-shot benchmarks). The array lives in an :class:`ArrayStore`
  owned by the dataset object; it is loaded once and shared with DataLoader workers by fork.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from utils.errors import UserError

ARRAY_SCHEME = "pkl://"
CROP_TAG = "#crop="


class ImageReadError(UserError, OSError):
    """An image file is missing, truncated or not an image; the message names the file."""


def make_array_ref(file: str, index: int) -> str:
    """Virtual path of row ``index`` of the image array stored in ``file``."""
    return f"{ARRAY_SCHEME}{file}#{int(index)}"


def parse_array_ref(path: str) -> tuple[str, int] | None:
    """``(file, index)`` for a ``pkl://file#index`` path, ``None`` for anything else."""
    if not path.startswith(ARRAY_SCHEME):
        return None
    file, _, index = path[len(ARRAY_SCHEME):].rpartition("#")
    return file, int(index)


def make_crop_ref(file: str, box: Sequence[int]) -> str:
    """Virtual path of the box ``(left, upper, right, lower)`` of an image file."""
    return f"{file}{CROP_TAG}{','.join(str(int(v)) for v in box)}"


def parse_crop_ref(path: str) -> tuple[str, tuple[int, int, int, int] | None]:
    """Split ``file#crop=l,u,r,b`` into the file and the box (``None`` when uncropped)."""
    file, tag, box = path.rpartition(CROP_TAG)
    if not tag:
        return path, None
    left, upper, right, lower = (int(v) for v in box.split(","))
    return file, (left, upper, right, lower)


def physical_file(path: str) -> str:
    """The file on disk behind a path of any of the three forms."""
    ref = parse_array_ref(path)
    if ref is not None:
        return ref[0]
    return parse_crop_ref(path)[0]


def load_pickle(file: str) -> Any:
    """Unpickle ``file``; retries with latin1 for the Python-2 pickles of the few-shot releases."""
    try:
        with open(file, "rb") as fh:
            return pickle.load(fh)
    except UnicodeDecodeError:
        with open(file, "rb") as fh:
            return pickle.load(fh, encoding="latin1")


class ArrayStore:
    """Image arrays of pickle/npz releases, keyed by file path, loaded on first use.

    ``loaders[file]`` is a zero-argument callable returning a sequence of images, each an
    ``(H, W, 3)`` uint8 array or encoded PNG/JPEG bytes. Dataset classes register loaders
    (and usually prime them, having parsed the file anyway); readers call :meth:`image`.
    """

    def __init__(self) -> None:
        self._loaders: dict[str, Callable[[], Sequence[Any]]] = {}
        self._arrays: dict[str, Sequence[Any]] = {}

    def register(self, file: str, loader: Callable[[], Sequence[Any]], data: Sequence[Any] | None = None) -> None:
        """Register how to load ``file``'s images; ``data`` primes the cache when already loaded."""
        self._loaders[file] = loader
        if data is not None:
            self._arrays[file] = data

    def __contains__(self, file: object) -> bool:
        return file in self._loaders

    def __len__(self) -> int:
        return len(self._loaders)

    def get(self, file: str) -> Sequence[Any]:
        """The image sequence of ``file`` (loaded now if needed)."""
        if file not in self._arrays:
            if file not in self._loaders:
                raise ImageReadError(f"{file}: no array loader registered for this pickle/npz file")
            self._arrays[file] = self._loaders[file]()
        return self._arrays[file]

    def image(self, file: str, index: int) -> Image.Image:
        """Row ``index`` of ``file`` as an RGB PIL image."""
        data = self.get(file)
        if not 0 <= index < len(data):
            raise ImageReadError(f"{make_array_ref(file, index)}: index out of range (file holds {len(data)} images)")
        item = data[index]
        if isinstance(item, bytes | bytearray | np.bytes_) or (
            isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype == np.uint8
        ):
            return Image.open(io.BytesIO(bytes(item))).convert("RGB")
        arr = np.asarray(item)
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        elif arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:  # CHW stored
            arr = arr.transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def read_image(path: str, arrays: ArrayStore | None = None) -> Image.Image:
    """Decode ``path`` (any of the three forms) into an RGB PIL image.

    Raises :class:`ImageReadError` naming the file when it is missing, truncated or not
    an image (PIL's ``LOAD_TRUNCATED_IMAGES`` is left off on purpose: a broken file is
    reported, never silently half-read).
    """
    try:
        ref = parse_array_ref(path)
        if ref is not None:
            if arrays is None:
                raise ImageReadError(f"{path}: array reference but no ArrayStore was given")
            return arrays.image(*ref)
        file, box = parse_crop_ref(path)
        if not os.path.isfile(file):
            raise ImageReadError(f"{file}: image file does not exist")
        with Image.open(file) as img:
            img = img.convert("RGB")  # forces a full decode inside the try
        return img.crop(box) if box is not None else img
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, pickle.UnpicklingError) as exc:
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
