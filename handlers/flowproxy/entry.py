"""The `flowproxy` executable: `handle` takes a stdlib-only path, everything else goes to click."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["handle"]:
        from flowproxy.handler import main as handle_main

        sys.exit(handle_main(sys.argv[2:]))
    from flowproxy.cli import main as cli_main

    cli_main()
