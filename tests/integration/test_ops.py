"""The operations kit in ops/ stays true to the code: the env file, the agent config, the units' commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flowproxy.consul.watches import config_watches
from flowproxy.core.contract import DEFAULT_PREFIX
from flowproxy.haproxy.master import check_config
from flowproxy.settings import Settings
from tests.harness import need

OPS = Path(__file__).resolve().parents[2] / "ops"
FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


def env_file() -> dict[str, str]:
    lines = (line.strip() for line in (OPS / "flowproxy.env").read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_env_file_gives_haproxy_what_the_settings_say() -> None:
    env = env_file()
    settings = Settings.from_env({k: v for k, v in env.items() if not k.startswith("FP_")})
    by_unit = {k: v for k, v in settings.haproxy_env().items() if k not in ("FP_USER", "FP_GROUP")}
    assert {k: v for k, v in env.items() if k.startswith("FP_")} == by_unit


def test_example_agent_config_is_valid_for_consul_and_watches_the_prefix(tmp_path: Path) -> None:
    consul = need("consul")
    key = subprocess.run([consul, "keygen"], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    for path in (OPS / "consul.d").glob("*.json"):  # the one placeholder Consul checks the form of
        (tmp_path / path.name).write_text(path.read_text().replace("REPLACE-WITH-GOSSIP-KEY-FROM-consul-keygen", key))
    done = subprocess.run([consul, "validate", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    production = (OPS / "consul.d" / "flowproxy.json").read_text()
    assert production == (OPS.parent / "consul.d" / "flowproxy.json").read_text()  # the same as `node up`'s
    assert production == config_watches(DEFAULT_PREFIX)  # the config folders; the node adds the routes'
    assert all(w["args"] == ["flowproxy-watch", "keyprefix", w["prefix"]] for w in json.loads(production)["watches"])


def test_the_units_first_command_leaves_haproxy_a_valid_config(tmp_path: Path) -> None:
    need("haproxy")
    units = (OPS / "systemd" / "flowproxy-haproxy.service").read_text()
    assert "ExecStartPre=/opt/flowproxy/venv/bin/flowproxy node init" in units
    env = {**os.environ, **{k: v for k, v in env_file().items() if not k.startswith("FP_")},
           "FLOWPROXY_DATA_DIR": str(tmp_path)}
    done = subprocess.run([FLOWPROXY, "node", "init"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    settings = Settings.from_env(env)
    check_config("haproxy", settings.current / "haproxy.cfg", settings.haproxy_env())


def test_node_env_prints_the_same_locked_stats_password_every_time(tmp_path: Path) -> None:
    """Without a stats password the page is locked by one no one was told; the node's data folder owns it,
    so `node env` (an EnvironmentFile's source) prints the same one on every run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "FLOWPROXY_"))}
    runs = [subprocess.run([FLOWPROXY, "--data-dir", str(tmp_path), "node", "env"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout for _ in range(2)]
    (auth,) = [line for line in runs[0].splitlines() if line.startswith("FP_STATS_AUTH=")]
    assert auth.startswith("FP_STATS_AUTH=locked:") and len(auth) > 40
    assert runs[0] == runs[1]
