"""A cost model of secure aggregation: what it does to the updates, and the bytes it adds.

No cryptography runs and nothing is claimed about security. Two things are simulated:

**The arithmetic.** Secure aggregation sums integer vectors modulo 2^R. Each client clips every
coordinate of its update (the delta of each floating tensor from the broadcast, as under a codec)
to [-clip, clip] and rounds it stochastically (unbiased within the range) to one of 2^b evenly
spaced fixed-point values; with n clients the sum needs R = b + ceil(log2 n) bits to never wrap
(Bonawitz et al., CCS 2017, section 3; Bell et al., CCS 2020). The server sees the dequantised
updates; their aggregation is the algorithm's own (a deployment would have each client pre-scale
by its weight, which this model leaves out). Coordinates clipped are counted per client
(``secagg_clipped``); integer tensors (BatchNorm's counter) travel as they are and count as
overflows (``secagg_overflow``) where they do not fit in b bits.

**The bytes**, per client and round, from this wire format: public keys are X25519, 32 bytes
raw; client ids are uint32 (4 bytes); a Shamir share is one element of a 256-bit prime field
(32 bytes); every encrypted share is AES-256-GCM (12-byte nonce + 16-byte tag = 28 bytes of
overhead). With N neighbours (N = n - 1 for ``secagg``, Bonawitz et al. 2017; N = min(k, n - 1)
for ``secagg_plus`` on a k-regular neighbour graph, Bell et al. 2020), the four stages of the
semi-honest protocol cost:

==========================  ======================================  =================================
stage                       client -> server                        server -> client
==========================  ======================================  =================================
0 advertise keys            2 keys: 64                              N x (id + 2 keys) = 68 N
1 share keys                N x AEAD(2 ids + 2 shares) = 100 N      the N ciphertexts for it: 100 N
2 masked input              sum over tensors ceil(d R / 8)          the survivors' ids: 4 N
3 unmasking                 N x (id + share) = 36 N                 -
==========================  ======================================  =================================

so the protocol adds 64 + 136 N bytes up and 172 N bytes down (``bytes_secagg`` = their sum), and
the masked vector replaces the upload (``bytes_up`` = masked vector + 64 + 136 N). A neighbour
that drops out before stage 2 changes which share a client sends for it in stage 3 (its mask key
instead of its self-mask seed), not how many: every surviving client sends one share per
neighbour either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

KEY_BYTES = 32  # an X25519 public key, raw
ID_BYTES = 4  # a client id, uint32
SHARE_BYTES = 32  # a Shamir share: one element of a 256-bit prime field
AEAD_BYTES = 28  # AES-256-GCM: 12-byte nonce + 16-byte tag


def ring_bits(bits: int, n: int) -> int:
    """R = b + ceil(log2 n): bits per coordinate of the masked vector, so that the sum of n
    b-bit values cannot wrap (Bonawitz et al. 2017, section 3)."""
    return bits + (math.ceil(math.log2(n)) if n > 1 else 0)


def neighbours(protocol: str, k: int | None, n: int) -> int:
    """N, the clients each client shares keys with: n - 1 (secagg) or min(k, n - 1) (secagg_plus)."""
    return n - 1 if protocol == "secagg" else min(int(k or 0), n - 1)


def protocol_bytes(protocol: str, k: int | None, n: int) -> tuple[int, int]:
    """(up, down): bytes one client sends and receives in the protocol's messages besides its
    masked vector, in a cohort of n (see the module docstring's table): 64 + 136 N up, 172 N down."""
    m = neighbours(protocol, k, n)
    cipher = AEAD_BYTES + 2 * ID_BYTES + 2 * SHARE_BYTES
    up = 2 * KEY_BYTES + m * cipher + m * (ID_BYTES + SHARE_BYTES)
    down = m * (ID_BYTES + 2 * KEY_BYTES) + m * cipher + m * ID_BYTES
    return up, down


def masked_bytes(tensors: Mapping[str, Any], ring: int) -> int:
    """Bytes of the masked vectors of ``tensors`` (name -> array or tensor; shapes only): each
    tensor's d coordinates at ``ring`` bits, padded to a whole byte, sum over tensors ceil(d R / 8)."""
    return sum(-(-math.prod(tuple(v.shape)) * ring // 8) for v in tensors.values())


def clip_quantize(x: np.ndarray, clip: float, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``x`` clipped to [-clip, clip] and rounded stochastically to the 2^b fixed-point values
    -clip + i 2 clip / (2^b - 1), i = 0..2^b - 1 (unbiased for values inside the range).

    Returns:
        (the dequantised values, float32 of ``x``'s shape; how many coordinates were clipped).
    """
    x = np.asarray(x, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(x) > clip))
    top = (1 << bits) - 1
    pos = (np.clip(x, -clip, clip) + clip) / (2 * clip) * top
    q = np.clip(np.floor(pos + rng.random(x.shape)), 0, top)
    return (q * (2 * clip / top) - clip).astype(np.float32), clipped


def fixed_point_upload(
    upload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip: float, bits: int, rng
) -> tuple[dict[str, np.ndarray], int, int]:
    """The upload as the server learns it through the protocol: each floating tensor's delta from
    ``reference`` clipped and quantised (:func:`clip_quantize`) and added back; other tensors as
    they are. Returns (that upload, coordinates clipped, integer coordinates outside [0, 2^b))."""
    out, clipped, overflow = {}, 0, 0
    for name, value in upload.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
            overflow += int(np.count_nonzero((value < 0) | (value >= (1 << bits))))
            continue
        ref = reference.get(name)
        base = np.zeros(value.shape, np.float32) if ref is None else np.asarray(ref, np.float32)
        delta, n = clip_quantize(value.astype(np.float32) - base, clip, bits, rng)
        out[name] = (base + delta).astype(value.dtype)
        clipped += n
    return out, clipped, overflow


#: algorithms secure aggregation cannot serve, and why (the config check's one-line message)
REFUSED: dict[str, str] = {
    "fedma": "FedMA's matching needs each client's neurons, and secure aggregation reveals only their sum",
    "pfnm": "PFNM's matching needs each client's neurons, and secure aggregation reveals only their sum",
    "fedmedian": "a coordinate-wise median needs each client's values, and secure aggregation reveals only their sum",
    "ensemble": "the ensemble keeps every client's model, and secure aggregation reveals only their sum",
    "local": "the local models are kept one by one, and secure aggregation reveals only their sum",
    "entire_data": "entire_data trains on pooled data and sends nothing over a wire",
}
