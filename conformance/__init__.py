"""The property-based conformance suite (``hal conformance``, or ``pytest -p hal.conformance.plugin
--pyargs hal.conformance --hal-backend NAME``): certifies a backend operator by operator and dtype by dtype against the
contracts' float64 reference, with hypothesis drawing DeepSeek-shaped inputs and their edge cases."""

from importlib.util import find_spec

from hal.errors import MissingExtraError

if find_spec("hypothesis") is None:  # the suite's stack is an extra: hal.ops and hal.model do not need it
    raise MissingExtraError("hal.conformance", "conformance", "hypothesis")
