"""netferry: the Python SDK, frame codecs, address parsing and the `netferry` CLI."""
