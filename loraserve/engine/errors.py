"""Errors the engine raises on purpose, typed so the server can tell them from bugs.

`RequestError`: this request cannot be served as asked (too long, adapter of too high a rank,
bad sampling parameters); the server answers 422 and everyone else carries on.
`GenerationError`: the request was admitted but failed while generating (non-finite logits,
a broken step); the server answers 424, as LoRAX does. Anything else that escapes the engine
is a bug: the server logs it and answers 500.
"""

from __future__ import annotations


class RequestError(Exception):
    pass


class GenerationError(Exception):
    pass
