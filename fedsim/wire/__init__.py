"""What crosses the wire: codecs that encode tensors to bytes (:mod:`fedsim.wire.codecs`) and the
uplink's encoding of a client's upload, with error feedback (:mod:`fedsim.wire.transport`).

numpy only (no torch, no Ray), so the config check and the dry run can use it.
"""

from fedsim.wire.codecs import CODECS, Codec, make_codec, register_codec
from fedsim.wire.transport import (
    REFUSED,
    WireSizes,
    codec_for,
    decode_broadcast,
    decode_results,
    decode_upload,
    dropped,
    encode_broadcast,
    encode_results,
    encode_upload,
    keeps_state,
    round_wire_columns,
    upload_bytes,
    wire_columns,
    wire_sizes,
)

__all__ = [
    "CODECS",
    "REFUSED",
    "Codec",
    "WireSizes",
    "codec_for",
    "decode_broadcast",
    "decode_results",
    "decode_upload",
    "dropped",
    "encode_broadcast",
    "encode_results",
    "encode_upload",
    "keeps_state",
    "make_codec",
    "register_codec",
    "round_wire_columns",
    "upload_bytes",
    "wire_columns",
    "wire_sizes",
]
