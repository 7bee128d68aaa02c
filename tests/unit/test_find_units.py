"""Tests of unit finding (remat.find_units) and execution order (remat.execution_order) on toy
models defined here and on the built-in zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from remat import execution_order, find_units
from remat.models import BuiltModel, build_builtin


# ------------------------------------------------------------------------------- toy models
class Block(nn.Module):
    """A pre-LayerNorm residual block, the shape of a transformer layer."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.ln(x))


class GPTLike(nn.Module):
    """Embedding, a ModuleList of Blocks, a final LayerNorm (the same class as inside the blocks)
    and a head."""

    def __init__(self, n: int = 3, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class SubBlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class OuterBlock(nn.Module):
    """A block made of repeated sub-blocks: both classes repeat, only the outer one is a unit."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.subs = nn.Sequential(SubBlock(d), SubBlock(d), SubBlock(d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.subs(x))


class NestedRepeats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([OuterBlock(), OuterBlock()])
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class A(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class B(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).tanh())


class C(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MixedBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(A(), B(), A(), C())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layers = nn.Sequential(
            ResBlock(4, 4), ResBlock(4, 8, 2), ResBlock(8, 8), ResBlock(8, 16, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = nn.Conv2d(2 * cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ModuleList([Down(3, 4), Down(4, 8)])
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.ModuleList([Up(16, 8), Up(8, 4)])
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        for stage in self.up:
            x = stage(x, skips.pop())
        return self.head(x)


# ------------------------------------------------------------------------------ default rule
def test_gpt_like_blocks_only_not_the_final_layernorm() -> None:
    model = GPTLike(n=3)
    # LayerNorm repeats (ln inside each block plus ln_f) but is a single layer: larger repeated
    # blocks exist, so ln_f is not a unit; neither is the ModuleList container.
    assert find_units(model) == ["blocks.0", "blocks.1", "blocks.2"]


def test_nested_repeats_outermost_only() -> None:
    assert find_units(NestedRepeats()) == ["layers.0", "layers.1"]


def test_sequential_of_mixed_blocks_inside_a_model() -> None:
    # A repeats; B and C are blocks in the same Sequential, so they are units too.
    assert find_units(MixedBody()) == ["body.0", "body.1", "body.2", "body.3"]


def test_sequential_of_mixed_blocks_as_the_model() -> None:
    # the same when the Sequential is the model itself (the parent FQN is "")
    assert find_units(nn.Sequential(A(), B(), A(), C())) == ["0", "1", "2", "3"]
    # single layers among the blocks are not units
    model = nn.Sequential(nn.Linear(8, 8), A(), B(), nn.ReLU(), A(), C())
    assert find_units(model) == ["1", "2", "4", "5"]


def test_only_linear_layers_repeat() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )
    assert find_units(model) == ["0", "2", "4"]


def test_resnet_like() -> None:
    # The downsample Sequentials repeat too, but nested inside the blocks; the stem appears once.
    assert find_units(ResNetLike()) == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_unet_like() -> None:
    assert find_units(UNetLike()) == ["down.0", "down.1", "up.0", "up.1"]


class Stack(nn.Module):
    """An encoder or decoder: embedding-free, a ModuleList of layers and a final norm."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.block = nn.ModuleList(Block() for _ in range(n))
        self.final_norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.final_norm(x)


class EncoderDecoderLike(nn.Module):
    """Two instances of one stack class as attributes, as T5 has (T5Stack twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Stack(2)
        self.decoder = Stack(3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


def test_two_stacks_of_one_class_give_their_layers() -> None:
    # encoder and decoder repeat, but each holds a stack of layers and is not in one itself: the
    # layers are the units (two units for the whole model would leave the planner nothing to do)
    assert find_units(EncoderDecoderLike()) == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
        "decoder.block.2",
    ]


def test_sequentials_of_blocks_as_attributes_give_their_blocks() -> None:
    class TwoStages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Sequential(Block(), Block())
            self.second = nn.Sequential(Block(), Block())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    model = TwoStages()
    assert find_units(model) == ["first.0", "first.1", "second.0", "second.1"]


def test_units_are_in_registration_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = Block()
            self.first = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    assert find_units(Reversed()) == ["second", "first"]


def test_no_repeats_is_an_error() -> None:
    with pytest.raises(ValueError, match="no module of Sequential qualifies as a unit") as info:
        find_units(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    assert "units=" in str(info.value)  # says how to name units instead
    with pytest.raises(ValueError, match="no module of Linear qualifies as a unit"):
        find_units(nn.Linear(2, 2))


def test_repeats_are_by_class_not_shape_or_dtype() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2).to(torch.float64))
    assert find_units(model) == ["0", "2"]


# --------------------------------------------------------------------------------- overrides
def test_override_by_class_name() -> None:
    model = GPTLike()
    assert find_units(model, "LayerNorm") == ["blocks.0.ln", "blocks.1.ln", "blocks.2.ln", "ln_f"]
    assert find_units(model, "Block") == ["blocks.0", "blocks.1", "blocks.2"]


def test_override_by_class_object() -> None:
    model = GPTLike()
    assert find_units(model, Block) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_units(model, nn.Linear) == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"]


def test_override_by_fqn() -> None:
    model = GPTLike()
    assert find_units(model, "blocks.1") == ["blocks.1"]
    assert find_units(model, ["ln_f", "head"]) == ["ln_f", "head"]


def test_override_by_pattern() -> None:
    model = GPTLike()
    assert find_units(model, "re:blocks\\.[02]") == ["blocks.0", "blocks.2"]
    # full match only: "blocks" alone does not match "blocks.0"
    assert find_units(model, "re:blocks") == ["blocks"]


def test_override_by_filter() -> None:
    model = GPTLike()

    def is_fc(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn.endswith(".fc")

    assert find_units(model, is_fc) == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert find_units(model, lambda m, n: n == "head") == ["head"]


def test_override_keeps_the_outermost_matches() -> None:
    model = GPTLike()
    # matches blocks.N and everything inside them: only blocks.N are units
    assert find_units(model, "re:blocks\\.[0-9]+(\\..*)?") == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_units(model, ["Block", "Linear"]) == ["blocks.0", "blocks.1", "blocks.2", "head"]


def test_override_mixed_list() -> None:
    model = GPTLike()
    assert find_units(model, [Block, "ln_f", "re:head"]) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "ln_f",
        "head",
    ]


def test_override_unknown_name_lists_close_names() -> None:
    with pytest.raises(ValueError, match="neither a module class nor an FQN") as info:
        find_units(GPTLike(), "Blok")
    message = str(info.value)
    assert "'Blok'" in message
    assert "closest" in message
    assert "'Block'" in message
    with pytest.raises(ValueError, match="closest") as info:
        find_units(GPTLike(), "blocks.7")
    assert "blocks." in str(info.value)


@pytest.mark.parametrize("spec", ["", [3], [None], ["Block", ""]])
def test_override_bad_items(spec: object) -> None:
    with pytest.raises(ValueError, match="units"):
        find_units(GPTLike(), spec)  # type: ignore[arg-type]


def test_override_bad_pattern() -> None:
    with pytest.raises(ValueError, match="regular expression"):
        find_units(GPTLike(), "re:blocks[")


def test_override_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="qualifies as a unit"):
        find_units(GPTLike(), "re:layers\\..*")
    with pytest.raises(ValueError, match="qualifies as a unit"):
        find_units(GPTLike(), lambda m, n: False)
    with pytest.raises(ValueError, match="qualifies as a unit"):
        find_units(GPTLike(), nn.Conv2d)


# --------------------------------------------------------------------------- execution order
class Shuffled(nn.Module):
    """Registers a, b, c, unused; calls c, a, c, b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Block()
        self.b = Block()
        self.c = Block()
        self.unused = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(self.a(self.c(x))))


def test_execution_order_reorders_by_first_call() -> None:
    model = Shuffled()
    units = find_units(model)
    assert units == ["a", "b", "c", "unused"]
    # each unit once, by first call; units that never run go last in their given order
    assert execution_order(model, units, (torch.randn(2, 8),)) == ["c", "a", "b", "unused"]


def test_execution_order_leaves_no_hooks_and_no_grad() -> None:
    model = Shuffled()
    before = {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()}
    x = torch.randn(2, 8, requires_grad=True)
    execution_order(model, ["a", "b", "c"], (x,))
    after = {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()}
    assert before == after
    assert x.grad is None


def test_execution_order_keyword_inputs() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = Block()
            self.q = Block()

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.p(self.q(x))

    assert execution_order(Kw(), ["p", "q"], {"x": torch.randn(1, 8)}) == ["q", "p"]


def test_execution_order_unet_like() -> None:
    model = UNetLike()
    units = find_units(model)
    order = execution_order(model, units, (torch.randn(1, 3, 8, 8),))
    assert order == ["down.0", "down.1", "up.0", "up.1"]


def test_execution_order_on_meta() -> None:
    with torch.device("meta"):
        model = GPTLike(n=4)
        idx = torch.zeros(2, 5, dtype=torch.long)
    order = execution_order(model, ["blocks.3", "blocks.1", "blocks.0", "blocks.2"], (idx,))
    assert order == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


# ---------------------------------------------------------------------------------- built-ins
def _meta(name: str, **overrides: object) -> BuiltModel:
    torch.manual_seed(0)
    with torch.device("meta"):
        return build_builtin(name, **overrides)


@pytest.mark.parametrize("n_layer", [2, 3, 8])
def test_builtin_gpt_units(n_layer: int) -> None:
    built = _meta("gpt", n_layer=n_layer)
    units = find_units(built.model)
    assert units == [f"blocks.{i}" for i in range(n_layer)]
    assert execution_order(built.model, units, built.example_inputs) == units


def test_builtin_gpt_one_layer_falls_back_to_layers() -> None:
    # One Block: Block, CausalSelfAttention and FeedForward each appear once, so no block repeats
    # and the units are the repeated single layers (Embedding, Dropout, LayerNorm, Linear).
    built = _meta("gpt", n_layer=1)
    units = find_units(built.model)
    modules = dict(built.model.named_modules())
    assert "blocks.0" not in units
    assert all(not list(modules[u].children()) for u in units)
    assert {"wte", "wpe", "ln_f", "lm_head", "blocks.0.attn.qkv", "blocks.0.mlp.fc"} <= set(units)


def test_builtin_mlp_units() -> None:
    built = _meta("mlp", n_blocks=5)
    assert find_units(built.model) == [f"blocks.{i}" for i in range(5)]


def test_builtin_cnn_units() -> None:
    built = _meta("cnn")
    units = find_units(built.model)
    assert units == [f"layers.{i}" for i in range(len(built.model.layers))]
    assert len(units) == 4  # two stages of two blocks


def test_builtin_unet_units() -> None:
    built = _meta("unet")
    units = find_units(built.model)
    downs = [u for u in units if u.startswith("down.")]
    ups = [u for u in units if u.startswith("up.")]
    assert downs == ["down.0", "down.1", "down.2"]
    assert ups == ["up.0", "up.1", "up.2"]
    # the mid block's ConvBlock repeats the class of the stages' inner blocks: a unit of its own
    assert units == ["down.0", "down.1", "down.2", "mid.conv", "up.0", "up.1", "up.2"]
    assert execution_order(built.model, units, built.example_inputs) == units
