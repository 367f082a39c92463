"""What crosses the network between a swarm client and a server, and nothing else: tensors through hivemind's
serialization (protobuf: raw buffers, a dtype name and a shape; never pickle) and metadata as msgpack (plain values
only). One request or response is an `ExpertRequest` / `ExpertResponse` of hivemind's runtime protocol: `uid` names
the operation, `metadata` holds its arguments, `tensors` its tensors. A request the server refuses is answered with
no tensors and `{"error": {"code": ..., "message": ...}}`: the code says which error it is, so the client acts on
its type (`error_of`), the message says why to a person.

Payloads over hivemind's unary limit (MAX_UNARY_PAYLOAD_SIZE, 2 MiB) go as a stream of chunks (hivemind's
split_for_streaming), which the other side joins again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from ..errors import BytelmError, UnknownSession
from ..nn import Step

CHUNK_BYTES = DEFAULT_MAX_MSG_SIZE // 2  # one streamed message's tensor part


class SwarmError(BytelmError):
    """The swarm cannot do what was asked: no server holds a span, every server for it failed, servers disagree."""


class BadMessage(ValueError):
    """A message that is not what the protocol allows (wrong shape, dtype, length, value): the sender's fault."""

    code = "bad_message"


REFUSALS = (BadMessage, UnknownSession)  # what a server answers with an error reply, by `code`
MAX_ERROR_CHARS = 300


def error_reply(e: BadMessage | UnknownSession) -> dict[str, Any]:
    """The metadata of a server's answer to a request it refused."""
    return {"error": {"code": e.code, "message": str(e)[:MAX_ERROR_CHARS]}}


def error_of(meta: dict[str, Any]) -> BadMessage | UnknownSession | None:
    """The error a server answered with, as its type (an unknown code, or a reply that does not read as an error, as
    a BadMessage), or None for an answer that is not an error."""
    if "error" not in meta:
        return None
    err = meta["error"]
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return BadMessage("an error reply that cannot be read")
    kind = next((cls for cls in REFUSALS if cls.code == err.get("code")), BadMessage)
    return kind(err["message"][:MAX_ERROR_CHARS])


# The bytelm version that last changed what crosses the wire (0.6: a step's call is a Step's schema). A server of an
# earlier one would refuse every call; clients leave such servers out instead of failing over from them.
WIRE_SINCE = (0, 6)


def speaks_our_wire(version: str) -> bool:
    """Whether a server announcing bytelm `version` takes this client's calls: major.minor at or after WIRE_SINCE
    and the same major (an unknown or unparsable version: no)."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return major == WIRE_SINCE[0] and (major, minor) >= WIRE_SINCE


def step_to_wire(step: Step) -> dict[str, Any]:
    """A `Step` as a call's metadata: {"rows": [n], "pos": [n], "span": int, "lens": [n] or None}: host values
    only, exactly what `step_from_wire` checks."""
    return {"rows": list(step.slots), "pos": list(step.at), "span": step.span,
            "lens": None if step.lens is None else list(step.lens)}


def _ints(v, name: str, n: int, lo: int, hi: int) -> list[int]:
    if not isinstance(v, list) or len(v) != n or not all(
            isinstance(i, int) and not isinstance(i, bool) and lo <= i <= hi for i in v):
        raise BadMessage(f"{name} must list {n} integers in [{lo}, {hi}]"[:200])
    return v


def step_from_wire(call: Any, n: int, T: int, batch: int, max_len: int, device) -> Step:
    """The checked `Step` of a call feeding x (n, T) into a session of `batch` rows of `max_len` positions: n distinct
    rows, each row's real inputs (`lens`, default T) inside the cache, `span` covering them."""
    if not isinstance(call, dict):
        raise BadMessage("each call must be a map of rows, pos, span, lens")
    rows = _ints(call.get("rows"), "rows", n, 0, batch - 1)
    if len(set(rows)) != n:
        raise BadMessage(f"rows must list {n} distinct rows")
    lens = None if call.get("lens") is None else _ints(call.get("lens"), "lens", n, 0, T)
    ends = [T] * n if lens is None else lens
    pos = _ints(call.get("pos"), "pos", n, 0, max_len - 1)
    if any(p + m > max_len for p, m in zip(pos, ends, strict=True)):
        raise BadMessage(f"a row's inputs run past the session's {max_len} positions")
    span, need = call.get("span"), max(p + m for p, m in zip(pos, ends, strict=True))
    if isinstance(span, bool) or not isinstance(span, int) or not max(need, 1) <= span <= max_len:
        raise BadMessage(f"span must be an integer in [{max(need, 1)}, {max_len}], got {span!r}"[:200])
    return Step.make(rows, pos, span, device, lens)


def pack(tensors: Iterable[torch.Tensor], meta: dict[str, Any]) -> tuple[list[runtime_pb2.Tensor], bytes]:
    return [serialize_torch_tensor(t.detach().contiguous().cpu()) for t in tensors], MSGPackSerializer.dumps(meta)


def unpack_tensors(protos: Iterable[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    try:
        return [deserialize_torch_tensor(p) for p in protos]
    except Exception as e:  # a buffer that does not fit its shape, an unknown dtype or compression
        raise BadMessage(f"a tensor that cannot be read: {str(e).splitlines()[0][:200]}") from None


def unpack_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = MSGPackSerializer.loads(raw) if raw else {}
    except Exception:
        raise BadMessage("metadata that is not msgpack") from None
    if not isinstance(meta, dict):
        raise BadMessage("metadata must be a map")
    return meta


def size_of(protos: list[runtime_pb2.Tensor]) -> int:
    return sum(len(p.buffer) for p in protos)


def is_large(protos: list[runtime_pb2.Tensor]) -> bool:
    return size_of(protos) > MAX_UNARY_PAYLOAD_SIZE


def stream_parts(make, op: str, protos: list[runtime_pb2.Tensor], meta: bytes):
    """The messages of a streamed payload: the first carries op and metadata, each carries tensor chunks."""
    head = {"uid": op, "metadata": meta} if op else {"metadata": meta}  # responses have no uid
    first = True
    for p in protos:
        for part in split_for_streaming(p, CHUNK_BYTES):
            yield make(tensors=[part], **head) if first else make(tensors=[part])
            first = False
    if first:  # no tensors at all
        yield make(**head)


MAX_STREAM_BYTES = 1 << 30  # what one streamed request may carry in all: a server reads no more than this


async def join_stream(messages: AsyncIterator, limit: int = MAX_STREAM_BYTES
                      ) -> tuple[str, list[runtime_pb2.Tensor], bytes]:
    """(op, whole serialized tensors, metadata) of a streamed payload: chunks of a tensor follow its first part,
    which alone carries a dtype. More than `limit` bytes in all is refused."""
    op, meta, tensors, parts, total = "", b"", [], [], 0
    async for msg in messages:
        total += msg.ByteSize()
        if total > limit:
            raise BadMessage(f"a streamed message over {limit / 2**20:.0f} MiB")
        if getattr(msg, "uid", ""):
            op = msg.uid
        if msg.metadata:
            meta = msg.metadata
        for part in msg.tensors:
            if part.dtype and parts:
                tensors.append(combine_from_streaming(parts))
                parts = []
            parts.append(part)
    if parts:
        tensors.append(combine_from_streaming(parts))
    return op, tensors, meta


async def shutdown_replica(p2p) -> None:
    """Shut a replica of hivemind's P2P down inside its event loop. hivemind 1.1.12's P2P.__del__ closes it again
    wherever the object is collected, and at interpreter exit that is outside any loop: tracebacks on stderr. So
    leave __del__ nothing to close."""
    await p2p.shutdown()
    p2p._client = p2p._listen_task = p2p._reader_task = None
