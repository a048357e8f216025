"""X-rays to bones: the reconstructor, label clean-up, surfaces, the overlay, the output folder,
batches and the quality report. Knows nothing of training."""
