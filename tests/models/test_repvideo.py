"""RepVideo gates against the base model and against a naive reference with an explicit list cache.

The reference does not use hooks: it swaps every block for a wrapper module that reads the block's
input, keeps the cache as a Python list of tensors exactly as the issue states it (starts with the
input of block 0; after block i, restart with [output] when i % window == 0, else append) and
applies ``g * stack(cache).mean(0) + (1 - g) * previous`` before every block, block 0 included.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crepa.models import BlockCapture, detect_family
from crepa.models.tiny import TINY_MODELS, tiny_inputs, tiny_transformer
from crepa.regularizer import CrepaConfig, CrepaRegularizer
from crepa.repvideo import RepVideoGates, install_repvideo

ALL_MODELS = list(TINY_MODELS)
DEPTH = 8
# Families whose blocks update and return the text tokens next to the video tokens.
TEXT_STREAM_MODELS = [
    name for name in ALL_MODELS if TINY_MODELS[name].family in ("cogvideox", "hunyuanvideo", "mochi")
]
FIXED_TEXT_MODELS = [name for name in ALL_MODELS if name not in TEXT_STREAM_MODELS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread: intra-op threading only adds overhead at these sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def deep_tiny(name: str, depth: int = DEPTH, seed: int = 0) -> nn.Module:
    """The tiny config of ``name`` with ``depth`` blocks in all (HunyuanVideo: half dual, half single)."""
    if TINY_MODELS[name].family == "hunyuanvideo":
        return tiny_transformer(name, seed, num_layers=depth // 2, num_single_layers=depth - depth // 2)
    return tiny_transformer(name, seed, num_layers=depth)


def inputs_for(name: str, transformer: nn.Module, seed: int = 1) -> dict:
    return tiny_inputs(
        name, transformer, frames=2, height=4, width=6, generator=torch.Generator().manual_seed(seed)
    )


def run(transformer: nn.Module, inputs: dict) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


class ReferenceBlock(nn.Module):
    """Wraps one block; applies RepVideo with an explicit list cache shared by all wrappers."""

    def __init__(self, block: nn.Module, index: int, state: dict) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.state = state

    def forward(self, *args, **kwargs):
        state = self.state
        args = list(args)
        names = ["hidden_states", "encoder_hidden_states"][: len(state["caches"])]
        for position, name in enumerate(names):  # both are the first two parameters of every block
            previous = kwargs[name] if name in kwargs else args[position]
            cache = state["caches"][position]
            if self.index == 0:
                cache[:] = [previous]  # the cache starts with the input of block 0
            gate = state["gates"][self.index]
            mixed = gate * torch.stack(cache).mean(dim=0) + (1 - gate) * previous
            if name in kwargs:
                kwargs[name] = mixed
            else:
                args[position] = mixed
        output = self.block(*args, **kwargs)
        state["outputs"].append(output[0] if isinstance(output, tuple) else output)
        for position, cache in enumerate(state["caches"]):
            newest = output[position] if isinstance(output, tuple) else output
            if self.index % state["window"] == 0:
                cache[:] = [newest]
            else:
                cache.append(newest)
        return output


def reference_model(transformer: nn.Module, gates: torch.Tensor, window: int, include_text: bool = False):
    """A copy of ``transformer`` whose blocks are :class:`ReferenceBlock` wrappers; returns (model, state)."""
    model = copy.deepcopy(transformer)
    family = detect_family(model)
    for block in family.blocks(model):
        names = list(inspect.signature(block.forward).parameters)
        assert names[:2] == ["hidden_states", "encoder_hidden_states"], names
    state = {
        "caches": [[] for _ in range(2 if include_text else 1)],
        "gates": gates,
        "window": window,
        "outputs": [],
    }
    index = 0
    for attr in family.block_lists:
        wrapped = []
        for block in getattr(model, attr):
            wrapped.append(ReferenceBlock(block, index, state))
            index += 1
        setattr(model, attr, nn.ModuleList(wrapped))
    return model, state


def random_gates(gates: RepVideoGates, seed: int = 3) -> torch.Tensor:
    values = torch.rand(gates.depth, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        gates.gate.copy_(values)
    return values


@pytest.mark.parametrize("name", ALL_MODELS)
def test_zero_gates_give_the_base_model_exactly(name: str) -> None:
    transformer = deep_tiny(name)
    inputs = inputs_for(name, transformer)
    base = run(transformer, inputs)
    gates = install_repvideo(transformer, window=3)
    assert torch.count_nonzero(gates.gate) == 0
    assert torch.equal(run(transformer, inputs), base)
    with torch.no_grad():
        gates.gate.fill_(0.5)
    assert not torch.allclose(run(transformer, inputs), base, atol=1e-3)  # the hooks do act
    gates.remove()
    assert torch.equal(run(transformer, inputs), base)


@pytest.mark.parametrize("window", [1, 2, 6, DEPTH + 3])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_random_gates_match_the_list_cache_reference(name: str, window: int) -> None:
    transformer = deep_tiny(name)
    inputs = inputs_for(name, transformer)
    values = torch.rand(DEPTH, generator=torch.Generator().manual_seed(3))
    reference, _ = reference_model(transformer, values, window)
    with torch.no_grad():
        base = run(transformer, inputs)
        expected = run(reference, inputs)
        gates = install_repvideo(transformer, window=window)
        gates.gate.copy_(values)
        actual = run(transformer, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if window == 1:  # the cache never holds more than the previous output
        torch.testing.assert_close(actual, base, rtol=1e-5, atol=1e-5)
    else:
        assert (actual - base).abs().max() > 1e-3


@pytest.mark.parametrize("name", TEXT_STREAM_MODELS)
def test_include_text_matches_the_reference(name: str) -> None:
    transformer = deep_tiny(name)
    inputs = inputs_for(name, transformer)
    values = torch.rand(DEPTH, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, _ = reference_model(transformer, values, window=3, include_text=True)
        expected = run(reference, inputs)
        video_only = install_repvideo(transformer, window=3)
        video_only.gate.copy_(values)
        without_text = run(transformer, inputs)
        video_only.remove()
        gates = install_repvideo(transformer, window=3, include_text=True)
        gates.gate.copy_(values)
        actual = run(transformer, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (actual - without_text).abs().max() > 1e-4


@pytest.mark.parametrize("name", FIXED_TEXT_MODELS)
def test_include_text_is_refused_where_blocks_do_not_return_text(name: str) -> None:
    transformer = deep_tiny(name, depth=3)
    install_repvideo(transformer, window=3, include_text=True)
    with pytest.raises(ValueError, match="include_text"), torch.no_grad():
        run(transformer, inputs_for(name, transformer))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gate_gradients_match_the_reference(name: str) -> None:
    transformer = deep_tiny(name)
    inputs = inputs_for(name, transformer)
    include_text = name in TEXT_STREAM_MODELS
    values = torch.rand(DEPTH, generator=torch.Generator().manual_seed(3))
    reference_gates = values.clone().requires_grad_(True)
    reference, _ = reference_model(transformer, reference_gates, window=3, include_text=include_text)
    run(reference, inputs).square().mean().backward()

    gates = install_repvideo(transformer, window=3, include_text=include_text)
    with torch.no_grad():
        gates.gate.copy_(values)
    run(transformer, inputs).square().mean().backward()

    gated = torch.tensor([gates.is_gated(index) for index in range(DEPTH)])
    assert gated.tolist() == [False, False, True, True, False, True, True, False]
    assert torch.all(gates.gate.grad[gated] != 0)
    assert torch.all(gates.gate.grad[~gated] == 0)
    torch.testing.assert_close(gates.gate.grad, reference_gates.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_save_load_round_trip_restores_outputs(name: str, tmp_path) -> None:
    include_text = name == "cogvideox"
    transformer = deep_tiny(name)
    inputs = inputs_for(name, transformer)
    gates = install_repvideo(transformer, window=3, gate_init=0.5, include_text=include_text)
    random_gates(gates)
    with torch.no_grad():
        expected = run(transformer, inputs)
    save_file(gates.state_dict(), tmp_path / "gates.safetensors")

    fresh = deep_tiny(name)
    loaded = install_repvideo(fresh, window=3, include_text=include_text)
    with torch.no_grad():
        assert not torch.equal(run(fresh, inputs), expected)
        loaded.load_state_dict(load_file(tmp_path / "gates.safetensors"))
        assert torch.equal(run(fresh, inputs), expected)

    other_window = install_repvideo(deep_tiny(name), window=4, include_text=include_text)
    with pytest.raises(RuntimeError, match="window=3"):
        other_window.load_state_dict(load_file(tmp_path / "gates.safetensors"))
    other_text = install_repvideo(deep_tiny(name), window=3, include_text=not include_text)
    with pytest.raises(RuntimeError, match="include_text"):
        other_text.load_state_dict(load_file(tmp_path / "gates.safetensors"))


def _output_and_gradients(name: str, checkpointing: bool, include_text: bool) -> tuple[torch.Tensor, dict]:
    transformer = deep_tiny(name)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    gates = install_repvideo(transformer, window=3, include_text=include_text)
    random_gates(gates)
    output = run(transformer, inputs_for(name, transformer))
    output.square().mean().backward()
    grads = {"gate": gates.gate.grad}
    grads.update({key: param.grad for key, param in transformer.named_parameters() if param.grad is not None})
    return output.detach(), grads


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradient_checkpointing_gives_the_same_output_and_gradients(name: str) -> None:
    include_text = name in TEXT_STREAM_MODELS
    plain_output, plain_grads = _output_and_gradients(name, checkpointing=False, include_text=include_text)
    ckpt_output, ckpt_grads = _output_and_gradients(name, checkpointing=True, include_text=include_text)
    assert torch.equal(ckpt_output, plain_output)
    assert ckpt_grads.keys() == plain_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_checkpointing_survives_a_no_grad_forward_and_refuses_a_stale_backward() -> None:
    transformer = deep_tiny("wan")
    transformer.enable_gradient_checkpointing()
    gates = install_repvideo(transformer, window=3)
    random_gates(gates)
    inputs = inputs_for("wan", transformer)
    _, expected = _output_and_gradients("wan", checkpointing=False, include_text=False)

    loss = run(transformer, inputs).square().mean()
    with torch.no_grad():  # e.g. a validation forward between forward and backward
        run(transformer, inputs_for("wan", transformer, seed=7))
    loss.backward()
    torch.testing.assert_close(gates.gate.grad, expected["gate"], rtol=1e-5, atol=1e-7)

    first = run(transformer, inputs).square().mean()
    run(transformer, inputs_for("wan", transformer, seed=7)).square().mean()  # a second forward with grad
    with pytest.raises(RuntimeError, match="latest forward"):
        first.backward()


def test_reentrant_checkpointing_is_refused() -> None:
    transformer = deep_tiny("wan")
    transformer.enable_gradient_checkpointing(
        lambda block, *args: torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=True)
    )
    install_repvideo(transformer, window=3)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        run(transformer, inputs_for("wan", transformer))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_crepa_sees_the_block_output_inside_the_gated_stack(checkpointing: bool) -> None:
    name, block_index = "cogvideox", 4
    transformer = deep_tiny(name)
    inputs = inputs_for(name, transformer)
    values = torch.rand(DEPTH, generator=torch.Generator().manual_seed(11))
    reference, state = reference_model(transformer, values, window=3)
    with torch.no_grad():
        run(reference, inputs)
    expected_block_output = state["outputs"][block_index]

    if checkpointing:
        transformer.enable_gradient_checkpointing()
    gates = install_repvideo(transformer, window=3)
    with torch.no_grad():
        gates.gate.copy_(values)
    capture = BlockCapture(transformer, block_index)
    config = CrepaConfig(block_index=block_index, projector="linear", weight=1.0)
    crepa = CrepaRegularizer(transformer, config, teacher_dim=6)
    output = run(transformer, inputs)
    torch.testing.assert_close(capture.pop().flatten(1, 3), expected_block_output, rtol=1e-5, atol=1e-5)

    teacher = torch.randn(2, 2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    (crepa.loss(teacher, step=0).loss + output.square().mean()).backward()
    gated = torch.tensor([gates.is_gated(index) for index in range(DEPTH)])
    assert torch.all(gates.gate.grad[gated] != 0)
    assert all(param.grad is not None for param in crepa.parameters())


def test_window_and_gating_pattern() -> None:
    transformer = deep_tiny("wan", depth=3)
    with pytest.raises(ValueError, match="window"):
        install_repvideo(transformer, window=0)
    gates = install_repvideo(transformer, window=2, gate_init=0.5)
    assert gates.gate.shape == (3,) and torch.all(gates.gate == 0.5)
    assert [gates.is_gated(index) for index in range(3)] == [False, False, True]
    assert set(gates.state_dict()) == {"gate", "window", "include_text"}


def test_eval_profile_of_a_run_with_trained_gates(tmp_path):
    """The evaluation's per-layer adjacent-frame similarity sees the trained RepVideo gates."""
    from safetensors.torch import save_file

    from crepa.config import RepVideoSection
    from crepa.eval.diagnostics import load_repvideo_gates
    from crepa.eval.layers import layer_similarity_profile
    from crepa.models.tiny import tiny_inputs, tiny_transformer

    settings = RepVideoSection(enabled=True, window=2, gate_init=0.0)
    calls = [
        tiny_inputs("wan", tiny_transformer("wan", num_layers=4), generator=torch.Generator().manual_seed(0))
    ]
    trained = install_repvideo(tiny_transformer("wan", num_layers=4), window=2)
    with torch.no_grad():
        trained.gate.copy_(torch.tensor([0.0, 0.0, 0.9, 0.0]))
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()},
        str(tmp_path / "repvideo_gates.safetensors"),
    )

    base = tiny_transformer("wan", num_layers=4)
    (tmp_path / "no-gates").mkdir()
    assert load_repvideo_gates(base, tmp_path / "no-gates", settings) is None
    base_profile = layer_similarity_profile(base, calls)
    gated = tiny_transformer("wan", num_layers=4)
    gates = load_repvideo_gates(gated, tmp_path, settings)
    assert gates is not None and torch.equal(gates.gate, trained.gate)
    gated_profile = layer_similarity_profile(gated, calls)
    # blocks 0 and 1 are never gated; block 2 (gate 0.9) and everything after it change
    torch.testing.assert_close(gated_profile[:2], base_profile[:2])
    assert not torch.allclose(gated_profile[2:], base_profile[2:])
