"""Server-side rules for Medusa speculative decoding: which heads draft, and how many tokens.

LoRAX's behaviour, followed here:

* `--adapter-id` naming an adapter with Medusa heads (Medusa-only or LoRA + Medusa)
  makes those heads the *default speculator*: they draft for every request that
  brings no heads of its own, whatever LoRA it uses.
* `--speculative-tokens 0` (the default) with such an adapter means "as many as
  the heads": LoRAX runs `max(heads, --speculative-tokens)` tokens per step.
* A request whose adapter carries heads is refused (422) unless the server has a
  default speculator.

Where loraserve differs, on purpose: `--speculative-tokens N > 0` *caps* the drafts
per step at N (LoRAX takes the larger of N and the head count, so it can only
raise the number), because a cap is what an operator needs to trade acceptance for
verification cost. Per-request heads may be v1 or v2 and have any number of heads
(LoRAX wants v2 heads, as many as the default's); the cap applies to them too.
`--speculative-tokens > 0` without Medusa heads (LoRAX's n-gram speculation) is
refused at start rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from loraserve.adapters.lora_weights import LoraAdapter

NO_DEFAULT_SPECULATOR = (
    "this adapter carries Medusa heads, but speculative decoding needs the server to be started "
    "with a default Medusa adapter (--adapter-id); LoRAX has the same rule"
)


class SpeculationConfigError(ValueError):
    """A start-up flag combination that cannot run; the CLI prints it and exits 2."""


def configure_speculation(engine: Any, static_adapter: LoraAdapter | None, speculative_tokens: int) -> int:
    """Install the static adapter's heads (if any) as the default speculator; returns drafts per step.

    `engine` is a `loraserve.engine.engine.Engine` that has not started stepping.
    """
    if speculative_tokens < 0:
        raise SpeculationConfigError(f"--speculative-tokens must be >= 0, got {speculative_tokens}")
    heads = static_adapter.medusa if static_adapter is not None else None
    if heads is None:
        if speculative_tokens > 0:
            raise SpeculationConfigError(
                "--speculative-tokens > 0 needs Medusa heads: pass a Medusa (or LoRA + Medusa) adapter as "
                "--adapter-id (n-gram speculation without heads is not supported)"
            )
        return 0
    # None: as many as the heads have; a cap above the head count would only be reported, never drafted
    cap = min(speculative_tokens, heads.num_heads) if speculative_tokens else None
    engine.set_default_speculator(heads, cap)
    return int(engine.speculative_tokens)


def has_default_speculator(engine: Any) -> bool:
    return getattr(engine, "default_speculator", None) is not None


def check_request_heads(engine: Any, adapter: LoraAdapter | None) -> str | None:
    """The 422 message for per-request heads on a server without a default speculator, else None.

    The engine refuses the same request; checking here too makes streaming routes
    answer 422 before their headers go out instead of an error event.
    """
    if adapter is not None and adapter.medusa is not None and not has_default_speculator(engine):
        return NO_DEFAULT_SPECULATOR
    return None


def tokens_per_step(spec_steps: int, spec_tokens: int) -> float | None:
    """Mean tokens a verification step produced (accepted drafts + the corrected/bonus token)."""
    return round(spec_tokens / spec_steps, 4) if spec_steps > 0 else None
