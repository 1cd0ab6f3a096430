"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; MIT licence) read from its IDX files, offline.

Where the files are looked for, in order:

1. ``data.data_dir`` when set: the four files, gzipped (``train-images-idx3-ubyte.gz``...) or
   not, directly in it or in torchvision's ``<data_dir>/FashionMNIST/raw/``; with
   ``data.download`` torchvision fetches them there first (needs the network).
2. Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), which
   ships the full 60,000/10,000 set in :data:`DEBIAN_DIR`. Its ``.gz`` files were recompressed,
   so torchvision's md5 check rejects them; fedsim parses the IDX format itself.

IDX (LeCun et al.'s MNIST format): a big-endian header, magic ``0x00000803`` (unsigned bytes,
3 dimensions: N, 28, 28) for images and ``0x00000801`` (1 dimension: N) for labels, then the
bytes. Every file's header, payload length and dimensions are checked, and the labels must lie
in 0..9 and be as many as the images.

Inputs are float32 ``(N, 1, 28, 28)``, ``(x / 255 - 0.2860) / 0.3530``: the mean and std of the
60,000 training images' pixels on the [0, 1] scale.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from fedsim.data.base import Split
from fedsim.errors import FedsimError

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Classes (0 T-shirt/top ... 9 ankle boot), input shape and normalisation.
NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)
MEAN, STD = 0.2860, 0.3530

#: Split -> (images file, labels file), without the ``.gz``.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_FIX = (
    "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), or set "
    "data.data_dir to a folder holding the four IDX files"
)


def _find(folder: Path, name: str) -> Path | None:
    for d in (folder, folder / "FashionMNIST" / "raw"):
        for f in (d / name, d / f"{name}.gz"):
            if f.is_file():
                return f
    return None


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """One IDX file (gzipped if its name ends in ``.gz``) as a uint8 array.

    Args:
        path: the file.
        magic: the expected magic number, 0x0801 (labels) or 0x0803 (images): unsigned bytes
            with ``dims`` dimensions.
        dims: number of dimensions the header declares.

    Returns:
        uint8 array of the header's shape.

    Raises:
        FedsimError: unreadable or corrupt gzip, a wrong magic number, or a payload whose length
            differs from the header's dimensions.
    """
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise FedsimError(f"could not read {path} ({type(err).__name__}: {err}); {_FIX}") from err
    head = 4 + 4 * dims
    if len(raw) < head or int.from_bytes(raw[:4], "big") != magic:
        got = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise FedsimError(f"{path} is not an IDX file of magic {magic:#010x} (starts {got}); {_FIX}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - head != int(np.prod(shape)):
        raise FedsimError(
            f"{path} declares shape {shape} ({int(np.prod(shape))} bytes) but holds {len(raw) - head}; "
            f"the file is truncated or corrupt: {_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def fashion_mnist_dir(data_dir: str | os.PathLike | None, download: bool = False) -> Path:
    """The folder to read (see the module docstring).

    Raises:
        FedsimError: the files are in neither place, or the download failed.
    """
    if data_dir is not None and str(data_dir) != "":
        root = Path(data_dir).expanduser()
        if download:
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(root), train=True, download=True)
                FashionMNIST(str(root), train=False, download=True)
            except Exception as err:  # torchvision raises many types for network errors
                raise FedsimError(
                    f"could not download Fashion-MNIST into {root} ({type(err).__name__}); check the "
                    f"network, or {_FIX} and set data.download=false"
                ) from err
        return root
    return DEBIAN_DIR


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[Split, Split]:
    """Train and test splits of Fashion-MNIST (tensor layout).

    Args:
        data_dir: folder holding the IDX files; None: Debian's :data:`DEBIAN_DIR`.
        download: fetch the files into ``data_dir`` with torchvision first.

    Returns:
        ``(train, test)``: ``x`` float32 ``(N, 1, 28, 28)`` normalised as the module docstring
        says, ``y`` int64 ``(N,)`` in 0..9 (the Debian package: 60,000 and 10,000).

    Raises:
        FedsimError: a file is missing, unreadable or corrupt (see :func:`read_idx`), images are
            not 28 x 28, labels not as many as images or outside 0..9.
    """
    folder = fashion_mnist_dir(data_dir, download)
    out = []
    for images_name, labels_name in FILES.values():
        paths = [_find(folder, images_name), _find(folder, labels_name)]
        missing = [n for n, p in zip((images_name, labels_name), paths, strict=True) if p is None]
        if missing:
            raise FedsimError(f"Fashion-MNIST file {missing[0]}(.gz) is not in {folder}; {_FIX}")
        images = read_idx(paths[0], 0x0803, 3)
        labels = read_idx(paths[1], 0x0801, 1).astype(np.int64)
        if images.shape[1:] != INPUT_SHAPE[1:]:
            raise FedsimError(f"{paths[0]} holds {images.shape[1:]} images, expected 28 x 28; {_FIX}")
        if labels.shape[0] != images.shape[0] or (labels.size and labels.max() >= NUM_CLASSES):
            raise FedsimError(
                f"{paths[1]} has {labels.shape[0]} labels (largest {labels.max() if labels.size else None}) "
                f"for {images.shape[0]} images; labels must be one per image in 0..9: {_FIX}"
            )
        x = images[:, None, :, :].astype(np.float32)
        x /= np.float32(255.0)
        x -= np.float32(MEAN)
        x /= np.float32(STD)
        out.append(Split(x=x, y=labels))
    return out[0], out[1]
