"""Hugging Face datasets (``data.dataset: hf``) through the ``datasets`` library.

``data.path`` is read by ``datasets``:

* an existing directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``:
  ``datasets.load_from_disk`` (memory-mapped Arrow files);
* any other existing directory: ``datasets.load_dataset("parquet", data_dir=path)``, which names
  the splits after the files (``train-00000-of-00001.parquet``, ``test/...``), the layout of a
  Hub dataset's Parquet export;
* otherwise a Hub name such as ``flwrlabs/femnist``: ``datasets.load_dataset(path)``, which
  downloads once into the Hugging Face cache (``HF_HOME``) and reads the cache afterwards.

Images (``data.image_column``: an ``Image`` feature, or PNG/JPEG bytes) are decoded by
``datasets`` (numpy format) and become float32 ``(N, C, H, W)``, ``C`` 1 for greyscale and 3 for
RGB, scaled to ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5`` in every channel. Labels
(``data.label_column``) must be integers (a ``ClassLabel`` or an integer ``Value``); K is the
``ClassLabel``'s number of names, else the largest label + 1. ``data.partition_by`` names the
natural-id column of ``partition: natural`` (FEMNIST ``writer_id``). Without ``data.test_split``
each client keeps ``data.train_fraction`` of its examples for training and the rest is the test
set, as LEAF does.

Text (``data.text_column``, e.g. flwrlabs/shakespeare's ``x``: 80-character windows, with the next
character in ``y``) is tokenised per character with LEAF's 80-symbol vocabulary
(:func:`tokenise`), so the ``char_lstm`` model reads it as it reads ``dataset: shakespeare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.registry import DataArrays
from fedsim.errors import FedsimError

#: Image columns tried, in order, when ``data.image_column`` is null.
IMAGE_COLUMNS = ("image", "img")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def open_dataset(path: str) -> Any:
    """The ``datasets.Dataset`` or ``DatasetDict`` at ``path`` (see the module docstring).

    Raises:
        FedsimError: a local path that does not exist, or a Hub dataset that cannot be loaded
            (offline, misspelt): one line saying how to get it.
    """
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_dir():
            if any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
                return datasets.load_from_disk(str(local))
            return datasets.load_dataset("parquet", data_dir=str(local))
        if path.startswith((".", "/", "~")) or local.exists():
            raise FedsimError(
                f"data.path {path} is not a directory; pass a save_to_disk or Parquet directory, or a "
                "Hub name such as flwrlabs/femnist"
            )
        return datasets.load_dataset(path)
    except FedsimError:
        raise
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError...)
        if local.is_dir():
            raise FedsimError(
                f"could not read data.path {path} as a save_to_disk or Parquet directory "
                f"({_one_line(err)}); point it at one"
            ) from None
        raise FedsimError(
            f"could not load Hugging Face dataset {path!r} ({_one_line(err)}); on a machine with the "
            f"network run: python -c \"import datasets; datasets.load_dataset('{path}')"
            ".save_to_disk('DIR')\" and set data.path: DIR"
        ) from None


def _split(ds: Any, name: str, key: str, path: str) -> Any:
    import datasets

    if isinstance(ds, datasets.Dataset):
        if name != "train":
            raise FedsimError(
                f"data.{key}={name!r} but {path} holds a single split; set data.{key}: "
                f"{'train' if key == 'train_split' else 'null'}"
            )
        return ds
    if name not in ds:
        raise FedsimError(
            f"data.{key}={name!r} is not a split of {path} (splits: {', '.join(ds)}); use one of them"
        )
    return ds[name]


def _column(split: Any, column: str, key: str, path: str) -> None:
    if column not in split.column_names:
        raise FedsimError(
            f"data.{key}={column!r} is not a column of {path} (columns: {', '.join(split.column_names)}); "
            "use one of them"
        )


def _array(split: Any, column: str) -> np.ndarray:
    """One column as a numpy array (``datasets``' numpy format; images decoded)."""
    return split.select_columns([column]).with_format("numpy")[:][column]


def _images(split: Any, column: str) -> np.ndarray:
    """``(N, C, H, W)`` float32 in [-1, 1] from an image column."""
    import datasets

    if not isinstance(split.features[column], datasets.Image):
        split = split.cast_column(column, datasets.Image())
    try:
        pixels = _array(split, column)
    except Exception as err:  # undecodable bytes
        raise FedsimError(
            f"could not decode the images of data.image_column={column!r} ({_one_line(err)}); "
            "point it at an image column"
        ) from None
    if pixels.dtype == object or pixels.ndim not in (3, 4):
        raise FedsimError(
            f"the images of data.image_column={column!r} differ in size or mode; fedsim needs one "
            "shape for all (resize them with datasets' map first)"
        )
    x = pixels[:, None, :, :] if pixels.ndim == 3 else np.moveaxis(pixels, -1, 1)  # (N, C, H, W)
    x = x.astype(np.float32)
    x /= np.float32(255.0)
    x -= np.float32(0.5)
    x /= np.float32(0.5)
    return np.ascontiguousarray(x)


def tokenise(texts: list[str]) -> np.ndarray:
    """Character tokens of equal-length strings with LEAF's 80-symbol Shakespeare vocabulary.

    Each character becomes one symbol id (:data:`fedsim.data.shakespeare.VOCAB`); a character
    outside the vocabulary becomes the first symbol of
    :func:`fedsim.data.shakespeare.map_char`'s replacement (``é`` -> ``e``), or a space.

    Args:
        texts: N strings of one length L.

    Returns:
        ``(N, L)`` uint8 symbol ids in [0, 80).

    Raises:
        FedsimError: the strings differ in length.
    """
    from fedsim.data.shakespeare import VOCAB, encode, map_char

    lengths = {len(t) for t in texts}
    if len(lengths) > 1:
        raise FedsimError(
            f"the text column's strings have {len(lengths)} different lengths ({min(lengths)} to "
            f"{max(lengths)}); fedsim needs fixed-length windows such as LEAF's 80 characters"
        )
    joined = "".join(texts)
    outside = set(joined) - set(VOCAB)
    if outside:
        joined = joined.translate(str.maketrans({c: (map_char(c)[:1] or " ") for c in outside}))
    return encode(joined).reshape(len(texts), lengths.pop() if lengths else 0)


def _labels(split: Any, column: str, text: bool = False) -> np.ndarray:
    import datasets

    feature = split.features[column]
    if text and isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        chars = [str(c) for c in _array(split, column)]
        if any(len(c) != 1 for c in chars):
            raise FedsimError(
                f"data.label_column={column!r} holds strings that are not single characters; the "
                "next-character labels of a text dataset must be one character each"
            )
        return tokenise(chars)[:, 0].astype(np.int64)
    ok = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and ("int" in feature.dtype or feature.dtype == "bool")
    )
    if not ok:
        raise FedsimError(
            f"data.label_column={column!r} holds {feature}, not integer class labels; point it at an "
            "integer (or ClassLabel) column"
        )
    return _array(split, column).astype(np.int64)


def load_hf(data: Any) -> DataArrays:
    """A Hugging Face image dataset as :class:`~fedsim.data.registry.DataArrays`.

    Args:
        data: the ``data:`` section (:class:`fedsim.config.DataConfig`): ``path``,
            ``train_split``, ``test_split``, ``image_column``, ``label_column``, ``partition_by``.

    Returns:
        float32 ``(N, C, H, W)`` images in [-1, 1], int64 labels, the ``partition_by`` column as
        natural ids (None if unset), K from the ``ClassLabel`` if there is one.

    Raises:
        FedsimError: the dataset cannot be loaded, a split or column does not exist, labels are
            not integers, images cannot be decoded or differ in shape.
    """
    import datasets

    path = str(data.path)
    ds = open_dataset(path)
    train = _split(ds, data.train_split, "train_split", path)
    test = None if data.test_split is None else _split(ds, data.test_split, "test_split", path)
    if data.text_column is not None:
        return _load_text(data, train, test, path)
    column = data.image_column
    if column is None:
        column = next((c for c in IMAGE_COLUMNS if c in train.column_names), None)
        if column is None:
            raise FedsimError(
                f"{path} has no 'image' or 'img' column (columns: {', '.join(train.column_names)}); "
                "set data.image_column"
            )
    _columns(train, test, column, "image_column", data, path)
    feature = train.features[data.label_column]
    k = feature.num_classes if isinstance(feature, datasets.ClassLabel) else None
    return DataArrays(
        x_train=_images(train, column),
        y_train=_labels(train, data.label_column),
        x_test=None if test is None else _images(test, column),
        y_test=None if test is None else _labels(test, data.label_column),
        client_ids=_ids(train, data, path),
        num_classes=k,
    )


def _columns(train: Any, test: Any, column: str, key: str, data: Any, path: str) -> None:
    for split in (train,) if test is None else (train, test):
        _column(split, column, key, path)
        _column(split, data.label_column, "label_column", path)


def _ids(train: Any, data: Any, path: str) -> np.ndarray | None:
    if data.partition_by is None or data.partition not in ("natural", "grouped_natural"):
        return None
    _column(train, data.partition_by, "partition_by", path)
    return _array(train, data.partition_by)


def _load_text(data: Any, train: Any, test: Any, path: str) -> DataArrays:
    """A text dataset: ``(N, L)`` uint8 character tokens (:func:`tokenise`), which
    :func:`fedsim.data.registry.to_splits` stores in the window layout; labels are integers or
    single characters (tokenised the same way); K is the vocabulary's 80."""
    from fedsim.data.shakespeare import NUM_CLASSES

    _columns(train, test, data.text_column, "text_column", data, path)

    def tokens(split: Any) -> np.ndarray:
        return tokenise([str(t) for t in _array(split, data.text_column)])

    return DataArrays(
        x_train=tokens(train),
        y_train=_labels(train, data.label_column, text=True),
        x_test=None if test is None else tokens(test),
        y_test=None if test is None else _labels(test, data.label_column, text=True),
        client_ids=_ids(train, data, path),
        num_classes=NUM_CLASSES,
    )
