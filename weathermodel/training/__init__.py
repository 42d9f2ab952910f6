"""Training: ``weathermodel train`` on Lightning Fabric (1..N processes, 1..N nodes)."""
