"""TLS on the front door (``frontdoor.tls_cert_file`` and ``tls_key_file``): HTTPS and gRPC over TLS with a
certificate a client checks against its CA, and a plain-text client gets nothing served."""

from __future__ import annotations

import ssl

import grpc
import httpx
import pytest
from pydantic import ValidationError

from frontdoor.grpc_api import start_grpc_server
from frontdoor.textgen import TextGenerator
from protocol.config import FrontDoorConfig
from protocol.proto import router_pb2, router_pb2_grpc
from tests.integration.api_harness import api_app, uvicorn_server
from tests.support.tls import CertificateFiles, make_certificates

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


async def test_https_serves_a_client_that_trusts_the_ca_and_nothing_in_plain_text(
    textgen: TextGenerator, certificates: CertificateFiles
) -> None:
    fd = FrontDoorConfig(tls_cert_file=certificates.cert, tls_key_file=certificates.key)
    app = api_app(textgen)
    async with uvicorn_server(app, ssl_certfile=fd.tls_cert_file, ssl_keyfile=fd.tls_key_file) as url:
        assert url.startswith("https://")
        trusting = ssl.create_default_context(cafile=str(certificates.ca))
        async with httpx.AsyncClient(verify=trusting, timeout=DEADLINE_S) as client:
            body = {"model": textgen.model_name, "prompt": "Hi", "max_tokens": 4}
            served = await client.post(f"{url}/v1/completions", json=body)
            assert served.status_code == 200 and served.json()["choices"][0]["text"]
        async with httpx.AsyncClient(timeout=DEADLINE_S) as stranger:  # the system's CAs: not ours
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await stranger.get(f"{url}/health")
        async with httpx.AsyncClient(timeout=DEADLINE_S) as plain:
            plain_url = url.replace("https://", "http://")
            try:
                answer = await plain.get(f"{plain_url}/health")
            except httpx.HTTPError:
                pass  # the TLS server hangs up on a plain-text request
            else:
                assert answer.status_code == 400 and "ok" not in answer.text


async def test_grpc_over_tls_serves_a_client_that_trusts_the_ca_and_refuses_plain_text(
    textgen: TextGenerator, certificates: CertificateFiles
) -> None:
    fd = FrontDoorConfig(tls_cert_file=certificates.cert, tls_key_file=certificates.key)
    server, port = await start_grpc_server(textgen, "127.0.0.1", 0, tls=fd.tls_pair())
    request = router_pb2.GenerateRequest(prompt="Hi", sampling=router_pb2.SamplingParams(max_tokens=3))
    try:
        trust = grpc.ssl_channel_credentials(root_certificates=certificates.ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", trust) as channel:
            responses = [
                r async for r in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=DEADLINE_S)
            ]
            assert responses[-1].finish_reason and "".join(r.text for r in responses)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=DEADLINE_S):
                    pass
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_a_certificate_without_its_key_is_a_configuration_error(certificates: CertificateFiles) -> None:
    with pytest.raises(ValidationError, match="go together"):
        FrontDoorConfig(tls_cert_file=certificates.cert)
    assert FrontDoorConfig().tls_pair() is None


def test_the_cluster_config_takes_the_tls_files(certificates: CertificateFiles) -> None:
    from protocol.config import ClusterConfig

    cfg = ClusterConfig.load(
        None,
        {"frontdoor.tls_cert_file": str(certificates.cert), "frontdoor.tls_key_file": str(certificates.key)},
    )
    chain, key = cfg.frontdoor.tls_pair() or (b"", b"")
    assert chain.startswith(b"-----BEGIN CERTIFICATE") and b"PRIVATE KEY" in key
