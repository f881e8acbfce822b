"""GGUF key/value metadata -> plain Python values.

`gguf.GGUFReader` keeps every value as numpy memmap "parts" (a string is a length part plus a byte part; an
array of N strings is 2N+2 parts). `read_metadata` turns each field into what the rest of the engine wants:
`str`, `int`, `float`, `bool`, or a `list` of those. Numeric arrays are gathered with one numpy call, and
string arrays decode each element once (the SmolLM2 vocabulary, 49k tokens + 49k merges, takes ~50 ms).
"""
from __future__ import annotations

import logging
from typing import Any

import gguf
import numpy as np

logger = logging.getLogger(__name__)

_T = gguf.GGUFValueType


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Return every key/value field of `reader` as a plain Python value, keyed by its GGUF name.

    Strings are decoded as UTF-8, arrays become lists of str/int/float/bool, scalars become int/float/bool.
    The GGUF header pseudo-fields (`GGUF.version`, `GGUF.tensor_count`, `GGUF.kv_count`) are included too.
    """
    return {name: field_value(field) for name, field in reader.fields.items()}


def field_value(field: gguf.ReaderField) -> Any:
    """Convert one `ReaderField` to a plain Python value (see `read_metadata`)."""
    if not field.types:
        raise ValueError(f"GGUF field {field.name!r} has no value type")
    main = field.types[0]
    if main == _T.STRING:
        return _decode(field.name, field.parts[field.data[0]])
    if main != _T.ARRAY:
        # Scalars: one part holding one element; .item() gives a Python int/float/bool.
        return field.parts[field.data[0]][0].item()
    if len(field.types) > 2 and field.types[1] == _T.ARRAY:
        # Arrays of arrays: the reader flattens them; no known model key uses them, so keep gguf's own view.
        return field.contents()
    if not field.data:
        return []
    sub = field.types[-1]
    if sub == _T.STRING:
        return [_decode(field.name, field.parts[i]) for i in field.data]
    # Numeric/bool arrays: every element is its own 1-element part; gather them in one C-level call.
    return np.concatenate([field.parts[i] for i in field.data]).tolist()


def _decode(name: str, raw: np.ndarray) -> str:
    data = raw.tobytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Some converters write raw bytes into token strings; keep loading, but say which key was affected.
        logger.warning("GGUF field %r holds invalid UTF-8 %r; decoding with replacement", name, data[:40])
        return data.decode("utf-8", errors="replace")
