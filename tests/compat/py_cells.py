"""The Python clients' cells: one function per (client, feature), as a user of that client
would write it, registered here by :func:`cell` (cells_openai.py, cells_http.py and
cells_frameworks.py hold them; :func:`load` imports all three).

Each takes a :class:`Target` and returns an :class:`Outcome`; a failure raises (the runner
records the error). Nothing here configures a proxy or a CA: in egress mode the runner's
process has ``HTTPS_PROXY`` and the CA variables set, as a real app's environment would, and
each client finds them its own way. Heavy imports stay inside the functions, so a run imports
each framework once, and only if one of its cells runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel

CELLS: dict[tuple[str, str], Callable[[Target], Outcome]] = {}


@dataclass(frozen=True)
class Target:
    api_base: str  # ".../v1": the gateway's (reverse) or the upstream's own https URL (egress)
    api_key: str
    model: str
    marker: str  # unique per cell, in every prompt: how the tests find its upstream requests

    @property
    def prompt(self) -> str:
        return f"Say hello. [{self.marker}]"

    @property
    def tool_prompt(self) -> str:
        return f"What is the weather in Paris? Use the tool. [{self.marker}]"

    @property
    def tool_result(self) -> str:
        """What the tool returns: the final answer must quote it."""
        return f"sunny-{self.marker.rsplit(' ', 1)[-1]}"

    @property
    def schema_prompt(self) -> str:
        return f"Describe a city. [{self.marker}]"


@dataclass
class Outcome:
    text: str = ""  # the final answer's text
    chunks: int = 0  # text deltas received (streams)
    data: dict[str, Any] | None = None  # the parsed structured output
    tool_calls: int = 0  # tool calls the loop executed
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class City(BaseModel):
    name: str
    population: int


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


def cell(client: str, feature: str) -> Callable[[Callable[[Target], Outcome]], Any]:
    def register(fn: Callable[[Target], Outcome]) -> Callable[[Target], Outcome]:
        CELLS[(client, feature)] = fn
        return fn

    return register




def load() -> dict[tuple[str, str], Callable[[Target], Outcome]]:
    """Every cell (importing the modules that register them; the frameworks stay unimported
    until a cell of theirs runs)."""
    from tests.compat import cells_frameworks, cells_http, cells_openai  # noqa: F401

    return CELLS
