"""swarmfly: peer-to-peer file and container-image distribution for clusters."""

__version__ = "0.1.0"
