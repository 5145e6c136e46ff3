"""Session fixtures that start real clusters on this machine: a private Slurm and a local Ray, each also as two
nodes on a private network (`tests.clusters.netns`)."""

pytest_plugins = [
    "tests.clusters.slurm",
    "tests.clusters.ray",
    "tests.clusters.slurm_two_node",
    "tests.clusters.ray_two_node",
]
