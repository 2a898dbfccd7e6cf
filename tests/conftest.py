from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from flowproxy.backend import IdentityServer


@pytest.fixture
def backends() -> Iterator[Callable[[str], IdentityServer]]:
    """Start real HTTP services that answer with their own name; all stopped after the test."""
    started: list[IdentityServer] = []

    def start(name: str) -> IdentityServer:
        server = IdentityServer(name).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


FIGURES = {
    "bad-input cases rejected alone, reported, nothing lost": "test_hostile.py::test_bad_input",
    "CLI lint cases refused before writing": "test_hostile.py::test_route_put",
    "property tests (hundreds of generated intents each)": "test_property.py::",
    "faults survived": "test_faults.py::",
    "security checks": "test_security.py::",
    "custom-template fragment rules (tables and properties)": "test_fragment_rules.py::",
    "pipeline stages made to raise, each key rejected alone": "test_containment.py::",
    "production-layout checks (wheel, units, ACL + TLS + gossip agent)": "test_production.py::",
}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The robustness figures the README quotes, counted from this very run."""
    passed = [r.nodeid for r in terminalreporter.stats.get("passed", []) if getattr(r, "when", "") == "call"]
    failed = [r.nodeid for r in terminalreporter.stats.get("failed", [])]
    counts = {label: (sum(m in n for n in passed), sum(m in n for n in failed)) for label, m in FIGURES.items()}
    if any(p or f for p, f in counts.values()):
        terminalreporter.write_sep("-", "robustness figures")
        for label, (ok, bad) in counts.items():
            terminalreporter.write_line(f"{ok:4d} passed, {bad} failed: {label}")
