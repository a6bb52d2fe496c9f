"""Training: sequences laid out as the real-time session feeds them, the trainer, metrics."""
