"""The run contract, torch-free: URLs and JSON, status and leases, the metrics log, code snapshots, provenance."""
