"""What crosses the uplink when a codec is on: each client's upload as encoded bytes.

The client encodes what its algorithm uploads, tensor by tensor, right after its local update;
the driver decodes the bytes before :meth:`~fedsim.algorithms.base.Algorithm.aggregate`, so
algorithms never see a codec.

* A floating tensor is sent as its **delta** from the tensor of the same name in the round's
  broadcast (zero where the broadcast has none: SCAFFOLD's Delta c_i, which is a delta already, or
  round 0 under ``init: independent``, which sends nothing down), carried as float32 and encoded
  with the run's codec; the driver adds the decoded delta back to the broadcast. For the FedAvg
  family the upload is then the model update w_i - w, what compression papers compress.
* Any other tensor (BatchNorm's integer counter) travels lossless (the ``raw`` codec).
* **Error feedback** (Stich et al., NeurIPS 2018; Karimireddy et al., ICML 2019, Algorithm 2,
  EF-SGD) for a biased codec: the client adds its residual e to the delta, sends C(delta + e) and
  keeps e' = delta + e - D(C(delta + e)), so the transmitted sum plus the residual equals the sum of
  the uncompressed deltas. The residuals, and PowerSGD's warm-start factors, live in the client's
  stored state (:attr:`fedsim.algorithms.base.ClientState.wire`), which the engine keeps between
  rounds and in checkpoints.

Bytes on the uplink are the sum of the encoded messages' lengths (each with its header, see
:mod:`fedsim.wire.codecs`); :func:`upload_bytes` gives the same number from shapes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.rng import numpy_rng
from fedsim.wire.codecs import Codec, Raw, make_codec

if TYPE_CHECKING:
    from fedsim.algorithms.base import ClientResult, ClientTask
    from fedsim.config import CodecConfig, RunConfig

RAW = Raw()

#: algorithms a codec cannot serve, and why (the config check's one-line message)
REFUSED: dict[str, str] = {
    "fedma": "FedMA's matching compares each client's raw neurons; compressed weights would be "
    "matched as if they were the client's",
    "pfnm": "PFNM's matching compares each client's raw neurons; compressed weights would be "
    "matched as if they were the client's",
    "fedmedian": "the coordinate-wise median of decoded values is not the median of the updates "
    "(a quantised or sparsified coordinate's median is mostly a grid point or 0)",
    "entire_data": "entire_data trains on pooled data and sends nothing over a wire",
}


def codec_for(cfg: CodecConfig) -> Codec:
    """The codec a ``uplink:`` / ``downlink:`` section configures."""
    params = {
        k: getattr(cfg, k) for k in ("bits", "levels", "fraction", "rank") if getattr(cfg, k) is not None
    }
    if cfg.rotation:
        params["rotation"] = True
    return make_codec(cfg.codec, **params)


def keeps_state(cfg: CodecConfig | None) -> bool:
    """Whether clients keep codec state between rounds: error feedback's residual or PowerSGD's
    warm-start factors (the engine then keeps a state per client, as for stateful algorithms)."""
    return cfg is not None and (cfg.error_feedback or cfg.codec == "powersgd")


def _nbytes(tensors: Mapping[str, Any]) -> int:
    """numel x element size over numpy arrays (:func:`fedsim.params.nbytes` without torch)."""
    return sum(int(np.asarray(v).nbytes) for v in tensors.values())


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _delta(value: np.ndarray, reference: Mapping[str, Any], name: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float32)
    ref = reference.get(name)
    return v if ref is None else v - np.asarray(ref, dtype=np.float32)


def encode_upload(
    codec: Codec,
    upload: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    memory: Mapping[str, Any] | None = None,
    error_feedback: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The upload as encoded messages, and the client's new codec memory.

    Args:
        codec: the run's uplink codec.
        upload: name -> array, what the algorithm uploads (any shapes and dtypes).
        reference: name -> array, the round's broadcast (deltas are taken from it).
        rng: the (seed, "codec", round, client) generator; tensors draw from it in ``upload``'s order.
        memory: the client's codec memory from earlier rounds, ``{"residual": {name: array},
            "warm": {name: array}}`` (arrays or tensors, as restored from a checkpoint), or None.
        error_feedback: add the residual before encoding and keep the new one.

    Returns:
        (name -> uint8 array of the encoded message, the new memory or None when the codec keeps
        none). Residuals and factors of tensors not in this upload (FedPart's other groups) are kept.
    """
    old = memory or {}
    residual = {k: np.asarray(v, dtype=np.float32) for k, v in (old.get("residual") or {}).items()}
    warm = {k: np.asarray(v, dtype=np.float32) for k, v in (old.get("warm") or {}).items()}
    out: dict[str, np.ndarray] = {}
    for name, value in upload.items():
        value = np.asarray(value)
        if not _floating(value):
            out[name] = np.frombuffer(RAW.encode(value), np.uint8)
            continue
        p = _delta(value, reference, name)
        if error_feedback and name in residual and residual[name].shape == p.shape:
            p = p + residual[name]
        data = codec.encode(p, rng, warm.get(name))
        if error_feedback:
            residual[name] = p - codec.decode(data)
        carried = codec.carry(data)
        if carried is not None:
            warm[name] = carried
        out[name] = np.frombuffer(data, np.uint8)
    new = {"residual": residual} if error_feedback else {}
    if warm:
        new["warm"] = warm
    return out, (new or None)


def decode_upload(
    codec: Codec, encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The upload :func:`encode_upload` encoded, as the server sees it: name -> array, floating
    tensors as reference + decoded delta in the reference's dtype (float32 without a reference),
    other tensors exactly as sent.

    Raises:
        ValueError: a message was written by another codec.
    """
    out = {}
    for name, msg in encoded.items():
        data = memoryview(np.ascontiguousarray(msg))
        if data[0] == RAW.code:
            out[name] = RAW.decode(data)
            continue
        delta = codec.decode(data)
        ref = reference.get(name)
        out[name] = delta if ref is None else (np.asarray(ref, dtype=np.float32) + delta).astype(ref.dtype)
    return out


def residual_norm(memory: Mapping[str, Any] | None) -> float | None:
    """||e||_2 over every tensor's error-feedback residual, or None without error feedback."""
    if not memory or "residual" not in memory:
        return None
    return float(
        np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in memory["residual"].values()))
    )


def upload_bytes(codec: Codec, tensors: Mapping[str, Any]) -> int:
    """Bytes of the encoded upload of ``tensors`` (name -> array or tensor; only shapes and dtypes
    are read): the codec's size for floating tensors, the raw size for the others. Equals the sum
    of the lengths :func:`encode_upload` returns (the dry run's projection)."""
    total = 0
    for v in tensors.values():
        shape = tuple(int(s) for s in v.shape)
        dtype = np.dtype(str(v.dtype).replace("torch.", ""))
        total += codec.size(shape) if np.issubdtype(dtype, np.floating) else RAW.size(shape, dtype)
    return total


@dataclass(frozen=True)
class WireSizes:
    """What one client's messages take on the wire under a run's codecs and secure aggregation,
    from shapes alone: the projection the dry run and the virtual clock use, equal to the lengths
    the engine logs (a test checks projected == logged == encoded length).

    Attributes:
        upload: bytes of an upload of the given tensors (name -> array or tensor): the uplink
            codec's encoded length (:func:`upload_bytes`) or secure aggregation's masked vector
            (:func:`fedsim.wire.secagg.masked_bytes`); None: numel x element size.
        download: bytes of the broadcast of the given tensors under the downlink codec; None:
            numel x element size.
        protocol_up / protocol_down: secure aggregation's messages besides the masked vector, bytes
            per client and round (:func:`fedsim.wire.secagg.protocol_bytes`; 0 without it).
    """

    upload: Callable[[Mapping[str, Any]], int] | None = None
    download: Callable[[Mapping[str, Any]], int] | None = None
    protocol_up: int = 0
    protocol_down: int = 0


def wire_sizes(run: RunConfig, n: int) -> WireSizes:
    """The :class:`WireSizes` of ``run`` in a cohort of ``n`` clients (secure aggregation's ring
    width and neighbour count depend on n)."""
    from functools import partial

    from fedsim.wire import secagg

    upload, proto = None, (0, 0)
    if run.uplink is not None:
        upload = partial(upload_bytes, codec_for(run.uplink))
    elif run.secure_aggregation is not None:
        sa = run.secure_aggregation
        upload = partial(secagg.masked_bytes, ring=secagg.ring_bits(sa.bits, n))
        proto = secagg.protocol_bytes(sa.protocol, sa.neighbours, n)
    download = None if run.downlink is None else partial(upload_bytes, codec_for(run.downlink))
    return WireSizes(upload, download, *proto)


# ------------------------------------------------------------------------ the engine's calls


def encode_broadcast(
    run: RunConfig, seed: int, round: int, broadcast: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The broadcast as the server sends it under ``run.downlink``: every floating tensor (the
    model's weights themselves, not a delta) encoded by the codec with the (seed, "downlink",
    round) generator, the others lossless, as uint8 arrays; ``broadcast`` itself without one."""
    if run.downlink is None:
        return broadcast
    codec, rng = codec_for(run.downlink), numpy_rng(seed, "downlink", round)
    return {
        k: np.frombuffer((codec if _floating(np.asarray(v)) else RAW).encode(v, rng), np.uint8)
        for k, v in broadcast.items()
    }


def decode_broadcast(run: RunConfig, sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the clients receive: :func:`encode_broadcast`'s messages decoded (floating tensors as
    float32), on every worker and on the driver alike; ``sent`` itself without a downlink codec."""
    if run.downlink is None:
        return sent
    return decode_upload(codec_for(run.downlink), sent, {})


def dropped(
    x: ClientResult, pooled: bool, broadcast: Mapping[str, Any], sent: Mapping[str, Any], extra
) -> ClientResult:
    """A client dropped for lateness, billed what it was sent: the broadcast as sent (encoded
    under a downlink codec) and its own extra tensors; ``bytes_down_raw`` the uncompressed size."""
    if pooled:
        return replace(x, bytes_down=0)
    own = _nbytes(extra or {})
    raw = None if sent is broadcast else _nbytes(broadcast) + own
    return replace(x, bytes_down=_nbytes(sent) + own, bytes_down_raw=raw)


def _downlink_bytes(x: ClientResult, task: ClientTask, received: Mapping, sent: Mapping) -> ClientResult:
    """``x`` with ``bytes_down`` the encoded broadcast's length (plus its own extra tensors, as
    before) and ``bytes_down_raw`` the uncompressed size the worker counted."""
    if x.dropped or task.plan.pooled:
        return x
    return replace(
        x, bytes_down=x.bytes_down - _nbytes(received) + _nbytes(sent), bytes_down_raw=x.bytes_down
    )


def encode_results(
    run: RunConfig,
    seed: int,
    tasks: list[ClientTask],
    received: Mapping[str, np.ndarray],
    states: list[Any],
    results: list[ClientResult],
    state_type: type,
    sent: Mapping[str, np.ndarray] | None = None,
) -> list[ClientResult]:
    """The worker's results with their uploads encoded by ``run.uplink``, or made fixed-point and
    billed by ``run.secure_aggregation`` (unchanged without either); under ``run.downlink``,
    ``sent`` is the broadcast as it was sent (encoded) and ``received`` as it was decoded, and
    ``bytes_down`` becomes the encoded length.

    Each result's ``bytes_up`` becomes the encoded length and ``bytes_up_raw`` the uncompressed
    one (numel x element size); its stored state (of ``state_type`` when the algorithm made none)
    carries the new codec memory, read from ``states`` (each task's stored state before the round).
    Pooled rounds and dropped clients are left as they are (nothing crosses a wire).
    """
    if run.downlink is not None:
        results = [_downlink_bytes(x, t, received, sent) for t, x in zip(tasks, results)]
    if run.secure_aggregation is not None:
        return [_secure(run, seed, t, received, x) for t, x in zip(tasks, results)]
    cfg = run.uplink
    if cfg is None:
        return results
    codec = codec_for(cfg)
    out = []
    for task, state, x in zip(tasks, states, results):
        if x.dropped or task.plan.pooled:
            out.append(x)
            continue
        rng = numpy_rng(seed, "codec", task.round, task.client_id)
        memory = getattr(state, "wire", None)
        encoded, memory = encode_upload(codec, x.upload, received, rng, memory, cfg.error_feedback)
        new_state = x.state
        if keeps_state(cfg):
            new_state = replace(x.state if x.state is not None else state_type(), wire=memory)
        out.append(
            replace(
                x,
                upload=encoded,
                bytes_up=sum(int(m.size) for m in encoded.values()),
                bytes_up_raw=x.bytes_up,
                state=new_state,
                residual_norm=residual_norm(memory),
            )
        )
    return out


def _secure(run: RunConfig, seed: int, task: ClientTask, received: Mapping[str, np.ndarray], x: ClientResult):
    """One result under ``run.secure_aggregation``: its upload as the server learns it (clipped,
    fixed-point) and the protocol's bytes (:mod:`fedsim.wire.secagg`)."""
    from fedsim.wire import secagg

    sa = run.secure_aggregation
    if x.dropped or task.plan.pooled:
        return x
    n = len(task.plan.cohort)
    up, down = secagg.protocol_bytes(sa.protocol, sa.neighbours, n)
    rng = numpy_rng(seed, "codec", task.round, task.client_id)
    upload, clipped, overflow = secagg.fixed_point_upload(x.upload, received, sa.clip, sa.bits, rng)
    return replace(
        x,
        upload=upload,
        bytes_up=secagg.masked_bytes(x.upload, secagg.ring_bits(sa.bits, n)) + up,
        bytes_down=x.bytes_down + down,
        bytes_up_raw=x.bytes_up,
        bytes_down_raw=x.bytes_down if x.bytes_down_raw is None else x.bytes_down_raw,
        bytes_secagg=up + down,
        secagg_clipped=clipped,
        secagg_overflow=overflow,
    )


def decode_results(
    run: RunConfig, broadcast: Mapping[str, np.ndarray], results: list[ClientResult]
) -> list[ClientResult]:
    """The results with their uploads decoded (the driver, before aggregating); unchanged
    without an uplink codec."""
    if run.uplink is None:
        return results
    codec = codec_for(run.uplink)
    return [replace(x, upload=decode_upload(codec, x.upload, broadcast)) for x in results]


def wire_columns(x: ClientResult) -> dict[str, Any]:
    """clients.parquet's wire columns of one result: ``bytes_up_raw`` / ``bytes_down_raw`` (the
    uncompressed sizes; ``bytes_up`` / ``bytes_down`` where nothing was compressed),
    ``bytes_secagg`` and ``residual_norm`` (null without error feedback)."""
    return {
        "bytes_up_raw": x.bytes_up if x.bytes_up_raw is None else x.bytes_up_raw,
        "bytes_down_raw": x.bytes_down if x.bytes_down_raw is None else x.bytes_down_raw,
        "bytes_secagg": x.bytes_secagg,
        "residual_norm": x.residual_norm,
        "secagg_clipped": x.secagg_clipped,
        "secagg_overflow": x.secagg_overflow,
    }


def round_wire_columns(results: list[ClientResult]) -> dict[str, int]:
    """rounds.parquet's wire columns: the cohort's ``bytes_up_raw``, ``bytes_down_raw`` and
    ``bytes_secagg`` summed over every result (dropped clients included, as ``bytes_up``)."""
    rows = [wire_columns(x) for x in results]
    return {k: int(sum(r[k] for r in rows)) for k in ("bytes_up_raw", "bytes_down_raw", "bytes_secagg")}
