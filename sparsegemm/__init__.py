"""sparsegemm: 2:4 structured-sparse GEMM (skeleton; the public API lands with the foundation)."""
