"""The NCA step on CUDA (fast and compiled backends) equals the reference step; the compiled backend
also on CPU.

Float32 to rounding (TF32 off), bf16 autocast within its bound, in 2D (Growing NCA) and 3D (a seg
level: learned 3^3 filters, reflect border), inference and training (gradients of the parameters and
the input). The CUDA cases skip without a GPU; ``benchmarks/gpu_check.sh`` runs them on one. On CPU
the compiled backend is traced with ``aot_eager`` (the same graphs, forward and backward, without
Inductor's code generation, which takes about a minute on 2 cores); ``NCATOOL_TEST_INDUCTOR=1`` runs
it through Inductor there too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from ncatool.bench import growing_config
from ncatool.models.fast_step import FastOptions
from ncatool.models.nca import NCA, NCAConfig

CUDA = torch.cuda.is_available()
GPU = "cuda"  # the device of the CUDA cases (a module constant so their logic can be tried on CPU)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
#: A seg level as seg3d builds it (one fixed image channel, learned 3^3 filters, reflect border).
SEG3D_LEVEL = NCAConfig(channels=16, fixed_channels=1, hidden=64, dim=3, fire_rate=0.5, padding="reflect")


@pytest.fixture(autouse=True)
def _exact_float32() -> Iterator[None]:
    """TF32 off (cuDNN allows it by default): float32 must mean float32 for the comparisons."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    torch.set_num_threads(threads)


def _pair(dim: int, device: str, backend: str, options: FastOptions | None = None) -> tuple[NCA, NCA]:
    """The same weights twice: one NCA on ``backend``, one on the reference step."""
    cfg = growing_config() if dim == 2 else SEG3D_LEVEL
    torch.manual_seed(0)
    ref = NCA(cfg, backend="reference")
    torch.nn.init.normal_(ref.rule.fc1.weight, std=0.05)
    other = NCA(cfg, backend=backend, fast_options=options)
    other.load_state_dict(ref.state_dict())
    return ref.to(device), other.to(device)


def _state(dim: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (2, 16, 20, 20) if dim == 2 else (1, 16, 9, 10, 11)
    x = torch.rand(shape, generator=gen)
    if dim == 2:
        x[:, 3] *= 0.2  # alpha around the alive threshold: the alive mask matters
    return x.to(device)


def _run(
    nca: NCA, x: torch.Tensor, train: bool, amp: bool, every: int = 0, steps: int = 4
) -> list[torch.Tensor]:
    """The final state, and when training the gradients of the input and every parameter, of a
    weighted sum of the state after ``steps`` steps from seed 7."""
    nca.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(train)
    torch.manual_seed(7)
    with torch.set_grad_enabled(train), torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        y = nca(xx, steps, checkpoint_every=every)
    if not train:
        return [y.float()]
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y.float() * weights).sum().backward()
    assert xx.grad is not None
    return [y.detach().float(), xx.grad, *(p.grad for p in nca.parameters() if p.grad is not None)]


def _assert_float32_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    assert not torch.allclose(want[0], want[0].roll(1))  # the state is not trivial
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _assert_bf16_within_bound(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """bf16 products, float32 state: the state within 1 % (relative norm; ~0.1 % measured on CPU),
    gradients within 5 %."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        rel = ((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert rel < (1e-2 if i == 0 else 5e-2), (i, rel)


# ---------------------------------------------------------------------------------------------------
# the fast backend on CUDA (the masked, sync-free variant; gather=True: the CPU's row gathering)


@needs_cuda
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("every", [0, 1])
@pytest.mark.parametrize("gather", [None, True])
def test_cuda_fast_step_equals_reference_float32(
    dim: int, train: bool, every: int, gather: bool | None
) -> None:
    if every and not train:
        pytest.skip("checkpointing is for training")
    ref, fast = _pair(dim, GPU, "fast", FastOptions(gather=gather))
    x = _state(dim, GPU)
    _assert_float32_equal(_run(fast, x, train, False, every), _run(ref, x, train, False))


@needs_cuda
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_cuda_fast_step_bf16_within_bound(dim: int, train: bool) -> None:
    ref, fast = _pair(dim, GPU, "fast")
    x = _state(dim, GPU)
    got = _run(fast, x, train, True)
    assert got[0].dtype == torch.float32
    _assert_bf16_within_bound(got, _run(ref, x, train, False))


@needs_cuda
def test_cuda_segmentation_model_and_bench_workload_run() -> None:
    # the whole two-level model on CUDA, as `ncatool bench --device cuda` builds it, equals its
    # reference-backend twin
    from ncatool.bench import build_fast, seg3d_config
    from ncatool.models.nca import set_backend
    from ncatool.models.segmentation import SegmentationNCA

    torch.manual_seed(0)
    model = SegmentationNCA(seg3d_config((3, 3))).to(GPU)
    for level in model.levels:
        torch.nn.init.normal_(level.rule.fc1.weight, std=0.05)
    img = torch.rand(1, 1, 16, 16, 16, device=GPU)
    torch.manual_seed(2)
    fast = model(img).logits
    set_backend(model, "reference")
    torch.manual_seed(2)
    torch.testing.assert_close(fast, model(img).logits, rtol=1e-4, atol=1e-5)
    spec = {
        "dim": 3,
        "mode": "train",
        "size": [16] * 3,
        "batch": 1,
        "steps": [2, 2],
        "device": GPU,
        "seed": 0,
    }
    _, run = build_fast(spec, "bf16+ckpt1")
    assert torch.isfinite(run()).all()


# ---------------------------------------------------------------------------------------------------
# the compiled backend (torch.compile of the reference step; the fire mask drawn outside)


def _compiler(device: str) -> str:
    if device == "cpu" and os.environ.get("NCATOOL_TEST_INDUCTOR") != "1":
        return "aot_eager"
    return "inductor"


CPU_COMPILED = [(2, True), (3, False)]  # what the CPU traces (each case costs seconds)
COMPILED_CASES = [
    *(
        pytest.param("cpu", dim, train, id=f"cpu-{dim}d-{'train' if train else 'infer'}")
        for dim, train in CPU_COMPILED
    ),
    *(
        pytest.param("cuda", dim, train, marks=needs_cuda, id=f"cuda-{dim}d-{'train' if train else 'infer'}")
        for dim in (2, 3)
        for train in (False, True)
    ),
]


@pytest.mark.parametrize(("device", "dim", "train"), COMPILED_CASES)
def test_compiled_step_equals_reference_float32(device: str, dim: int, train: bool) -> None:
    ref, comp = _pair(dim, device, "compiled", FastOptions(compiler=_compiler(device)))
    x = _state(dim, device)
    _assert_float32_equal(_run(comp, x, train, False), _run(ref, x, train, False))
    if train:  # checkpointing: torch's checkpoint replays the RNG, so the same cells fire again
        _assert_float32_equal(_run(comp, x, train, False, every=2), _run(ref, x, train, False))


@needs_cuda
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_cuda_compiled_step_bf16_within_bound(dim: int, train: bool) -> None:
    ref, comp = _pair(dim, GPU, "compiled")
    x = _state(dim, GPU)
    _assert_bf16_within_bound(_run(comp, x, train, True), _run(ref, x, train, False))


def test_compiled_backend_is_a_setting() -> None:
    nca = NCA(replace(growing_config(), hidden=8), backend="compiled")
    assert not nca.runs_fast(torch.zeros(1, 16, 4, 4))  # the fast backend's flag stays off
    with pytest.raises(ValueError, match="backend must be one of"):
        NCA(growing_config(), backend="triton")
