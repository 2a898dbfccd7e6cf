"""The exception tree; the click edge turns each into a message and an exit code."""


class FlowproxyError(Exception):
    """Base of every error flowproxy reports to a user."""

    exit_code = 1


class UsageError(FlowproxyError):
    """A setting or argument is wrong; fix the command line or the environment."""

    exit_code = 2


class ConsulUnavailable(FlowproxyError):
    """The Consul agent did not answer or answered with an error."""

    exit_code = 3


class IntentRejected(FlowproxyError):
    """An intent failed validation; `problems` holds every reason, each naming its key and field."""

    exit_code = 4

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CasConflict(FlowproxyError):
    """Someone else changed the key between our read and our write."""

    exit_code = 4


class NotFound(FlowproxyError):
    """A command named a route or variant that is not in KV."""

    exit_code = 4


class HAProxyError(FlowproxyError):
    """HAProxy rejected a candidate configuration, failed a reload, or is not reachable."""

    exit_code = 5


class CandidateRefused(HAProxyError):
    """`haproxy -c` refused a candidate config; the node looks for the backends that cause it."""


class ApplyIOError(FlowproxyError):
    """Writing the configuration to disk failed; the last good configuration keeps serving."""

    exit_code = 6


class EmptyRefused(FlowproxyError):
    """Consul answered with no routes at an index no newer than what runs: refused, kept, retried."""

    exit_code = 8


class NotConverged(FlowproxyError):
    """`--wait` timed out before every proxy node applied a write (or there was no node to wait for);
    `status` / `route list`: a node is stale, critical or failing."""

    exit_code = 7


class RejectedByNode(FlowproxyError):
    """A node applied the write and rejected the written route (`--wait`); `status` / `route list`: some
    route is rejected."""

    exit_code = 9


EXIT_CODES = """Exit codes: 0 ok; 2 usage; 3 Consul unreachable, refused (ACL) or not Consul; 4 intent rejected by
the lint, CAS conflict, or no such route/variant; 5 HAProxy refused; 6 config not written; 7 not converged
(a node did not apply in time, is stale, critical or failing, or there is no node); 8 empty route table
refused; 9 a node rejected the route."""
