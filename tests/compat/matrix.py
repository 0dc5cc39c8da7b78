"""The compatibility matrix: one source of truth for what each real client does through teegate.

Every cell is (client, feature, mode) and says what the tests expect of it:

* :data:`OK`: the client completes the feature against the gateway (tests/compat/test_cells.py
  runs it and checks the answer came from the sandbox and the ledger charged the key);
* :class:`No`: the client runs and fails in the stated way (its error must contain ``error``);
* :class:`NA`: not applicable or not run, with the reason (a raw HTTP client has no schema
  layer; a client that cannot be installed beside the others).

README's "Compatibility" table is rendered from this module (:func:`render_table`), and
tests/compat/test_readme.py asserts README carries exactly that rendering, so the table says
what the tests check. To flip a cell, change it here, run the tests, then
``python -m tests.compat.render --write``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"  # package.json, cells.mjs, node_modules
MODES = ("reverse", "egress")

# Column order in the table; (id, heading).
FEATURES: tuple[tuple[str, str], ...] = (
    ("chat", "Chat"),
    ("stream", "Chat stream"),
    ("tools", "Tool loop"),
    ("structured", "Structured output"),
    ("responses", "Responses"),
    ("responses_stream", "Responses stream"),
    ("responses_tools", "Responses tool loop"),
    ("responses_structured", "Responses structured"),
)
FEATURE_IDS = tuple(f for f, _ in FEATURES)


@dataclass(frozen=True)
class Client:
    id: str
    label: str  # what the table shows, with the pinned versions
    runner: str  # "py" (tests/compat/py_runner.py) or "node" (tests/compat/node/cells.mjs)
    how: str  # what "Chat" / "Responses" mean for this client (the API it calls)
    excluded: str | None = None  # why it is not run at all
    # The packages whose versions the label names: pyproject's test extra (Python) or
    # tests/compat/node/package.json (Node); test_matrix.py checks the installed ones match.
    pins: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class No:
    """Runs, and fails: ``error`` is a substring of the error the client raises."""

    reason: str
    error: str
    reaches_upstream: bool = False  # whether a request still gets through the gateway


@dataclass(frozen=True)
class NA:
    """Not run, for ``reason``."""

    reason: str


OK = "ok"
Expect = str | No | NA

_RAW = NA("raw HTTP, no tool or schema layer (the openai rows cover that wire format)")

CLIENTS: tuple[Client, ...] = (
    Client(
        "openai_py",
        "openai (Python) 3.57.0",
        "py",
        "`chat.completions.create`/`.parse`; `responses.create`/`.stream`/`.parse`",
        pins=(("openai", "3.57.0"),),
    ),
    Client(
        "requests",
        "requests 2.34.2",
        "py",
        "POST JSON, SSE read line by line",
        pins=(("requests", "2.34.2"),),
    ),
    Client("curl", "curl (system)", "py", "`curl -d`, `curl -N` for streams"),
    Client(
        "pydantic_ai",
        "pydantic-ai-slim 2.68.0",
        "py",
        '`OpenAIChatModel` for chat; the default `Agent("openai:…")` (Responses) for Responses',
        pins=(("pydantic-ai-slim", "2.68.0"),),
    ),
    Client(
        "langchain",
        "langchain-openai 1.7.4",
        "py",
        "`ChatOpenAI`; `use_responses_api=True` for Responses",
        pins=(("langchain-openai", "1.7.4"),),
    ),
    Client(
        "node_openai",
        "openai (Node) 6.30.1",
        "node",
        "`chat.completions.create`/`.parse`; `responses.create`/`.stream`/`.parse`",
        pins=(("openai", "6.30.1"),),
    ),
    Client(
        "node_no_agent",
        "openai (Node) 6.30.1, no proxy agent",
        "node",
        "",
        pins=(("openai", "6.30.1"),),
    ),
    Client(
        "vercel_ai",
        "Vercel AI SDK: ai 6.0.325, @ai-sdk/openai 3.0.141",
        "node",
        "`openai.chat(model)` for chat; the default provider `openai(model)` (Responses)",
        pins=(("ai", "6.0.325"), ("@ai-sdk/openai", "3.0.141")),
    ),
    Client(
        "litellm",
        "LiteLLM SDK",
        "py",
        "",
        excluded=(
            "not installed: litellm 1.110 adds about 270 MB (boto3, tokenizers, huggingface_hub) "
            "and about 50 s to setup, and its import alone costs about 8 s of CPU, most of this "
            "folder's budget; the benchmark runs LiteLLM's proxy from its own venv"
        ),
    ),
    Client(
        "instructor",
        "instructor",
        "py",
        "",
        excluded=(
            "not installed: instructor 1.17 requires jiter<0.15, the openai 3.x SDK the tests "
            "use requires jiter>=0.16, so pip cannot put both in one environment"
        ),
    ),
)
CLIENT_BY_ID = {c.id: c for c in CLIENTS}

# Per client, the cells that differ from OK (all modes unless the key names one).
_NODE_FETCH = (
    "Node's built-in fetch ignores HTTPS_PROXY (this is Node 20; newer Node reads it only with "
    "NODE_USE_ENV_PROXY=1): "
    "the app dials the upstream directly, so the gateway never sees the request, and the "
    "upstream's certificate is not the one NODE_EXTRA_CA_CERTS trusts; install undici's "
    "EnvHttpProxyAgent, as the row above does (the client's `fetch` option)"
)
_EXCEPTIONS: dict[str, dict[str, Expect]] = {
    "node_no_agent": {
        "chat.reverse": NA("reverse mode needs no proxy: the openai (Node) row covers it"),
        "chat.egress": No(_NODE_FETCH, "Connection error"),
        **{f: NA("every call takes the same fetch as Chat") for f in FEATURE_IDS[1:]},
    },
    "requests": {
        "tools": _RAW,
        "structured": _RAW,
        "responses_tools": _RAW,
        "responses_structured": _RAW,
    },
    "curl": {
        "tools": _RAW,
        "structured": _RAW,
        "responses_tools": _RAW,
        "responses_structured": _RAW,
    },
}


def expected(client: str, feature: str, mode: str) -> Expect:
    """What the tests expect of one cell."""
    c = CLIENT_BY_ID[client]
    if c.excluded is not None:
        return NA(c.excluded)
    exceptions = _EXCEPTIONS.get(client, {})
    return exceptions.get(f"{feature}.{mode}", exceptions.get(feature, OK))


def cell_id(client: str, feature: str, mode: str) -> str:
    return f"{client}.{feature}.{mode}"


def cells(runner: str | None = None, mode: str | None = None) -> list[tuple[str, str, str]]:
    """Every (client, feature, mode) that runs (OK or No), optionally one runner's or mode's."""
    out = []
    for c in CLIENTS:
        for feature in FEATURE_IDS:
            for m in MODES:
                if runner not in (None, c.runner) or mode not in (None, m):
                    continue
                if not isinstance(expected(c.id, feature, m), NA):
                    out.append((c.id, feature, m))
    return out


def _mark(expect: Expect) -> str:
    if expect == OK:
        return "✅"
    if isinstance(expect, No):
        return "❌"
    return "—"


def render_table() -> str:
    """The README block: one row per client and mode, one column per feature, notes saying
    why any cell is not green."""
    head = ["Client", "Mode", *(h for _, h in FEATURES), "Notes"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    for c in CLIENTS:
        if c.excluded is not None:
            dashes = " | ".join("—" for _ in FEATURES)
            lines.append(f"| {c.label} | — | {dashes} | {c.excluded} |")
            continue
        for mode in MODES:
            if all(isinstance(expected(c.id, f, mode), NA) for f in FEATURE_IDS):
                continue  # a mode the client's row is not about (its reasons are in the code)
            marks, notes = [], []
            for feature, heading in FEATURES:
                expect = expected(c.id, feature, mode)
                marks.append(_mark(expect))
                if expect != OK:
                    reason = expect.reason
                    same = [n for n in notes if n[1] == reason]
                    if same:
                        same[0][0].append(heading)
                    else:
                        notes.append(([heading], reason))
            text = "; ".join(f"{', '.join(h)}: {r}" for h, r in notes)
            if not text:
                text = c.how if mode == "reverse" else "HTTPS_PROXY + the egress CA, unchanged app"
            lines.append(f"| {c.label} | {mode} | " + " | ".join(marks) + f" | {text} |")
    legend = (
        "✅ passes in the test suite · ❌ fails as the note says · — not run, the note says why. "
        "Reverse: `base_url` is the gateway. Egress: the app keeps the upstream's https URL and "
        "reaches it through `HTTPS_PROXY` (the gateway's egress listener), trusting the "
        "gateway's CA (`SSL_CERT_FILE`/`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, "
        "`NODE_EXTRA_CA_CERTS`; Node 20 through undici's `EnvHttpProxyAgent`)."
    )
    return "\n".join(lines) + "\n\n" + legend + "\n"
