"""Small programs the tests run in subprocesses (toy training, DDP probes)."""
