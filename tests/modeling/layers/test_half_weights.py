"""The matmul weights cast once for an evaluation: the same bits as autocast's per-call casts, and every parameter
its own fp32 tensor again afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.layers.half_weights import matmul_weights_in


def _tower(**kernels: bool) -> CLIPVisionBackbone:
    torch.manual_seed(0)
    return CLIPVisionBackbone("ViT-tiny", (64, 32), num_cameras=3, **kernels).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 32, generator=g), torch.tensor([0, 2, 1])


def test_the_matmul_parameters_are_the_blocks_linears_the_patch_embedding_and_the_projection() -> None:
    tower = _tower()
    chosen = {id(p) for p in tower.matmul_only_parameters()}
    names = {n for n, p in tower.named_parameters() if id(p) in chosen}
    blocks = len(tower.visual.transformer.resblocks)
    assert len(chosen) == len(names) == 2 + 8 * blocks
    assert {"visual.conv1.weight", "visual.proj", "visual.transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.1.mlp.c_proj.bias"} <= names
    # nothing autocast runs in fp32: layer norms, embeddings, the camera table
    assert not any("ln" in n or "embedding" in n or "camera" in n for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_copies_give_autocast_s_bits_and_hand_the_fp32_tensors_back(dtype: torch.dtype) -> None:
    tower = _tower()
    images, cams = _inputs()
    before = {n: (p, p.detach().clone()) for n, p in tower.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expected = tower(images, cams)
        with matmul_weights_in(tower, dtype):
            chosen = {id(p) for p in tower.matmul_only_parameters()}
            assert all((p.dtype == dtype) == (id(p) in chosen) for p in tower.parameters())
            got = tower(images, cams)
    assert torch.equal(got, expected)
    for n, p in tower.named_parameters():
        own, values = before[n]
        assert p is own and p.dtype == torch.float32 and torch.equal(p, values), n


def test_each_entry_copies_the_current_weights_into_the_same_memory() -> None:
    tower = _tower()
    mlp = tower.visual.transformer.resblocks[0].mlp
    weight = mlp.c_fc.weight
    with matmul_weights_in(tower, torch.bfloat16):
        first = mlp.c_fc.weight
        assert first is not weight and first.dtype == torch.bfloat16
    with torch.no_grad():
        weight.add_(0.25)  # a training step in between
    updated = weight.detach().clone()
    with matmul_weights_in(tower, torch.bfloat16):
        assert mlp.c_fc.weight is first  # the same memory: CUDA graphs recorded over the copies stay valid
        assert torch.equal(first.detach(), updated.to(torch.bfloat16))
    assert mlp.c_fc.weight is weight and torch.equal(weight.detach(), updated)


def test_a_nested_call_keeps_the_enclosing_copies_and_the_next_evaluation_reuses_them() -> None:
    tower = _tower()
    proj = tower.visual.proj
    with matmul_weights_in(tower, torch.bfloat16):
        copy = tower.visual.proj
        with matmul_weights_in(tower, torch.bfloat16):
            assert tower.visual.proj is copy
        assert tower.visual.proj is copy  # the inner exit put nothing back
    assert tower.visual.proj is proj
    with matmul_weights_in(tower, torch.bfloat16):
        assert tower.visual.proj is copy


@pytest.mark.slow
def test_a_compiled_tower_recompiles_for_the_copies_and_back_once() -> None:
    tower = _tower()
    images, cams = _inputs()
    run = torch.compile(tower)
    counters.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = tower(images, cams)
        before = run(images, cams)
        with matmul_weights_in(tower, torch.bfloat16):
            inside = run(images, cams)
        after = run(images, cams)
        graphs = counters["stats"]["unique_graphs"]
        with matmul_weights_in(tower, torch.bfloat16):  # the next evaluation
            inside_again = run(images, cams)
        after_again = run(images, cams)
    # a graph compiled for the fp32 parameters must not run on the copies (nor the reverse): it would read their
    # memory as the other dtype; compiled, the copies give the bits the casts give
    assert torch.equal(inside, before) and torch.equal(after, before)
    assert torch.allclose(before, expected, atol=0.05, rtol=0.05)  # compiled against eager: round-off only
    # one graph for the parameters and one for the copies, each reused by the later calls of its kind
    assert graphs == 2 and counters["stats"]["unique_graphs"] == 2
    assert torch.equal(inside_again, before) and torch.equal(after_again, before)


def test_fp32_changes_nothing_and_an_error_inside_still_restores() -> None:
    tower = _tower()
    params = list(tower.parameters())
    with matmul_weights_in(tower, None):
        assert all(p.dtype == torch.float32 for p in tower.parameters())
    with pytest.raises(RuntimeError, match="inside"), matmul_weights_in(tower, torch.bfloat16):
        raise RuntimeError("inside")
    assert all(a is b for a, b in zip(tower.parameters(), params, strict=True))
    assert all(p.dtype == torch.float32 for p in tower.parameters())


def test_modules_without_the_method_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _tower())
    linear = model[0].weight
    with matmul_weights_in(model, torch.bfloat16):
        assert linear.dtype == torch.float32
        assert model[1].visual.proj.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kernels", [False, True])  # torch's attention and MLP, or the repository's Triton kernels
def test_cuda_evaluation_keeps_its_bits_with_half_copies(compiled: bool, kernels: bool) -> None:
    tower = _tower(eval_attention=kernels, eval_fused_mlp=kernels).cuda()
    images, cams = (t.cuda() for t in _inputs())
    run = torch.compile(tower) if compiled else tower
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = run(images, cams)
        with matmul_weights_in(tower, torch.bfloat16):
            got = run(images, cams)
    assert torch.equal(got, expected)
