"""padd.training."""
