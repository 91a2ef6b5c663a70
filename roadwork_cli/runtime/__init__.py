"""Where the code runs: the compute device and precision (``device``) and the torchrun process group (``distributed``)."""
