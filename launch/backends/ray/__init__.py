"""The Ray backend: `backend` (jobs, the driver every job runs), `head` (a local head for a sweep), `logs`."""
