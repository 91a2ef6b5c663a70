"""Where the code runs: compute device and precision (``device``), the torchrun process group (``distributed``)."""
