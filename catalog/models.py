"""Catalog entries, parsed strictly from upstream rows.

Prices become integers (micro-USD per 1M tokens) the moment they are parsed:
the upstream's decimal string is multiplied by the markup and rounded *up* to
the micro-dollar (:func:`teegate.money.usd_to_micro`), so the provider is
never short by a rounding error and no float ever touches money.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from teegate.money import usd_to_micro

# Upstreams spell features inconsistently ("json-mode", "json_mode").
_FEATURE_ALIASES = {"json-mode": "json_mode", "structured-outputs": "structured_outputs"}


class Pricing(BaseModel):
    """Marked-up prices in integer micro-USD per 1M tokens."""

    model_config = ConfigDict(frozen=True)

    input: int
    output: int
    cache_read: int | None = None


class CatalogModel(BaseModel):
    """One confidential model as the gateway serves it."""

    model_config = ConfigDict(frozen=True)

    id: str
    created: int
    owned_by: str
    context_length: int
    max_output_length: int | None
    features: frozenset[str]
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    pricing: Pricing
    chute_id: str | None = None
    """Chutes' id of the deployment serving this model (a UUID), when the upstream lists one:
    where a Chutes upstream's per-instance evidence and E2EE path are found."""

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.features

    @property
    def supports_json(self) -> bool:
        return bool({"json_mode", "structured_outputs"} & self.features)


# The upstream client parses JSON numbers as Decimal (``parse_float=Decimal``),
# so a price written as a JSON number arrives exact, never as a float.
_PriceStr = Annotated[str | int | Decimal, Field(union_mode="left_to_right")]


class _UpstreamPricing(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: _PriceStr
    completion: _PriceStr
    input_cache_read: _PriceStr | None = None


class UpstreamRow(BaseModel):
    """A row of the upstream's ``GET /v1/models``, in Chutes' shape.

    Strict: a row we do not fully understand is skipped, never guessed at.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    id: Annotated[str, Field(min_length=1, max_length=256)]
    confidential_compute: bool
    context_length: int | None = None
    max_model_len: int | None = None
    max_output_length: int | None = None
    created: int = 0
    owned_by: str | None = None
    supported_features: list[str] = []
    input_modalities: list[str] = ["text"]
    output_modalities: list[str] = ["text"]
    pricing: _UpstreamPricing
    chute_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] | None = None

    @field_validator("id")
    @classmethod
    def _printable_id(cls, v: str) -> str:
        if not re.fullmatch(r"[\x21-\x7e]+", v):
            raise ValueError("model id must be printable ASCII without spaces")
        return v

    def to_model(self, markup: Decimal) -> CatalogModel:
        context = self.context_length or self.max_model_len
        if not context or context < 1:
            raise ValueError("row has no positive context_length")
        p = self.pricing
        return CatalogModel(
            id=self.id,
            created=self.created,
            owned_by=self.owned_by or self.id.split("/", 1)[0],
            context_length=context,
            max_output_length=self.max_output_length,
            features=frozenset(_FEATURE_ALIASES.get(f, f) for f in self.supported_features),
            input_modalities=tuple(self.input_modalities),
            output_modalities=tuple(self.output_modalities),
            chute_id=self.chute_id,
            pricing=Pricing(
                input=usd_to_micro(p.prompt, markup),
                output=usd_to_micro(p.completion, markup),
                cache_read=(
                    None if p.input_cache_read is None else usd_to_micro(p.input_cache_read, markup)
                ),
            ),
        )


def parse_rows(
    rows: Any, markup: Decimal
) -> tuple[dict[str, CatalogModel], frozenset[str], list[str]]:
    """Keep rows whose flag is exactly ``true``.

    Returns (confidential models, ids listed upstream without the flag, reasons
    for skipped rows). Skip reasons name the row's position and the failing
    field, never its content.
    """
    if not isinstance(rows, list):
        raise ValueError("upstream catalog 'data' is not a list")
    models: dict[str, CatalogModel] = {}
    others: set[str] = set()
    skipped: list[str] = []
    for i, row in enumerate(rows):
        try:
            parsed = UpstreamRow.model_validate(row)
            if parsed.confidential_compute is not True:
                others.add(parsed.id)
                continue
            model = parsed.to_model(markup)
        except (ValueError, TypeError) as e:  # pydantic.ValidationError is a ValueError
            skipped.append(f"row {i}: {_short_reason(e)}")
            continue
        if model.id in models:
            skipped.append(f"row {i}: duplicate id")
            continue
        models[model.id] = model
    return models, frozenset(others - models.keys()), skipped


def _short_reason(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors(include_input=False)[0]
        loc = ".".join(str(x) for x in first["loc"])
        return f"{loc}: {first['msg']}"
    return str(e)
