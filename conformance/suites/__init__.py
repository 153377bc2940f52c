"""One suite per operator; importing this package registers them all."""

from hal.conformance.suites import grouped_gemm, mla, quant, routing  # noqa: F401
