"""padd.configs."""
