"""The peer: downloads pieces from parents, serves its own, keeps a local cache (dfdaemon)."""
