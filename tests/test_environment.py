"""What a run records about where it ran (report.json, checkpoint metadata)."""

import torch

from mcat_ds.environment import ISA_FLAGS, describe_environment


def test_the_environment_record_names_versions_cpu_threads_and_seeds():
    record = describe_environment(world_size=2, threads_per_rank=1, seeds={"runtime": 3, "data": 3})
    assert record["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"transformers", "peft", "deepspeed", "numpy"} <= set(record["packages"])
    assert record["python"].count(".") == 2
    cpu = record["cpu"]
    assert cpu["model"] and set(cpu["isa_flags"]) <= set(ISA_FLAGS)
    assert cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (record["world_size"], record["threads_per_rank"], record["seeds"]) == (2, 1, {"runtime": 3, "data": 3})


def test_checkpoint_metadata_carries_the_environment(tiny_config, tmp_path):
    from mcat_ds.build import build_model
    from mcat_ds.checkpoint import read_checkpoint_metadata, save_checkpoint

    config = tiny_config()
    model, tokenizer = build_model(config)
    save_checkpoint(model, tokenizer, config, tmp_path / "ckpt")
    environment = read_checkpoint_metadata(tmp_path / "ckpt")["environment"]
    assert environment["threads_per_rank"] == torch.get_num_threads() and environment["world_size"] == 1
    assert environment["seeds"] == {"runtime": config.runtime.seed, "data": config.data.seed}
