"""Property-based fuzzing of the safetensors header parser and the file reader (hypothesis).

Properties, for any bytes:

* ``parse_header`` and ``SafetensorsFile`` raise nothing but ``FormatError`` (the
  project's own error type, which the CLI prints on one line);
* whatever they accept is consistent: every tensor lies inside the data buffer,
  holds exactly shape x itemsize bytes, and no two tensors overlap;
* nothing is ever read outside the file: every view of every accepted tensor is
  exactly the file's bytes at the claimed place, and a view outside a tensor is refused.

Inputs come from three generators: raw bytes, structured headers (valid shapes with
hostile values mixed in), and byte-level mutations of valid files. CI runs a short
campaign (``RELEX_FUZZ_EXAMPLES``, default 150 per property); the long one is
``RELEX_SLOW=1 pytest tests/reliability/test_header_fuzz.py`` (20000 per property), or
any count via ``RELEX_FUZZ_EXAMPLES=100000``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from math import prod

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relex_kernels.errors import FormatError
from relex_kernels.io import dtypes
from relex_kernels.io.reader import SafetensorsFile, parse_header

N = int(os.environ.get("RELEX_FUZZ_EXAMPLES", "150"))
LONG = int(os.environ.get("RELEX_FUZZ_LONG_EXAMPLES", "20000"))
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
          "U8", "BOOL"]
HOSTILE_INTS = [-1, 0, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30]

json_scalars = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8),
                         st.integers(-2**70, 2**70), st.sampled_from(HOSTILE_INTS))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4)), max_leaves=12)
dims = st.one_of(st.integers(0, 40), st.sampled_from(HOSTILE_INTS), json_scalars)


@st.composite
def entries(draw):
    """A tensor entry: mostly well-formed, with any field possibly hostile."""
    dt = draw(st.one_of(st.sampled_from(DTYPES), json_values)) if draw(st.booleans()) else draw(
        st.sampled_from(DTYPES))
    shape = draw(st.lists(dims, max_size=4)) if draw(st.integers(0, 4)) else draw(json_values)
    if draw(st.integers(0, 3)):
        b = draw(st.one_of(st.integers(0, 600), st.sampled_from(HOSTILE_INTS)))
        n = prod(shape) * dtypes.itemsize(dt) if (isinstance(dt, str) and dtypes.known(dt) and isinstance(
            shape, list) and all(type(s) is int and 0 <= s < 2**40 for s in shape)) else draw(st.integers(0, 64))
        e = b + n + draw(st.sampled_from([0, 0, 0, 1, -1, 2**32]))
        offs = [b, e]
    else:
        offs = draw(json_values)
    ent = {"dtype": dt, "shape": shape, "data_offsets": offs}
    if draw(st.integers(0, 5)) == 0:
        ent.pop(draw(st.sampled_from(list(ent))))
    if draw(st.integers(0, 5)) == 0:
        ent[draw(st.text(max_size=5))] = draw(json_values)
    return ent if draw(st.integers(0, 10)) else draw(json_values)


@st.composite
def headers(draw):
    obj = draw(st.dictionaries(st.text(max_size=10), entries(), max_size=5))
    r = draw(st.integers(0, 6))
    if r == 0:
        obj["__metadata__"] = draw(json_values)
    elif r == 1:
        obj["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    raw = json.dumps(obj, allow_nan=True).encode()
    if draw(st.integers(0, 8)) == 0:
        raw = json.dumps(draw(json_values)).encode()  # not even an object
    return raw + b" " * draw(st.integers(0, 9))


@st.composite
def valid_files(draw):
    """A valid safetensors file (bytes), tensors packed in random order with random gaps."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), max_size=5, unique=True))
    obj, pos = {}, 0
    for n in names:
        dt = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        pos += draw(st.integers(0, 3))
        size = prod(shape) * dtypes.itemsize(dt)
        obj[n] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    if draw(st.booleans()):
        obj["__metadata__"] = {"format": "pt"}
    raw = json.dumps(obj).encode()
    raw += b" " * (-len(raw) % 8)
    data = draw(st.binary(min_size=pos, max_size=pos + 16))
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def mutated_files(draw):
    b = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == 0 and b:
            b[i] = draw(st.integers(0, 255))
        elif op == 1:
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del b[i:i + draw(st.integers(1, 16))]
        else:  # rewrite the length field
            n = draw(st.one_of(st.integers(0, len(b) + 8), st.sampled_from(HOSTILE_INTS[1:9])))
            b[0:8] = struct.pack("<Q", n % 2**64)
    return bytes(b)


def framed(draw_header: bytes, data: bytes, length: int | None = None) -> bytes:
    n = len(draw_header) if length is None else length
    return struct.pack("<Q", n % 2**64) + draw_header + data


# -- checks ------------------------------------------------------------------------------------
def check_parsed(tensors, data_size):
    spans = []
    for name, t in tensors.items():
        assert isinstance(t.begin, int) and isinstance(t.nbytes, int)
        assert 0 <= t.begin and t.begin + t.nbytes <= data_size
        assert dtypes.known(t.dtype)
        assert t.nbytes == prod(t.shape) * dtypes.itemsize(t.dtype)
        if t.nbytes:
            spans.append((t.begin, t.begin + t.nbytes))
    spans.sort()
    assert all(b1 >= e0 for (_, e0), (b1, _) in zip(spans, spans[1:]))


def check_parse(raw: bytes, data_size: int):
    try:
        tensors, meta = parse_header(raw, data_size, "fuzz.safetensors")
    except FormatError as e:
        assert "fuzz.safetensors" in str(e)
        return
    assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    check_parsed(tensors, data_size)


_DIR = tempfile.mkdtemp(prefix="relex-fuzz-")


def check_file(content: bytes):
    path = os.path.join(_DIR, "f.safetensors")
    with open(path, "wb") as fh:
        fh.write(content)
    try:
        f = SafetensorsFile(path)
    except FormatError as e:
        assert path in str(e)
        return
    try:
        assert f.size == len(content)
        for name, t in f.tensors.items():
            assert f.data_start <= t.begin and t.begin + t.nbytes <= len(content)
            v = f.view(name)
            assert v.nbytes == t.nbytes
            assert v.tobytes() == content[t.begin:t.begin + t.nbytes]  # exactly the claimed bytes
            if t.numel:
                k = t.numel // 2
                assert f.view(name, k, t.numel).tobytes() == content[t.begin + k * dtypes.itemsize(t.dtype):
                                                                      t.begin + t.nbytes]
            for bad in ((0, t.numel + 1), (-1, 0), (1, 0)):
                with pytest.raises(IndexError):
                    f.view(name, *bad)
            del v
        check_parsed({k: type(t)(t.name, t.dtype, t.shape, t.begin - f.data_start, t.nbytes)
                      for k, t in f.tensors.items()}, f.size - f.data_start)
    finally:
        f.close()


# -- properties: short campaign (CI) --------------------------------------------------------------
@settings(max_examples=N, **SETTINGS)
@given(st.binary(max_size=300), st.integers(0, 2**64))
def test_parse_header_raw_bytes(raw, data_size):
    check_parse(raw, data_size)


@settings(max_examples=N, **SETTINGS)
@given(headers(), st.one_of(st.integers(0, 700), st.sampled_from(HOSTILE_INTS[1:])))
def test_parse_header_structured(raw, data_size):
    check_parse(raw, data_size)


@settings(max_examples=N, **SETTINGS)
@given(headers(), st.binary(max_size=700), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_file_structured(raw, data, length):
    check_file(framed(raw, data, length))


@settings(max_examples=N, **SETTINGS)
@given(mutated_files())
def test_file_mutated(content):
    check_file(content)


@settings(max_examples=max(20, N // 5), **SETTINGS)
@given(valid_files())
def test_valid_files_are_accepted(content):
    path = os.path.join(_DIR, "v.safetensors")
    with open(path, "wb") as fh:
        fh.write(content)
    SafetensorsFile(path).close()  # no FormatError for any valid file
    check_file(content)


def test_deep_nesting_and_huge_numbers():
    for raw in (b"[" * 100000 + b"]" * 100000, b'{"a": ' * 50000 + b"1" + b"}" * 50000,
                b'{"t": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}',
                b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1e999]}}',
                b'{"t": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}',
                b'{"t": {"dtype": "U8", "shape": [true], "data_offsets": [0, 1]}}',
                b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [false, true]}}',
                b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 2]}}'):
        check_parse(raw, 1)


# -- long campaign ------------------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=LONG, **SETTINGS)
@given(st.one_of(mutated_files(), st.builds(framed, headers(), st.binary(max_size=700),
                                             st.one_of(st.none(), st.integers(0, 2**64 - 1)))))
def test_file_long_campaign(content):
    check_file(content)


@pytest.mark.slow
@settings(max_examples=LONG, **SETTINGS)
@given(st.one_of(headers(), st.binary(max_size=400)), st.integers(0, 2**64))
def test_parse_header_long_campaign(raw, data_size):
    check_parse(raw, data_size)
