"""padd.decompress."""
