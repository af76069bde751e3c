"""The connection to Ray: a cluster at ``grid.ray_address``, or a local Ray started for one grid.

Ray's own failure modes are minutes of retries, a traceback and a process
exit; here they are one ``ClusterError`` line that says what to fix. The Ray
backend (``cnnpipe.search.backend_ray``) connects through this module and
only runs tasks.

Nothing here imports ray at module level: ``ray_installed`` checks for the
optional extra without paying for the import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket

from cnnpipe.compute.parallelism import cpu_cores
from cnnpipe.util.errors import CnnpipeError

RAY_MISSING = "grid.backend is ray but ray is not installed; pip install 'cnnpipe[ray]'"


class ClusterError(CnnpipeError):
    """The Ray cluster in ``grid.ray_address`` cannot be reached or refused the connection."""


def ray_installed() -> bool:
    """Whether the optional ``ray`` extra is importable (found, not imported: the check is instant)."""
    return importlib.util.find_spec("ray") is not None


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto`` and other forms."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def connect_ray(address: str, timeout_s: float = 5.0) -> None:
    """``ray.init(address)``, with a one-line ``ClusterError`` instead of Ray's retries, traceback and exit.

    A TCP check first: an address where nothing listens would otherwise keep
    Ray retrying for minutes and then exit the process. Ray 2.60 refuses a
    driver without the cluster's token when token authentication is on, and
    never turns it on by itself for an explicit address.
    """
    import ray

    where = _host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=timeout_s).close()
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise ClusterError(f"cannot reach the Ray cluster at grid.ray_address {address} ({reason}); "
                               f"start it (ray start --head --port={where[1]}) or fix grid.ray_address") from None
    try:
        ray.init(address=address, log_to_driver=False)
    except (Exception, SystemExit) as err:  # Ray exits (SystemExit) when the address never answers
        with contextlib.suppress(Exception):
            ray.shutdown()
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            fix = ("RAY_AUTH_MODE=token is set: check that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds the "
                   "cluster's token (`ray get-auth-token` on the head)")
        else:
            fix = ("a cluster with token authentication (Ray 2.60 `ray start --head` when the head has a token) "
                   "needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<`ray get-auth-token` on the head>; "
                   "else check the address and `ray status` on the head")
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise ClusterError(f"the Ray cluster at grid.ray_address {address} refused the connection ({detail}); "
                           f"{fix}") from None


def start_local_ray() -> None:
    """Start a new Ray on this machine with the same cores the local backend would use.

    The core count is the affinity mask's (containers, ``taskset``).
    ``address="local"``: a new instance, never the last ``ray start`` cluster
    of this machine that ``ray.init()`` would otherwise attach to (with
    ``num_cpus``, that attach fails).
    """
    import ray

    ray.init(address="local", num_cpus=cpu_cores(), include_dashboard=False, log_to_driver=False)


def cluster_cpus() -> tuple[int, int]:
    """``(CPUs of the whole cluster, CPUs of its largest live node)``: a task cannot ask for more than the latter."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_node = max([int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")] or [cpus])
    return cpus, per_node
