"""Running a trained model: loading it by name, moshi's full-duplex server, offline conversations."""
