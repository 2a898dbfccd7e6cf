"""Defaults more than one part needs, in one place. Imports nothing: the lean watch entry reads it."""

DEFAULT_DATA_DIR = "/var/lib/flowproxy"
DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"  # the local agent, as the `consul` CLI assumes
