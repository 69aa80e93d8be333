"""Forward protocol v1 encoding: pure functions, no sockets (Fluent Bit's forward_format.c).

Wire shapes (Fluentd "Forward Protocol Specification v1"):

* entry:                  ``[EventTime, record]`` (what :func:`encode_entry` returns)
* Message:                ``[tag, EventTime, record, option?]`` (one per record)
* Forward:                ``[tag, [entry, ...], option]``
* PackedForward:          ``[tag, bin(entry entry ...), option]``
* CompressedPackedForward ``[tag, bin(gzip(entry entry ...)), option]`` with
  ``option.compressed = "gzip"``

EventTime is msgpack ext type 0 holding big-endian uint32 seconds and uint32
nanoseconds: byte-for-byte what fluent-logger's ``EventTime`` packs to (a test
checks it; fluent-logger is a test dependency only, the reference for these
bytes), built here with one precompiled ``struct`` so the event path does not
allocate an ``ExtType`` per record.

Every message shape is built from the already-encoded entries of a batch by
concatenating bytes; records are never re-encoded on the delivery path.

The record serialiser is ormsgpack (Rust, about 3x faster than msgpack's C
packer on a 50-key nested record); it produces msgpack's exact bytes for the
JSON-like types a record holds (tested). msgpack builds the message framing here,
and its streaming ``Unpacker`` reads the receiver's replies (``forward.py``) and
decodes messages for the fake receiver and the tests: ormsgpack has no streaming
unpacker.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import ormsgpack

MODES = ("forward", "packed_forward", "compressed_packed_forward", "message")

# fixarray(2) + fixext8 (0xd7) of ext type 0 + uint32 seconds + uint32 nanoseconds.
_ENTRY_HEAD = struct.Struct(">BBbII")
_NS = 1_000_000_000


def _fallback(obj: Any) -> Any:
    """Types a record may carry that msgpack does not know (slow path, rare)."""
    if type(obj).__name__ == "Fragment":  # orjson.Fragment: pre-serialised JSON
        import orjson

        return orjson.loads(orjson.dumps(obj))
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def _pack_record(record: dict[str, Any]) -> bytes:
    return ormsgpack.packb(record, default=_fallback)


def encode_entry(record: dict[str, Any], time_ns: int) -> bytes:
    """``[EventTime(time_ns), record]`` as msgpack (pure; the event-path encoder)."""
    s, ns = divmod(time_ns, _NS)
    return _ENTRY_HEAD.pack(0x92, 0xD7, 0, s, ns) + _pack_record(record)


def pack_str(text: str) -> bytes:
    """msgpack str."""
    return msgpack.packb(text)


def _bin_header(n: int) -> bytes:
    if n < 256:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def new_chunk_id() -> str:
    """A fresh chunk id: base64 of 16 random bytes, like Fluentd's out_forward."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def build_options(size: int, chunk: str | None, compressed: bool = False) -> bytes:
    """The option map: ``size`` (entries), ``chunk`` when an ack is wanted, ``compressed``."""
    opts: dict[str, Any] = {"size": size}
    if chunk is not None:
        opts["chunk"] = chunk
    if compressed:
        opts["compressed"] = "gzip"
    return msgpack.packb(opts)


def build_message(
    mode: str,
    tag_packed: bytes,
    entries: Sequence[bytes],
    chunk: str | None,
    *,
    compression_level: int = 1,
) -> bytes:
    """One batch as the bytes of one Forward, PackedForward or CompressedPackedForward message,
    or of ``len(entries)`` Message-mode messages.

    ``tag_packed`` is the msgpack str of the tag (see :func:`pack_str`). In Message mode only
    the last message carries the ``chunk`` option: a receiver handles the messages of one
    connection in order, so the ack of the last one confirms the batch.
    """
    n = len(entries)
    if mode == "packed_forward":
        body = b"".join(entries)
        return b"".join(
            (b"\x93", tag_packed, _bin_header(len(body)), body, build_options(n, chunk))
        )
    if mode == "compressed_packed_forward":
        body = gzip.compress(b"".join(entries), compresslevel=compression_level, mtime=0)
        return b"".join(
            (b"\x93", tag_packed, _bin_header(len(body)), body, build_options(n, chunk, True))
        )
    if mode == "forward":
        return b"".join(
            (b"\x93", tag_packed, _array_header(n), *entries, build_options(n, chunk))
        )
    if mode == "message":
        return _build_messages(tag_packed, entries, chunk)
    raise ValueError(f"unknown forward mode {mode!r}")


def _build_messages(tag_packed: bytes, entries: Sequence[bytes], chunk: str | None) -> bytes:
    parts: list[bytes] = []
    last = len(entries) - 1
    for i, entry in enumerate(entries):
        # An entry is fixarray(2)+time+record; a message is [tag, time, record(, option)].
        if i == last and chunk is not None:
            parts += (b"\x94", tag_packed, entry[1:], msgpack.packb({"chunk": chunk}))
        else:
            parts += (b"\x93", tag_packed, entry[1:])
    return b"".join(parts)


# --- the shared_key handshake (pure parts) -----------------------------------------------


def sha512_hex(*parts: bytes) -> str:
    """Lowercase hex SHA-512 of the concatenated parts (the handshake's digest)."""
    h = hashlib.sha512()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def build_ping(
    hostname: str,
    salt: str,
    nonce: bytes,
    shared_key: bytes,
    username: str = "",
    password: bytes = b"",
    auth_salt: bytes = b"",
) -> bytes:
    """``["PING", hostname, salt, digest, username, password_digest]`` (six str elements).

    digest = sha512_hex(salt + hostname + nonce + shared_key). When the HELO carried an
    ``auth`` salt, the last two are ``username`` and sha512_hex(auth_salt + username +
    password), also when no user is configured (then the digest of an empty username and
    password): that is what Fluentd's out_forward (``HandshakeProtocol#generate_ping``, its
    username and password default to "") and Fluent Bit's out_forward send, and both
    receivers look at them only when they have users configured. Without an ``auth`` salt
    both are ``""``.
    """
    digest = sha512_hex(salt.encode(), hostname.encode(), nonce, shared_key)
    if auth_salt:
        user_field = username
        pw_digest = sha512_hex(auth_salt, username.encode(), password)
    else:
        user_field = pw_digest = ""
    return msgpack.packb(["PING", hostname, salt, digest, user_field, pw_digest])


def pong_digest(salt: str, server_hostname: bytes, nonce: bytes, shared_key: bytes) -> str:
    """The digest a genuine server puts in PONG: sha512_hex(salt + hostname + nonce + key)."""
    return sha512_hex(salt.encode(), server_hostname, nonce, shared_key)


# --- decoding (used by the fake receiver and by tests) -----------------------------------


def time_to_ns(t: Any) -> int:
    """EventTime / int / float seconds -> ns."""
    if isinstance(t, msgpack.ExtType) and t.code == 0:
        s, ns = struct.unpack(">II", t.data)
        return s * _NS + ns
    if isinstance(t, int):
        return t * _NS
    if isinstance(t, float):
        return int(t * _NS)
    raise ValueError(f"not a forward time: {t!r}")


def unpacker(max_buffer_size: int = 64 * 1024 * 1024) -> msgpack.Unpacker:
    """A streaming Unpacker that keeps str as str; an EventTime comes out as
    ``msgpack.ExtType(0, ...)`` (:func:`time_to_ns` reads it)."""
    return msgpack.Unpacker(
        raw=False,
        max_buffer_size=max_buffer_size,
        strict_map_key=False,
    )


def decode_entries(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(time_ns, record)`` of every entry in concatenated entries (a PackedForward body)."""
    u = unpacker()
    u.feed(data)
    for item in u:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"malformed entry: {item!r:.80}")
        yield time_to_ns(item[0]), item[1]


def decode_message(
    msg: Any,
) -> tuple[str, list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """Decode one unpacked forward message of any mode into ``(tag, entries, options)``.

    Raises ValueError on anything that is not a forward message.
    """
    if not isinstance(msg, (list, tuple)) or len(msg) < 2 or not isinstance(msg[0], str):
        raise ValueError(f"not a forward message: {msg!r:.80}")
    tag = msg[0]
    second = msg[1]
    if isinstance(second, (msgpack.ExtType, int, float)):  # Message (ExtType is a tuple)
        if len(msg) < 3 or not isinstance(msg[2], dict):
            raise ValueError(f"malformed message: {msg!r:.80}")
        return tag, [(time_to_ns(second), msg[2])], _opts(msg, 3)
    if isinstance(second, (list, tuple)):  # Forward
        opts = _opts(msg, 2)
        return tag, [(time_to_ns(e[0]), e[1]) for e in second], opts
    if isinstance(second, (bytes, str)):  # PackedForward (bin, or str from old senders)
        opts = _opts(msg, 2)
        body = second.encode("latin-1") if isinstance(second, str) else second
        if opts.get("compressed") == "gzip":
            body = gzip.decompress(body)
        return tag, list(decode_entries(body)), opts
    raise ValueError(f"not a forward message: {msg!r:.80}")


def _opts(msg: Sequence[Any], i: int) -> dict[str, Any]:
    if len(msg) > i and msg[i] is not None:
        if not isinstance(msg[i], dict):
            raise ValueError("option is not a map")
        return msg[i]
    return {}

