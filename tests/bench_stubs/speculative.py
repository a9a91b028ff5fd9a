"""A stand-in benchmark that crashes, for the runner's failure path."""

raise RuntimeError("draft model exploded on purpose")
