"""The model's tokenizer, read straight from `tokenizer.json` with the `tokenizers` library.

The serving path must not import `transformers` (slow to import, heavy), yet clients
compare our token ids and chat prompts with what `transformers.AutoTokenizer` gives
on the same files. So this module re-implements the few rules transformers layers
on top of `tokenizer.json`: named special tokens that must exist in the vocab, eos ids
gathered from all configs, and chat-template rendering in a sandboxed jinja2
environment. Like transformers 5, bos/eos insertion is whatever the post-processor in
`tokenizer.json` says; `add_bos_token`/`add_eos_token` in tokenizer_config.json are
ignored when a tokenizer.json exists (transformers 4 fast tokenizers already baked
those flags into the post-processor they saved).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as AddedToken dicts."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


class Tokenizer:
    """Encode/decode and chat-template rendering for one model directory."""

    def __init__(
        self,
        backend: _HFTokenizer,
        tokenizer_config: dict | None = None,
        model_config: dict | None = None,
        generation_config: dict | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = backend
        cfg = tokenizer_config or {}
        model_config = model_config or {}
        generation_config = generation_config or {}
        self.special_tokens_map: dict[str, str] = {}
        for name in _NAMED_SPECIAL_TOKENS:
            content = _token_content(cfg.get(name))
            if content is not None:
                self.special_tokens_map[name] = content
        # transformers adds named special tokens missing from tokenizer.json, so ids must match.
        missing = [t for t in self.special_tokens_map.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self._cleanup_spaces = bool(cfg.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"  # transformers 5 never cleans up BPE output
        )
        self._special_ids: set[int] = {
            int(i) for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        }
        self.bos_token_id: int | None = self._named_id("bos_token")
        if self.bos_token_id is None:
            ids = _as_id_list(model_config.get("bos_token_id"))
            self.bos_token_id = ids[0] if ids else None
        eos: set[int] = set()
        eos.update(_as_id_list(generation_config.get("eos_token_id")))
        eos.update(_as_id_list(model_config.get("eos_token_id")))
        eos_named = self._named_id("eos_token")
        if eos_named is not None:
            eos.add(eos_named)
        self.eos_token_ids: set[int] = eos
        self.chat_template: str | None = (
            chat_template if chat_template is not None else self._template_from(cfg)
        )
        self._text_cache: dict[int, str] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` plus the configs that decide bos/eos and the chat template."""
        path = Path(path)
        backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        template_file = path / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls(
            backend,
            tokenizer_config=_read_json(path / "tokenizer_config.json"),
            model_config=_read_json(path / "config.json"),
            generation_config=_read_json(path / "generation_config.json"),
            chat_template=template,
        )

    # -- setup helpers -------------------------------------------------------------------
    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self._tok.token_to_id(token)

    @staticmethod
    def _template_from(cfg: dict) -> str | None:
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            return named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    # -- public API ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Tokenizer vocab incl. added tokens; the model's lm_head may be larger (padding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Batch encode uses the Rust thread pool, worth it for many prompts at once."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._cleanup_spaces else text

    def decode_raw(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Decode without space cleanup: incremental detokenization needs prefix-stable text."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_text(self, token_id: int) -> str:
        """A token decoded on its own (LoRAX's text for prefill and alternative tokens)."""
        text = self._text_cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            self._text_cache[token_id] = text
        return text

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocab entry (e.g. 'Ġhello'), useful for logs and debugging."""
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self._special_ids)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation exactly as `transformers` `apply_chat_template(tokenize=False)`.

        The result already contains the template's bos token when the template
        writes it, so callers should encode it with `add_special_tokens=False`
        (as transformers does) to avoid a doubled bos.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = [_alias_reasoning({k: v for k, v in dict(m).items() if v is not None}) for m in messages]
        context: dict[str, Any] = {**self.special_tokens_map, **kwargs}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        return _compile_template(template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **context
        )


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    """transformers exposes a message's reasoning under every name templates read it by."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _clean_up_tokenization(text: str) -> str:
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


@lru_cache(maxsize=32)
def _compile_template(template: str) -> Any:
    """Templates come from untrusted repos: render them in jinja2's immutable sandbox, like transformers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja's builtin tojson HTML-escapes, which would corrupt prompts.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _GenerationTag(jinja2.ext.Extension):
        """`{% generation %}` only marks assistant spans for training masks; render its body as-is."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class _SafeNamespace(jinja2.utils.Namespace):
        """Forbid underscore attributes on `namespace()` objects, closing a sandbox escape route."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(template)
