"""Training machinery: processes and sharding, checkpoints, the end of a step, optimizers, weights in and out."""
