"""Untrusted input read and reported safely: bounded YAML, errors naming file, path and reason, printable values."""
