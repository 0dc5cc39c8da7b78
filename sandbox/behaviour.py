"""Misbehaviour switches that tests flip at run time (``POST /_sandbox/behaviour``).

Validated strictly: a typo in a test's switch name must fail loudly, not silently test nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Behaviour(BaseModel):
    """How the sandbox (mis)behaves; all defaults mean "a well-behaved upstream"."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    omit_usage: bool = False
    usage_with_choices: bool = False
    stop_after_chunks: int | None = Field(default=None, ge=0)
    # Hold streams after N content chunks until POST /_sandbox/release: lets a test see the first
    # tokens arrive while the upstream provably has not finished (no timing involved).
    hold_after_chunks: int | None = Field(default=None, ge=0)
    delay_ms: int = Field(default=0, ge=0)
    chunk_delay_ms: int = Field(default=0, ge=0)
    status: int | None = Field(default=None, ge=100, le=599)
    flags: dict[str, bool] = Field(default_factory=dict)
    remove_models: list[str] = Field(default_factory=list)
    cached_tokens: int = Field(default=0, ge=0)
    # Report this many completion tokens in usage, whatever was generated: an upstream that
    # ignored the request's budget (billing must still never take a balance below zero).
    usage_completion_tokens: int | None = Field(default=None, ge=0)
    malformed_rows: bool = False
    models_status: int | None = Field(default=None, ge=100, le=599)
    # The ``model`` chat answers name (plain and every streamed chunk); None: the requested one.
    answer_model: str | None = None

    # The Chutes flavour (``--upstream chutes``, sandbox/chutes/); ignored by the default one.
    # The first instance of every chute gets a quote over a key it does not serve.
    chutes_unbound_key: bool = False
    # The last instance of every chute has no TEE evidence: /e2e/instances still lists it
    # (as the real API does), /chutes/{id}/evidence names it in ``failed_instance_ids``.
    chutes_no_tee_instance: bool = False
    # The first instance of every chute restarts with a new E2EE key (while on): discovery and
    # evidence show the new key; requests sealed to the old one no longer decrypt.
    chutes_rotate_key: bool = False
    # The first instance of every chute sends GPU evidence signed over an old nonce (its quote
    # is fine): canned or replayed GPU evidence, which must get that instance refused.
    chutes_gpu_stale_nonce: bool = False
    # /e2e/invoke refuses every nonce token (403); /e2e/instances answers 429 (no tokens).
    chutes_refuse_tokens: bool = False
    chutes_exhaust_tokens: bool = False
    # The front door tampers with the N-th encrypted frame (0 = the first after e2e_init):
    # leaves it out, sends it twice, or flips a byte of its ciphertext.
    chutes_drop_frame: int | None = Field(default=None, ge=0)
    chutes_replay_frame: int | None = Field(default=None, ge=0)
    chutes_corrupt_frame: int | None = Field(default=None, ge=0)
    # The model fails: an encrypted error (``e2e_error`` event, or an encrypted error body).
    chutes_encrypted_error: bool = False

    def merged(self, patch: dict[str, Any]) -> Behaviour:
        """A new behaviour with ``patch`` applied on top (validated as a whole)."""
        return Behaviour.model_validate({**self.model_dump(), **patch})
