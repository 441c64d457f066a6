"""The fleet wing: many runs at once: `bench compare` (compare) and its local / SLURM launchers (launch)."""
