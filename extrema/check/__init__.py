"""Will it fit? A stage's memory per rank, FLOPs per step and time on a named GPU, predicted on this machine.

`python -m extrema.check` runs one stage configuration's step under fake tensors and a fake process group of the
job's world size (`estimate`), plans its checkpoint at that size (`plan`) and prints JSON; `devices` is the table
of GPUs (torch-free: the launcher reads it). `extrema-launch check FILE` runs it once per stage configuration.
"""
