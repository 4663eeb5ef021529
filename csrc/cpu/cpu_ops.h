// CPU backend on the logical layout (format.h): vectorised with run-time ISA dispatch, threaded.
// Every function is synchronous and validates nothing: ops.py checks arguments first.
#pragma once
#include <cstdint>

#include "params.h"

namespace sparsegemm {
namespace cpu {

// Worker threads used by the functions below (ops.py passes torch.get_num_threads()).
void set_num_threads(int threads);
int num_threads();

// Name of the vector ISA picked at run time: "avx512", "avx2" or "generic".
const char* isa_name();

// mask[N, K] (contiguous, 0/1 bytes) <- magnitude 2:4 mask of W[N, K] (row stride ldw).
void mask_2to4(DType dtype, const void* w, int64_t N, int64_t K, int64_t ldw, uint8_t* mask);

void compress(const CompressParams& p);
void decompress(const DecompressParams& p);

// First row * num_groups(K) + group whose nibble is not an ordered pair (or, for the unused
// high nibble of an odd row, not kPadNibble); -1 when all of E[N, meta_cols(K)] is valid.
int64_t find_invalid_meta(const uint8_t* meta, int64_t N, int64_t K);

// Y = act(X @ W^T + bias), fp32 accumulation, output rounded once to p.dtype.
void gemm(const GemmParams& p);

}  // namespace cpu
}  // namespace sparsegemm
