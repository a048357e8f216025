"""Training anatomy and images: the procedural phantoms, the LLP26 bone population, DRRs, the
radiograph simulator and the training data sets (caches). No networks."""
