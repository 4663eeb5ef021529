// sparsegemm::cuda - the device build of csrc/cuda/ (host launchers and the instantiation list
// live in kernels_dispatch.cuh, shared with the SIMT emulator build).
#include "kernels_dispatch.cuh"
