"""guestd: the guest side of netferry (vm-switch, network-setup, wsl-proxy)."""
