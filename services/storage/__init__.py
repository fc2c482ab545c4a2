"""The storage service: the cluster seed and cache (Dragonfly seed peer)."""
