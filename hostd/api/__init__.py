"""hostd.api."""
