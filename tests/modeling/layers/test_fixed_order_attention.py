"""The fixed-order attention kernels against a float64 formula, and their determinism.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton compiles a kernel, so
in a fresh process), in fp16: the interpreter's bf16 matmuls are wrong in Triton 3.8, so bf16 is checked on the GPU
(the CUDA-only tests below). The interpreter runs the kernels' exact loops and masks, tile by tile.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.layers.fixed_order_attention import fixed_order_attention
from modeling.layers.triton_device import triton_runs_on
from tests.helpers.tower_modes import forward_each_way
from tests.helpers.triton_interpreter import run_interpreted

pytest.importorskip("triton")

# Runs in a fresh interpreted process; prints one JSON object.
_INTERPRETED = r"""
import json, torch
from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.layers.fixed_order_attention import fixed_order_attention

def reference(q, k, v):  # float64, written out
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

def run(q, k, v, grad, block):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fixed_order_attention(*leaves, block=block)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]

torch.manual_seed(0)
cases = []
for (b, h, n, d, block) in [(2, 2, 1, 16, 64), (1, 2, 10, 16, 16), (2, 1, 65, 32, 32), (1, 3, 129, 16, 64),
                            (1, 1, 40, 64, 16)]:
    qkv = torch.randn(b, n, 3, h, d, dtype=torch.float16)  # q, k, v as the tower makes them: strided views
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    grad = torch.randn(b, h, n, d, dtype=torch.float16)
    out, grads = run(q, k, v, grad, block)
    out2, grads2 = run(q, k, v, grad, block)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference(*ref)
    ref_out.backward(grad.double())
    err = lambda a, r: ((a.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()
    cases.append(dict(shape=[b, h, n, d], block=block, out=err(out, ref_out.detach()),
                      grads=[err(g, r.grad) for g, r in zip(grads, ref)],
                      repeatable=torch.equal(out, out2) and all(torch.equal(x, y) for x, y in zip(grads, grads2)),
                      heads_last=list(out.stride()) == [n * h * d, d, h * d, 1]))

# forward only (no gradient recorded): the last tile cut to the rows left
inference = []
for (b, h, n, d, block) in [(1, 2, 129, 16, 64), (2, 1, 1, 32, 64), (1, 2, 197, 16, 64), (1, 1, 64, 16, 64),
                            (2, 2, 40, 16, 16), (1, 1, 100, 64, 32), (1, 2, 129, 16, 128)]:
    qkv = torch.randn(b, n, 3, h, d, dtype=torch.float16)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with torch.no_grad():
        out, out2 = fixed_order_attention(q, k, v, block=block), fixed_order_attention(q, k, v, block=block)
    ref = reference(q.double(), k.double(), v.double())
    inference.append(dict(shape=[b, h, n, d], block=block,
                          err=((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item(),
                          repeatable=torch.equal(out, out2), heads_last=list(out.stride()) == [n * h * d, d, h * d, 1]))

# the tower: fixed-order kernels in training against open_clip's blocks with SDPA, same weights
torch.manual_seed(0)
fixed = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), num_cameras=2, attention="fixed_order").half()
sdpa = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), num_cameras=2).half()
sdpa.load_state_dict(fixed.state_dict())
images, cams = torch.randn(3, 3, 64, 32, dtype=torch.float16), torch.tensor([0, 1, 1])
runs = []
for model in (fixed, sdpa, fixed):
    model.zero_grad()
    out = model(images, cams)
    (out.float() ** 2).sum().backward()
    runs.append((out.detach().float(), [p.grad.float().clone() for p in model.parameters()]))
tower = dict(out=((runs[0][0] - runs[1][0]).abs().max() / runs[1][0].abs().max()).item(),
             grads=max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(runs[0][1], runs[1][1])),
             repeatable=torch.equal(runs[0][0], runs[2][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[2][1])))
# compiled (inductor; the operators stay whole in the graph): the same bits as eager, forward and backward
q, k, v, grad = (torch.randn(1, 2, 20, 16, dtype=torch.float16) for _ in range(4))
def step(fn):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves)]
compiled = all(torch.equal(a, b) for a, b in zip(step(fixed_order_attention),
                                                   step(torch.compile(fixed_order_attention, fullgraph=True))))
print(json.dumps(dict(cases=cases, inference=inference, tower=tower, compiled=compiled)))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(_INTERPRETED)


def test_output_and_gradients_match_the_float64_formula(interpreted: dict) -> None:
    """Single rows, ragged last tiles (10, 65, 129 tokens in tiles of 16-64), head dims 16-64, strided inputs: fp16
    round-off (a few 1e-4 of the largest value), like torch's fused kernels."""
    for case in interpreted["cases"]:
        assert case["out"] < 2e-3, case
        assert max(case["grads"]) < 2e-3, case


def test_the_forward_only_kernel_matches_the_float64_formula(interpreted: dict) -> None:
    """No gradient: tiles of ``block`` then one cut to the rows and keys left (129 = 64 + 64 + 1 in a tile of 16;
    a single token; nothing left; more left than 16), fp16 round-off, bit-repeatable, heads last."""
    assert len(interpreted["inference"]) == 7
    for case in interpreted["inference"]:
        assert case["err"] < 2e-3, case
        assert case["repeatable"] and case["heads_last"], case


def test_two_backward_passes_are_bit_identical(interpreted: dict) -> None:
    assert all(case["repeatable"] for case in interpreted["cases"]), interpreted["cases"]


def test_the_output_is_laid_out_for_a_free_merge_of_the_heads(interpreted: dict) -> None:
    """(B, H, N, D) with (B, N, H, D) strides: the tower's transpose and reshape back to (B, N, H*D) copy nothing."""
    assert all(case["heads_last"] for case in interpreted["cases"]), interpreted["cases"]


def test_a_tower_trained_with_the_kernels_matches_open_clips_blocks_and_repeats_itself(interpreted: dict) -> None:
    """Same weights, fp16: tokens and every parameter's gradient agree to fp16 round-off, and a second pass gives
    the same bits."""
    tower = interpreted["tower"]
    assert tower["out"] < 5e-3 and tower["grads"] < 5e-3, tower
    assert tower["repeatable"], tower


@pytest.fixture
def attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtypes the tower's blocks call the fixed-order attention with (SDPA computes it; the device check passes)."""
    import modeling.backbones.clip_vit as clip_vit

    calls: list[torch.dtype] = []

    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(clip_vit, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(clip_vit, "fixed_order_or_sdpa", counted)
    return calls


@pytest.mark.parametrize("grad", [True, False])
def test_the_tower_runs_the_kernels_in_half_precision_with_or_without_gradients(attention_calls: list,
                                                                               grad: bool) -> None:
    """``fixed_order``: training and evaluation alike, in half precision; fp32 keeps open_clip's blocks."""
    tower = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), attention="fixed_order")
    images = torch.randn(2, 3, 64, 32)
    with torch.set_grad_enabled(grad):
        tower(images)
        assert attention_calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tower(images)
        tower.bfloat16()(images.bfloat16())
    assert attention_calls == [torch.bfloat16] * 2 * len(tower.visual.transformer.resblocks)


def test_evaluation_runs_the_kernels_forward_only_where_asked(attention_calls: list) -> None:
    """``eval_attention``: with no gradient, in bf16, a free (``sdpa``) tower attends with the kernels; with a
    gradient, in fp32, or without ``eval_attention``, it runs open_clip's blocks."""
    tower = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), eval_attention=True)
    forward_each_way(tower, CLIPVisionBackbone("ViT-tiny", image_size=(64, 32)), torch.randn(2, 3, 64, 32))
    assert attention_calls == [torch.bfloat16] * 2 * len(tower.visual.transformer.resblocks)


def test_a_compiled_forward_and_backward_give_the_eager_bits(interpreted: dict) -> None:
    assert interpreted["compiled"]


def test_the_towers_own_blocks_compute_what_open_clips_compute() -> None:
    """``blocks`` with SDPA equals open_clip's transformer (fp32, CPU), so the kernels are the only change."""
    torch.manual_seed(0)
    model = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32))
    x = torch.randn(2, 9, model.width)
    torch.testing.assert_close(model.blocks(x, F.scaled_dot_product_attention), model.visual.transformer(x),
                               rtol=1e-5, atol=1e-6)


def test_without_the_kernels_device_the_tower_runs_open_clips_blocks() -> None:
    """``fixed_order`` on the CPU (no interpreter), or without grad: the tower is the SDPA tower, bit for bit."""
    assert not triton_runs_on("cpu") or os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    fixed = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), attention="fixed_order")
    sdpa = CLIPVisionBackbone("ViT-tiny", image_size=(64, 32))
    sdpa.load_state_dict(fixed.state_dict())
    images = torch.randn(2, 3, 64, 32)
    assert torch.equal(fixed(images), sdpa(images))


def test_bad_inputs_are_refused_with_the_reason() -> None:
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        fixed_order_attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head dims"):
        x = torch.randn(1, 2, 8, 24, dtype=torch.float16)
        fixed_order_attention(x, x, x)
    with pytest.raises(ValueError, match="block"):
        fixed_order_attention(q, q, q, block=48)
    with pytest.raises(ValueError, match="one"):
        fixed_order_attention(q, q[:, :, :4], q)
    wide = torch.empty(2, 1, 8, 16, dtype=torch.float16, device="meta").as_strided((2, 1, 8, 16), (2**31, 128, 16, 1))
    with pytest.raises(ValueError, match="32 bits"):
        fixed_order_attention(wide, wide, wide)
    with pytest.raises(ValueError, match="attention must be one of"):
        CLIPVisionBackbone("ViT-tiny", image_size=(64, 32), attention="flash")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_the_gpu_the_kernels_match_float64_and_repeat_bit_for_bit(dtype: torch.dtype) -> None:
    """ViT-B/16's shape in the ReID family: 129 tokens, 12 heads of 64, against float64 and twice."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(24, 129, 3, 12, 64, generator=g).to("cuda", dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    grad = torch.randn(24, 12, 129, 64, generator=g).to("cuda", dtype)
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fixed_order_attention(*leaves)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in leaves)])
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = torch.softmax(ref[0] @ ref[1].transpose(-1, -2) / 8.0, -1) @ ref[2]
    ref_out.backward(grad.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in zip(results[0], [ref_out.detach(), *(t.grad for t in ref)]):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_cuda
def test_on_the_gpu_a_compiled_forward_and_backward_equals_the_eager_one() -> None:
    """The kernels are torch operators (``torch.library.custom_op``): compiled, the graph calls them whole."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(8, 4, 129, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(4))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fixed_order_attention(*leaves)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in leaves)]

    compiled = torch.compile(lambda q, k, v: fixed_order_attention(q, k, v), fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    out.backward(grad)
    for got, want in zip([out.detach(), *(t.grad for t in leaves)], step(q, k, v)):
        assert torch.equal(got, want)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_the_gpu_the_forward_only_kernel_matches_float64_and_repeats(dtype: torch.dtype) -> None:
    """The evaluation's shape (129 tokens: tiles of 64, 64 and 16), no gradient: against float64, twice, and
    compiled against eager."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(24, 129, 3, 12, 64, generator=g).to("cuda", dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with torch.no_grad():
        out = fixed_order_attention(q, k, v)
        again = fixed_order_attention(q, k, v)
        compiled = torch.compile(lambda q, k, v: fixed_order_attention(q, k, v), fullgraph=True)(q, k, v)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, -1) @ v.double()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert torch.equal(out, again) and torch.equal(out, compiled)
