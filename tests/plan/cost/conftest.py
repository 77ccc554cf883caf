"""Shared helpers of the cost-model tests: tiny kernels, and a skip when the IREE tools are missing."""
import pytest

from memfit.plan.cost import iree

needs_iree = pytest.mark.skipif(not iree.available(), reason="IREE tools not installed (pip install 'memfit[cost]')")

TINY_MATMUL = """func.func @main(%lhs: tensor<16x32xf32>, %rhs: tensor<32x16xf32>) -> tensor<16x16xf32> {
  %zero = arith.constant 0.0 : f32
  %empty = tensor.empty() : tensor<16x16xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%empty : tensor<16x16xf32>) -> tensor<16x16xf32>
  %out = linalg.matmul ins(%lhs, %rhs : tensor<16x32xf32>, tensor<32x16xf32>) outs(%acc : tensor<16x16xf32>) -> tensor<16x16xf32>
  return %out : tensor<16x16xf32>
}
"""
