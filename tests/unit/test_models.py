"""Tests of the built-in reference models (remat.models): CPU, meta, FakeTensorMode, errors."""

from __future__ import annotations

import doctest
import inspect
from typing import Any

import pytest
import torch

import remat.models as models_pkg
from remat.models import BUILTIN_MODELS, BuiltModel, build_builtin, cnn, gpt, mlp, moe, unet

MODULES = [models_pkg, gpt, mlp, cnn, unet, moe]

# Small sizes for the models whose defaults take more than a fraction of a second on a CPU.
SMALL: dict[str, dict[str, Any]] = {
    "gpt": {"n_layer": 2, "d_model": 32, "n_head": 4, "seq": 16, "batch": 2, "vocab": 64},
    "mlp": {},
    "cnn": {},
    "unet": {},
    "moe": {"n_layer": 2, "d_model": 32, "seq": 16},
}
NOT_META = {"moe"}  # data-dependent routing (nonzero) has no meta implementation


def _call(built: BuiltModel) -> Any:
    inputs = built.example_inputs
    if isinstance(inputs, dict):
        return built.model(**inputs)
    return built.model(*inputs)


def _forward_backward(built: BuiltModel) -> torch.Tensor:
    assert built.loss_fn is not None
    loss = built.loss_fn(_call(built))
    loss.backward()
    return loss


def test_builtin_names() -> None:
    assert list(BUILTIN_MODELS) == ["gpt", "mlp", "cnn", "unet", "moe"]


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_forward_backward_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    built = build_builtin(name, **SMALL[name])
    assert isinstance(built, BuiltModel)
    assert built.name == name
    assert isinstance(built.example_inputs, tuple)
    loss = _forward_backward(built)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    trainable = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad]
    assert trainable
    for param_name, param in trainable:
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"


@pytest.mark.parametrize("name", ["mlp", "cnn", "unet", "moe"])
def test_defaults_are_small_enough_for_the_cpu(name: str) -> None:
    # Work, not wall time (timed unit tests fail on a loaded machine): a default step stays under
    # 20 GFLOP, a few seconds on this 2-core CPU.
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    built = build_builtin(name)
    with FlopCounterMode(display=False) as counter:
        loss = _forward_backward(built)
    assert torch.isfinite(loss)
    assert counter.get_total_flops() < 20e9


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_same_seed_same_model_inputs_and_outputs(name: str) -> None:
    overrides = dict(SMALL[name])
    if name in ("gpt", "moe"):
        overrides["dropout"] = 0.2  # exercise the random dropout masks too

    def run() -> tuple[BuiltModel, torch.Tensor, torch.Tensor]:
        torch.manual_seed(1234)
        built = build_builtin(name, **overrides)
        out = _call(built)
        assert built.loss_fn is not None
        return built, out, built.loss_fn(out)

    first, out_1, loss_1 = run()
    second, out_2, loss_2 = run()
    for (key, a), b in zip(
        first.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
    for a, b in zip(first.example_inputs, second.example_inputs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out_1, out_2)
    assert torch.equal(loss_1, loss_2)

    torch.manual_seed(4321)
    third = build_builtin(name, **overrides)
    assert not torch.equal(_call(third), out_1)


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_factories_do_not_seed(name: str) -> None:
    torch.manual_seed(0)
    build_builtin(name, **SMALL[name])
    once = torch.rand(4)
    torch.manual_seed(0)
    build_builtin(name, **SMALL[name])
    build_builtin(name, **SMALL[name])
    twice = torch.rand(4)
    assert not torch.equal(once, twice)


@pytest.mark.parametrize("name", [n for n in BUILTIN_MODELS if n not in NOT_META])
def test_meta_device_forward_backward(name: str) -> None:
    with torch.device("meta"):
        built = build_builtin(name)
        loss = _forward_backward(built)
    assert loss.is_meta
    tensors = [*built.model.parameters(), *built.model.buffers(), *built.example_inputs]
    assert all(t.is_meta for t in tensors)
    assert all(p.grad is not None and p.grad.is_meta for p in built.model.parameters())


def test_moe_builds_on_meta() -> None:
    with torch.device("meta"):
        built = build_builtin("moe")
    assert all(p.is_meta for p in built.model.parameters())
    assert all(t.is_meta for t in built.example_inputs)


def test_large_gpt_builds_on_meta_without_memory() -> None:
    # 2 billion float32 parameters would be 8 GB; on meta the process must not grow by 1 GB.
    import resource

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        built = build_builtin("gpt", n_layer=48, d_model=2048, seq=2048)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
    assert grown_kib < 1024 * 1024, f"building on meta grew the peak RSS by {grown_kib} KiB"
    params = list(built.model.parameters())
    assert sum(p.numel() for p in params) > 2_000_000_000
    assert all(p.is_meta for p in params)
    assert all(b.is_meta for b in built.model.buffers())
    assert all(t.is_meta for t in built.example_inputs)
    assert built.example_inputs[0].shape == (8, 2048)
    assert len(built.model.blocks) == 48


@pytest.mark.parametrize("name", [n for n in BUILTIN_MODELS if n not in NOT_META])
def test_fake_tensor_mode(name: str) -> None:
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
    with fake_tensor.FakeTensorMode():
        built = build_builtin(name, **SMALL[name])
        loss = _forward_backward(built)
        assert isinstance(loss, fake_tensor.FakeTensor)
        assert all(p.grad is not None for p in built.model.parameters())


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(ValueError, match="got 'gtp'") as info:
        build_builtin("gtp")
    message = str(info.value)
    for name in BUILTIN_MODELS:
        assert name in message
    assert "did you mean 'gpt'" in message
    assert "fix:" in message


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_unknown_override_lists_accepted_keys(name: str) -> None:
    with pytest.raises(ValueError, match="unknown override") as info:
        build_builtin(name, not_an_arg=1)
    message = str(info.value)
    for key in inspect.signature(BUILTIN_MODELS[name]).parameters:
        assert key in message
    assert "not_an_arg" in message


@pytest.mark.parametrize(
    ("name", "overrides", "pattern"),
    [
        ("gpt", {"d_model": 30, "n_head": 8}, "d_model: got 30; expected a multiple of n_head=8"),
        ("gpt", {"batch": 0}, "batch: got 0"),
        ("gpt", {"dropout": 1.5}, "dropout: got 1.5"),
        ("gpt", {"n_layer": True}, "n_layer: got True"),
        ("mlp", {"width": -1}, "width: got -1"),
        ("cnn", {"channels": ()}, "channels: got"),
        ("cnn", {"channels": (8, 0)}, r"channels\[i\]: got 0"),
        ("unet", {"image_size": 60}, "image_size: got 60; expected a multiple of 2 \\*\\* depth"),
        ("moe", {"top_k": 5}, "top_k: got 5; expected at most n_experts=4"),
        ("moe", {"d_model": 30}, "d_model: got 30"),
    ],
)
def test_invalid_values(name: str, overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        build_builtin(name, **overrides)
    assert "fix:" in str(info.value)


def test_factory_signatures() -> None:
    for name, factory in BUILTIN_MODELS.items():
        params = inspect.signature(factory).parameters
        assert all(p.kind is p.KEYWORD_ONLY for p in params.values()), name
        assert all(p.default is not p.empty for p in params.values()), name
        assert "batch" in params, name
    assert {"n_layer", "d_model", "n_head", "seq", "batch", "vocab", "dropout"} <= set(
        inspect.signature(gpt.build).parameters
    )
    assert "seq" in inspect.signature(moe.build).parameters
    for factory in (cnn.build, unet.build):
        assert "image_size" in inspect.signature(factory).parameters
    with pytest.raises(TypeError):
        gpt.build(8)  # type: ignore[misc]


def test_builtmodel_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        BuiltModel(torch.nn.Linear(2, 2), ())  # type: ignore[misc]
    built = BuiltModel(model=torch.nn.Linear(2, 2), example_inputs={"input": torch.randn(1, 2)})
    assert built.loss_fn is None
    assert built.name == ""
    assert _call(built).shape == (1, 2)


def test_structure() -> None:
    built = build_builtin("gpt", **SMALL["gpt"])
    model = built.model
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert all(isinstance(b, gpt.Block) for b in model.blocks)
    assert len(model.blocks) == 2
    assert model.lm_head.weight is model.wte.weight
    untied = build_builtin("gpt", **SMALL["gpt"], tie_weights=False).model
    assert untied.lm_head.weight is not untied.wte.weight

    net = build_builtin("mlp").model
    assert len(net.blocks) == 10
    assert all(isinstance(b, mlp.MLPBlock) for b in net.blocks)
    assert net.stem[0].in_features == 784 and net.head.out_features == 10

    resnet = build_builtin("cnn").model
    assert len(resnet.layers) == 4
    assert all(isinstance(b, cnn.ResidualBlock) for b in resnet.layers)
    assert resnet.layers[0].downsample is None and resnet.layers[2].downsample is not None

    u = build_builtin("unet").model
    assert [type(s) for s in u.down] == [unet.DownStage] * 3
    assert [type(s) for s in u.up] == [unet.UpStage] * 3
    assert isinstance(u.mid, unet.MidBlock)

    decoder = build_builtin("moe", **SMALL["moe"]).model
    assert all(isinstance(b.moe, moe.MoELayer) for b in decoder.blocks)


def test_output_shapes() -> None:
    shapes = {
        "gpt": (2, 16, 64),
        "mlp": (256, 10),
        "cnn": (16, 10),
        "unet": (4, 3, 64, 64),
        "moe": (4, 16, 512),
    }
    for name, shape in shapes.items():
        device = "cpu" if name in NOT_META else "meta"
        with torch.device(device):
            built = build_builtin(name, **SMALL[name])
            assert tuple(_call(built).shape) == shape, name


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    built = build_builtin("gpt", **SMALL["gpt"])
    model = built.model.eval()
    (idx,) = built.example_inputs
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_moe_matches_dense_reference() -> None:
    torch.manual_seed(0)
    layer = moe.MoELayer(d_model=8, n_experts=4, top_k=2, hidden=16)
    x = torch.randn(3, 5, 8)
    tokens = x.reshape(-1, 8)
    probs = torch.softmax(layer.router(tokens), dim=-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.stack([expert(tokens) for expert in layer.experts], dim=1)  # (N, E, d)
    picked = dense.gather(1, chosen.unsqueeze(-1).expand(-1, -1, 8))  # (N, k, d)
    expected = (picked * weights.unsqueeze(-1)).sum(1).reshape(3, 5, 8)
    torch.testing.assert_close(layer(x), expected)


def test_gpt_rejects_too_long_inputs() -> None:
    built = build_builtin("gpt", **SMALL["gpt"])
    with pytest.raises(ValueError, match="sequence length"):
        built.model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_doctests(module: Any) -> None:
    result = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_api_documented_with_examples(module: Any) -> None:
    assert module.__doc__ and module.__doc__.strip()
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__ and "Example:" in obj.__doc__, f"{module.__name__}.{name}"
            assert ">>>" in obj.__doc__, f"{module.__name__}.{name}"
