"""Codecs: what one tensor becomes on the wire, as bytes, and how those bytes are read back.

Each codec is a small pair, :meth:`Codec.encode` (a float32 array to ``bytes``) and
:meth:`Codec.decode` (those bytes to a float32 array of the original shape), plus
:meth:`Codec.size`, the length of the encoding as a function of the tensor's shape alone, which
is what the dry run projects. The engine counts ``len(encoded)``, so the logged bytes cannot
drift from the formula (the contract test in tests/wire checks ``len(encode(x)) == size(shape)``
for every registered codec).

Every message starts with the same header: the codec's code (1 byte), the tensor's number of
dimensions (1 byte) and each dimension as a little-endian uint32, H = 2 + 4 ndim bytes. Below,
d is the tensor's number of elements. Values narrower than a byte are packed most significant
bit first with :func:`numpy.packbits`. Stochastic codecs draw from the generator they are given
(the engine's (seed, "codec", round, client) stream, :mod:`fedsim.rng`).

=========  ======================================================  ===========  =========
codec      bytes                                                   unbiased     biased
=========  ======================================================  ===========  =========
raw        H + 1 + d x itemsize (any dtype; lossless)              exact        no
fp16       H + 2d                                                  -            cast
bf16       H + 2d                                                  -            cast
quantize   H + 8 + ceil(d b / 8)                                   yes          no
qsgd       H + 4 + ceil(d (1 + ceil(log2(s + 1))) / 8)             yes          no
(rotated)  the same with d' for d, plus an 8-byte seed             yes          no
topk       H + 1 + 4k + min(ceil(d / 8), ceil(k w / 8))            -            yes
randk      H + 8 + 4k                                              yes          no
sign       H + 4 + ceil(d / 8)                                     -            yes
powersgd   H + 4 r' (n + m) for an n x m matrix, H + 4d otherwise  -            yes
=========  ======================================================  ===========  =========

with k = ceil(f d) for a fraction f, w = max(1, ceil(log2 d)), r' = min(r, n, m) and, for
quantize and qsgd with ``rotation``, d' = 2^ceil(log2 d). Error
feedback (:mod:`fedsim.wire.transport`) applies to the biased codecs.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any, ClassVar

import numpy as np

#: dtypes the lossless ``raw`` codec carries, by their 1-byte code
RAW_DTYPES = ("<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1")

CODECS: dict[str, type[Codec]] = {}
"""Codec name -> class, for every registered codec (``raw`` included)."""


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add ``cls`` to :data:`CODECS` under ``cls.name``.

    Raises:
        ValueError: the name or the code is taken.
    """
    if cls.name in CODECS or any(c.code == cls.code for c in CODECS.values()):
        raise ValueError(f"codec {cls.name!r} (code {cls.code}) is registered twice")
    CODECS[cls.name] = cls
    return cls


# ---------------------------------------------------------------------------- bit packing


def _group_shifts(width: int) -> np.ndarray:
    """Bit offsets of eight ``width``-bit values in a uint64, the first value most significant."""
    return np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(width)


def pack_uint(q: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers below 2**width (1 <= width <= 32), each as ``width`` bits, most
    significant first, into ceil(len(q) width / 8) bytes (numpy's packbits order; for width 8 and 16
    the same bytes as uint8 / big-endian uint16). Widths 2..7 pack eight values at a time into
    the low ``width`` bytes of a big-endian uint64, the same bytes about ten times faster than
    packing a (d, width) bit array."""
    q = np.asarray(q).reshape(-1)
    if width == 8:
        return q.astype(np.uint8).tobytes()
    if width == 16:
        return q.astype(">u2").tobytes()
    if 2 <= width <= 7:  # eight values fill ``width`` bytes of one big-endian uint64
        n = q.size
        groups = np.zeros((-(-n // 8), 8), np.uint64)
        groups.reshape(-1)[:n] = q
        words = np.bitwise_or.reduce(groups << _group_shifts(width), axis=1)
        tail = words.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width :]
        return tail.reshape(-1)[: packed_bytes(n, width)].tobytes()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
    bits = ((q.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)  # (d, width)
    return np.packbits(bits, axis=None).tobytes()


def unpack_uint(data: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """The ``count`` integers :func:`pack_uint` packed at ``width`` bits, as uint32 ``(count,)``."""
    if width == 8:
        return np.frombuffer(data, np.uint8, count).astype(np.uint32)
    if width == 16:
        return np.frombuffer(data, ">u2", count).astype(np.uint32)
    if 2 <= width <= 7:
        groups = -(-count // 8)
        flat = np.zeros(groups * width, np.uint8)
        body = np.frombuffer(data, np.uint8, packed_bytes(count, width))
        flat[: body.size] = body
        words = np.zeros((groups, 8), np.uint8)
        words[:, 8 - width :] = flat.reshape(groups, width)
        values = (words.view(">u8") >> _group_shifts(width)) & np.uint64((1 << width) - 1)
        return values.reshape(-1)[:count].astype(np.uint32)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=count * width).reshape(count, width)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
    return (bits.astype(np.uint32) << shifts).sum(axis=1, dtype=np.uint32)


def packed_bytes(count: int, width: int) -> int:
    """Bytes :func:`pack_uint` takes for ``count`` values of ``width`` bits: ceil(count width / 8)."""
    return -(-count * width // 8)


def header_bytes(shape: tuple[int, ...]) -> int:
    """H = 2 + 4 ndim: the codec code, the number of dimensions and each dimension (uint32)."""
    return 2 + 4 * len(shape)


def read_header(data: bytes | memoryview) -> tuple[int, tuple[int, ...], memoryview]:
    """(codec code, shape, payload) of an encoded tensor.

    Raises:
        ValueError: ``data`` is shorter than its header says.
    """
    view = memoryview(data)
    if len(view) < 2:
        raise ValueError(f"an encoded tensor needs at least 2 header bytes (got {len(view)})")
    code, ndim = view[0], view[1]
    h = 2 + 4 * ndim
    if len(view) < h:
        raise ValueError(f"an encoded tensor's header takes {h} bytes (got {len(view)})")
    shape = struct.unpack(f"<{ndim}I", view[2:h]) if ndim else ()
    return code, tuple(shape), view[h:]


def rotated_length(d: int) -> int:
    """d' = 2^ceil(log2 d): the length a tensor of d values is zero-padded to for the randomised
    Hadamard rotation (0 for an empty tensor)."""
    return 0 if d == 0 else 1 << (d - 1).bit_length()


def hadamard(a: np.ndarray) -> np.ndarray:
    """H a for the d x d Walsh-Hadamard matrix H (Sylvester's order, entries +-1, H H = d I) and
    a float64 vector ``a`` of d = 2^m values, in O(d log2 d) additions (the fast transform): each
    block of 16 consecutive values times the 16 x 16 matrix, then the butterflies of the longer
    strides, in place."""
    a = np.array(a, dtype=np.float64).reshape(-1)
    n = a.size
    block = min(n, 16)
    if block > 1:  # the butterflies of strides 1..8, as one small product per block
        a = np.einsum("ij,kj->ki", _sylvester(block), a.reshape(-1, block)).reshape(n)
    h = block
    while h < n:
        pairs = a.reshape(-1, 2, h)
        first = pairs[:, 0].copy()
        pairs[:, 0] += pairs[:, 1]
        np.subtract(first, pairs[:, 1], out=pairs[:, 1])
        h *= 2
    return a


@functools.cache
def _sylvester(n: int) -> np.ndarray:
    """The n x n Walsh-Hadamard matrix (n a power of two), float64 (cached; not to be written)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _signs(seed: int, n: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(n) < 0.5, -1.0, 1.0)


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """R x = H D x / sqrt(d') for ``x`` (d values) zero-padded to d' = :func:`rotated_length`,
    D a diagonal of random signs drawn from ``seed``: the randomised Hadamard rotation of Suresh
    et al. (ICML 2017, "Distributed Mean Estimation with Limited Communication", section 4), an
    orthogonal map that spreads a vector's mass evenly over its coordinates so that its range,
    and a quantiser's error, shrink. Returns float64 ``(d',)``."""
    n = rotated_length(x.size)
    padded = np.zeros(n)
    padded[: x.size] = x
    return hadamard(_signs(seed, n) * padded) / math.sqrt(n) if n else padded


def unrotate(y: np.ndarray, seed: int, d: int) -> np.ndarray:
    """R^-1 y = D H y / sqrt(d') (R is orthogonal), its first ``d`` values: the inverse of
    :func:`rotate`. Returns float64 ``(d,)``."""
    n = y.size
    return (_signs(seed, n) * hadamard(y) / math.sqrt(n))[:d] if n else np.zeros(d)


class Codec:
    """The contract of a codec (see the module docstring for every codec's size formula).

    Class attributes: ``name`` (the config's ``codec:`` value), ``code`` (its header byte),
    ``unbiased`` (E[decode(encode(x))] == x over the generator's draws), ``biased`` (error
    feedback applies: a deterministic lossy map such as a cast, top-k or sign), ``lossless``.
    """

    name: ClassVar[str] = ""
    code: ClassVar[int] = -1
    unbiased: ClassVar[bool] = False
    biased: ClassVar[bool] = True
    lossless: ClassVar[bool] = False

    def header(self, shape: tuple[int, ...]) -> bytes:
        """The common header of a message about a tensor of ``shape`` (:func:`header_bytes` long)."""
        return struct.pack(f"<BB{len(shape)}I", self.code, len(shape), *shape)

    def size(self, shape: tuple[int, ...], dtype: Any = np.float32) -> int:
        """Bytes of the encoding of any tensor of ``shape`` (and ``dtype`` for ``raw``), header
        included: the formula in the module docstring, equal to ``len(self.encode(x, ...))``."""
        return header_bytes(shape) + self.payload_bytes(shape, np.dtype(dtype))

    def payload_bytes(self, shape: tuple[int, ...], dtype: np.dtype) -> int:
        raise NotImplementedError

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None, warm: Any = None) -> bytes:
        """The bytes that carry ``x`` (float32 of any shape; ``raw`` takes any dtype).

        Args:
            rng: the generator of stochastic codecs (unused by deterministic ones).
            warm: the codec's carried state from the previous encoding of this tensor
                (:meth:`carry`; PowerSGD's factor Q), or None.
        """
        x = np.asarray(x)
        shape = tuple(int(s) for s in x.shape)
        return self.header(shape) + self.payload(
            x.astype(np.float32, copy=False).reshape(-1), shape, rng, warm
        )

    def payload(self, x: np.ndarray, shape: tuple[int, ...], rng: Any, warm: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        """The tensor ``data`` carries: float32 of the encoded shape (``raw``: its own dtype).

        Raises:
            ValueError: ``data`` was written by another codec.
        """
        code, shape, body = read_header(data)
        if code != self.code:
            raise ValueError(f"codec {self.name!r} cannot read a message of codec code {code}")
        return self.unpayload(body, shape, math.prod(shape)).reshape(shape)

    def unpayload(self, body: memoryview, shape: tuple[int, ...], d: int) -> np.ndarray:
        raise NotImplementedError

    def carry(self, data: bytes | memoryview) -> Any:
        """State the sender keeps for its next encoding of the same tensor, read from what it
        sent (PowerSGD's Q, Vogels et al. 2019 warm start); None for a memoryless codec."""
        return None


@register_codec
class Raw(Codec):
    """Lossless: the tensor's own bytes behind a dtype byte. H + 1 + d x itemsize bytes. What
    travels for tensors a codec does not apply to (integer buffers such as BatchNorm's counter)."""

    name, code, unbiased, biased, lossless = "raw", 0, True, False, True

    def payload_bytes(self, shape, dtype):
        return 1 + math.prod(shape) * dtype.itemsize

    def encode(self, x, rng=None, warm=None):
        x = np.asarray(x)
        shape = tuple(int(s) for s in x.shape)
        dtype = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
        if dtype.str not in RAW_DTYPES:
            raise ValueError(f"the raw codec carries dtypes {RAW_DTYPES} (got {x.dtype})")
        return self.header(shape) + bytes([RAW_DTYPES.index(dtype.str)]) + x.astype(dtype).tobytes()

    def unpayload(self, body, shape, d):
        return np.frombuffer(body[1:], RAW_DTYPES[body[0]], d).copy()


@register_codec
class FP16(Codec):
    """IEEE half precision (round to nearest even): H + 2d bytes. Decodes to the plain cast
    ``x.astype(float16).astype(float32)``."""

    name, code = "fp16", 1

    def payload_bytes(self, shape, dtype):
        return 2 * math.prod(shape)

    def payload(self, x, shape, rng, warm):
        with np.errstate(over="ignore"):  # beyond 65504 the cast gives inf, as IEEE says
            return x.astype("<f2").tobytes()

    def unpayload(self, body, shape, d):
        return np.frombuffer(body, "<f2", d).astype(np.float32)


@register_codec
class BF16(Codec):
    """bfloat16 (float32's upper 16 bits, rounded to nearest even, as torch's cast): H + 2d bytes.
    Decodes to the plain cast ``torch.tensor(x).bfloat16().float()``."""

    name, code = "bf16", 2

    def payload_bytes(self, shape, dtype):
        return 2 * math.prod(shape)

    def payload(self, x, shape, rng, warm):
        u = x.view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round half to even on the dropped 16 bits
        nan = np.isnan(x)
        top = np.where(nan, (u >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
        return top.astype("<u2").tobytes()

    def unpayload(self, body, shape, d):
        return (np.frombuffer(body, "<u2", d).astype(np.uint32) << 16).view(np.float32)


class _Quantiser(Codec):
    """A quantiser of a flat float32 vector (:meth:`_quantize` / :meth:`_dequantize`, whose
    message for d values is :meth:`_body_bytes` long), optionally of its randomised Hadamard
    rotation (:func:`rotate`, Suresh et al. 2017): the rotation's 64-bit seed, then the
    quantiser's message for the d' = 2^ceil(log2 d) rotated values."""

    rotation: bool = False

    def _body_bytes(self, d: int) -> int:
        raise NotImplementedError

    def _quantize(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        raise NotImplementedError

    def _dequantize(self, body: memoryview, d: int) -> np.ndarray:
        raise NotImplementedError

    def payload_bytes(self, shape, dtype):
        d = math.prod(shape)
        return 8 + self._body_bytes(rotated_length(d)) if self.rotation else self._body_bytes(d)

    def payload(self, x, shape, rng, warm):
        if self.rotation:
            seed = int(rng.integers(0, 2**63))
            return struct.pack("<Q", seed) + self._quantize(rotate(x, seed).astype(np.float32), rng)
        return self._quantize(x, rng)

    def unpayload(self, body, shape, d):
        if self.rotation:
            (seed,) = struct.unpack("<Q", body[:8])
            return unrotate(self._dequantize(body[8:], rotated_length(d)), seed, d).astype(np.float32)
        return self._dequantize(body, d).astype(np.float32)


@register_codec
class Quantize(_Quantiser):
    """Stochastic uniform quantisation to 2**b levels over [min x, max x] (unbiased: each value
    rounds up with probability equal to its fractional position; Alistarh et al. 2017's
    stochastic rounding on a per-tensor affine grid, as FLSim's scalar quantisation and FedJAX's
    uniform quantisation). H + 8 + ceil(d b / 8) bytes: the minimum and the step as float32, and
    b bits per value. With ``rotation`` the values quantised are those of the randomised
    Hadamard rotation (:func:`rotate`; Suresh et al. 2017's stochastic rotated quantisation):
    H + 8 + 8 + ceil(d' b / 8) bytes, the rotation's 64-bit seed first, d' = 2^ceil(log2 d).

    Args:
        bits: b, 1..16.
        rotation: rotate before quantising, and back after decoding.

    Raises:
        ValueError: ``bits`` outside 1..16.
    """

    name, code, unbiased, biased = "quantize", 3, True, False

    def __init__(self, bits: int, rotation: bool = False):
        if not 1 <= bits <= 16:
            raise ValueError(f"quantize needs bits in 1..16 (got {bits})")
        self.bits, self.rotation = bits, rotation

    def _body_bytes(self, d):
        return 8 + packed_bytes(d, self.bits)

    def _quantize(self, x, rng):
        top = (1 << self.bits) - 1
        lo = np.float32(x.min()) if x.size else np.float32(0)
        hi = np.float32(x.max()) if x.size else np.float32(0)
        step = np.float32((np.float64(hi) - np.float64(lo)) / top)
        if step > 0:
            pos = (x.astype(np.float64) - np.float64(lo)) / np.float64(step)
            q = np.clip(np.floor(pos + rng.random(x.size)), 0, top)
        else:  # a constant tensor: every value is lo
            q = np.zeros(x.size)
        return struct.pack("<ff", lo, step) + pack_uint(q.astype(np.uint32), self.bits)

    def _dequantize(self, body, d):
        lo, step = struct.unpack("<ff", body[:8])
        q = unpack_uint(body[8:], d, self.bits)
        return np.float64(lo) + q * np.float64(step)


@register_codec
class QSGD(_Quantiser):
    """QSGD (Alistarh et al., NeurIPS 2017, section 3.1): Q_s(v_i) = ||v||_2 sign(v_i) xi_i / s,
    xi_i = l + 1 with probability |v_i| s / ||v||_2 - l, else l (l = floor(|v_i| s / ||v||_2)), so
    E Q_s(v) = v. Fixed-width coding (the paper's Elias coding is not used): the norm as float32
    and, per value, a sign bit and the level in ceil(log2(s + 1)) bits:
    H + 4 + ceil(d (1 + ceil(log2(s + 1))) / 8) bytes. With ``rotation``, QSGD of the randomised
    Hadamard rotation (:func:`rotate`, Suresh et al. 2017): H + 8 + 4 + ceil(d' (1 + ceil(log2(s
    + 1))) / 8) bytes, the rotation's 64-bit seed first, d' = 2^ceil(log2 d).

    Args:
        levels: s, 1..65535.
        rotation: rotate before quantising, and back after decoding.

    Raises:
        ValueError: ``levels`` outside 1..65535.
    """

    name, code, unbiased, biased = "qsgd", 4, True, False

    def __init__(self, levels: int, rotation: bool = False):
        if not 1 <= levels <= 65535:
            raise ValueError(f"qsgd needs levels in 1..65535 (got {levels})")
        self.levels, self.rotation = levels, rotation
        self.width = max(1, math.ceil(math.log2(levels + 1)))

    def _body_bytes(self, d):
        return 4 + packed_bytes(d, 1 + self.width)

    def _quantize(self, x, rng):
        x64 = x.astype(np.float64)
        norm = np.float32(np.sqrt(np.sum(x64 * x64)))  # not np.linalg.norm: BLAS threads cost ms here
        if norm > 0:
            r = np.abs(x64) / np.float64(norm) * self.levels
            low = np.floor(r)
            level = np.minimum(low + (rng.random(x.size) < r - low), self.levels).astype(np.uint32)
        else:
            level = np.zeros(x.size, dtype=np.uint32)
        sign = (x < 0).astype(np.uint32) << self.width
        return struct.pack("<f", norm) + pack_uint(sign | level, 1 + self.width)

    def _dequantize(self, body, d):
        (norm,) = struct.unpack("<f", body[:4])
        v = unpack_uint(body[4:], d, 1 + self.width)
        level = (v & ((1 << self.width) - 1)).astype(np.float64)
        sign = 1.0 - 2.0 * (v >> self.width)
        return np.float64(norm) * sign * level / self.levels


def kept(d: int, fraction: float) -> int:
    """k = ceil(f d), the values top-k and rand-k send (at least 1 of a non-empty tensor)."""
    return math.ceil(fraction * d - 1e-9) if d else 0


def _check_fraction(name: str, fraction: float) -> float:
    if not 0 < fraction <= 1:
        raise ValueError(f"{name} needs a fraction in (0, 1] (got {fraction})")
    return fraction


@register_codec
class TopK(Codec):
    """Top-k sparsification (the k largest magnitudes; biased, for use with error feedback, Stich
    et al. 2018): the k values as float32 and their positions, as a d-bit bitmap or as k packed
    indices of w = max(1, ceil(log2 d)) bits, whichever is shorter (a flag byte says which):
    H + 1 + 4k + min(ceil(d / 8), ceil(k w / 8)) bytes, k = ceil(f d).

    Args:
        fraction: f in (0, 1].

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """

    name, code = "topk", 5

    def __init__(self, fraction: float):
        self.fraction = _check_fraction("topk", fraction)

    @staticmethod
    def _width(d: int) -> int:
        return max(1, math.ceil(math.log2(d))) if d > 1 else 1

    def _index_bytes(self, d: int, k: int) -> tuple[bool, int]:
        bitmap, packed = packed_bytes(d, 1), packed_bytes(k, self._width(d))
        return bitmap <= packed, min(bitmap, packed)

    def payload_bytes(self, shape, dtype):
        d = math.prod(shape)
        k = kept(d, self.fraction)
        return 1 + 4 * k + self._index_bytes(d, k)[1]

    def payload(self, x, shape, rng, warm):
        d, k = x.size, kept(x.size, self.fraction)
        idx = np.sort(np.argpartition(-np.abs(x), k - 1)[:k]) if 0 < k < d else np.arange(k)
        use_bitmap, _ = self._index_bytes(d, k)
        if use_bitmap:
            mask = np.zeros(d, dtype=np.uint8)
            mask[idx] = 1
            positions = np.packbits(mask).tobytes()
        else:
            positions = pack_uint(idx.astype(np.uint32), self._width(d))
        return bytes([use_bitmap]) + x[idx].astype("<f4").tobytes() + positions

    def unpayload(self, body, shape, d):
        k = kept(d, self.fraction)
        values = np.frombuffer(body[1 : 1 + 4 * k], "<f4", k)
        rest = body[1 + 4 * k :]
        if body[0]:
            idx = np.flatnonzero(np.unpackbits(np.frombuffer(rest, np.uint8), count=d))
        else:
            idx = unpack_uint(rest, k, self._width(d))
        out = np.zeros(d, dtype=np.float32)
        out[idx] = values
        return out


@register_codec
class RandK(Codec):
    """Random-k sparsification, unbiased: k positions drawn uniformly without replacement from a
    64-bit seed that is sent instead of the positions, and the k values, scaled by d / k on decoding
    (E = x; Stich et al., NeurIPS 2018, rand-k). H + 8 + 4k bytes, k = ceil(f d).

    Args:
        fraction: f in (0, 1].

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """

    name, code, unbiased, biased = "randk", 6, True, False

    def __init__(self, fraction: float):
        self.fraction = _check_fraction("randk", fraction)

    def payload_bytes(self, shape, dtype):
        return 8 + 4 * kept(math.prod(shape), self.fraction)

    @staticmethod
    def positions(seed: int, d: int, k: int) -> np.ndarray:
        """The k positions of a d-element tensor that ``seed`` selects (sender and receiver alike)."""
        return np.random.default_rng(seed).choice(d, size=k, replace=False)

    def payload(self, x, shape, rng, warm):
        seed = int(rng.integers(0, 2**63))
        idx = self.positions(seed, x.size, kept(x.size, self.fraction))
        return struct.pack("<Q", seed) + x[idx].astype("<f4").tobytes()

    def unpayload(self, body, shape, d):
        (seed,) = struct.unpack("<Q", body[:8])
        k = kept(d, self.fraction)
        out = np.zeros(d, dtype=np.float64)
        out[self.positions(seed, d, k)] = np.frombuffer(body[8:], "<f4", k) * (d / k)
        return out.astype(np.float32)


@register_codec
class Sign(Codec):
    """Scaled sign, (||x||_1 / d) sign(x) (signSGD, Bernstein et al., ICML 2018; the scaled form
    of EF-signSGD, Karimireddy et al., ICML 2019, Algorithm 1). Zero is sent as +. The scale as
    float32 and one bit per value: H + 4 + ceil(d / 8) bytes."""

    name, code = "sign", 7

    def payload_bytes(self, shape, dtype):
        return 4 + packed_bytes(math.prod(shape), 1)

    def payload(self, x, shape, rng, warm):
        scale = np.float32(np.abs(x.astype(np.float64)).mean()) if x.size else np.float32(0)
        return struct.pack("<f", scale) + np.packbits(x < 0).tobytes()

    def unpayload(self, body, shape, d):
        (scale,) = struct.unpack("<f", body[:4])
        negative = np.unpackbits(np.frombuffer(body[4:], np.uint8), count=d)
        return (np.float32(scale) * (1 - 2 * negative.astype(np.float32))).astype(np.float32)


@register_codec
class PowerSGD(Codec):
    """Rank-r PowerSGD (Vogels et al., NeurIPS 2019, Algorithm 1, one power iteration): a tensor of
    2 or more dimensions is the n x m matrix M (n its first dimension); P = orth(M Q), Q = M^T P,
    and M ~ P Q^T. Q is warm-started from the previous round's (:meth:`carry`; the client keeps it
    in its state) or drawn standard normal. Both factors as float32: H + 4 r' (n + m) bytes,
    r' = min(r, n, m). Vectors and scalars are sent as float32 (H + 4d), as in the paper.

    Args:
        rank: r >= 1.

    Raises:
        ValueError: ``rank`` < 1.
    """

    name, code = "powersgd", 8

    def __init__(self, rank: int):
        if rank < 1:
            raise ValueError(f"powersgd needs rank >= 1 (got {rank})")
        self.rank = rank

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        if len(shape) < 2 or math.prod(shape) == 0:
            return None
        n = shape[0]
        m = math.prod(shape) // n
        return n, m, min(self.rank, n, m)

    def payload_bytes(self, shape, dtype):
        dims = self._dims(shape)
        if dims is None:
            return 4 * math.prod(shape)
        n, m, r = dims
        return 4 * r * (n + m)

    def payload(self, x, shape, rng, warm):
        dims = self._dims(shape)
        if dims is None:
            return x.astype("<f4").tobytes()
        n, m, r = dims
        M = x.reshape(n, m).astype(np.float64)  # (n, m)
        Q = np.asarray(warm, dtype=np.float64) if warm is not None else None
        if Q is None or Q.shape != (m, r):
            Q = rng.standard_normal((m, r))  # (m, r)
        P, _ = np.linalg.qr(M @ Q)  # (n, r), orthonormal columns
        Q = M.T @ P  # (m, r)
        return P.astype("<f4").tobytes() + Q.astype("<f4").tobytes()

    def _factors(self, body, shape) -> tuple[np.ndarray, np.ndarray] | None:
        dims = self._dims(shape)
        if dims is None:
            return None
        n, m, r = dims
        P = np.frombuffer(body[: 4 * n * r], "<f4").reshape(n, r)
        Q = np.frombuffer(body[4 * n * r : 4 * r * (n + m)], "<f4").reshape(m, r)
        return P, Q

    def unpayload(self, body, shape, d):
        f = self._factors(body, shape)
        if f is None:
            return np.frombuffer(body, "<f4", d).copy()
        P, Q = f
        return (P.astype(np.float64) @ Q.T.astype(np.float64)).astype(np.float32).reshape(-1)

    def carry(self, data):
        _, shape, body = read_header(data)
        f = self._factors(body, shape)
        return None if f is None else f[1].copy()


def make_codec(name: str, **params: Any) -> Codec:
    """The codec ``name`` with its parameters (``bits``, ``levels``, ``fraction``, ``rank``,
    ``rotation``).

    Raises:
        KeyError: no codec of that name.
        ValueError: a parameter is out of range (the codec's own check).
    """
    cls = CODECS[name]
    return cls(**params)  # type: ignore[call-arg]
