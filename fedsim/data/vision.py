"""MNIST, CIFAR-10 and CIFAR-100 read through ``torchvision.datasets``.

Files live in ``data_dir`` in torchvision's on-disk layout:

* MNIST: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
* CIFAR-10: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
* CIFAR-100: ``<data_dir>/cifar-100-python/{train, test, meta}``

With ``download=True`` torchvision fetches the archives into ``data_dir`` and checks each archive's
md5 on download. When reading an existing copy, torchvision's CIFAR classes also check the md5 of
every extracted batch file; fedsim's subclasses only require those files to exist (so small
fixtures in the same format can be read), and instead check the decoded arrays' shapes and labels.
Any unreadable, truncated or malformed file becomes a :class:`~fedsim.errors.FedsimError` naming the
folder and the fix.

Inputs are float32 NCHW, ``(x / 255 - mean_c) / std_c`` per channel c. MNIST: mean 0.1307, std
0.3081. CIFAR-10: mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255, the FedMA values
(docs/algorithms.md section 7). CIFAR-100 uses the CIFAR-10 values too (FedMA has no CIFAR-100 setting).
CIFAR datasets carry ``augment="cifar"``: the worker applies reflect-pad-4 random crop + flip.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.data.base import Split
from fedsim.errors import FedsimError


@dataclass(frozen=True)
class VisionInfo:
    """Static facts of one torchvision dataset.

    Attributes:
        num_classes: K.
        input_shape: (C, H, W).
        mean, std: per-channel normalisation on the [0, 1] pixel scale.
        augment: ``"cifar"`` or None.
        folder: the dataset's sub-folder of ``data_dir`` in torchvision's layout.
        files: files that must exist in ``folder`` to read the dataset without downloading.
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str | None
    folder: str
    files: tuple[str, ...]


_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

VISION: dict[str, VisionInfo] = {
    "mnist": VisionInfo(
        10,
        (1, 28, 28),
        (0.1307,),
        (0.3081,),
        None,
        os.path.join("MNIST", "raw"),
        (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ),
    ),
    "cifar10": VisionInfo(
        10,
        (3, 32, 32),
        _CIFAR_MEAN,
        _CIFAR_STD,
        "cifar",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
    ),
    "cifar100": VisionInfo(
        100,
        (3, 32, 32),
        _CIFAR_MEAN,
        _CIFAR_STD,
        "cifar",
        "cifar-100-python",
        ("train", "test", "meta"),
    ),
}


def _cifar_classes():
    """torchvision's CIFAR classes with the per-file md5 check replaced by an existence check."""
    from torchvision.datasets import CIFAR10, CIFAR100

    class _Present:
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            names = [f for f, _ in self.train_list + self.test_list]
            return all(os.path.isfile(os.path.join(folder, f)) for f in names)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    class PresentCIFAR10(_Present, CIFAR10):
        """CIFAR-10 that requires its batch files to exist, not to match torchvision's md5."""

    class PresentCIFAR100(_Present, CIFAR100):
        """CIFAR-100 that requires its files to exist, not to match torchvision's md5."""

    return {"cifar10": PresentCIFAR10, "cifar100": PresentCIFAR100}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_dir(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise FedsimError(
            f"{name} needs its files but data.data_dir is not set; pass data.data_dir=<folder> "
            "holding them (torchvision layout) or set data.download=true"
        )
    root = Path(data_dir).expanduser()
    if download:
        return root
    if not root.is_dir():
        raise FedsimError(
            f"data.data_dir {root} does not exist; pass data.data_dir=<folder> holding {name} "
            "(torchvision layout) or set data.download=true"
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise FedsimError(
            f"data.data_dir {root} is not readable; fix its permissions or pass another data.data_dir"
        )
    info = VISION[name]
    for f in info.files:
        path = root / info.folder / f
        if not path.is_file():
            raise FedsimError(
                f"{name} file {path} is missing; pass a data.data_dir holding {name} in "
                "torchvision's layout or set data.download=true"
            )
    return root


def _normalise(images: np.ndarray, info: VisionInfo) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` -> float32 ``(N, C, H, W)`` standardised per channel."""
    x = images.astype(np.float32)
    x /= np.float32(255.0)
    mean = np.asarray(info.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(info.std, dtype=np.float32)[None, :, None, None]
    x -= mean
    x /= std
    return x


def _read(name: str, root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 ``(N, C, H, W)`` images and int64 ``(N,)`` labels of one split."""
    if name == "mnist":
        from torchvision.datasets import MNIST

        ds = MNIST(str(root), train=train, download=download)
        images = np.asarray(ds.data.numpy(), dtype=np.uint8)
        if images.ndim == 3:
            images = images[:, None, :, :]
        labels = np.asarray(ds.targets.numpy(), dtype=np.int64)
    else:
        ds = _cifar_classes()[name](str(root), train=train, download=download)
        images = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        labels = np.asarray(ds.targets, dtype=np.int64)
    return images, labels


def load_vision(name: str, data_dir: str | os.PathLike | None, download: bool = False) -> tuple[Split, Split]:
    """Train and test splits of ``mnist``, ``cifar10`` or ``cifar100`` (tensor layout).

    Args:
        name: a key of :data:`VISION`.
        data_dir: folder holding the dataset in torchvision's layout (see the module docstring),
            or where to download it.
        download: fetch the archives with torchvision (md5-checked) if they are not there yet.

    Returns:
        ``(train, test)``: ``x`` float32 ``(N, C, H, W)`` normalised per channel, ``y`` int64
        ``(N,)`` in ``[0, num_classes)``.

    Raises:
        FedsimError: unknown name, data_dir unset, missing or unreadable; a required file missing;
            a file truncated, corrupt or of the wrong shape; the download failed.
    """
    if name not in VISION:
        raise FedsimError(f"unknown vision dataset {name!r}; use one of {', '.join(VISION)}")
    info = VISION[name]
    root = _check_dir(name, data_dir, download)
    folder = root / info.folder
    splits = []
    for train in (True, False):
        try:
            images, labels = _read(name, root, train, download)
        except FedsimError:
            raise
        except Exception as err:  # torchvision raises many types for bad files; report all alike
            if download:
                raise FedsimError(
                    f"could not download or read {name} into {folder} ({_one_line(err)}); "
                    f"check the network connection, or copy intact files into {folder} "
                    "and set data.download=false"
                ) from err
            raise FedsimError(
                f"could not read {name} in {folder} ({_one_line(err)}); the files are truncated or "
                f"corrupt: delete {folder} and set data.download=true, or copy intact files"
            ) from err
        _check_arrays(name, folder, images, labels, info)
        splits.append(Split(x=_normalise(images, info), y=labels))
    return splits[0], splits[1]


def _check_arrays(name: str, folder: Path, images: np.ndarray, labels: np.ndarray, info: VisionInfo) -> None:
    fix = f"delete {folder} and set data.download=true, or copy intact files"
    if images.shape[1:] != info.input_shape:
        raise FedsimError(
            f"{name} images in {folder} have shape {images.shape[1:]}, expected {info.input_shape}; {fix}"
        )
    if labels.shape != (images.shape[0],):
        raise FedsimError(
            f"{name} in {folder} has {labels.shape[0]} labels for {images.shape[0]} images; {fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise FedsimError(f"{name} labels in {folder} lie outside [0, {info.num_classes}); {fix}")
