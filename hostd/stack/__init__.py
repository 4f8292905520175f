"""The sans-IO userspace network stack: bytes and a clock in, bytes, timers and events out."""
