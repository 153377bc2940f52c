"""One suite per operator; importing this package registers them all."""
from hal.conformance.suites import grouped_gemm  # noqa: F401
