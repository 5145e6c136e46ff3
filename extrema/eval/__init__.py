"""Evaluation: neighbours and the kNN monitor, classifier evaluation, locality scoring, COCO metrics."""
