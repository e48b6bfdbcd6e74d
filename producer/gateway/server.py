"""``m3q serve``: the gateway on uvicorn, in this process.

SIGTERM (or Ctrl-C) stops it gracefully: uvicorn closes the listening socket, answers every request in
flight, then the app's lifespan closes its Redis connections. uvloop and httptools are used when installed
(the ``http`` extra installs them).
"""
from __future__ import annotations

import logging

from producer.contract.settings import Settings

log = logging.getLogger("m3q.gateway")


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, access_log: bool = False) -> int:
    """Run the gateway until SIGTERM or SIGINT; the exit status (2 when it could not start, e.g. port taken)."""
    import uvicorn

    from producer.gateway.app import create_app

    app = create_app(settings)
    # No access log by default: at thousands of requests per second it would cost more than the routes;
    # /metrics counts every request by route and status.
    config = uvicorn.Config(app, host=host, port=port, loop="auto", http="auto", lifespan="on",
                            access_log=access_log, log_level="info", server_header=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 2
