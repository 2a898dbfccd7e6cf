"""Render custom backend templates in a child process with CPU, memory, time and output limits.

One child per template name, so a template that exhausts its limits rejects only the routes using it.
Answers are kept by (template text, data) in the caller's memo (the warm applier's lives as long as
it does: it re-renders on every change, and a child costs ~80 ms), and failures are also kept on disk
so that a cold handler does not pay a template's whole time limit on every event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flowproxy import runstate
from flowproxy.core.memo import Memo
from flowproxy.core.plan import Plan
from flowproxy.core.render import Templates, backend_data

log = logging.getLogger(__name__)
WALL_SECONDS = 5.0
FAILURES = "template-failures.json"
Answers = Memo[str, dict[str, str]]  # job_key -> the child's answer for one backend


def job_key(source: str, data: Mapping[str, Any]) -> str:
    return hashlib.sha256(source.encode() + b"\0" + json.dumps(data, sort_keys=True).encode()).hexdigest()


def render_all(jobs: Iterable[tuple[str, str, str, dict[str, Any]]], run_dir: Path,
               answers: Answers | None = None) -> dict[str, dict[str, str]]:
    """(backend name, template name, template source, data) -> {backend: {"text"|"error": str}}."""
    failures: dict[str, str] = {k: str(v) for k, v in runstate.load(run_dir, FAILURES).items()}
    out: dict[str, dict[str, str]] = {}
    todo: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    sources: dict[str, str] = {}
    keys: dict[str, str] = {}
    for backend, name, source, data in jobs:
        key = keys[backend] = job_key(source, data)
        known = answers.get(key) if answers is not None else None
        if known is not None:
            out[backend] = known
        elif key in failures:
            out[backend] = {"error": failures[key]}
        else:
            todo.setdefault(name, []).append((backend, source, data))
            sources[name] = source
    children = {name: _start(sources[name], items) for name, items in sorted(todo.items())}
    for name, (proc, payload) in children.items():
        said = _finish(proc, payload, name)
        for backend, _, _ in todo[name]:
            # A child that died answered for nobody: every route of that template gets its reason.
            found = {"error": said} if isinstance(said, str) else said.get(backend)
            out[backend] = found or {"error": "the renderer gave no answer"}
    if answers is not None:
        for backend, answer in out.items():
            answers.put(keys[backend], answer)
    live = {keys[b]: a["error"] for b, a in out.items() if "error" in a}
    if live != failures:
        runstate.save(run_dir, FAILURES, dict(live))
    return out


def _start(source: str, items: list[tuple[str, str, dict[str, Any]]]) -> tuple[subprocess.Popen[bytes], bytes]:
    request = {"templates": {"t": source}, "jobs": [[backend, "t", data] for backend, _, data in items]}
    # An empty environment: nothing the node knows (its Consul token) is within a template's reach.
    env = {"LANG": "C.UTF-8", "PATH": os.defpath}
    proc = subprocess.Popen([sys.executable, "-I", "-m", "flowproxy.sandbox.child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/")
    return proc, json.dumps(request).encode()


def _finish(proc: subprocess.Popen[bytes], payload: bytes, name: str) -> dict[str, dict[str, str]] | str:
    """The child's answers, or why it gave none."""
    try:
        out, err = proc.communicate(payload, timeout=WALL_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return f"rendering took longer than {WALL_SECONDS:.0f} s and was stopped"
    if proc.returncode != 0:
        why = _why(proc.returncode, err)
        log.warning("template %s: the renderer stopped: %s", name, why)
        return why
    try:
        answers = json.loads(out)
    except ValueError:
        return "the renderer's answer was not readable"
    return {str(k): {str(kk): str(vv) for kk, vv in v.items()} for k, v in answers.items()}


def _why(code: int, err: bytes) -> str:
    if code in (-9, -24, 128 + 24):  # SIGKILL/SIGXCPU: the CPU limit
        return "rendering used more than its CPU time limit and was stopped"
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {code}"]
    if "MemoryError" in tail[0]:
        return "rendering used more than the memory a template may use"
    return f"the renderer failed: {tail[0][:200]}"


def render_plan(plan: Plan, templates: Templates, run_dir: Path,
                answers: Answers | None = None) -> dict[str, dict[str, str]]:
    """What every backend with a custom template renders to (or why not), its source from KV templates/
    or else the node's templates/routes/<name>.j2."""
    jobs = []
    missing: dict[str, dict[str, str]] = {}
    for backend in plan.backends:
        name = backend.intent.template
        if name is None:
            continue
        source = templates.from_kv.get(name)
        if source is None:
            try:
                source = (templates.folder / "routes" / f"{name}.j2").read_text()
            except (OSError, UnicodeDecodeError):
                missing[backend.name] = {"error": f"template {name!r} is in neither KV templates/{name} nor "
                                                  f"the node's templates/routes/{name}.j2"}
                continue
        jobs.append((backend.name, name, source, backend_data(backend)))
    return render_all(jobs, run_dir, answers) | missing
