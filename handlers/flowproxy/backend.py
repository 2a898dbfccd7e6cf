"""A small real HTTP service that answers with its own identity: the demo's `go-demo` and the tests' backends."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class IdentityHandler(BaseHTTPRequestHandler):
    server: IdentityServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, each response waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        if self.path == "/echo" and self.headers.get("Upgrade"):
            self.echo()
            return
        if self.path == "/health":
            body = b"ok\n"
            status = 503 if self.server.unhealthy.is_set() else 200
        elif self.path.startswith("/status/") and self.path[8:].isascii() and self.path[8:].isdigit():
            body, status = b"as asked\n", int(self.path[8:])  # any status on demand, like httpbin
        elif self.path.startswith("/sleep/") and self.path[7:].isascii() and self.path[7:].isdigit():
            time.sleep(min(int(self.path[7:]), 10_000) / 1000)  # a slow answer, for timeout tests
            body, status = b"slept\n", 200
        else:
            doc = {"instance": self.server.name, "path": self.path, "host": self.headers.get("Host", ""),
                   "forwarded_for": self.headers.get("X-Forwarded-For", "")}
            body = (json.dumps(doc, sort_keys=True) + "\n").encode()
            status = 200
        self.send_response(status)
        json_body = status == 200 and self.path != "/health" and not self.path.startswith(("/status/", "/sleep/"))
        self.send_header("Content-Type", "application/json" if json_body else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", self.server.name)
        self.end_headers()
        self.wfile.write(body)

    def echo(self) -> None:
        """A long-lived connection, as a WebSocket or a database session is to the proxy: after `101
        Switching Protocols` every line comes back prefixed with the instance's name, until the client
        closes. Through an HTTP route HAProxy tunnels it like a WebSocket; a TCP route carries it as is."""
        self.send_response(101)
        self.send_header("Upgrade", self.headers["Upgrade"])
        self.send_header("Connection", "Upgrade")
        if key := self.headers.get("Sec-WebSocket-Key"):  # RFC 6455's proof that this server understood
            digest = hashlib.sha1(key.strip().encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(digest).decode())
        self.end_headers()
        self.close_connection = True
        while line := self.rfile.readline(65536):
            self.wfile.write(self.server.name.encode() + b" " + line)

    def log_message(self, format: str, *args: object) -> None:
        pass


class IdentityServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 drops connections under a load test

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), IdentityHandler)
        self.name = name
        self.unhealthy = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        # HAProxy's TCP health checks connect and reset; that is not an error worth a traceback.
        pass

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> IdentityServer:
        threading.Thread(target=self.serve_forever, daemon=True, name=f"backend-{self.name}").start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HTTP service answering with its own identity")
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = IdentityServer(args.name, args.host, args.port)
    print(f"{args.name} listening on {args.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # stopped from a terminal: nothing to report
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
