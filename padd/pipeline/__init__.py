"""padd.pipeline."""
