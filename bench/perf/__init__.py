"""Performance measurements of the training code (throughput, packing runs onto a device)."""
