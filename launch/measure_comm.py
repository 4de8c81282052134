"""Bytes ZeRO moves between ranks per step, measured with DeepSpeed's comms logger.

    deepspeed --num_gpus 2 launch/measure_comm.py                 # tiny preset, zero2_bf16 engine
    deepspeed --num_gpus 8 launch/measure_comm.py --preset small-9b --llm-layers 4
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.train.comm_volume:main"))
