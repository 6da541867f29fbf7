"""The pieces of a training run: the step, its guards, loaders and the history it writes."""
