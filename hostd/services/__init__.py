"""hostd.services."""
