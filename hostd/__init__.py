"""hostd: the host side of netferry (the `host-switch` daemon)."""
