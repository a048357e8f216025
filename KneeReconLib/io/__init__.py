"""Files in and out: radiograph reading and writing, atomic file helpers, the .seg.nrrd writer,
intensity preprocessing, input validation and where the bundled resources are."""
