"""Content addresses of full KV blocks, for prefix caching.

A block's K/V depend on every token up to its end *and* on the weights that produced the
hidden states, so its address chains the previous block's address with its own token ids,
and the first block's address starts from the identity of those weights:

- the base model is one identity (""); a Medusa-only adapter drafts but does not change
  K/V, so it shares the base model's blocks;
- a LoRA adapter is its store key, `source:id@revision`, where the revision is the hub
  commit, the S3 ETags or the local files' fingerprint: a reloaded adapter whose weights
  changed gets a new key and never reads blocks computed with the old ones;
- a merged adapter is its merge key (strategy, weights and its parts' resolved keys).

Addresses are 16-byte BLAKE2b digests, so two different prefixes colliding is as likely as a
random 128-bit collision; Python's `hash` of a tuple would be cheaper but 64 bits wide.
"""

from __future__ import annotations

import hashlib
from array import array

from loraserve.engine.sequence import Sequence

BASE_IDENTITY = ""


def cache_identity(seq: Sequence) -> str:
    """Whose K/V this sequence computes (see the module docstring)."""
    return seq.adapter.key if seq.uses_slot and seq.adapter is not None else BASE_IDENTITY


def block_hash(parent: bytes | None, identity: str, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        h.update(b"\x00" + identity.encode() + b"\x00")
    else:
        h.update(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_hashes(seq: Sequence, num_blocks: int, block_size: int) -> list[bytes]:
    """`seq.block_hashes` grown to cover its first `num_blocks` full blocks (computed once each:
    a block's tokens never change, preemption and recompute keep them)."""
    hashes = seq.block_hashes
    if len(hashes) >= num_blocks:
        return hashes
    ids = seq.all_ids
    identity = cache_identity(seq)
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else None
        hashes.append(block_hash(parent, identity, ids[i * block_size : (i + 1) * block_size]))
    return hashes
