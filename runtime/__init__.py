"""Where and how code runs: device and precision, distributed processes, atomic files, checkpoints."""
