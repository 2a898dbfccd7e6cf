"""The `flowproxy` executable: `handle` takes a stdlib-only path, everything else goes to click."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["handle"]:
        payload = None
        if len(args) == 3 and args[1] == "--kind":
            from flowproxy.node.forward import KINDS, forward, socket_path

            if args[2] in KINDS:
                data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
                code = forward(socket_path(), args[2], data)
                if code is not None:
                    sys.exit(code)
                payload = data.decode(errors="replace")
        from flowproxy.node.handler import main as handle_main

        sys.exit(handle_main(args[1:], payload))
    from flowproxy.cli.main import main as cli_main

    cli_main()
