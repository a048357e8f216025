"""Learning: the losses and the training loop."""
