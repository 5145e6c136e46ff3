"""Figures: plots of results, attention maps."""
