"""The fused matmul + QuickGELU kernel against a float64 formula, and where the CLIP tower runs it.

On the CPU the kernel runs in Triton's interpreter, in fp16 (the interpreter's bf16 matmuls are wrong in Triton
3.8); bf16 and the compiled graph are checked on the GPU (the CUDA-only tests below).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.layers.quick_gelu_linear import K_MULTIPLE, quick_gelu_linear, quick_gelu_linear_or_torch
from tests.helpers.tower_modes import forward_each_way
from tests.helpers.triton_interpreter import run_interpreted

pytest.importorskip("triton")

# Runs in a fresh interpreted process; prints one JSON object.
_INTERPRETED = r"""
import json, torch
from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.layers.quick_gelu_linear import quick_gelu_linear

def reference(x, w, b):  # float64, written out
    y = x.double() @ w.double().T + b.double()
    return y / (1 + torch.exp(-1.702 * y))

from modeling.layers import quick_gelu_linear_kernel as kernel

def each_kernel(x, w, b):  # the descriptor kernel and the pointer kernel, same tiles
    out = []
    for descriptors in (True, False):
        y = x.new_empty(x.shape[0], w.shape[0])
        kernel.launch(x, w, b, y, kernel.LAUNCH._replace(descriptors=descriptors))
        out.append(y)
    return out

torch.manual_seed(0)
cases = []
# rows and columns that end inside a tile (one row; 130 rows; 300 columns), K of one and of three slices,
# a strided view of rows
for m, n, k in [(1, 8, 64), (130, 300, 192), (257, 256, 64)]:
    x = torch.randn(m, k, dtype=torch.float16)
    w = (torch.randn(n, k) / k ** 0.5).half()
    b = torch.randn(n).half()
    out = quick_gelu_linear(x, w, b)
    ref = reference(x, w, b)
    desc, ptr = each_kernel(x, w, b)
    cases.append(dict(shape=[m, n, k], err=((out.double() - ref).abs().max() / ref.abs().max()).item(),
                      repeatable=torch.equal(out, quick_gelu_linear(x, w, b)), kernels_agree=torch.equal(desc, ptr),
                      default_is_descriptors=torch.equal(out, desc)))
x = torch.randn(4, 5, 2 * 64, dtype=torch.float16)[:, :, :64]
w, b = (torch.randn(16, 64) / 8).half(), torch.randn(16).half()
ref = reference(x, w, b)
strided = ((quick_gelu_linear(x, w, b).double() - ref).abs().max() / ref.abs().max()).item()
# rows that start off a 16-byte boundary: no descriptor can read them, the pointer kernel runs
flat = torch.randn(1 + 9 * 64, dtype=torch.float16)
x = flat[1:].view(9, 64)
ref = reference(x, w, b)
unaligned = dict(fits=kernel.descriptors_fit(x, w), err=((quick_gelu_linear(x, w, b).double() - ref).abs().max()
                                                          / ref.abs().max()).item())

# towers evaluating with the fused MLP (and with the fixed-order attention too) against open_clip's blocks, same
# fp16 weights and images
torch.manual_seed(0)
plain = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), num_cameras=2).half()
images, cams = torch.randn(3, 3, 64, 32, dtype=torch.float16), torch.tensor([0, 1, 1])
tower = []
for attention in (False, True):
    fused = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), num_cameras=2, eval_attention=attention,
                               eval_fused_mlp=True).half()
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = fused(images, cams).float(), plain(images, cams).float()
    tower.append(((a - b).abs().max() / b.abs().max()).item())
print(json.dumps(dict(cases=cases, strided=strided, unaligned=unaligned, tower=tower)))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(_INTERPRETED)


def test_the_kernel_matches_the_float64_formula(interpreted: dict) -> None:
    """Ragged row and column tiles, one to three slices of K, strided rows: fp16 round-off of the output."""
    for case in interpreted["cases"]:
        assert case["err"] < 2e-3, case
    assert interpreted["strided"] < 2e-3, interpreted["strided"]


def test_the_descriptor_and_pointer_kernels_agree_bit_for_bit(interpreted: dict) -> None:
    """Same tiles, same slices of K in the same order: the two ways of reading tiles give the same outputs, and
    the layer's default launch reads through descriptors where they fit."""
    for case in interpreted["cases"]:
        assert case["kernels_agree"] and case["default_is_descriptors"], case


def test_rows_off_a_16_byte_boundary_take_the_pointer_kernel(interpreted: dict) -> None:
    assert not interpreted["unaligned"]["fits"]
    assert interpreted["unaligned"]["err"] < 2e-3, interpreted["unaligned"]


def test_the_kernel_repeats_bit_for_bit(interpreted: dict) -> None:
    assert all(case["repeatable"] for case in interpreted["cases"]), interpreted["cases"]


def test_a_tower_evaluating_with_the_kernels_matches_open_clips_blocks(interpreted: dict) -> None:
    """Same fp16 weights, no gradient: the fused MLP, alone and with the fixed-order attention, changes only the
    round-off."""
    assert max(interpreted["tower"]) < 5e-3, interpreted["tower"]


def test_the_tower_runs_the_kernels_only_to_evaluate_in_half_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no gradient, in bf16 (autocast or bf16 weights): every block's MLP goes through the fused layer; with a
    gradient, in fp32, or with ``eval_fused_mlp`` off, open_clip's blocks run."""
    import modeling.backbones.clip_vit as clip_vit
    import modeling.layers.quick_gelu_linear as fused_module

    calls: list[torch.dtype] = []

    def counted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        calls.append(x.dtype)
        return F.linear(x, weight, bias) * torch.sigmoid(1.702 * F.linear(x, weight, bias))

    monkeypatch.setattr(clip_vit, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(fused_module, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(fused_module, "quick_gelu_linear", counted)
    monkeypatch.setattr(clip_vit, "fixed_order_or_sdpa", F.scaled_dot_product_attention)
    torch.manual_seed(0)
    tower = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), eval_fused_mlp=True)
    forward_each_way(tower, CLIPVisionBackbone("ViT-tiny", image_size=(64, 32)), torch.randn(2, 3, 64, 32))
    assert calls == [torch.bfloat16] * 2 * len(tower.visual.transformer.resblocks)


def test_a_gelu_tower_keeps_torchs_mlp_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tower = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), activation="gelu", eval_fused_mlp=True)
    assert not tower.eval_fused_mlp
    assert "uses GELU" in caplog.text


def test_where_the_kernel_does_not_run_the_layer_is_torchs() -> None:
    """On the CPU without the interpreter, or with a gradient to record: F.linear then QuickGELU, bit for bit."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 64), torch.randn(32, 64, requires_grad=True), torch.randn(32)
    want = F.linear(x, w, b) * torch.sigmoid(1.702 * F.linear(x, w, b))
    got = quick_gelu_linear_or_torch(x, w, b)
    assert torch.equal(got, want)
    got.sum().backward()
    assert w.grad is not None


def test_the_layer_asks_for_k_in_whole_slices_of_the_kernels() -> None:
    from modeling.layers import quick_gelu_linear_kernel as kernel

    assert K_MULTIPLE == kernel.LAUNCH.block_k


def test_bad_inputs_are_refused_with_the_reason() -> None:
    x, w, b = torch.randn(4, 64, dtype=torch.float16), torch.randn(8, 64, dtype=torch.float16), torch.randn(8)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        quick_gelu_linear(x, w, b)
    with pytest.raises(ValueError, match="chain"):
        quick_gelu_linear(x, w[:, :32], b.half())
    with pytest.raises(ValueError, match="multiple of 64"):
        quick_gelu_linear(x[:, :48], w[:, :48], b.half())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_the_gpu_the_kernel_matches_float64_and_repeats_bit_for_bit(dtype: torch.dtype) -> None:
    """ViT-B/16's MLP in evaluation: 3 x 129 tokens a sample, width 768 -> 3072, against float64 and twice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * 3 * 129, 768, generator=g).to("cuda", dtype)
    w = (torch.randn(3072, 768, generator=g) / 768 ** 0.5).to("cuda", dtype)
    b = torch.randn(3072, generator=g).to("cuda", dtype)
    out = quick_gelu_linear(x, w, b)
    y = x.double() @ w.double().T + b.double()
    ref = y * torch.sigmoid(1.702 * y)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert torch.equal(out, quick_gelu_linear(x, w, b))


@needs_cuda
def test_on_the_gpu_a_compiled_call_equals_the_eager_one() -> None:
    """The kernel is a torch operator (``torch.library.custom_op``): compiled, the graph calls it whole."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 768, generator=g).to("cuda", torch.bfloat16)
    w = torch.randn(3072, 768, generator=g).to("cuda", torch.bfloat16) / 28
    b = torch.randn(3072, generator=g).to("cuda", torch.bfloat16)
    compiled = torch.compile(quick_gelu_linear, fullgraph=True)
    assert torch.equal(compiled(x, w, b), quick_gelu_linear(x, w, b))


@needs_cuda
def test_on_the_gpu_both_kernels_give_the_same_outputs() -> None:
    """Tiles read through tensor descriptors (Hopper and later) or with plain loads: the same slices of K in the
    same order, so the same bits; the layer's launch reads through descriptors where the GPU has them."""
    from modeling.layers import quick_gelu_linear_kernel as kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 129 * 4 + 5, 768, generator=g).to("cuda", torch.bfloat16)
    w = (torch.randn(3072, 768, generator=g) / 28).to("cuda", torch.bfloat16)
    b = torch.randn(3072, generator=g).to("cuda", torch.bfloat16)
    out = []
    for descriptors in (True, False):
        y = x.new_empty(x.shape[0], w.shape[0])
        kernel.launch(x, w, b, y, kernel.LAUNCH._replace(descriptors=descriptors))
        out.append(y)
    assert torch.equal(out[0], out[1])
    assert torch.equal(quick_gelu_linear(x, w, b), out[0])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("descriptors", [True, False])
def test_on_the_gpu_the_ptx_epilogue_gives_tl_sigmoids_outputs(dtype: torch.dtype, descriptors: bool) -> None:
    """QuickGELU through ``ex2.approx.ftz`` and ``div.full`` (the default on an NVIDIA GPU) against the same kernel
    through ``tl.sigmoid``: the same bits, also where 2^(-1.702 log2(e) y) overflows (y = -60 000, -100, -60), is
    near its largest (-52) or subnormal (52, 60), underflows to 0 (100, 60 000), and at +-0 and 1e-6 (columns whose
    weights are zero hold their bias)."""
    from modeling.layers import quick_gelu_linear_kernel as kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * 3 * 129, 768, generator=g).to("cuda", dtype)
    w = (torch.randn(3072, 768, generator=g) / 28).to("cuda", dtype)
    b = torch.randn(3072, generator=g)
    b[:12] = torch.tensor([-6e4, -100.0, -60.0, -52.0, -50.0, -0.0, 0.0, 1e-6, 50.0, 60.0, 100.0, 6e4])
    w[:12] = 0  # those columns are their bias exactly
    b = b.to("cuda", dtype)
    out = {}
    for ptx in (True, False):
        out[ptx] = x.new_empty(x.shape[0], w.shape[0])
        kernel.launch(x, w, b, out[ptx], kernel.LAUNCH._replace(descriptors=descriptors), ptx_epilogue=ptx)
    assert torch.equal(out[True], out[False])
    assert torch.isfinite(out[True]).all()
