"""Session fixtures that start real clusters on this machine: a private Slurm and a local Ray."""

pytest_plugins = ["tests.clusters.slurm", "tests.clusters.ray"]
