"""Reading a reply topic: telling StreamChunks from InferenceResults, and putting one request's chunks back in
order, whatever redeliveries and takeovers did to them (docs/architecture.md "Streaming").

A request's chunks and result share a partition (key: the request id), so they arrive in the order the
worker sent them. What can still happen: a chunk arrives twice (a repeat of a `seq` already taken: dropped),
and the request is served again by another worker, or the same worker restarted, after its first server died
mid-stream. A new serving has a new `serve_id` and starts again from `seq` 0 with its own output:

- while nothing of the old serving was delivered to the reader (a client that waits for the whole answer, or
  a stream whose first output had not arrived), the new serving replaces it silently;
- once part of the old serving's output was delivered, the two outputs cannot be joined (sampling differs,
  chunking differs): the stream is interrupted (`StreamInterrupted`), and the reader reports it as an error.

A gap in `seq` (a chunk that never arrived) interrupts the stream too. Fragments (`more`) are joined.
"""

from __future__ import annotations

from lodestar.schemas import InferenceResult, InvalidMessage, StreamChunk, decode

CHUNK_MARK = b'"kind"'


class StreamInterrupted(Exception):
    """A stream cannot be continued: a chunk was lost, or a new serving began after output was delivered."""


def decode_reply(raw: bytes) -> StreamChunk | InferenceResult:
    """A reply topic's message; raises InvalidMessage if it is neither a StreamChunk nor an InferenceResult."""
    if CHUNK_MARK in raw:
        try:
            return decode(StreamChunk, raw)
        except InvalidMessage:
            pass  # a result whose text happens to hold the mark
    return decode(InferenceResult, raw)


class ChunkAssembler:
    """One request's chunks, in order, from one serving at a time (see the module doc)."""

    def __init__(self) -> None:
        self.serve_id: str | None = None
        self.next_seq = 0
        self.delivered = False  # the reader has handed output of `serve_id` on: no silent restart any more
        self.restarts = 0
        self.duplicates = 0
        self._parts: list[str] = []

    def accept(self, chunk: StreamChunk) -> str | None:
        """The payload the chunk completes (its `text` or joined `data`), or None (a fragment, or a repeat);
        raises StreamInterrupted (see the module doc)."""
        if chunk.serve_id != self.serve_id:
            if self.delivered:
                raise StreamInterrupted(
                    f"the request was served again (by worker {chunk.worker_id}) after part of its output had "
                    "been delivered; that output cannot be continued")
            if self.serve_id is not None:
                self.restarts += 1
            self.serve_id, self.next_seq, self._parts = chunk.serve_id, 0, []
        if chunk.seq < self.next_seq:
            self.duplicates += 1
            return None
        if chunk.seq > self.next_seq:
            raise StreamInterrupted(f"chunk {self.next_seq} of the stream from worker {chunk.worker_id} was lost")
        self.next_seq += 1
        piece = chunk.data or chunk.text
        if chunk.more:
            self._parts.append(piece)
            return None
        if self._parts:
            piece, self._parts = "".join(self._parts) + piece, []
        return piece
