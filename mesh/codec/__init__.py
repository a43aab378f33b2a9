"""The tensor-tree codec: ComfyUI node outputs <-> one byte buffer, exactly, without pickle (format: layout.py).

A subpackage of its own so that only what handles values imports it: the provider (encode, decode, check) and
`mesh get --describe` (describe, which reads the manifest alone). A mesh node moves opaque bytes and never
imports this, and so never imports torch; torch itself is imported lazily, only when a tensor is built.

One module per idea: layout (the format, its manifest and the reader that validates it), encoder (value ->
blob), decoder (blob -> value, and describe), stream (decoding while the chunks arrive), levels (the 8-bit
image form), shuffle (byte planes).

May import: the ground floor only (`mesh.buffers`, for the memory a decoded value lands in).
"""

from mesh.codec.decoder import decode, describe
from mesh.codec.encoder import LEVELS_MIN_ELEMENTS, SHUFFLE_MIN_ELEMENTS, check, encode
from mesh.codec.layout import ALIGN, LEVELS, MAGIC, MAX_DEPTH, MAX_MANIFEST, TENSOR_DTYPES, BlobFormatError, NotCacheable
from mesh.codec.shuffle import byte_shuffle, byte_unshuffle
from mesh.codec.stream import StreamDecoder

__all__ = [
    "ALIGN", "LEVELS", "LEVELS_MIN_ELEMENTS", "MAGIC", "MAX_DEPTH", "MAX_MANIFEST", "SHUFFLE_MIN_ELEMENTS",
    "TENSOR_DTYPES", "BlobFormatError", "NotCacheable", "StreamDecoder",
    "byte_shuffle", "byte_unshuffle", "check", "decode", "describe", "encode",
]
