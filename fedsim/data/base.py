"""Array containers shared by every dataset: one split, and the federated view of a dataset.

Everything here is plain numpy so the driver can ``ray.put`` it once per node and workers read it
zero-copy (docs/design.md decision 3). Inputs are built on demand with :meth:`Split.inputs`, which lets a
character-window dataset such as Shakespeare store its text once instead of one 80-character copy
per example.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    """One split (train or test) of a dataset.

    Two layouts:

    * tensor layout (``text is None``): ``x`` is ``(N, *input_shape)``; float32 for images, already
      normalised, channel-first (N, C, H, W).
    * window layout (``text`` set): ``text`` is the ``(T,)`` uint8 symbol ids of the whole corpus,
      ``x`` is the ``(N,)`` int64 start offsets, and example i is ``text[x[i] : x[i] + seq_len]``.

    ``y`` is always ``(N,)`` int64 class (or next-symbol) labels.
    """

    x: np.ndarray
    y: np.ndarray
    text: np.ndarray | None = None
    seq_len: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(self, idx: np.ndarray) -> np.ndarray:
        """Inputs of the examples ``idx`` ((B,) int64): ``(B, *input_shape)`` float32, or
        ``(B, seq_len)`` int64 symbol ids in the window layout."""
        if self.text is None:
            return self.x[idx]
        starts = self.x[idx]
        return self.text[starts[:, None] + np.arange(self.seq_len)].astype(np.int64)


@dataclass(frozen=True)
class FederatedDataset:
    """A dataset split across clients.

    Attributes:
        name: dataset name as in ``data.dataset``.
        train, test: the splits; ``test`` is the global test set the server evaluates on.
        num_classes: number of classes (Shakespeare: the 80-symbol vocabulary).
        input_shape: shape of one example's input, e.g. ``(1, 8, 8)`` for digits or ``(80,)``.
        client_indices: J arrays of int64 indices into ``train``, one per client, disjoint.
        class_counts: ``(J, num_classes)`` int64, examples of each class held by each client.
        augment: ``"cifar"`` for reflect-pad-4 random crop + horizontal flip on the worker, else None.
        client_names: optional human-readable client names (Shakespeare: "PLAY/ROLE").
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    client_indices: list[np.ndarray]
    class_counts: np.ndarray
    augment: str | None = None
    client_names: list[str] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)
