"""How a process finds the cluster: the NATS servers (its configuration, or what `swarmfly up`
recorded in the state dir) and the peer service running on this host.

Kept light (no service imports): `swarmfly get` loads it on every run.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from swarmfly.bus import Bus
from swarmfly.config import Config
from swarmfly.errors import SwarmflyError
from swarmfly.get.socket_client import peer_record

CLUSTER_FILE = "cluster.json"


def recorded_servers(state_dir: Path) -> list[str]:
    """The NATS that `swarmfly up` started for this state dir, if any."""
    try:
        data = orjson.loads((state_dir / CLUSTER_FILE).read_bytes())
        return [str(s) for s in data["nats"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def servers_of(config: Config) -> list[str]:
    return config.nats.servers or recorded_servers(config.state_dir)


async def connect(
    config: Config, name: str, servers: list[str] | None = None, *, within: float | None = None
) -> Bus:
    """``within``: a one-shot command's connect deadline (``Bus.connect``)."""
    servers = servers or servers_of(config)
    if not servers:
        raise SwarmflyError(
            "unavailable", "no NATS server: pass --nats URL, or start one with `swarmfly up`"
        )
    return await Bus.connect(
        servers, prefix=config.nats.prefix, name=name, options=config.nats_options(), within=within
    )


def local_peer(state_dir: Path) -> str | None:
    """The host id of a peer service running on this state dir, if its process lives."""
    record = peer_record(state_dir)
    return str(record["host_id"]) if record and "host_id" in record else None
