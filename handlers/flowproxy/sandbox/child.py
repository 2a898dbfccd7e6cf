"""The child process that renders custom templates: `python -I -m flowproxy.sandbox.child`. Stdlib + Jinja2.

Templates come from KV and are untrusted. Jinja2's sandbox stops attribute tricks, but not cost: a loop of
10**10 empty iterations, `"x" * 10**9`, or a self-recursive macro would stall or kill the node's applier.
Here they can only kill this child: it caps its own CPU time and address space before reading anything,
caps each output, and the parent caps the wall time. Protocol: JSON on stdin
`{"templates": {name: text}, "jobs": [[id, name, data], ...]}`, JSON on stdout `{id: {"text"|"error": str}}`.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

CPU_SECONDS = 3
MEMORY_BYTES = 1024 * 1024 * 1024
MAX_OUTPUT = 64 * 1024
RECURSION = 400


def limit() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # it writes nothing but its answer on a pipe
    sys.setrecursionlimit(RECURSION)


def render_one(env: Any, source: str, data: dict[str, Any]) -> dict[str, str]:
    try:
        size = 0
        parts = []
        for chunk in env.from_string(source).generate(backend=data):
            size += len(chunk)
            if size > MAX_OUTPUT:
                return {"error": f"output is over {MAX_OUTPUT} bytes"}
            parts.append(chunk)
        return {"text": "".join(parts)}
    except MemoryError:
        return {"error": "used more than the memory a template may use"}
    except RecursionError:
        return {"error": "recursion too deep"}
    except Exception as exc:  # anything a template does wrong is its own problem, reported by name
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main() -> None:
    limit()
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    request = json.loads(sys.stdin.read())
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    answers = {str(job_id): render_one(env, request["templates"][name], data)
               for job_id, name, data in request["jobs"]}
    sys.stdout.write(json.dumps(answers))


if __name__ == "__main__":
    main()
