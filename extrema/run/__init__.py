"""The run contract, torch-free: URLs and JSON, status and leases, code snapshots, provenance, trackers."""
