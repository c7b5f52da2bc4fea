"""The only door a deployment opens to the network: Flower's Fleet API, and nothing else.

Flower 1.41's SuperLink serves all of its HTTP APIs on one address: the Fleet API
the SuperNodes speak (``/v1/fleet/...``), the Control API the ``flwr`` CLI speaks
(``/v1/control/...``: start and stop runs, register node keys, list nodes) and
the runtime APIs of its own ServerApp processes. The open-source build does not
authenticate the Control API, so anyone who reaches that address can start a
run or register a key of their own and then pass node authentication.

``fedseed fleet-gateway`` is a small reverse proxy: it listens on the address
the nodes are given (TLS, with the deployment's server certificate) and forwards
``POST /v1/fleet/*`` to a SuperLink that listens on the operator's host only
(``--host 127.0.0.1``). Every other path is answered 404 without touching the
SuperLink. Request headers (node authentication's signatures among them) and
bodies pass unchanged; nothing is parsed beyond the request line.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

FLEET = "/v1/fleet/"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


def gateway_app(upstream: str, ca_file: str | None = None) -> Any:
    """An ASGI app forwarding the Fleet API to ``upstream`` (``https://127.0.0.1:9091``) and refusing the rest."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, verify=ca_file or True, timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET) or ".." in path:
            return Response(f"{request.method} {path}: only the Fleet API ({FLEET}*) is served here\n", status_code=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream_reply = await client.post(path, content=await request.body(), headers=headers,
                                           params=request.query_params)
        out = {k: v for k, v in upstream_reply.headers.items() if k.lower() not in HOP_BY_HOP
               and k.lower() != "content-encoding"}
        return Response(upstream_reply.content, status_code=upstream_reply.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def cmd_fleet_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    host, _, port = args.listen.rpartition(":")
    scheme = "http" if args.insecure_upstream else "https"
    app = gateway_app(f"{scheme}://{args.superlink}", args.upstream_ca)
    uvicorn.run(app, host=host, port=int(port), ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning")
    return 0


def add_gateway_command(sub: Any) -> None:
    """``fedseed fleet-gateway --listen HOST:PORT --superlink 127.0.0.1:PORT --certfile ... --keyfile ...``."""
    g = sub.add_parser("fleet-gateway", help="expose only a SuperLink's Fleet API (the nodes' door) to the network; "
                                             "the SuperLink itself listens on 127.0.0.1")
    g.add_argument("--listen", required=True, help="HOST:PORT the nodes connect to, e.g. 0.0.0.0:9092")
    g.add_argument("--superlink", required=True, help="the SuperLink's local HOST:PORT, e.g. 127.0.0.1:9091")
    g.add_argument("--certfile", help="TLS certificate of the gateway's address (PEM); omit only on loopback tests")
    g.add_argument("--keyfile", help="its private key (PEM)")
    g.add_argument("--upstream-ca", help="CA certificate that signed the SuperLink's own certificate")
    g.add_argument("--insecure-upstream", action="store_true", help="the SuperLink runs --insecure (on 127.0.0.1)")
    g.set_defaults(fn=cmd_fleet_gateway)
