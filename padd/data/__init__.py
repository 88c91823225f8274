"""padd.data."""
