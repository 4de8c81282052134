"""mcat serve's command line for vLLM's server, checked without vLLM (tests/test_vllm_serve.py starts
it): MCAT's settings, and the user's vLLM options passed on and winning over ours."""

import json

from mcat_ds.cli import build_parser
from mcat_ds.infer.export import CHAT_TEMPLATE_FILE
from mcat_ds.infer.serve import NO_REPEAT_PROCESSOR, ServeOptions, example_requests, server_command

TINY = {"max_position_embeddings": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}


def value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_server_gets_mcats_settings_and_the_users_vllm_options_win(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("{{ bos_token }}")
    command = server_command(ServeOptions(str(tmp_path), port=9000, api_key="k"), tmp_path, "float32", on_cpu=True)
    assert command[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert value(command, "--max-model-len") == "1024" and value(command, "--port") == "9000"
    assert value(command, "--logits-processors") == NO_REPEAT_PROCESSOR and value(command, "--api-key") == "k"
    assert value(command, "--chat-template") == str(tmp_path / CHAT_TEMPLATE_FILE)
    assert int(value(command, "--kv-cache-memory-bytes")) > 0
    assert "--enforce-eager" in command and "--skip-mm-profiling" in command

    mine = ("--max-model-len", "512", "--gpu-memory-utilization=0.3", "--max-num-seqs", "8")
    command = server_command(ServeOptions(str(tmp_path), vllm_args=mine), tmp_path, "float32", on_cpu=True)
    assert command.count("--max-model-len") == 1 and command[-len(mine):] == list(mine)
    assert "--kv-cache-memory-bytes" not in command  # the user sized memory themselves
    on_gpu = server_command(ServeOptions(str(tmp_path)), tmp_path, "bfloat16", on_cpu=False)
    assert "--enforce-eager" not in on_gpu and "--kv-cache-memory-bytes" not in on_gpu


def test_options_mcat_does_not_know_go_to_vllm_only_for_serve(capsys):
    from mcat_ds.cli import main

    args, unknown = build_parser().parse_known_args(["serve", "--checkpoint", "c", "--max-num-seqs", "16", "--port", "1"])
    assert (args.port, unknown) == (1, ["--max-num-seqs", "16"])
    try:
        main(["evaluate", "--hyps", "h", "--out", "o", "--max-num-seqs", "16"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "unrecognized arguments: --max-num-seqs 16" in capsys.readouterr().err


def test_the_example_requests_name_the_endpoint_model_and_key():
    text = example_requests("http://127.0.0.1:8000", "/models/x.export", "secret")
    assert "curl http://127.0.0.1:8000/v1/audio/translations -H 'Authorization: Bearer secret'" in text
    assert "extra_body={'language': 'de', 'to_language': 'fr'}" in text and "model='/models/x.export'" in text
