"""Real TLS with certificates the project generates (`openimis-mediator certs`)."""

import ssl
import warnings

import aiohttp
import pytest
from aiohttp import web

from mediator.app import build_app
from mediator.certs import make_dev_pki
from mediator.cli import main
from mediator.tls import server_context
from tests.conftest import channels_yaml, loaded, upstream_url, write_config
from tests.identity.kit import TLS_BLOCK as KIT_TLS_BLOCK

# The shared block plus the setting these tests vary.
TLS_BLOCK = KIT_TLS_BLOCK + "    require_client_cert: {required}\n"


async def _serve(root, unused_port):
    config = loaded(root)
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_port,
                       ssl_context=server_context(config.channels.server.listen.tls, root))
    await site.start()
    return runner


def _client_context(certs, client=None, max_version=None):
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if client:
        context.load_cert_chain(certs / f"{client}.crt", certs / f"{client}.key")
    if max_version:
        with warnings.catch_warnings():  # the old versions are deprecated: that is the point of the test
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = max_version
            context.maximum_version = max_version
    return context


@pytest.mark.parametrize("required", [False, True])
async def test_tls_termination_with_generated_certificates(tmp_path, sandbox_server, unused_tcp_port, required):
    certs = tmp_path / "certs"
    make_dev_pki(certs, ("vendor-a",))
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server),
                                                extra_server=TLS_BLOCK.format(required=str(required).lower())))
    runner = await _serve(root, unused_tcp_port)
    url = f"https://localhost:{unused_tcp_port}/fhir/Medication/"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=_client_context(certs, "vendor-a")) as response:
                assert response.status == 200
            if required:
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(url, ssl=_client_context(certs)) as response:
                        await response.read()
            else:
                async with session.get(url, ssl=_client_context(certs)) as response:
                    assert response.status == 200
            # An untrusted server certificate is refused by a verifying client (sanity of the PKI).
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(url, ssl=ssl.create_default_context()) as response:
                    await response.read()
            # TLS 1.1 and older are refused by the server.
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url, ssl=_client_context(certs, "vendor-a", ssl.TLSVersion.TLSv1_1)):
                    pass
    finally:
        await runner.cleanup()


def test_certs_command_writes_ca_server_and_clients(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--client", "vendor-x"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"ca.crt", "ca.key", "server.crt", "server.key",
                                                     "vendor-x.crt", "vendor-x.key"}
    assert "sha256=" in capsys.readouterr().out
    first_ca = (tmp_path / "ca.crt").read_bytes()
    main(["certs", "--out", str(tmp_path)])
    assert (tmp_path / "ca.crt").read_bytes() == first_ca  # the CA is kept, so issued certs stay valid
