"""padd.moe."""
