"""Pure billing arithmetic: prices, charges, conservative token estimates.

Everything here is integer micro-USD and integer tokens; no function touches
a float, a clock or the database, so each is property-tested on its own.

Rounding rule (the only one): a charge is the exact cost in micro-USD rounded
*up* to the next whole micro-USD, once per request::

    charge = ceil((uncached_prompt*input + cached*cache_read + completion*output) / 1_000_000)

with prices in integer micro-USD per 1M tokens. The provider is therefore
never short, and never ahead by a full micro-USD (< $0.000001 per request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from teegate.money import parse_usd

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens

# Token-estimate constants; see estimate_prompt_tokens for the reasoning.
BASE_OVERHEAD_TOKENS = 64
TOOLS_OVERHEAD_TOKENS = 192
# Bytes counted as half a token: ASCII letters, space and tab.
_HALF_TOKEN_BYTES = bytes(sorted(set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \t")))
# UTF-8 lead bytes of multi-byte characters (0xC0-0xFF) are counted as zero;
# every continuation byte (0x80-0xBF) as one, so an n-byte character costs n-1.
_LEAD_BYTES = bytes(range(0xC0, 0x100))

# Generated-text bytes per token assumed when no usage block arrives.
FALLBACK_BYTES_PER_TOKEN = 3


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Prices:
    """Integer micro-USD per 1M tokens; ``cache_read`` None means "same as input"."""

    input: int
    output: int
    cache_read: int | None = None

    def __post_init__(self) -> None:
        _check_count("input price", self.input)
        _check_count("output price", self.output)
        if self.cache_read is not None:
            _check_count("cache_read price", self.cache_read)

    @classmethod
    def from_usd(cls, input: str, output: str, cache_read: str | None = None) -> Prices:
        """Prices from decimal USD strings per 1M tokens ("0.28" -> 280_000)."""
        return cls(
            parse_usd(input),
            parse_usd(output),
            None if cache_read is None else parse_usd(cache_read),
        )

    @property
    def cache_read_effective(self) -> int:
        """The price of a cached prompt token: cache_read, or the input price if unknown."""
        return self.input if self.cache_read is None else self.cache_read


def exact_cost_scaled(
    prices: Prices, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> int:
    """The exact cost in micro-USD * 1_000_000 (i.e. pico-USD), before rounding.

    Raises ValueError for negative counts or more cached than prompt tokens
    (cached tokens are a subset of the prompt in the OpenAI usage schema).
    """
    _check_count("prompt_tokens", prompt_tokens)
    _check_count("completion_tokens", completion_tokens)
    _check_count("cached_tokens", cached_tokens)
    if cached_tokens > prompt_tokens:
        raise ValueError(f"cached_tokens ({cached_tokens}) exceeds prompt_tokens ({prompt_tokens})")
    return (
        (prompt_tokens - cached_tokens) * prices.input
        + cached_tokens * prices.cache_read_effective
        + completion_tokens * prices.output
    )


def charge_micro(
    prices: Prices, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> int:
    """What a request costs, in whole micro-USD, rounded up (never down)."""
    scaled = exact_cost_scaled(prices, prompt_tokens, completion_tokens, cached_tokens)
    return -(-scaled // TOKENS_PER_PRICE_UNIT)


def _text_tokens(data: bytes) -> int:
    """The per-byte bound used by :func:`estimate_prompt_tokens` (see there)."""
    rest = data.translate(None, _HALF_TOKEN_BYTES)
    half = len(data) - len(rest)
    lead = len(rest) - len(rest.translate(None, _LEAD_BYTES))
    return (half + 1) // 2 + len(rest) - lead


def estimate_prompt_tokens(request_body: dict[str, Any]) -> int:
    """An upper bound on the prompt tokens a chat request will be billed for.

    Method. Serialise the *whole* request body as compact JSON (UTF-8, no
    ASCII escaping) -- so every field an upstream chat template might render
    (messages, tool definitions, response schemas, unknown future fields) is
    counted, plus the JSON syntax around it -- and count:

    * half a token per ASCII letter, space or tab;
    * one token per ASCII digit, punctuation mark, newline or other ASCII byte;
    * ``n - 1`` tokens per ``n``-byte UTF-8 character (1 for Cyrillic/Greek/
      accented Latin, 2 for CJK, 3 for emoji and other astral characters);

    then add :data:`BASE_OVERHEAD_TOKENS` (64) for the chat template (role
    markers, a default system preamble such as gpt-oss's harmony header) and
    :data:`TOOLS_OVERHEAD_TOKENS` (192) when tools/functions are present (the
    fixed tool-use instructions templates such as Qwen's inject).

    Why this bound. Byte-level BPE tokenizers (cl100k/o200k, Llama 3, Qwen,
    DeepSeek, GLM, Kimi) never produce more tokens than their pre-tokenizer
    splits plus what their vocabulary cannot merge. English prose runs at
    ~4-5 bytes per token and code at ~3, so half a token per letter (2 bytes
    per token) leaves a wide margin. Digits get a full token each because the
    Qwen and Llama 2 families split numbers into single digits (a CSV of
    numbers is ~1 token per byte there), and punctuation a full token each
    because dense code ("a[i][j]=b[i][j]*c;") approaches one token per symbol.
    Common CJK characters are ~1 token in cl100k and < 1 in Qwen/DeepSeek/
    o200k; 2 per character also covers the rarer ones cl100k splits in two.
    The JSON syntax around each message (~20 tokens by this count) exceeds the
    few marker tokens a chat template adds per message, so no per-message term
    is needed.

    Limits. This is an estimate for *holding* money, not a tokenizer:
    adversarial input (e.g. long runs of rare emoji) can exceed it. That only
    means the settled charge -- always the upstream's reported usage -- exceeds
    the reservation; see :meth:`teegate.ledger.Ledger.settle`. It is deliberately
    pessimistic (about 2x for English), which only affects how much balance a
    request must have available, never what it is charged.
    """
    if not isinstance(request_body, dict):
        raise TypeError("request_body must be the parsed JSON object of the request")
    data = json.dumps(request_body, ensure_ascii=False, separators=(",", ":"), default=str).encode(
        "utf-8", "surrogatepass"
    )
    tokens = BASE_OVERHEAD_TOKENS + _text_tokens(data)
    if request_body.get("tools") or request_body.get("functions"):
        tokens += TOOLS_OVERHEAD_TOKENS
    return tokens


def reservation_micro(prices: Prices, body: dict[str, Any], max_tokens: int) -> int:
    """The amount to hold before a request goes upstream.

    The estimated prompt at the input price plus ``max_tokens`` of completion
    at the output price, rounded like a charge. Cached-prompt discounts are
    ignored (we cannot know them in advance), which only makes the hold larger.
    """
    _check_count("max_tokens", max_tokens)
    return charge_micro(prices, estimate_prompt_tokens(body), max_tokens, 0)


def tokens_from_bytes(n_bytes: int) -> int:
    """Completion tokens to bill when the upstream sent no usage: ceil(bytes / 3).

    ``n_bytes`` is the UTF-8 length of the generated text (content, reasoning,
    tool-call names and arguments), not of the wire format. Three bytes per
    token is in the provider's favour for English (~4-5 bytes/token), code
    (~3-4) and CJK in the modern vocabularies (~3-4.5 bytes per token, i.e.
    1-1.5 characters), so a client cannot lower its bill by suppressing the
    usage block; it is not so pessimistic that a genuine upstream omission
    costs the client more than about a third extra.
    """
    _check_count("n_bytes", n_bytes)
    return -(-n_bytes // FALLBACK_BYTES_PER_TOKEN)
