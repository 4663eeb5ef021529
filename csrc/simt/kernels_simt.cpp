// sparsegemm::simt - the csrc/cuda/ kernels compiled by the host compiler and run by the SIMT
// emulator (SG_KERNEL_NS is `simt` here), from the very sources nvcc compiles.
#include "../cuda/kernels_dispatch.cuh"
