"""Bytes ZeRO moves between ranks per step, measured with DeepSpeed's comms logger.

    deepspeed --num_gpus 2 launch/measure_comm.py                 # tiny preset, zero2_bf16 engine
    deepspeed --num_gpus 8 launch/measure_comm.py --preset small-9b --llm-layers 4
"""

from mcat_ds.train.comm_volume import main

if __name__ == "__main__":
    main()
