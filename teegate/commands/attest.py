"""``teegate attest``: verify TDX / GPU evidence offline, or attest a model of a live upstream.

``verify`` checks a quote file (or a whole NEAR AI / Phala report: quote, event log, info and
NVIDIA payload) against a collateral file at a given time (never the wall clock, since
collateral expires) and prints the verdict as JSON, GPU part included; ``gpu`` verifies an
NVIDIA GPU payload alone; ``fetch`` asks an upstream for fresh evidence bound to a random
nonce and verifies it now. All exit 0 only when the verdict is ok, 1 when the attestation
fails, 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx

from teegate.catalog.attestation import (
    AttestationService,
    NearAiSource,
    Policy,
    Verdict,
    load_policy,
    verify_evidence,
)
from teegate.catalog.attestation.gpu import verify_gpu_payload
from teegate.config import UpstreamSettings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    attest = subparsers.add_parser("attest", help="verify TDX attestation evidence")
    sub = attest.add_subparsers(dest="attest_command", required=True, metavar="ACTION")

    verify = sub.add_parser("verify", help="verify a quote or report offline at a given time")
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--quote", type=Path, help="quote (binary or hex)")
    source.add_argument(
        "--report",
        type=Path,
        help="a whole NEAR AI / Phala attestation report (JSON, nvidia_payload included)",
    )
    verify.add_argument(
        "--collateral", type=Path, required=True, help="QuoteCollateralV3 JSON file"
    )
    verify.add_argument(
        "--at", type=int, required=True, metavar="UNIX_SECONDS", help="verification time"
    )
    verify.add_argument("--nonce", help="64 hex digits report_data[32:64] must equal")
    verify.add_argument("--signing-address", help="hex address report_data[0:32] must bind")
    verify.add_argument("--event-log", type=Path, help="dstack event log JSON to replay")
    verify.add_argument("--info", type=Path, help="dstack info JSON (tcb_info.app_compose)")
    verify.add_argument("--gpu-payload", type=Path, help="NVIDIA payload JSON to verify too")
    _common(verify)
    _gpu_options(verify)
    verify.set_defaults(func=run_verify)

    gpu = sub.add_parser("gpu", help="verify an NVIDIA GPU payload offline at a given time")
    gpu.add_argument("payload", type=Path, metavar="PAYLOAD.json")
    gpu.add_argument(
        "--at", type=int, required=True, metavar="UNIX_SECONDS", help="verification time"
    )
    gpu.add_argument("--nonce", help="64 hex digits the signed SPDM requests must carry")
    gpu.add_argument("--policy", type=Path, help="TOML file whose [attestation] table applies")
    _gpu_options(gpu)
    gpu.set_defaults(func=run_gpu)

    fetch = sub.add_parser("fetch", help="attest a model of a live upstream now")
    fetch.add_argument("--model", required=True)
    fetch.add_argument("--upstream", help="upstream origin (default: [upstream].base_url)")
    fetch.add_argument("--api-key", help="upstream key (default: [upstream] or env)")
    fetch.add_argument("--ca-file", type=Path, help="CA bundle for an HTTPS upstream")
    fetch.add_argument(
        "--show-evidence", action="store_true", help="include the raw evidence in the output"
    )
    _common(fetch)
    _gpu_options(fetch)
    fetch.set_defaults(func=run_fetch)

    from teegate.commands import attest_signature  # its own module: no DCAP policy involved

    attest_signature.register(sub)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, help="TOML file whose [attestation] table applies")
    p.add_argument(
        "--test-root-ca",
        type=Path,
        help="DANGER, tests only: verify against this DER root instead of Intel's",
    )


def _gpu_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rims", type=Path, metavar="DIR", help="NVIDIA RIM files (<RIM id>.xml)")
    p.add_argument("--ocsp", type=Path, metavar="DIR", help="DER OCSP responses")
    p.add_argument("--gpu-count", type=int, help="exactly this many GPUs")
    p.add_argument(
        "--gpu-test-root-ca",
        type=Path,
        help="DANGER, tests only: verify GPUs against this root instead of NVIDIA's",
    )


def _with_gpu_options(policy: Policy, args: argparse.Namespace) -> Policy:
    update = {
        key: value
        for key, value in (
            ("gpu_rim_dir", args.rims),
            ("gpu_ocsp_dir", args.ocsp),
            ("gpu_count", args.gpu_count),
            ("gpu_test_root_ca", args.gpu_test_root_ca),
        )
        if value is not None
    }
    for key in ("gpu_rim_dir", "gpu_ocsp_dir"):
        if key in update and not update[key].is_dir():
            raise UsageError(f"{update[key]} is not a folder")
    policy = Policy.model_validate({**policy.model_dump(), **update})
    if policy.gpu_test_root_ca is not None:
        print(
            f"WARNING: verifying GPUs against the TEST root {policy.gpu_test_root_ca}, "
            "not NVIDIA's",
            file=sys.stderr,
        )
    return policy


class UsageError(Exception):
    """Bad input: reported on stderr with exit code 2."""


def _policy(args: argparse.Namespace) -> Policy:
    policy = load_policy(args.policy) if args.policy else Policy()
    if args.test_root_ca is not None:
        policy = policy.model_copy(update={"test_root_ca": args.test_root_ca})
    if policy.test_root_ca is not None:
        print(
            f"WARNING: verifying against the TEST root CA {policy.test_root_ca}, not Intel's",
            file=sys.stderr,
        )
    return policy


def _read_quote(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        text = raw.decode("ascii").strip().removeprefix("0x")
        return bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        return raw


def _hex32(text: str | None, what: str) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise UsageError(f"{what} is not hex") from None
    if len(value) != 32:
        raise UsageError(f"{what} must be 32 bytes (64 hex digits)")
    return value


def _emit(verdict: Verdict, *, with_evidence: bool = False) -> int:
    doc = verdict.model_dump(mode="json") if with_evidence else verdict.summary()
    print(json.dumps(doc, indent=2))
    return EXIT_OK if verdict.ok else EXIT_FAILED


def _guard(func: Any, args: argparse.Namespace) -> int:
    try:
        return func(args)
    except (UsageError, OSError, ValueError) as e:
        print(f"teegate attest: {e}", file=sys.stderr)
        return EXIT_USAGE


def run_verify(args: argparse.Namespace) -> int:
    return _guard(_verify, args)


def _verify(args: argparse.Namespace) -> int:
    policy = _with_gpu_options(_policy(args), args)
    if args.report is not None:
        evidence = json.loads(args.report.read_text())
        if not isinstance(evidence, dict):
            raise UsageError("--report must be a JSON object")
    else:
        evidence = {"intel_quote": _read_quote(args.quote).hex()}
    if args.gpu_payload:
        evidence["nvidia_payload"] = args.gpu_payload.read_text()
    if args.signing_address:
        evidence["signing_address"] = args.signing_address
    if args.event_log:
        evidence["event_log"] = json.loads(args.event_log.read_text())
    if args.info:
        evidence["info"] = json.loads(args.info.read_text())
    verdict = verify_evidence(
        evidence,
        nonce=_hex32(args.nonce, "--nonce"),
        policy=policy,
        collateral=args.collateral.read_text(),
        now=args.at,
        root_ca_der=policy.load_test_root(),
        require_binding=False,
    )
    return _emit(verdict)


def run_gpu(args: argparse.Namespace) -> int:
    return _guard(_gpu, args)


def _gpu(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy) if args.policy else Policy()
    policy = _with_gpu_options(policy, args)
    verdict = verify_gpu_payload(
        args.payload.read_text(),
        nonce=_hex32(args.nonce, "--nonce"),
        at=args.at,
        requirements=policy.gpu_requirements(),
    )
    print(json.dumps(verdict.model_dump(mode="json"), indent=2))
    return EXIT_OK if verdict.ok else EXIT_FAILED


def run_fetch(args: argparse.Namespace) -> int:
    return _guard(_fetch, args)


def _upstream_table(args: argparse.Namespace) -> dict[str, Any]:
    if not args.policy:
        return {}
    with open(args.policy, "rb") as f:
        table = tomllib.load(f).get("upstream", {})
    return table if isinstance(table, dict) else {}


def _fetch(args: argparse.Namespace) -> int:
    policy = _with_gpu_options(_policy(args), args)
    upstream = _upstream_table(args)
    base_url = args.upstream or upstream.get("base_url")
    if not base_url:
        raise UsageError("no upstream: pass --upstream or set [upstream].base_url in --policy")
    api_key = (
        args.api_key
        or upstream.get("api_key")
        or os.environ.get(upstream.get("api_key_env", UpstreamSettings().api_key_env))
    )
    ca_file = args.ca_file or upstream.get("ca_file")
    verify: str | bool = str(ca_file) if ca_file else True
    # stdout carries only the verdict's JSON: anything logged meanwhile goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        verdict = asyncio.run(_attest(base_url, api_key, verify, policy, args.model))
    return _emit(verdict, with_evidence=args.show_evidence)


async def _attest(
    base_url: str, api_key: str | None, verify: str | bool, policy: Policy, model: str
) -> Verdict:
    async with httpx.AsyncClient(
        verify=verify, timeout=policy.fetch_timeout_s, trust_env=False
    ) as client:
        service = AttestationService(NearAiSource(base_url, api_key, client), policy)
        return await service.attest_now(model)
