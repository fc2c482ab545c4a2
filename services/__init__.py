"""swarmfly.services: scheduler, storage, peer and proxy."""
