"""Training: the shared loop every method's loss runs in, and robust (adversarial) training."""
