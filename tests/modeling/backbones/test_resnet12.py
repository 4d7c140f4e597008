"""ResNet-12 (few-shot standard), DropBlock, the registered backbones: shapes, parameter count, schedule."""

from __future__ import annotations

import pytest
import torch

from modeling import build_backbone
from modeling.backbones.resnet12 import DropBlock, ResNet12

# Sha-Lab/FEAT model/networks/res12.py (ResNet(BasicBlock), channels 64-160-320-640, 1x1 conv-BN shortcut)
# has 12,424,320 parameters; the same count follows from the architecture by hand:
PUBLISHED_RESNET12_PARAMS = 12_424_320


def resnet12_param_formula(channels: tuple[int, ...], cin: int = 3) -> int:
    """Per stage: three 3x3 convs (no bias), a 1x1 shortcut conv, four BatchNorms (weight + bias)."""
    total = 0
    for c in channels:
        total += 9 * cin * c + 2 * 9 * c * c + cin * c + 4 * 2 * c
        cin = c
    return total


def test_parameter_count_matches_published_and_formula() -> None:
    model = ResNet12()
    n = sum(p.numel() for p in model.parameters())
    assert n == resnet12_param_formula((64, 160, 320, 640)) == PUBLISHED_RESNET12_PARAMS
    assert model.out_dim == 640


def test_feature_map_and_output_shapes() -> None:
    model = ResNet12().eval()
    with torch.no_grad():
        fmap = model.forward_features(torch.randn(1, 3, 84, 84))
    assert fmap.shape == (1, 640, 5, 5)  # 84 -> 42 -> 21 -> 10 -> 5, as in the published code
    slim = ResNet12(channels=(8, 16, 24, 32)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = slim(x)
    assert out.shape == (3, 32)
    assert torch.allclose(out, slim.forward_features(x).mean(dim=(2, 3)))


def test_dropblock_identity_in_eval_and_linear_ramp() -> None:
    drop = DropBlock(0.5, block_size=3, ramp_steps=10)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(drop.eval()(x), x)
    assert int(drop.num_batches_tracked) == 0  # eval calls do not advance the ramp
    drop.train()
    for calls in (1, 4):
        while int(drop.num_batches_tracked) < calls:
            drop(x)
        assert drop.current_rate() == pytest.approx(0.5 * calls / 10)
    drop.num_batches_tracked.fill_(100)
    assert drop.current_rate() == 0.5
    assert "num_batches_tracked" in drop.state_dict()  # a resumed run continues the ramp
    assert torch.equal(DropBlock(0.0, 3).train()(x), x)


def test_dropblock_seed_probability_follows_the_ramp_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed probability of call 4 of a 10-call ramp is Ghiasi's gamma at rate 0.5 * 4 / 10, in the input's
    dtype, computed without reading the counter on the host."""
    seen = []
    bernoulli = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p: seen.append(p.clone()) or bernoulli(p))
    drop = DropBlock(0.5, block_size=3, ramp_steps=10).train()
    drop.num_batches_tracked.fill_(3)
    drop(torch.randn(2, 4, 9, 9))
    gamma = 0.5 * 4 / 10 / 3**2 * 81 / 7**2
    assert seen[0].shape == (2, 4, 7, 7) and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], torch.full((2, 4, 7, 7), gamma))


def test_a_compiled_resnet12_traces_its_dropblock_ramp_once() -> None:
    """A training forward compiles to one graph that the moving ramp does not recompile (no host read of the
    counter, no Python float that changes each call)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = ResNet12(channels=(4, 4, 8, 8), drop_rate=0.1, dropblock_size=2, dropblock_ramp_steps=100).train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(4):
        compiled(x)
    assert counter.frame_count == 1
    assert all(int(m.num_batches_tracked) == 4 for m in model.modules() if isinstance(m, DropBlock))


def test_dropblock_drops_square_blocks_at_the_expected_rate() -> None:
    torch.manual_seed(0)
    rate, bs = 0.2, 3
    drop = DropBlock(rate, block_size=bs, ramp_steps=0).train()
    x = torch.ones(64, 8, 20, 20)
    y = drop(x)
    kept = y > 0
    frac_dropped = 1 - kept.float().mean().item()
    # independent expectation: gamma = rate / bs^2 * HW / (H - bs + 1)^2 (Ghiasi et al.); pixel (i, j) is
    # dropped unless all the n_i * n_j seeds whose block covers it are off (n_i: covering seed rows)
    h, valid = 20, 20 - bs + 1
    gamma = rate / bs**2 * h * h / valid**2
    n_cover = [min(i, valid - 1) - max(0, i - bs + 1) + 1 for i in range(h)]
    expected = sum(1 - (1 - gamma) ** (a * b) for a in n_cover for b in n_cover) / h**2
    assert frac_dropped == pytest.approx(expected, abs=0.01)
    # kept values are rescaled so the mean is preserved exactly
    assert y.mean().item() == pytest.approx(1.0, rel=1e-5)
    # every dropped pixel lies in some fully dropped bs x bs square
    dropped = (~kept).float()
    full = torch.nn.functional.avg_pool2d(dropped, bs, stride=1) == 1.0  # squares entirely dropped
    covered = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(full.float(), (bs - 1, bs - 1, bs - 1, bs - 1)), bs, stride=1) > 0
    assert bool((covered | kept).all())


def test_registered_backbones() -> None:
    tiny = build_backbone("tiny_conv", channels=(4, 8))
    assert tiny(torch.randn(2, 3, 16, 16)).shape == (2, 8) and tiny.out_dim == 8
    r12 = build_backbone("resnet12", channels=(4, 8, 8, 16), drop_rate=0.0, dropblock_size=1, timm_name="ignored")
    assert r12(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    timm_net = build_backbone("timm", timm_name="test_resnet")
    out = timm_net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, timm_net.out_dim)
