"""The JetStream key-value buckets the schedulers share (leases, partitions)."""

from __future__ import annotations

import logging

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from swarmfly.bus.connection import Connection
from swarmfly.errors import SwarmflyError, in_words

log = logging.getLogger(__name__)


class KeyValues(Connection):
    async def key_value(self, bucket: str, *, timeout: float = 1.0, replicas: int = 1) -> KeyValue:
        """The JetStream key-value bucket (one revision per key), created on first use with
        ``replicas`` copies where the cluster has room for them, else one; ``timeout`` bounds
        each later read or write."""
        try:
            js = self.nc.jetstream(timeout=timeout)
            try:
                return await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            creator = self.nc.jetstream(timeout=max(timeout, 10.0))  # a raft group takes time
            for count in sorted({replicas, 1}, reverse=True):
                try:
                    await creator.create_key_value(bucket=bucket, history=1, replicas=count)
                    break
                except nats.js.errors.APIError as exc:
                    if count == 1:
                        raise
                    # A lone nats-server holds one copy: expected, not worth alarming anyone.
                    log.info("bucket %s: one copy (%d need a nats-server cluster)", bucket, count)
                    log.debug("bucket %s with %d replicas: %s", bucket, count, exc.description)
            return await js.key_value(bucket)
        except (nats.errors.Error, TimeoutError) as exc:
            raise SwarmflyError(
                "unavailable", f"JetStream key-value store unavailable: {in_words(exc)}"
            ) from None
