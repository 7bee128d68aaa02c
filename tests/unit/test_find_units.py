"""Tests of unit finding (remat.find_units) and execution order (remat.execution_order) on toy
models defined here and on the built-in zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import remat
from remat import execution_order, find_units
from remat.apply.units import NoUnitsError
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
    # every child of the stack is a unit, single layers included, so segments cover the chain
    model = nn.Sequential(nn.Linear(8, 8), A(), B(), nn.ReLU(), A(), C())
    assert find_units(model) == ["0", "1", "2", "3", "4", "5"]


def test_only_linear_layers_repeat() -> None:
    # no block anywhere: the second pass counts layers with parameters in stacks, and every child
    # of the stack is a unit
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )
    assert find_units(model) == ["0", "1", "2", "3", "4"]


def test_resnet_like() -> None:
    # The downsample Sequentials repeat too, but nested inside the blocks; the stem appears once.
    assert find_units(ResNetLike()) == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_unet_like() -> None:
    assert find_units(UNetLike()) == ["down.0", "down.1", "up.0", "up.1"]


class MLPBlock(nn.Module):
    """A residual MLP: two weights, a block (a transformer layer holds more)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """An encoder or decoder: embedding-free, a ModuleList of layers and a final norm."""

    def __init__(self, n: int = 3, layer: type[nn.Module] = MLPBlock) -> None:
        super().__init__()
        self.block = nn.ModuleList(layer() for _ in range(n))
        self.final_norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.final_norm(x)


class EncoderDecoderLike(nn.Module):
    """Two instances of one stack class as attributes, as T5 has (T5Stack twice)."""

    def __init__(self, layer: type[nn.Module] = MLPBlock) -> None:
        super().__init__()
        self.encoder = Stack(2, layer)
        self.decoder = Stack(3, layer)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


def test_two_stacks_of_one_class_give_their_layers() -> None:
    # encoder and decoder repeat, but each is a stage (a stack of blocks and a norm): the blocks
    # are the units (two units for the whole model would leave the planner nothing to do)
    assert find_units(EncoderDecoderLike()) == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
        "decoder.block.2",
    ]
    # Blocks of one weight each are layers (as a conv-norm-activation is): a stack of layers does
    # not make a stage, so the encoder and decoder are the units. This is what keeps a ResNet
    # bottleneck, whose convolutions sit in a Sequential, a unit (test_hf_resnet_shaped_...).
    assert find_units(EncoderDecoderLike(Block)) == ["encoder", "decoder"]


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
    with pytest.raises(NoUnitsError, match="no block repeats in Sequential") as info:
        find_units(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    assert isinstance(info.value, ValueError)
    assert info.value.candidates == ["0", "1"]
    assert "units=[...] (CLI: --units)" in str(info.value)  # says how to name units instead
    assert "candidates: 0, 1 (remat.profile measures" in str(info.value)
    with pytest.raises(NoUnitsError, match="no block repeats in Linear") as info:
        find_units(nn.Linear(2, 2))
    assert info.value.candidates == []
    assert "Linear has no submodules" in str(info.value)


def test_repeats_are_by_class_not_shape_or_dtype() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2).to(torch.float64))
    assert find_units(model) == ["0", "1", "2"]


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


def test_builtin_gpt_one_layer_lists_the_candidates() -> None:
    # One Block: Block, CausalSelfAttention and FeedForward each appear once, so no block repeats.
    # The error lists the model's children (through the ModuleList) to choose from, not the
    # repeated single layers inside the block that earlier versions planned on.
    built = _meta("gpt", n_layer=1)
    with pytest.raises(NoUnitsError) as info:
        find_units(built.model)
    assert info.value.candidates == ["wte", "wpe", "drop", "blocks.0", "ln_f", "lm_head"]
    assert find_units(built.model, ["blocks.0"]) == ["blocks.0"]  # the fix it names
    # the MLP's blocks Sequential of one block is a stage, but not repeated: not a unit either
    with pytest.raises(NoUnitsError) as info:
        find_units(_meta("mlp", n_blocks=1).model)
    assert info.value.candidates == ["stem", "blocks", "head"]


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


# ------------------------------------------------- hierarchical models: the blocks inside stages
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (torchvision's, a leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: a Sequential of leaves, a layer-scale parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class TorchvisionConvNeXt(nn.Module):
    """torchvision's ConvNeXt nesting: ``features`` = Sequential[stem, stage, downsample, stage,
    ...], each stage a Sequential of CNBlocks, each stem and downsample a Sequential of layers."""

    def __init__(self, depths: list[int], dims: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))]
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


@pytest.mark.parametrize("depths", [[3, 3, 9, 3], [2, 2, 2, 2], [1, 1, 1, 1]])
def test_torchvision_convnext_shaped_gives_the_blocks(depths: list[int]) -> None:
    # [3, 3, 9, 3] is ConvNeXt-T (18 blocks); equal depths make the stage Sequentials repeat;
    # depth 1 makes each stage a Sequential of one block. Stem and downsampling layers are not
    # units, as in transformers' ConvNeXt, where they are not in the stack either.
    with torch.device("meta"):
        model = TorchvisionConvNeXt(depths, [8, 16, 24, 32])
    want = [f"features.{2 * s + 1}.{b}" for s, depth in enumerate(depths) for b in range(depth)]
    assert find_units(model) == want
    assert len(want) == sum(depths)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int = 2) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Linear(dim, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    def __init__(self, dim: int, out: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[SwinTransformerBlock(out) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class TimmSwin(nn.Module):
    """timm's Swin nesting: ``layers`` = Sequential of stages, each a downsample (Identity in the
    first, PatchMerging after) and ``blocks``, a Sequential of SwinTransformerBlocks."""

    def __init__(self, depths: list[int], dims: list[int]) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), Permute([0, 2, 3, 1]))
        self.layers = nn.Sequential(
            *[
                SwinTransformerStage(dims[max(i - 1, 0)], dims[i], depth, downsample=i > 0)
                for i, depth in enumerate(depths)
            ]
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layers(self.patch_embed(x))).mean((1, 2)))


def test_timm_swin_shaped_gives_the_blocks() -> None:
    depths = [2, 2, 6, 2]  # Swin-T: 12 blocks, not 4 stages
    with torch.device("meta"):
        model = TimmSwin(depths, [8, 16, 24, 32])
    want = [f"layers.{s}.blocks.{b}" for s, depth in enumerate(depths) for b in range(depth)]
    assert find_units(model) == want
    # the attention and the MLP repeat too, inside each block: not units
    assert not any(".attn" in u or ".mlp" in u for u in find_units(model))


class ConvNormAct(nn.Module):
    """A conv-norm-activation: one weight, a layer (transformers' ResNetConvLayer)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class Bottleneck(nn.Module):
    """transformers' ResNetBottleNeckLayer: a shortcut, a Sequential of three ConvNormAct."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        mid = cout // 4
        self.shortcut: nn.Module = (
            ConvNormAct(cin, cout, 1, stride, act=False)
            if cin != cout or stride != 1
            else nn.Identity()
        )
        self.layer = nn.Sequential(
            ConvNormAct(cin, mid),
            ConvNormAct(mid, mid, 3, stride),
            ConvNormAct(mid, cout, act=False),
        )
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class HFResNetStage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int) -> None:
        super().__init__()
        blocks = [Bottleneck(cin, cout, stride)] + [
            Bottleneck(cout, cout) for _ in range(depth - 1)
        ]
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class HFResNetLike(nn.Module):
    """transformers' ResNet nesting: a ConvNormAct stem (the class repeats inside the
    bottlenecks), a ModuleList of stages, each a Sequential of bottlenecks."""

    def __init__(self, depths: list[int]) -> None:
        super().__init__()
        self.embedder = ConvNormAct(3, 8, 3, 2)
        dims = [8, 16, 32, 64, 128]
        self.stages = nn.ModuleList(
            HFResNetStage(dims[i], dims[i + 1], depth, 1 if i == 0 else 2)
            for i, depth in enumerate(depths)
        )
        self.head = nn.Linear(dims[len(depths)], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embedder(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("depths", [[1, 1, 1, 1], [2, 2], [3, 4, 6, 3]])
def test_hf_resnet_shaped_gives_the_bottlenecks(depths: list[int]) -> None:
    # Stages are looked into, even of one bottleneck; a bottleneck is not (its ConvNormAct are
    # layers: one weight each), including those whose shortcut is an Identity; the stem's
    # ConvNormAct repeats, but is a layer, so it is not a unit.
    with torch.device("meta"):
        model = HFResNetLike(depths)
    want = [f"stages.{s}.layers.{b}" for s, depth in enumerate(depths) for b in range(depth)]
    assert find_units(model) == want


class ParamBlock(nn.Module):
    """A block of its own parameters and functional ops: no submodules."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2 * d, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(d, 2 * d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.linear(
            nn.functional.gelu(nn.functional.linear(x, self.w1)), self.w2
        )


class ScaleBlock(nn.Module):
    """One parameter, functional ops: a block of a class outside torch.nn, with one weight."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale).exp()


def test_parameter_only_blocks_are_units() -> None:
    # In a Sequential of mixed blocks, blocks without submodules are units with the others (they
    # were left out as leaves); so is a ReLU between blocks.
    model = nn.Sequential(
        ParamBlock(), MLPBlock(), ScaleBlock(), MLPBlock(), nn.ReLU(), ParamBlock()
    )
    assert find_units(model) == ["0", "1", "2", "3", "4", "5"]
    # a stack of parameter-only blocks alone, and as attributes of a model
    assert find_units(nn.Sequential(ParamBlock(), ParamBlock(), ParamBlock())) == ["0", "1", "2"]
    assert find_units(nn.Sequential(ScaleBlock(), ScaleBlock())) == ["0", "1"]

    class TwoParamBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 8)
            self.a = ParamBlock()
            self.b = ParamBlock()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.embed(x)))

    assert find_units(TwoParamBlocks()) == ["a", "b"]


def test_parameter_only_blocks_are_planned() -> None:
    # The chain of the issue: blocks of parameters and functional ops hold the activations; with
    # all of them units, the least peak any plan reaches is far below the unplanned one.
    torch.manual_seed(0)
    model = nn.Sequential(*[ParamBlock(32) if i % 2 else MLPBlock(32) for i in range(6)])
    prof = remat.profile(model, (torch.randn(64, 32),), optimizer="sgd", options=(), repeats=0)
    assert prof.unit_fqns == ["0", "1", "2", "3", "4", "5"]
    param_blocks = [u for fqn, u in zip(prof.unit_fqns, prof.units, strict=True) if int(fqn) % 2]
    assert all(u.keep_bytes > u.recompute_bytes for u in param_blocks)


class ResnetBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class DownBlock(nn.Module):
    """diffusers' DownBlock2D nesting: ``resnets`` (a ModuleList) and ``downsamplers`` (a
    ModuleList of one conv); returns its output and the skip tensors of each resnet."""

    def __init__(self, c: int, down: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c), ResnetBlock(c)])
        self.downsamplers = nn.ModuleList([nn.Conv2d(c, c, 3, 2, 1)]) if down else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, c: int, up: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c), ResnetBlock(c)])
        self.upsamplers = nn.ModuleList([nn.ConvTranspose2d(c, c, 2, 2)]) if up else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x + skips.pop())
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class StagedUNet(nn.Module):
    """A U-Net of stages, as diffusers builds them: skip tensors cross from the resnets of the
    down blocks to those of the up blocks."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.down_blocks = nn.ModuleList([DownBlock(c, True), DownBlock(c, False)])
        self.mid_block = ResnetBlock(c)
        self.up_blocks = nn.ModuleList([UpBlock(c, True), UpBlock(c, False)])
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for block in self.down_blocks:
            x, more = block(x)
            skips += more
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return self.conv_out(x)


def test_unet_of_stages_with_skips_gives_the_resnets() -> None:
    model = StagedUNet()
    units = find_units(model)
    resnets = [
        f"{side}_blocks.{b}.resnets.{r}" for side in ("down", "up") for b in (0, 1) for r in (0, 1)
    ]
    assert units == [*resnets[:4], "mid_block", *resnets[4:]]
    x = torch.randn(1, 3, 8, 8)
    assert execution_order(model, units, (x,)) == units
    # the skip tensors cross units; a plan on these units applies with gradients bitwise equal
    torch.manual_seed(0)
    prof = remat.profile(model, (x,), optimizer="sgd", options=(), repeats=0)
    assert prof.unit_fqns == units
    plan = remat.solve(prof, "min").plan
    assert remat.verify(model, plan, (x,)).ok


def test_no_repeated_block_lists_measured_saved_bytes() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.BatchNorm1d(8))
    with pytest.raises(NoUnitsError) as info:
        find_units(model)
    assert info.value.saved_bytes == {}
    running_mean = model[2].running_mean.clone()
    with pytest.raises(NoUnitsError, match="by the activation bytes each saves") as info:
        remat.profile(model, (torch.randn(4, 8),), optimizer="sgd", options=(), repeats=0)
    # GELU keeps its input (4 x 8 floats, made by the Linear before it: not its own); BatchNorm
    # keeps what it made besides its output: its saved mean and inverse std (8 floats each)
    assert info.value.saved_bytes == {"0": 0, "1": 0, "2": 64}
    assert info.value.candidates == ["0", "1", "2"]
    assert "each saves for backward: 2 64 B, 0 0 B, 1 0 B" in str(info.value)  # largest first
    assert "units=[...]" in str(info.value)
    assert torch.equal(model[2].running_mean, running_mean)  # the measuring forward left no trace


def test_a_lone_block_beside_a_stack_of_its_kind_is_a_unit() -> None:
    class Tree(nn.Module):
        """tail(left(x) + right(x)): one stack, two containers of one Block each."""

        def __init__(self) -> None:
            super().__init__()
            self.left = nn.ModuleList([Block(), Block()])
            self.right = nn.ModuleList([Block()])
            self.tail = nn.ModuleList([Block()])
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.left[1](self.left[0](x))
            return self.head(self.tail[0](a + self.right[0](x)))

    # Block holds one weight, so only its stack makes units at first; its kind then makes the
    # lone ones units too. The head's Linear, a layer, is not spread to though the stack's
    # Blocks hold Linears (they are inside units).
    assert find_units(Tree()) == ["left.0", "left.1", "right.0", "tail.0"]
