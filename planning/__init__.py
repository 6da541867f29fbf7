"""The recipe planned for a time budget: the cases' fingerprint, the device's speed, the plan."""
