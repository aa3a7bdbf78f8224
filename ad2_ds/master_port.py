"""A master port another job already holds, said in one line before the process group starts.

    check_master_port()                      # in init_distributed: raises PortInUseError on rank 0 when it is taken
    with port_in_use_as_one_line(): ...      # the same line when torch itself hits EADDRINUSE (a port taken since)

Two jobs started on one machine both take the launcher's default port 29500; the second one's rank 0 cannot open its
rendezvous store there and died with a ``DistNetworkError ... EADDRINUSE`` traceback. Rank 0 of this job (the one
that opens the store) tries to bind the port first, as torch's store does (SO_REUSEADDR: a port left in TIME_WAIT
by an earlier job is free, one that another job listens on is not). Under torchrun the agent holds the store
(``TORCHELASTIC_USE_AGENT_STORE``): nothing to check here. A port this process's own earlier run opened (a sweep or
the default teacher's fine-tune in the same process) is its own, not taken: torch reuses that server.
"""

import contextlib
import errno
import os
import socket

_OWN_PORTS = set()  # ports this process's own stores hold: torch reuses its server when a later run here inits again


def remember_own_port(env=None) -> None:
    """Called once the process group is up: its port is this process's own from now on, not another job's."""
    env = os.environ if env is None else env
    if "MASTER_PORT" in env:
        _OWN_PORTS.add(int(env["MASTER_PORT"]))


class PortInUseError(ValueError):
    """The master port is taken: the message is one line naming the port and how to pick another."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_message(port, addr: str) -> str:
    other = _free_port()
    return (
        f"master port {port} on {addr} is taken (another job on this machine?): start this one on another port, "
        f"deepspeed --master_port {other} ... (torchrun: --master_port {other}; plain python: MASTER_PORT={other})"
    )


def check_master_port(env=None) -> None:
    """Raise :class:`PortInUseError` when this process is the job's rank 0, opens the rendezvous store itself, and
    cannot bind ``MASTER_PORT``."""
    env = os.environ if env is None else env
    if env.get("RANK", "0") != "0" or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or "MASTER_PORT" not in env:
        return
    port = int(env["MASTER_PORT"])
    if port in _OWN_PORTS:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))  # torch's store listens on every interface
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(port_message(port, env.get("MASTER_ADDR", "127.0.0.1"))) from None
            # anything else (no permission for a low port, ...) is torch's to report


@contextlib.contextmanager
def port_in_use_as_one_line():
    """Turn torch's ``DistNetworkError`` for a taken port (taken between the check and the store) into the line."""
    import torch.distributed as tdist

    try:
        yield
    except tdist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        port = os.environ.get("MASTER_PORT", "?")
        raise PortInUseError(port_message(port, os.environ.get("MASTER_ADDR", "127.0.0.1"))) from None
