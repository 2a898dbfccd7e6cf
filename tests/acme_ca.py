"""A real ACME CA on loopback for the tests: Debian's `pebble` (Let's Encrypt's test CA) with its mock DNS
`pebble-challtestsrv`, which resolves the test names to the loopback address a test chooses. Pebble
validates HTTP-01 on `<name>:<http_port>`, so every proxy node listens on that one port, each on an address
of its own in 127.0.0.0/8."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.parts import free_port
from flowproxy.node.up import wait_for
from tests.harness import need


@dataclass
class Pebble:
    directory: str  # the ACME directory URL
    ca_bundle: Path  # verifies pebble's own HTTPS (made here, not pebble's)
    management: str
    dns_management: str
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)

    def start(self) -> None:
        """pebble itself (its DNS runs on), validating without random sleeps, never rejecting a nonce on
        purpose, never reusing an authorization (every order is validated anew, renewals too)."""
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        with self.log.open("ab") as out:
            self.procs.append(subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

        def up() -> bool:
            try:
                requests.get(self.directory, verify=str(self.ca_bundle), timeout=2).raise_for_status()
                requests.get(f"http://{self.dns_management}/", timeout=2)
            except requests.RequestException:
                return False
            return True

        wait_for(up, 30, "pebble and its DNS")

    def restart(self) -> None:
        """A CA that forgets everything (its accounts, orders, roots), as a reset test CA does."""
        pebble = self.procs.pop()
        pebble.send_signal(signal.SIGTERM)
        pebble.wait(timeout=10)
        self.start()

    def root(self) -> str:
        """The root that issued certificates chain to (pebble makes a new one at every start)."""
        return requests.get(f"https://{self.management}/roots/0", verify=str(self.ca_bundle), timeout=10).text

    def point(self, host: str, address: str) -> None:
        """Make the mock DNS answer `host` with `address`."""
        requests.post(f"http://{self.dns_management}/add-a", json={"host": host, "addresses": [address]},
                      timeout=10).raise_for_status()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def orders(self) -> list[str]:
        """The ids of the orders pebble added, in order."""
        return [m.group(1) for line in self.lines() if (m := re.search(r'Added order "([^"]+)"', line))]

    def issued(self) -> list[str]:
        """The order ids pebble issued a certificate for, in order."""
        return [m.group(1) for line in self.lines() if (m := re.search(r"Issued certificate serial \S+ for order "
                                                                       r"(\S+)", line))]

    def events(self) -> list[tuple[str, str]]:
        """("added" | "issued" | "invalid", order id) in the order pebble logged them."""
        out = []
        for line in self.lines():
            for kind, pattern in (("added", r'Added order "([^"]+)"'), ("issued", r"for order (\S+)$"),
                                  ("invalid", r"order (\S+) set INVALID")):
                found = re.search(pattern, line)
                if found:
                    out.append((kind, found.group(1)))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def tls_pair(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for pebble's own HTTPS (127.0.0.1 and localhost), made by openssl."""
    cert, key = folder / "pebble-tls.pem", folder / "pebble-tls.key"
    subprocess.run([need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def start_pebble(folder: Path, http_port: int, validity: int) -> Pebble:
    """pebble and its DNS on free loopback ports; certificates valid `validity` seconds."""
    pebble, dns = need("pebble"), need("pebble-challtestsrv")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = tls_pair(folder)
    api, management, dns_port, dns_management = (f"127.0.0.1:{free_port()}" for _ in range(4))
    config = {"pebble": {"listenAddress": api, "managementListenAddress": management, "certificate": str(cert),
                         "privateKey": str(key), "httpPort": http_port, "tlsPort": free_port(),
                         "ocspResponderURL": "", "externalAccountBindingRequired": False,
                         "certificateValidityPeriod": validity}}
    (folder / "pebble.json").write_text(json.dumps(config))
    log = folder / "pebble.log"
    ca = Pebble(f"https://{api}/dir", cert, management, dns_management, log)
    with (folder / "dns.log").open("wb") as dns_log:
        # No AAAA answers: the VA would try ::1 first, where no node listens.
        ca.procs.append(subprocess.Popen([dns, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", dns_port,
                                          "-http01", "", "-https01", "", "-tlsalpn01", "",
                                          "-management", dns_management], stdout=dns_log, stderr=subprocess.STDOUT,
                                         start_new_session=True))
    ca.argv = [pebble, "-config", str(folder / "pebble.json"), "-dnsserver", dns_port]
    try:
        ca.start()
    except BaseException:
        ca.stop()
        raise
    return ca
