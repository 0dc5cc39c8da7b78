"""Egress mode end to end: the openai SDK behind HTTPS_PROXY, real processes on loopback."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import certifi
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import chat_count
from tests.support.egress import (
    balance,
    connect_tunnel,
    log_events,
    wait_for_balance_change,
    wait_for_event,
)
from tests.support.testdata import NON_TEE, TEE

PROMPT = "egress-secret-prompt-7f3a"
MSG = [{"role": "user", "content": PROMPT}]


# -- the confidential upstream, through the egress listener ------------------------------


def test_tee_model_succeeds_with_the_upstream_key_swapped_in(egress_openai, upstream, gateway):
    before = balance(gateway)
    with egress_openai(upstream.api_base) as client:
        raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
    completion = raw.parse()
    assert completion.model == TEE and completion.choices[0].message.content
    rid = raw.headers["x-request-id"]
    assert rid.startswith("req_")  # the gateway answered, not the upstream directly
    assert raw.headers["x-ratelimit-limit"].isdigit()  # the reverse path's rate limit too
    seen = upstream.stats()["chat"]
    assert len(seen) == 1
    assert seen[0]["headers"]["authorization"] == f"Bearer {upstream.api_key}"
    assert gateway.api_key not in str(seen[0]["headers"])
    line = wait_for_event(gateway, lambda e: e.get("request_id") == rid)
    assert line["mode"] == "egress" and line["decision"] == "forwarded"
    assert line["host"] == f"127.0.0.1:{upstream.port}" and line["status"] == 200
    assert wait_for_balance_change(gateway, before) > 0


def test_egress_is_attested_and_billed_exactly_like_reverse(egress_openai, upstream, gateway):
    """Same request both ways (the sandbox's usage is deterministic): same charge, same
    attestation evidence in the response headers."""
    before = balance(gateway)
    with openai.OpenAI(
        base_url=gateway.api_base, api_key=gateway.api_key, max_retries=0
    ) as reverse:
        r1 = reverse.chat.completions.with_raw_response.create(
            model=TEE, messages=MSG, max_tokens=20
        )
    via_reverse = wait_for_balance_change(gateway, before)
    before = balance(gateway)
    with egress_openai(upstream.api_base) as client:
        r2 = client.chat.completions.with_raw_response.create(
            model=TEE, messages=MSG, max_tokens=20
        )
    assert wait_for_balance_change(gateway, before) == via_reverse > 0
    quote = "x-teegate-quote-sha256"
    assert r1.headers[quote] and r2.headers[quote] == r1.headers[quote]


def test_a_key_the_ledger_does_not_know_is_refused(egress_openai, upstream):
    with egress_openai(upstream.api_base, api_key="vgpu_sk_not_a_real_key") as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=TEE, messages=MSG)
    assert chat_count(upstream) == 0


def test_non_tee_model_is_refused_by_the_same_gate(egress_openai, upstream, gateway):
    before = balance(gateway)
    with egress_openai(upstream.api_base) as client, pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NON_TEE, messages=MSG)
    assert e.value.body["code"] == "model_not_confidential"
    assert chat_count(upstream) == 0
    assert balance(gateway) == before


def test_model_list_is_answered_locally_like_reverse_mode(egress_openai, upstream, gateway):
    seen = upstream.requests_seen()
    with egress_openai(upstream.api_base) as client:
        ids = [m.id for m in client.models.list()]
    assert TEE in ids and NON_TEE not in ids
    # Served from the catalog: the upstream saw only the gateway's own catalog polls (it polls
    # every second here), each with the upstream's key, never the app's request.
    for r in upstream.requests(since=seen):
        assert (r["method"], r["path"]) == ("GET", "/v1/models")
        assert dict((k.lower(), v) for k, v in r["headers"])["authorization"] == (
            f"Bearer {upstream.api_key}"
        )


def test_streaming_through_egress(egress_openai, upstream):
    with egress_openai(upstream.api_base) as client:
        stream = client.chat.completions.create(model=TEE, messages=MSG, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert chat_count(upstream) == 1


def test_intercepted_upstream_shows_the_gateway_certificate(gateway, upstream, gateway_ca):
    der = _peer_cert_viaconnect_tunnel(gateway, "127.0.0.1", upstream.port)
    cert = x509.load_der_x509_certificate(der)
    assert _cn(cert.issuer) == "teegate egress CA"
    ca = x509.load_pem_x509_certificate(gateway_ca.read_bytes())
    cert.verify_directly_issued_by(ca)


# -- another LLM provider: refused, nothing forwarded -------------------------------------


def test_listed_llm_host_gets_provider_not_confidential(
    egress_openai, listed_tls, upstream, gateway
):
    before = balance(gateway)
    host = f"127.0.0.3:{listed_tls.port}"
    with egress_openai(listed_tls.api_base) as client:
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model=TEE, messages=MSG)
    err = e.value.body
    assert e.value.status_code == 403
    assert err["code"] == "provider_not_confidential" and err["type"] == "permission_error"
    assert host in err["message"]
    # The hint names the gateway's own reverse listener (the bound port), not the upstream:
    # the upstream's URL, with the documented NO_PROXY, would skip the gateway altogether.
    assert f"base_url={gateway.urls['reverse']}/v1 " in err["message"]
    assert upstream.base_url not in err["message"]
    assert listed_tls.stats()["total"] == 0
    assert chat_count(upstream) == 0
    assert balance(gateway) == before


def test_every_request_to_a_listed_host_is_refused(egress_http, listed_tls):
    url = f"{listed_tls.base_url}/v1/models"
    for method in ("GET", "POST", "DELETE"):
        r = egress_http.request(method, url, headers={"authorization": "Bearer sk-real-openai"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "provider_not_confidential"
    assert listed_tls.stats()["total"] == 0


def test_plain_http_to_a_listed_host_is_refused_too(gateway, listed_plain):
    with httpx.Client(proxy=gateway.urls["egress"], timeout=30) as c:
        r = c.post(
            f"{listed_plain.api_base}/chat/completions",
            json={"model": TEE, "messages": MSG},
            headers={"authorization": f"Bearer {listed_plain.api_key}"},
        )
    assert r.status_code == 403 and r.json()["error"]["code"] == "provider_not_confidential"
    assert listed_plain.stats()["total"] == 0


def test_raw_tcp_to_a_listed_host_is_not_relayed(gateway):
    with socket.create_server(("127.0.0.3", 0)) as server:
        port = server.getsockname()[1]
        with connect_tunnel(gateway, "127.0.0.3", port) as s:
            s.sendall(b"\x00\x01 not http, not tls\r\n\r\n")
            answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 400")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # the gateway never even connected


def test_a_refused_tls_host_is_never_connected_to(gateway, gateway_ca):
    with socket.create_server(("127.0.0.3", 0)) as server:
        port = server.getsockname()[1]
        ctx = ssl.create_default_context(cafile=str(gateway_ca))
        with connect_tunnel(gateway, "127.0.0.3", port) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.3") as s:
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.3\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
                )
                answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 403") and b"provider_not_confidential" in answer
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


# -- audit: forwarded as is, metadata logged ----------------------------------------------


def test_audit_host_is_forwarded_as_is_and_logged(egress_openai, audited, gateway):
    before = balance(gateway)
    with egress_openai(audited.api_base, api_key=audited.api_key) as client:
        raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
    assert raw.parse().choices[0].message.content
    seen = audited.stats()["chat"]
    assert len(seen) == 1 and seen[0]["body"]["messages"] == MSG  # untouched
    assert seen[0]["headers"]["authorization"] == f"Bearer {audited.api_key}"
    rid = raw.headers["x-request-id"]
    line = wait_for_event(gateway, lambda e: e.get("request_id") == rid)
    assert line["decision"] == "audit" and line["host"] == f"127.0.0.5:{audited.port}"
    assert wait_for_event(gateway, lambda e: e.get("event") == "egress_audit")
    assert balance(gateway) == before  # not a confidential call: not billed by the gateway


# -- every other host: untouched ---------------------------------------------------------


def test_unlisted_tls_host_is_tunnelled_with_its_own_certificate(gateway, unlisted_tls, tls_dir):
    der = _peer_cert_viaconnect_tunnel(gateway, "127.0.0.4", unlisted_tls.port)
    own = x509.load_pem_x509_certificate((tls_dir / "server.pem").read_bytes())
    cert = x509.load_der_x509_certificate(der)
    assert cert == own
    assert _cn(cert.issuer) == "teegate sandbox test CA"
    line = wait_for_event(
        gateway,
        lambda e: e.get("event") == "tunnel" and e.get("host") == f"127.0.0.4:{unlisted_tls.port}",
    )
    assert line["decision"] == "tunnel" and line["mode"] == "egress"


def test_unlisted_tls_host_works_for_a_client_that_never_trusted_the_gateway(gateway, unlisted_tls):
    with httpx.Client(proxy=gateway.urls["egress"], verify=unlisted_tls.verify(), timeout=30) as c:
        r = c.post(
            f"{unlisted_tls.api_base}/chat/completions",
            json={"model": NON_TEE, "messages": MSG},
            headers={"authorization": f"Bearer {unlisted_tls.api_key}"},
        )
    assert r.status_code == 200  # not our business: not an LLM host on the list
    assert "x-request-id" not in r.headers  # the gateway never saw the request
    assert chat_count(unlisted_tls) == 1


def test_plain_http_to_an_unlisted_host_passes_through(gateway, unlisted_plain):
    with httpx.Client(proxy=gateway.urls["egress"], timeout=30) as c:
        r = c.get(
            f"{unlisted_plain.api_base}/models",
            headers={"authorization": f"Bearer {unlisted_plain.api_key}"},
        )
    assert r.status_code == 200 and r.json()["data"]
    rid = r.headers["x-request-id"]
    line = wait_for_event(gateway, lambda e: e.get("request_id") == rid)
    assert line["decision"] == "passthrough" and line["mode"] == "egress"
    assert line["host"] == f"127.0.0.4:{unlisted_plain.port}"


def _passthrough_502s(gateway) -> float:
    text = httpx.get(gateway.urls["admin"] + "/metrics", timeout=30).text
    want = {("route", "passthrough"), ("status", "502")}
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "teegate_requests_total" and want <= set(s.labels.items())
    )


def test_a_passthrough_to_a_closed_port_is_logged_and_counted_with_the_502_sent(gateway):
    """mitmproxy writes that 502 page itself, after the hooks that log and count the flow:
    they must still record the status the client got, not None."""
    with socket.create_server(("127.0.0.4", 0)) as server:
        port = server.getsockname()[1]  # closed again when the block ends: refused
    before = _passthrough_502s(gateway)
    with httpx.Client(proxy=gateway.urls["egress"], timeout=30) as c:
        r = c.get(f"http://127.0.0.4:{port}/anything")
    assert r.status_code == 502, r.text
    line = wait_for_event(gateway, lambda e: e.get("host") == f"127.0.0.4:{port}")
    assert line["decision"] == "passthrough" and line["status"] == 502, line
    assert _passthrough_502s(gateway) == before + 1


def test_raw_tcp_to_an_unlisted_host_is_relayed(gateway):
    with socket.create_server(("127.0.0.4", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(10)
        with connect_tunnel(gateway, "127.0.0.4", port) as s:
            s.sendall(b"\x00\x01 not http\r\n")
            peer, _ = server.accept()
            with peer:
                peer.settimeout(10)
                assert peer.recv(100) == b"\x00\x01 not http\r\n"


# -- the reverse listener is unaffected by the egress rules --------------------------------


def test_reverse_listener_still_gates_while_egress_runs(gateway, upstream, unlisted_plain):
    assert set(gateway.urls) == {"reverse", "egress", "admin"}
    with openai.OpenAI(base_url=gateway.api_base, api_key=gateway.api_key, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=NON_TEE, messages=MSG)
        assert e.value.body["code"] == "model_not_confidential"
        # A Host header naming an unlisted site changes nothing: still gated, still upstream.
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(
                model=NON_TEE,
                messages=MSG,
                extra_headers={"host": f"127.0.0.4:{unlisted_plain.port}"},
            )
        assert e.value.body["code"] == "model_not_confidential"
        c.chat.completions.create(model=TEE, messages=MSG)
    assert chat_count(upstream) == 1
    assert unlisted_plain.stats()["total"] == 0


# -- logs ----------------------------------------------------------------------------------


def test_logs_carry_no_prompt_and_no_key(egress_openai, upstream, listed_tls, gateway):
    with egress_openai(upstream.api_base) as client:
        client.chat.completions.create(model=TEE, messages=MSG)
    with egress_openai(listed_tls.api_base) as client, pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model=TEE, messages=MSG)
    wait_for_event(gateway, lambda e: e.get("error_code") == "provider_not_confidential")
    text = gateway.log_text()
    assert PROMPT not in text and gateway.api_key not in text and upstream.api_key not in text
    modes = {e.get("mode") for e in log_events(gateway) if e.get("event") == "request"}
    assert "egress" in modes


# -- helpers -------------------------------------------------------------------------------


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _peer_cert_viaconnect_tunnel(gateway, host: str, port: int) -> bytes:
    """The certificate a client behind the proxy is shown, whoever issued it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # inspect, do not trust: the test asserts the issuer
    with connect_tunnel(gateway, host, port) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def _cn(name: x509.Name) -> str:
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_gateway_ca_path_is_the_one_in_confdir(gateway, gateway_ca):
    assert gateway_ca == (gateway.workdir / "ca" / "mitmproxy-ca-cert.pem").resolve()
    assert Path(gateway_ca).is_file()


def test_an_app_configured_only_by_environment_variables(gateway, gateway_ca, upstream, tmp_path):
    """The docs/egress.md recipe: HTTPS_PROXY plus a bundle of the public CAs and ours."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + gateway_ca.read_bytes())
    env = {
        **os.environ,
        "HTTPS_PROXY": gateway.urls["egress"],
        "NO_PROXY": "",
        "no_proxy": "",
        "SSL_CERT_FILE": str(bundle),
    }
    code = (
        "import openai\n"
        f"c = openai.OpenAI(base_url={upstream.api_base!r}, api_key={gateway.api_key!r},"
        " max_retries=0)\n"
        f"print(c.chat.completions.create(model={TEE!r}, messages={MSG!r}).model)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == TEE
    assert chat_count(upstream) == 1


# -- the upstream under other spellings: the same gate, never a tunnel -------------------

# Every one of these reaches the upstream sandbox (127.0.0.1) through the socket layer.
UPSTREAM_SPELLINGS = [
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "127.0.0.1.",
    "localhost",
    "LocalHost.",
    "api.localhost",
    "127.0.0.9",  # another loopback address on the upstream's port
    "0.0.0.0",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]


def _chat_via_connect(gateway, host: str, port: int, model: str) -> tuple[int, dict, dict, str]:
    """A chat request over a CONNECT tunnel to ``host``, as any client could send it (raw
    sockets: no URL library second-guesses the spelling). Status, headers, JSON body, and
    the issuer of the certificate the client was shown."""
    body = json.dumps({"model": model, "messages": MSG}).encode()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a careless client: what matters is what goes upstream
    with connect_tunnel(gateway, host, port) as raw, ctx.wrap_socket(raw) as s:
        issuer = _cn(x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).issuer)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Host: {host}:{port}\r\nAuthorization: Bearer {gateway.api_key}\r\n".encode()
            + b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, headers, payload = _read_response(s)
    return status, headers, json.loads(payload), issuer


def _read_response(s: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response, framed by Content-Length or chunked encoding (the gateway may
    keep the connection open, so reading to EOF is no frame)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "connection closed before the response head"
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if headers.get("transfer-encoding") == "chunked":
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, "connection closed inside a chunked body"
            data += chunk
        body = b""
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2 :]
        return int(lines[0].split()[1]), headers, body
    length = int(headers.get("content-length", "0"))
    while len(data) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside the body"
        data += chunk
    return int(lines[0].split()[1]), headers, data[:length]


@pytest.mark.parametrize("spelling", UPSTREAM_SPELLINGS)
def test_every_spelling_of_the_upstream_meets_the_gate(gateway, upstream, spelling):
    host = spelling  # IPv6 keeps its brackets in CONNECT and Host
    before = balance(gateway)
    status, headers, body, issuer = _chat_via_connect(gateway, host, upstream.port, NON_TEE)
    assert issuer == "teegate egress CA"  # decrypted by the gateway, not tunnelled
    assert status == 400 and body["error"]["code"] == "model_not_confidential"
    assert chat_count(upstream) == 0
    status, headers, body, _ = _chat_via_connect(gateway, host, upstream.port, TEE)
    assert status == 200 and body["model"] == TEE
    assert headers["x-request-id"].startswith("req_")  # the gateway answered
    seen = upstream.stats()["chat"]
    assert len(seen) == 1
    assert seen[0]["headers"]["authorization"] == f"Bearer {upstream.api_key}"
    assert gateway.api_key not in str(seen[0]["headers"])  # the client's key stayed here
    assert wait_for_balance_change(gateway, before) > 0  # billed like reverse mode


@pytest.mark.parametrize("spelling", ["2130706433", "127.1", "localhost"])
def test_plain_http_to_another_spelling_of_the_upstream_is_gated(gateway, upstream, spelling):
    with httpx.Client(proxy=gateway.urls["egress"], timeout=30) as c:
        r = c.post(
            f"http://{spelling}:{upstream.port}/v1/chat/completions",
            json={"model": NON_TEE, "messages": MSG},
            headers={"authorization": f"Bearer {gateway.api_key}"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_confidential"
        r = c.post(
            f"http://{spelling}:{upstream.port}/v1/chat/completions",
            json={"model": TEE, "messages": MSG},
            headers={"authorization": f"Bearer {gateway.api_key}"},
        )
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")
    seen = upstream.stats()["chat"]  # pinned to the configured https origin
    assert len(seen) == 1 and seen[0]["headers"]["authorization"] == f"Bearer {upstream.api_key}"


def test_a_name_that_resolves_to_the_upstream_meets_the_gate(gateway, upstream):
    """This machine's own name: listed nowhere, resolved (by /etc/hosts here) to loopback."""
    name = socket.gethostname()
    addresses = {i[4][0] for i in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    if not any(a.startswith("127.") or a == "::1" for a in addresses):
        pytest.skip(f"{name} does not resolve to a loopback address here")
    status, headers, body, issuer = _chat_via_connect(gateway, name, upstream.port, TEE)
    assert issuer == "teegate egress CA" and status == 200
    seen = upstream.stats()["chat"]
    assert len(seen) == 1 and seen[0]["headers"]["authorization"] == f"Bearer {upstream.api_key}"


def test_the_openai_sdk_at_a_respelled_upstream_is_gated(gateway, upstream):
    """The SDK with base_url=https://127.1:<port>/v1 (a client that does not verify)."""
    http_client = httpx.Client(proxy=gateway.urls["egress"], verify=False, timeout=30)
    with openai.OpenAI(
        base_url=f"https://127.1:{upstream.port}/v1",
        api_key=gateway.api_key,
        http_client=http_client,
        max_retries=0,
    ) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NON_TEE, messages=MSG)
        assert e.value.body["code"] == "model_not_confidential"
        raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
    assert raw.headers["x-request-id"].startswith("req_")
    seen = upstream.stats()["chat"]
    assert len(seen) == 1 and seen[0]["headers"]["authorization"] == f"Bearer {upstream.api_key}"


def test_the_same_address_on_another_port_is_still_tunnelled(gateway, unlisted_tls, tls_dir):
    """Canonical matching is on address *and* port: 0x7f.4 (127.0.0.4) on the unlisted
    sandbox's port is not the upstream, and keeps its own certificate."""
    der = _peer_cert_viaconnect_tunnel(gateway, "0x7f.4", unlisted_tls.port)
    assert _cn(x509.load_der_x509_certificate(der).issuer) == "teegate sandbox test CA"


def test_a_name_without_an_address_on_the_upstreams_port_is_refused_not_tunnelled(
    gateway, upstream
):
    """Doubt fails closed: a tunnel would look the name up again when connecting."""
    status, _, body, issuer = _chat_via_connect(gateway, "nx.invalid", upstream.port, TEE)
    assert issuer == "teegate egress CA"
    assert status == 504 and body["error"]["code"] == "destination_unverified"
    with httpx.Client(proxy=gateway.urls["egress"], timeout=30) as c:
        r = c.post(
            f"http://nx.invalid:{upstream.port}/v1/chat/completions",
            json={"model": TEE, "messages": MSG},
            headers={"authorization": f"Bearer {gateway.api_key}"},
        )
    assert r.status_code == 504 and r.json()["error"]["code"] == "destination_unverified"
    assert chat_count(upstream) == 0
