"""The scheduler: tasks, peers, piece counts; picks parents and decides back-to-source."""
