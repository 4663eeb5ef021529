// sparsegemm::simt - the csrc/cuda/ kernels compiled by the host compiler and run by the SIMT
// emulator (SG_KERNEL_NS is `simt` here), from the very sources nvcc compiles.
// SPARSEGEMM_SIMT selects the host branch of cuda/arch/portability.cuh.
#define SPARSEGEMM_SIMT 1
#include "../cuda/kernels_dispatch.cuh"
