"""Writes what a GPU result was measured on to a JSON file: the GPU as nvidia-smi reports it
(name, driver, clocks, power limit), torch and its CUDA, the sparsegemm build and the GPUs it sees.
The env.json of every folder under bench/results/ (gpu_suite.sh and the device scripts there).

    python bench/gpu_env.py OUT.json
"""
import json
import subprocess
import sys

import torch

from sparsegemm import _C

QUERY = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"


def main() -> None:
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True)
    first_gpu = [value.strip() for value in smi.stdout.splitlines()[0].split(",")]
    env = {"nvidia_smi": dict(zip(QUERY.split(","), first_gpu)), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "sparsegemm": _C.build_info(), "gpus": _C.list_gpus()}
    with open(sys.argv[1], "w") as out:
        json.dump(env, out, indent=1)


if __name__ == "__main__":
    main()
