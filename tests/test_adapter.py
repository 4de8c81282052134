import pytest
import torch

from blip2_reference import ReleaseQFormerPoolAdapter, randomize
from mcat_ds.config import AdapterConfig
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.release import release_adapter_state

ENCODER_WIDTH, LLM_WIDTH = 48, 40


def small_adapter_config(**changes) -> AdapterConfig:
    values = dict(num_queries=150, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                  cross_attention_every=2, pool_stride=5, mlp_hidden_size=24, dropout=0.0)
    values.update(changes)
    return AdapterConfig(**values)


def adapter_pair(config: AdapterConfig, seed: int = 0):
    torch.manual_seed(seed)
    reference = ReleaseQFormerPoolAdapter(config, ENCODER_WIDTH, LLM_WIDTH).double()
    randomize(reference, seed)
    ours = SpeechAdapter(config, ENCODER_WIDTH, LLM_WIDTH).double()
    release_state = {f"encoder_projector.{k}": v for k, v in reference.state_dict().items()}
    ours.load_state_dict(release_adapter_state(release_state))
    return reference.eval(), ours.eval()


@pytest.mark.parametrize("cross_every, num_queries", [(2, 150), (1, 151), (3, 7)])
def test_matches_blip2_qformer_reference_forward_and_backward(cross_every, num_queries):
    config = small_adapter_config(cross_attention_every=cross_every, num_queries=num_queries)
    reference, ours = adapter_pair(config)
    states = torch.randn(3, 37, ENCODER_WIDTH, dtype=torch.float64)
    lengths = torch.tensor([37, 1, 20])
    mask = (torch.arange(37)[None] < lengths[:, None]).long()

    states_ref = states.clone().requires_grad_(True)
    states_ours = states.clone().requires_grad_(True)
    expected = reference(states_ref, mask)
    actual = ours(states_ours, lengths)
    assert actual.shape == (3, num_queries // 5, LLM_WIDTH)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)

    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    torch.testing.assert_close(states_ours.grad, states_ref.grad, rtol=1e-9, atol=1e-9)
    # padding frames get no gradient: they took no part
    assert states_ours.grad[1, 1:].abs().max() == 0
    ref_grads = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}
    release_grads = release_adapter_state({f"encoder_projector.{k}": g for k, g in ref_grads.items()})
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, release_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_padding_frames_do_not_change_the_output():
    _, ours = adapter_pair(small_adapter_config())
    states = torch.randn(1, 50, ENCODER_WIDTH, dtype=torch.float64)
    garbage = states.clone()
    garbage[:, 20:] = 1e3 * torch.randn(1, 30, ENCODER_WIDTH, dtype=torch.float64)
    lengths = torch.tensor([20])
    torch.testing.assert_close(ours(states, lengths), ours(garbage, lengths))
    assert not torch.allclose(ours(states, torch.tensor([50])), ours(garbage, torch.tensor([50])))


@pytest.mark.parametrize("frames", [1, 17, 250, 1500])
def test_thirty_speech_tokens_for_any_input_length(frames):
    config = small_adapter_config()
    adapter = SpeechAdapter(config, ENCODER_WIDTH, LLM_WIDTH)
    out = adapter(torch.randn(2, frames, ENCODER_WIDTH), torch.tensor([frames, max(1, frames // 3)]))
    assert out.shape == (2, 30, LLM_WIDTH) == (2, adapter.num_speech_tokens, LLM_WIDTH)
    assert torch.isfinite(out).all()


def test_release_init_and_torch_init():
    blip2 = SpeechAdapter(AdapterConfig(), 1280, 3584)
    q_proj = blip2.layers[0].self_attn.q_proj
    assert abs(q_proj.weight.std().item() - 0.02) < 2e-3 and q_proj.bias.abs().max() == 0
    assert abs(blip2.queries.std().item() - 1.0) < 0.02
    assert sum(layer.cross_attn is not None for layer in blip2.layers) == 4  # every 2nd of 8
    torch_init = SpeechAdapter(AdapterConfig(init="torch", query_init_std=0.02), 1280, 3584)
    bound = 1 / 768**0.5  # PyTorch's kaiming-uniform bound for fan_in 768
    assert torch_init.layers[0].self_attn.q_proj.weight.abs().max() <= bound
    assert torch_init.layers[0].self_attn.q_proj.weight.std() > 0.3 * bound


def test_release_state_with_unknown_keys_is_rejected():
    from mcat_ds.release import ReleaseCheckpointError

    with pytest.raises(ReleaseCheckpointError, match="encoder_projector.extra_head.weight"):
        release_adapter_state({"encoder_projector.extra_head.weight": torch.zeros(1)})
    with pytest.raises(ReleaseCheckpointError, match="not a release MCAT checkpoint"):
        release_adapter_state({"llm.x": torch.zeros(1)})
