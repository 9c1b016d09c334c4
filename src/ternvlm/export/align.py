"""Post-pass on a converted .tflite: constant buffers moved to the file end, 64-byte aligned.

LiteRT refuses a custom op whose constant input is not 64-byte aligned ("Unaligned host memory
pointer") and the converter aligns buffers to 4 bytes only. TFLite buffers may instead point into
the file after the flatbuffer (``offset``/``size``, the >2 GB model layout): we write them there.
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np

ALIGN = 64


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _serialize(model) -> bytes:
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def load(data: bytes):
    """ModelT of a .tflite with every buffer inline (external ``offset`` buffers read back)."""
    model = _schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
    for buf in model.buffers or []:
        if buf.offset > 1:
            buf.data = np.frombuffer(data, np.uint8, buf.size, buf.offset).copy()
            buf.offset = buf.size = 0
    # Files near 2 GB (the converter's "large model" layout) keep custom options outside the
    # flatbuffer too; ours are 32 bytes: inline them, the runtime's C API only reads those.
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            size = getattr(op, "largeCustomOptionsSize", 0) or 0
            if size > 0:
                start = op.largeCustomOptionsOffset
                op.customOptions = np.frombuffer(data, np.uint8, size, start).copy()
                op.largeCustomOptionsOffset = op.largeCustomOptionsSize = 0
    return model


def serialize(model) -> bytes:
    """A ModelT back to bytes: every non-empty buffer after the flatbuffer, 64-byte aligned."""
    payloads: list[tuple[object, bytes]] = []
    for buf in model.buffers or []:
        if buf.data is not None and len(buf.data):
            payloads.append((buf, np.asarray(buf.data, dtype=np.uint8).tobytes()))
            buf.data = None
    for buf, raw in payloads:  # placeholders so the table layout (and size) is final
        buf.offset, buf.size = 1, len(raw)
    head = _serialize(model)
    pos = -(-len(head) // ALIGN) * ALIGN
    for buf, raw in payloads:
        buf.offset = pos
        pos = -(-(pos + len(raw)) // ALIGN) * ALIGN
    head2 = _serialize(model)
    if len(head2) != len(head):
        raise RuntimeError("flatbuffer size changed while fixing buffer offsets")
    out = bytearray(head2)
    for buf, raw in payloads:
        out += b"\0" * (buf.offset - len(out))
        out += raw
        buf.data, buf.offset, buf.size = np.frombuffer(raw, np.uint8), 0, 0  # model unchanged
    return bytes(out)


def realign(data: bytes) -> bytes:
    """The same model with every non-empty buffer stored after the flatbuffer, 64-byte aligned."""
    return serialize(load(data))


def realign_file(path: str | Path) -> None:
    p = Path(path)
    p.write_bytes(realign(p.read_bytes()))


def check_aligned(data: bytes) -> list[int]:
    """Indices of non-empty buffers that are not 64-byte aligned in the file (empty: all fine)."""
    schema = _schema()
    model = schema.Model.GetRootAs(bytearray(data), 0)
    bad = []
    for i in range(model.BuffersLength()):
        b = model.Buffers(i)
        if b.Offset() > 1:
            if b.Offset() % ALIGN:
                bad.append(i)
        elif b.DataLength() and b._tab.Vector(b._tab.Offset(4)) % ALIGN:
            bad.append(i)  # Vector(): absolute position of the data in the file
    return bad


def truncated_buffers(data: bytes) -> list[int]:
    """Indices of buffers stored past the end of ``data`` (a truncated file)."""
    model = _schema().Model.GetRootAs(bytearray(data), 0)
    return [
        i
        for i in range(model.BuffersLength())
        if model.Buffers(i).Offset() > 1
        and model.Buffers(i).Offset() + model.Buffers(i).Size() > len(data)
    ]
