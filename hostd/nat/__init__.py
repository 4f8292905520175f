"""hostd.nat."""
