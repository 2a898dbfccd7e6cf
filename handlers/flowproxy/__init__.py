"""flowproxy: on-demand HAProxy reconfiguration where Consul KV is the whole API.

Kept import-free on purpose: the watch handler's start-up path must stay stdlib-only until there is work.
"""

__version__ = "0.1.0"
