"""Serving an app with uvicorn: in the foreground (the CLI) or in a background thread
(tests, notebooks, benchmarks), always on an explicit address, 127.0.0.1 by default."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def under_prefix(app: Any, prefix: str) -> Any:
    """``app`` served under the URL path ``prefix`` (e.g. ``/services/tpmlab/``, where
    JupyterHub's proxy forwards a service's requests with their path unchanged): the prefix
    becomes the ASGI ``root_path``, which routing strips; paths outside it are 404."""
    prefix = "/" + prefix.strip("/")
    if prefix == "/":
        return app

    async def prefixed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if path != prefix and not path.startswith(prefix + "/"):
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": NOT_UNDER_PREFIX})
                return
            scope = {**scope, "root_path": prefix}
        await app(scope, receive, send)

    return prefixed


NOT_UNDER_PREFIX = b'{"error": "NotFound", "message": "no such path under this prefix"}'


class ServerThread:
    """``uvicorn`` in a daemon thread on ``host:port`` (port 0: a free one). ``.url``, ``.stop()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name=f"gateway-{self.port}")

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
