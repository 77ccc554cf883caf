"""memfit's own compute kernels (CPU: a row-major decode matmul, built on first use; see build.py)."""
from memfit.llm.kernels.build import get_cpu_linear, load_cpu_linear, unavailable_reason

__all__ = ["get_cpu_linear", "load_cpu_linear", "unavailable_reason"]
