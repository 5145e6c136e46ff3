"""Fixtures that start real clusters on this machine: a private Slurm and a local Ray, each also as two and four
nodes on a private network (`tests.clusters.netns`); and the multi-node tests' reference run
(`tests.multinode_runs`)."""

pytest_plugins = [
    "tests.clusters.slurm",
    "tests.clusters.ray",
    "tests.clusters.slurm_nodes",
    "tests.clusters.ray_nodes",
    "tests.multinode_runs",
]
