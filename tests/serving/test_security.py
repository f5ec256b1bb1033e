"""TLS, mutual TLS, API keys and restricted admin APIs of the embedded server, with a
throwaway CA made in the test."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fintwin.cli import main
from fintwin.serving.certificates import Pki, write_development_pki
from fintwin.serving.client import AccessDeniedError, InferenceError, TritonTransport
from fintwin.serving.security import (
    ADMIN_KEY_ENV,
    API_KEY_ENV,
    AccessControl,
    ClientCredentials,
    ClientTls,
    SecurityError,
    ServerTls,
    read_key,
)
from fintwin.serving.server import EmbeddedTriton

GRPC_HOST = "127.0.0.2"  # loopback too: lets a test tell the gRPC address from HTTP's 127.0.0.1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_development_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1", GRPC_HOST])


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, with a client certificate the server must not accept."""
    return write_development_pki(tmp_path_factory.mktemp("rogue"), ["127.0.0.1"], name="rogue")


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def tls_server(model_repo: Path, pki: Pki) -> Iterator[EmbeddedTriton]:
    """Server-side TLS only: any client trusting the CA is served."""
    with EmbeddedTriton(model_repo, tls=ServerTls(pki.server_cert, pki.server_key)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(model_repo: Path, pki: Pki, api_key: str) -> Iterator[EmbeddedTriton]:
    """Mutual TLS and an API key, gRPC on GRPC_HOST."""
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with EmbeddedTriton(
        model_repo, GRPC_HOST, tls=tls, access=AccessControl(api_key=api_key)
    ) as server:
        yield server


@pytest.fixture(scope="module")
def https_proxy(mtls_server: EmbeddedTriton, pki: Pki) -> Iterator[str]:
    """A TLS-terminating forwarder (mutual TLS) to the server's loopback HTTP port, standing in
    for serve/nginx.conf; yields its ``host:port``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    target = mtls_server.http_url.split(":")
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, ssl.SSLError):  # a peer hung up
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(forward, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    server.close()
    loop.close()


def _client_tls(pki: Pki, with_certificate: bool = True) -> ClientTls:
    if not with_certificate:
        return ClientTls(pki.ca)
    return ClientTls(pki.ca, pki.client_cert, pki.client_key)


def _infer(server: EmbeddedTriton, credentials: ClientCredentials, inputs, model: str) -> dict:
    transport = TritonTransport(server.grpc_url, "grpc", model, credentials=credentials, timeout_s=10)
    try:
        return transport.infer(inputs)
    finally:
        transport.close()


def test_a_tls_client_is_served_and_a_plain_text_client_is_refused(
    tls_server, pki, reference, standin, rng
):
    inputs = standin.random_inputs(rng, batch=3, seq=7)
    served = _infer(tls_server, ClientCredentials(ClientTls(pki.ca)), inputs, standin.model_name)
    standin.assert_outputs_equal(served, reference.infer(inputs))

    with pytest.raises(InferenceError, match="failed to connect|Socket closed|UNAVAILABLE"):
        _infer(tls_server, ClientCredentials(), inputs, standin.model_name)


def test_a_client_that_does_not_trust_the_server_certificate_refuses_it(
    tls_server, rogue_pki, standin, rng
):
    inputs = standin.random_inputs(rng, batch=1, seq=2)
    with pytest.raises(InferenceError, match="failed to connect|UNAVAILABLE"):
        _infer(tls_server, ClientCredentials(ClientTls(rogue_pki.ca)), inputs, standin.model_name)


def test_mutual_tls_serves_a_client_certificate_and_the_api_key(
    mtls_server, pki, api_key, reference, standin, rng
):
    inputs = standin.random_inputs(rng, batch=2, seq=5)
    credentials = ClientCredentials(_client_tls(pki), api_key)
    standin.assert_outputs_equal(
        _infer(mtls_server, credentials, inputs, standin.model_name), reference.infer(inputs)
    )


@pytest.mark.parametrize("who", ["no certificate", "certificate of another CA", "plain text"])
def test_mutual_tls_refuses_a_client_without_an_accepted_certificate(
    who, mtls_server, pki, rogue_pki, api_key, standin, rng
):
    tls = {
        "no certificate": ClientTls(pki.ca),
        "certificate of another CA": ClientTls(pki.ca, rogue_pki.client_cert, rogue_pki.client_key),
        "plain text": None,
    }[who]
    inputs = standin.random_inputs(rng, batch=1, seq=3)
    with pytest.raises(InferenceError, match="failed to connect|Socket closed|UNAVAILABLE"):
        _infer(mtls_server, ClientCredentials(tls, api_key), inputs, standin.model_name)


@pytest.mark.parametrize("key", [None, "wrong"])
def test_inference_without_the_api_key_is_refused(key, mtls_server, pki, api_key, standin, rng):
    given = None if key is None else secrets.token_urlsafe(32)
    inputs = standin.random_inputs(rng, batch=1, seq=3)
    with pytest.raises(AccessDeniedError, match="restricted, expecting header"):
        _infer(mtls_server, ClientCredentials(_client_tls(pki), given), inputs, standin.model_name)


def test_http_clients_speak_mutual_tls_through_a_terminating_proxy(
    https_proxy, pki, api_key, reference, standin, rng
):
    inputs = standin.random_inputs(rng, batch=2, seq=6)
    transport = TritonTransport(
        https_proxy, "http", standin.model_name, timeout_s=10,
        credentials=ClientCredentials(_client_tls(pki), api_key),
    )
    try:
        standin.assert_outputs_equal(transport.infer(inputs), reference.infer(inputs))
    finally:
        transport.close()
    without_certificate = TritonTransport(
        https_proxy, "http", standin.model_name, timeout_s=10,
        credentials=ClientCredentials(ClientTls(pki.ca), api_key),
    )
    try:
        with pytest.raises(InferenceError, match=f"no http answer from {https_proxy}"):
            without_certificate.infer(inputs)
    finally:
        without_certificate.close()


def test_with_tls_http_and_metrics_bind_loopback_only(mtls_server):
    assert mtls_server.grpc_url.startswith(f"{GRPC_HOST}:")
    http_port = mtls_server.ports["http"]
    assert mtls_server.http_url == f"127.0.0.1:{http_port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    for port in (http_port, mtls_server.ports["metrics"]):
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://{GRPC_HOST}:{port}/v2/health/ready", timeout=5)


def test_admin_apis_are_restricted_by_default(triton_server, standin):
    """Without any key option: inference is open, statistics and the repository need the
    server's own admin key, over gRPC and HTTP."""
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)
    http = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.get_inference_statistics(standin.model_name)
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_log_settings()
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.unload_model(standin.model_name)
        stats = grpc.get_inference_statistics(
            standin.model_name, headers=triton_server.admin_headers("grpc"), as_json=True
        )
        assert stats["model_stats"][0]["name"] == standin.model_name
        index = http.get_model_repository_index(headers=triton_server.admin_headers("http"))
        assert [entry["name"] for entry in index] == [standin.model_name]
        assert grpc.is_model_ready(standin.model_name)  # health stays open
    finally:
        grpc.close()
        http.close()


def test_an_admin_key_from_the_environment_opens_the_admin_apis(
    model_repo, standin, monkeypatch
):
    admin_key = secrets.token_urlsafe(24)
    monkeypatch.setenv(ADMIN_KEY_ENV, admin_key)
    access = AccessControl(admin_key=read_key(None, ADMIN_KEY_ENV, "admin key"))
    with EmbeddedTriton(model_repo, access=access) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                http.get_inference_statistics(standin.model_name, headers={"fintwin-admin-key": "x" * 20})
            stats = http.get_inference_statistics(
                standin.model_name, headers={"fintwin-admin-key": admin_key}
            )
            assert stats["model_stats"][0]["name"] == standin.model_name
            environ = Path(f"/proc/{server.process.pid}/environ").read_bytes()
            assert admin_key.encode() not in environ  # not handed to tritonserver's children
        finally:
            http.close()


def test_keys_never_reach_a_log(mtls_server, api_key, model_repo, pki, caplog):
    log = mtls_server.log_path.read_text()
    assert api_key not in log and mtls_server.access.admin_key not in log
    assert api_key not in mtls_server.log_excerpt()
    with caplog.at_level(logging.DEBUG, logger="fintwin.serving.server"):
        access = AccessControl(api_key=api_key)
        with EmbeddedTriton(model_repo, tls=ServerTls(pki.server_cert, pki.server_key),
                            access=access) as running:
            assert running.health_problem() is None
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting ")]
    assert len(started) == 1 and "--grpc-use-ssl=true" in started[0]
    assert "inference,metadata,model-config:fintwin-api-key=***" in started[0]
    assert api_key not in caplog.text and access.admin_key not in caplog.text


def test_fintwin_predict_speaks_mutual_tls_with_the_api_key(
    mtls_server, pki, api_key, standin, tmp_path, monkeypatch, capsys
):
    events = tmp_path / "events.csv"
    events.write_text(
        "customer_id,timestamp,event_type,amount\n"
        "a,2024-01-02,type_2,10.5\na,2024-01-09,type_3,3.0\nb,2024-01-05,type_4,7.25\n"
    )
    key_file = tmp_path / "api.key"
    key_file.write_text(api_key + "\n")
    key_file.chmod(0o600)
    out = tmp_path / "scores.csv"
    common = ["predict", "--url", mtls_server.grpc_url, "--model", standin.model_name,
              "--events", str(events), "--out", str(out), "--tls-ca", str(pki.ca)]
    certificate = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]

    assert main([*common, *certificate, "--api-key-file", str(key_file)]) == 0
    scores = pd.read_csv(out)
    assert list(scores["customer_id"]) == ["a", "b"]
    assert scores["churn_prob"].between(0, 1).all()

    out.unlink()
    monkeypatch.setenv(API_KEY_ENV, api_key)
    assert main([*common, *certificate]) == 0  # the key from the environment
    assert out.is_file()
    monkeypatch.delenv(API_KEY_ENV)
    out.unlink()
    assert main([*common, *certificate]) == 2  # no key: refused by the server
    assert not out.exists()
    assert "requires an API key: give --api-key-file" in capsys.readouterr().err


def test_bad_keys_and_certificates_are_named(tmp_path, pki, rogue_pki, monkeypatch, capsys,
                                            caplog):
    shared = tmp_path / "shared.key"
    shared.write_text("k" * 20)
    shared.chmod(0o644)
    assert read_key(shared, API_KEY_ENV, "API key") == "k" * 20
    assert f"the API key file {shared} can be read by other users (mode 644)" in caplog.text
    short = tmp_path / "short.key"
    short.write_text("secret\n")
    with pytest.raises(SecurityError, match=f"API key file {short} is not usable"):
        read_key(short, API_KEY_ENV, "API key")
    monkeypatch.setenv(API_KEY_ENV, "has,comma:and=equals" * 2)
    with pytest.raises(SecurityError, match=rf"API key in \${API_KEY_ENV} is not usable"):
        read_key(None, API_KEY_ENV, "API key")
    with pytest.raises(SecurityError, match="cannot read the API key file"):
        read_key(tmp_path / "absent", API_KEY_ENV, "API key")
    monkeypatch.delenv(API_KEY_ENV)
    assert read_key(None, API_KEY_ENV, "API key") is None

    with pytest.raises(SecurityError, match=f"server key {rogue_pki.server_key} does not belong"):
        ServerTls(pki.server_cert, rogue_pki.server_key).check()
    with pytest.raises(SecurityError, match=f"client CA {pki.server_key} holds no PEM certificate"):
        ServerTls(pki.server_cert, pki.server_key, client_ca=pki.server_key).check()
    with pytest.raises(SecurityError, match="needs its key"):
        ClientTls(pki.ca, pki.client_cert)

    repo = tmp_path / "repo"
    assert main(["serve", "--repo", str(repo), "--tls-cert", str(pki.server_cert),
                 "--tls-key", str(rogue_pki.server_key)]) == 2
    assert main(["serve", "--repo", str(repo), "--api-key-file", str(short)]) == 2
    assert main(["serve", "--repo", str(repo), "--tls-client-ca", str(pki.ca)]) == 2
    err = capsys.readouterr().err
    assert f"API key file {short} is not usable" in err
    assert "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key" in err


def test_development_pki_command_writes_a_ca_and_certificates_it_signed(tmp_path, capsys):
    from cryptography import x509

    from fintwin.serving.certificates import main as certificates_main

    certificates_main([str(tmp_path), "10.1.2.3", "twins.example"])
    assert "wrote" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    client = x509.load_pem_x509_certificate((tmp_path / "client.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert names.get_values_for_type(x509.DNSName) == ["twins.example"]
    for key in ("ca.key", "server.key", "client.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
    ServerTls(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.crt").check()
    ClientTls(tmp_path / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key").check()


def test_fintwin_live_run_passes_tls_and_the_api_key(mtls_server, pki, api_key, tmp_path,
                                                      monkeypatch, capsys, caplog):
    """The stand-in repository has no live model: with the right credentials the server is
    reached and answers that it does not know it; without the key it refuses the request."""
    events = tmp_path / "events.jsonl"
    events.write_text('{"customer_id": "a", "timestamp": "2024-01-02", "event_type": "x", '
                      '"amount": 1.0}\n')
    run = ["live", "run", "--url", mtls_server.grpc_url, "--model", "twin", "--input",
           str(events), "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]
    monkeypatch.setenv(API_KEY_ENV, api_key)
    assert main(run) == 1
    assert "cannot read the config of 'twin_live'" in caplog.text
    assert "unknown model" in caplog.text
    monkeypatch.delenv(API_KEY_ENV)
    assert main(run) == 2
    assert "requires an API key" in capsys.readouterr().err
