"""Turning evidence into a verdict: pure, no I/O, time passed in.

Everything the verdict relies on is checked here, in a fixed order, and recorded by name in
``Verdict.checks``; the first failure becomes the refusal reason ("attestation failed: TCB
status OutOfDate"). Checks that cannot or need not be made (no allow-list configured, no
event log sent) are listed in ``Verdict.skipped`` rather than reported as passed.

The quote's signature chain, QE report, collateral signatures and validity windows, and the
TCB level are dcap-qvl's job (``dcap_qvl.verify``, pinned to Intel's root; a test root only
when the caller passes one explicitly). The rest is policy: TEE type, TCB status and
advisories, debug bit, report_data binding, measurements, event log and compose hash.

Why this module is long: it is the whole ordered list of checks a verdict rests on; read
top to bottom in one file, a reviewer can see that nothing is skipped or reordered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import dcap_qvl

from teegate.catalog.attestation.binding import binds_nonce, binds_signing_key, ethereum_address
from teegate.catalog.attestation.collateral import (
    CollateralInput,
    collateral_window,
    load_collateral,
)
from teegate.catalog.attestation.eventlog import replay
from teegate.catalog.attestation.evidence import EvidenceError, EvidenceParser, NodeEvidence
from teegate.catalog.attestation.gpu import GpuVerdict, combine_gpu_verdicts, verify_gpu_payload
from teegate.catalog.attestation.near_ai import parse_near_ai
from teegate.catalog.attestation.policy import Policy
from teegate.catalog.attestation.verdict import Verdict

CollateralLookup = Callable[[bytes], CollateralInput | None]

BindingCheck = Callable[[bytes], Iterable[tuple[str, bool, str]]]
"""An upstream's own ``report_data`` layout: given the quote's 64 bytes, the named checks
(name, passed, failure reason) that tie it to our nonce and the upstream's keys. None (the
default) is NEAR AI / Phala's layout, checked by :meth:`_NodeVerifier._binding`."""


@dataclass
class _NodeResult:
    """The checks made on one TD's evidence, and the facts read from its quote."""

    checks: dict[str, bool] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    next_update: int | None = None

    def check(self, name: str, passed: bool, failure: str) -> bool:
        self.checks[name] = passed
        if not passed:
            self.failures.append(failure)
        return passed

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(f"{name}: {why}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return " ".join(line.strip() for line in text if line.strip()) or type(error).__name__


def _iso(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _compose_hash_from_mr_config_id(mr_config_id: bytes) -> bytes | None:
    """dstack writes ``0x01 || sha256(app_compose)`` (zero-padded) into MRCONFIGID."""
    if len(mr_config_id) == 48 and mr_config_id[0] == 1 and not any(mr_config_id[33:]):
        return mr_config_id[1:33]
    return None


class _NodeVerifier:
    """Checks one TD's evidence; a class only to share the arguments between the steps."""

    def __init__(
        self,
        node: NodeEvidence,
        *,
        nonce: bytes | None,
        policy: Policy,
        collateral: CollateralInput | None,
        now: int,
        root_ca_der: bytes | None,
        tls_fingerprint: bytes | None,
        require_binding: bool,
        binding: BindingCheck | None = None,
    ) -> None:
        self.node = node
        self.nonce = nonce
        self.policy = policy
        self.collateral = collateral
        self.now = now
        self.root_ca_der = root_ca_der
        self.tls_fingerprint = tls_fingerprint
        self.require_binding = require_binding
        self.binding = binding
        self.r = _NodeResult()

    def run(self) -> _NodeResult:
        r = self.r
        r.facts["quote_sha256"] = hashlib.sha256(self.node.quote).hexdigest()
        try:
            quote = dcap_qvl.parse_quote(self.node.quote)
        except ValueError as e:
            r.check("quote_parses", False, f"quote does not parse: {_first_line(e)}")
            return r
        r.check("quote_parses", True, "")
        tee = quote.quote_type()
        r.facts["tee_type"] = tee
        report = quote.report
        r.facts["report_data"] = bytes(report.report_data)
        is_tdx = r.check("tee_type_tdx", tee == "TDX", f"TEE type {tee} is not TDX")
        if is_tdx:
            self._read_td(report)
            debug = bool(report.td_attributes[0] & 1)
            r.check("not_debug", not debug, "debug TD (td_attributes debug bit set)")
        self._dcap()
        if self.binding is None:
            self._binding()
        else:
            for name, passed, failure in self.binding(r.facts["report_data"]):
                r.check(name, passed, failure)
        if is_tdx:
            self._measurements()
            self._event_log_and_compose()
        else:
            r.skip("measurements", "not a TD quote")
        return r

    def _read_td(self, report: Any) -> None:
        f = self.r.facts
        f["mrtd"] = bytes(report.mr_td)
        f["rtmrs"] = tuple(bytes(getattr(report, f"rt_mr{i}")) for i in range(4))
        f["mr_config_id"] = bytes(report.mr_config_id)
        f["td_attributes"] = bytes(report.td_attributes)

    def _dcap(self) -> None:
        r = self.r
        if self.collateral is None:
            r.check("quote_verified", False, "no collateral to verify the quote with")
            return
        try:
            collateral = load_collateral(self.collateral)
            window = collateral_window(collateral)
        except (ValueError, KeyError, TypeError) as e:
            r.check("quote_verified", False, f"collateral unreadable: {_first_line(e)}")
            return
        r.next_update = window.next_update
        # dcap-qvl enforces the window too; checking it first gives a plain reason.
        if self.now > window.next_update:
            r.check(
                "collateral_current",
                False,
                f"collateral expired at {_iso(window.next_update)} (nextUpdate passed)",
            )
        elif self.now < window.issued:
            r.check(
                "collateral_current", False, f"collateral not valid before {_iso(window.issued)}"
            )
        else:
            r.check("collateral_current", True, "")
        try:
            if self.root_ca_der is None:
                report = dcap_qvl.verify(self.node.quote, collateral, self.now)
            else:
                report = dcap_qvl.verify_with_root_ca(
                    self.node.quote, collateral, self.root_ca_der, self.now
                )
        except ValueError as e:
            detail = _first_line(e).removeprefix("Verification failed: ")
            r.check("quote_verified", False, f"quote verification failed: {detail}")
            r.skip("tcb_status_accepted", "quote not verified")
            return
        r.check("quote_verified", True, "")
        status = report.status
        advisories = tuple(report.advisory_ids)
        r.facts["tcb_status"] = status
        r.facts["advisory_ids"] = advisories
        r.check(
            "tcb_status_accepted",
            status in self.policy.accepted_tcb_statuses,
            f"TCB status {status}",
        )
        refused = sorted(set(advisories) & set(self.policy.refused_advisory_ids))
        r.check("advisories_accepted", not refused, f"refused advisories {', '.join(refused)}")

    def _binding(self) -> None:
        r, node = self.r, self.node
        report_data: bytes = r.facts["report_data"]
        if self.nonce is None:
            if self.require_binding:
                r.check("report_data_nonce", False, "no nonce to check freshness against")
            else:
                r.skip("report_data_nonce", "no nonce given")
        else:
            r.check(
                "report_data_nonce",
                binds_nonce(report_data, self.nonce),
                "report_data does not bind our nonce",
            )
            if node.request_nonce is not None:
                echoed = node.request_nonce.lower().removeprefix("0x")
                r.check(
                    "request_nonce_matches",
                    echoed == self.nonce.hex(),
                    "upstream answered for a different nonce",
                )
        address = node.signing_address_bytes()
        if address is None:
            if self.require_binding:
                r.check("report_data_signing_key", False, "evidence names no signing key")
            else:
                r.skip("report_data_signing_key", "evidence names no signing key")
            return
        r.facts["signing_address"] = node.signing_address
        r.check(
            "report_data_signing_key",
            binds_signing_key(report_data, address, self.tls_fingerprint),
            "report_data does not bind the signing key",
        )
        if node.signing_public_key is None:
            r.skip("signing_key_matches_address", "no public key in the evidence")
            return
        try:
            public = bytes.fromhex(node.signing_public_key.removeprefix("0x"))
            derived = ethereum_address(public) if node.signing_algo == "ecdsa" else public
        except ValueError:
            derived = b""
        r.check(
            "signing_key_matches_address",
            derived == address,
            "signing_public_key does not match signing_address",
        )

    def _measurements(self) -> None:
        r, p = self.r, self.policy
        lists = {
            "mrtd": (p.mrtd_allowlist, r.facts["mrtd"]),
            "rtmr0": (p.rtmr0_allowlist, r.facts["rtmrs"][0]),
            "rtmr1": (p.rtmr1_allowlist, r.facts["rtmrs"][1]),
            "rtmr2": (p.rtmr2_allowlist, r.facts["rtmrs"][2]),
            "rtmr3": (p.rtmr3_allowlist, r.facts["rtmrs"][3]),
        }
        for name, (allowed, value) in lists.items():
            if allowed is None:
                r.skip(f"{name}_allowed", "no allow-list configured")
                continue
            r.check(
                f"{name}_allowed",
                value.hex() in allowed,
                f"{name.upper()} {value.hex()} is not on the allow-list",
            )

    def _event_log_and_compose(self) -> None:
        r, node = self.r, self.node
        from_config = _compose_hash_from_mr_config_id(r.facts["mr_config_id"])
        attested = from_config
        if node.event_log is None:
            if self.policy.require_event_log:
                r.check("event_log_replays", False, "no event log in the evidence")
            else:
                r.skip("event_log_replays", "no event log in the evidence")
        else:
            try:
                log = replay(node.event_log)
            except EvidenceError as e:
                r.check("event_log_replays", False, f"event log malformed: {e}")
                log = None
            if log is not None:
                replays = r.check(
                    "event_log_replays",
                    log.rtmrs == r.facts["rtmrs"],
                    "event log does not reproduce RTMR0-3",
                )
                r.check(
                    "event_log_runtime_digests",
                    not log.forged_events,
                    f"event log entries {', '.join(log.forged_events)} do not match their digests",
                )
                expected = from_config
                if expected is None and node.app_compose is not None:
                    expected = hashlib.sha256(node.app_compose.encode()).digest()
                r.check(
                    "event_log_compose_hash",
                    log.compose_hash is not None
                    and (expected is None or log.compose_hash == expected),
                    "event log compose-hash event does not match"
                    if log.compose_hash is not None
                    else "event log has no compose-hash event",
                )
                if attested is None and replays and not log.forged_events:
                    attested = log.compose_hash
        r.facts["compose_hash"] = attested
        if node.app_compose is not None:
            r.check(
                "app_compose_matches",
                attested is not None
                and hashlib.sha256(node.app_compose.encode()).digest() == attested,
                "app_compose does not match the attested compose hash"
                if attested is not None
                else "app_compose is not attested (no compose hash measured)",
            )
        else:
            r.skip("app_compose_matches", "no app_compose in the evidence")
        allowed = self.policy.compose_hash_allowlist
        if allowed is None:
            r.skip("compose_hash_allowed", "no allow-list configured")
        else:
            r.check(
                "compose_hash_allowed",
                attested is not None and attested.hex() in allowed,
                f"compose hash {attested.hex() if attested else 'none'} is not on the allow-list",
            )


def _lookup(collateral: CollateralInput | CollateralLookup | None, quote: bytes) -> Any:
    if callable(collateral) and not isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        return collateral(quote)
    return collateral


def _hex(value: bytes | None) -> str | None:
    return value.hex() if value is not None else None


def verify_evidence(
    evidence: dict[str, Any],
    *,
    nonce: bytes | None,
    policy: Policy,
    collateral: CollateralInput | CollateralLookup | None,
    now: int,
    root_ca_der: bytes | None = None,
    model: str = "",
    parse: EvidenceParser = parse_near_ai,
    tls_fingerprint: bytes | None = None,
    require_binding: bool = True,
    binding: BindingCheck | None = None,
    gpu_nonce: bytes | None = None,
) -> Verdict:
    """Verify ``evidence`` (as received) for ``model`` at unix time ``now``.

    ``nonce``: the 32 bytes we asked the quote to bind. ``collateral``: one collateral for
    every quote, or a function from a quote to its collateral. ``root_ca_der``: None for
    Intel's root (always, outside tests). ``require_binding=False`` (offline inspection of a
    bare quote only) turns a missing nonce or signing key into a skipped check instead of a
    failure. ``binding``: the upstream's own report_data checks (Chutes); None for NEAR AI /
    Phala's layout. ``gpu_nonce``: the 32 bytes the GPUs' signed SPDM requests must carry
    when the upstream binds its GPU evidence to something else than ``nonce`` (Chutes: the
    same digest of our nonce and the instance key as ``report_data[0:32]``); None: ``nonce``.
    """
    if nonce is not None and len(nonce) != 32:
        raise ValueError("nonce must be 32 bytes")
    base: dict[str, Any] = {
        "model": model,
        "mode": "dcap",
        "verified_at": now,
        "root": "intel" if root_ca_der is None else "test",
        "nonce": _hex(nonce),
        "evidence": evidence,
    }
    retry_at = now + policy.retry_interval_s
    try:
        nodes = parse(evidence)
        if not nodes:
            raise EvidenceError("no attestation in the evidence")
    except EvidenceError as e:
        return Verdict(
            **base,
            ok=False,
            reason=f"attestation failed: malformed evidence: {e}",
            expires_at=retry_at,
            checks={"evidence_well_formed": False},
        )
    results = []
    for node in nodes:
        verifier = _NodeVerifier(
            node,
            nonce=nonce,
            policy=policy,
            collateral=_lookup(collateral, node.quote),
            now=now,
            root_ca_der=root_ca_der,
            tls_fingerprint=tls_fingerprint,
            require_binding=require_binding,
            binding=binding,
        )
        try:
            results.append(verifier.run())
        except EvidenceError as e:
            return Verdict(
                **base,
                ok=False,
                reason=f"attestation failed: malformed evidence: {e}",
                expires_at=retry_at,
                checks={"evidence_well_formed": False},
            )
    gpu_bound = nonce if gpu_nonce is None else gpu_nonce
    gpu = _gpu_part(nodes, nonce=gpu_bound, policy=policy, now=now)
    return _combine(base, results, policy, now, gpu=gpu)


def _gpu_part(
    nodes: list[NodeEvidence], *, nonce: bytes | None, policy: Policy, now: int
) -> GpuVerdict | Literal["unverified", "absent"]:
    """Each TD's GPU evidence verified for the same nonce its quote binds (``gpu_evidence``
    "verify" / "require"), or only recorded ("record")."""
    payloads = [node.gpu_payload for node in nodes if node.gpu_payload]
    if not payloads:
        return "absent"
    if policy.gpu_evidence == "record":
        return "unverified"
    bare = [i for i, node in enumerate(nodes) if not node.gpu_payload]
    if bare and policy.gpu_evidence == "require":
        reason = f"GPU evidence rejected: TD {bare[0]} sent none, and policy requires it"
        return GpuVerdict(ok=False, reason=reason, checks={"gpu_evidence_present": False})
    try:
        requirements = policy.gpu_requirements()
    except (OSError, ValueError) as e:
        reason = f"GPU evidence rejected: test GPU root unreadable: {_first_line(e)}"
        return GpuVerdict(ok=False, reason=reason)
    return combine_gpu_verdicts(
        [verify_gpu_payload(p, nonce=nonce, at=now, requirements=requirements) for p in payloads]
    )


def _combine(
    base: dict[str, Any],
    results: list[_NodeResult],
    policy: Policy,
    now: int,
    *,
    gpu: GpuVerdict | Literal["unverified", "absent"],
) -> Verdict:
    checks: dict[str, bool] = {"evidence_well_formed": True}
    for res in results:
        for name, passed in res.checks.items():
            checks[name] = checks.get(name, True) and passed
    failures = [
        (f"TD {i}: {msg}" if len(results) > 1 else msg)
        for i, res in enumerate(results)
        for msg in res.failures
    ]
    if isinstance(gpu, GpuVerdict):
        checks["gpu_evidence_verified"] = gpu.ok
        if not gpu.ok:
            failures.append(gpu.reason)
    elif gpu == "absent" and policy.gpu_evidence == "require":
        checks["gpu_evidence_present"] = False
        failures.append("no GPU evidence, and policy requires it")
    ok = not failures
    first = results[0].facts
    tee = first.get("tee_type")
    if ok:
        expires = now + policy.reattest_interval_s + policy.verdict_grace_s
        next_updates = [r.next_update for r in results if r.next_update is not None]
        expires = min([expires, *next_updates])
        count = f", {len(results)} TDs" if len(results) > 1 else ""
        reason = f"attested: {tee} {first.get('tcb_status')}{count}"
    else:
        expires = now + policy.retry_interval_s
        reason = f"attestation failed: {failures[0]}"
    addresses = tuple(r.facts["signing_address"] for r in results if r.facts.get("signing_address"))
    skipped = list(dict.fromkeys(s for r in results for s in r.skipped))
    if isinstance(gpu, GpuVerdict):
        skipped.extend(f"gpu: {s}" for s in gpu.skipped)
    else:
        skipped.append(
            "gpu: nvidia_payload recorded, not verified"
            if gpu == "unverified"
            else "gpu: no GPU evidence"
        )
    return Verdict(
        **base,
        ok=ok,
        reason=reason,
        expires_at=expires,
        quote_sha256=first.get("quote_sha256"),
        signing_address=addresses[0] if addresses else None,
        signing_addresses=addresses,
        tee_type=tee,
        tcb_status=first.get("tcb_status"),
        advisory_ids=first.get("advisory_ids", ()),
        mrtd=_hex(first.get("mrtd")),
        rtmrs=tuple(x.hex() for x in first.get("rtmrs", ())),
        mr_config_id=_hex(first.get("mr_config_id")),
        compose_hash=_hex(first.get("compose_hash")),
        report_data=_hex(first.get("report_data")),
        checks=checks,
        skipped=tuple(skipped),
        gpu=gpu,
    )
