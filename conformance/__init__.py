"""The property-based conformance suite (``hal conformance``, or ``pytest --pyargs hal.conformance
--hal-backend NAME``): certifies a backend operator by operator and dtype by dtype against the
contracts' float64 reference, with hypothesis drawing DeepSeek-shaped inputs and their edge cases."""
