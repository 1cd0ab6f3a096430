"""Neuron matching for FedMA and PFNM (docs/algorithms.md sections 2-4).

* :func:`bbp_map` (bbp.py): BBP-MAP, PFNM's MAP solver that FedMA uses to match one layer's
  neurons across clients; returns a :class:`MatchResult`.
* atoms.py: views between a layer and its atoms, and the permutations FedMA applies to clients
  (next-layer input axis, LSTM recurrent tensors, slicing the global model back to a client).
"""

from fedsim.matching.atoms import (
    atom_prior_mean,
    atoms_to_layer,
    layer_atoms,
    n_units,
    outgoing_atoms,
    permute_next_input,
    permute_recurrent,
    permute_units,
    slice_to_client,
)
from fedsim.matching.bbp import MatchResult, bbp_map, score_matrix

__all__ = [
    "MatchResult",
    "atom_prior_mean",
    "atoms_to_layer",
    "bbp_map",
    "layer_atoms",
    "n_units",
    "outgoing_atoms",
    "permute_next_input",
    "permute_recurrent",
    "permute_units",
    "score_matrix",
    "slice_to_client",
]
