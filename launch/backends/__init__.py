"""What differs between backends: the Backend protocol and names, what a job asks, log sources, each backend."""
