"""The compiled CPU pair-sum kernel (ncf_fast.native): float64 parity, tiles, duplicates, fallback."""
import shutil

import pytest
import torch

from ncf_fast import energy, native, pair_sums, reference
from tolerance import assert_close_to_ref

HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch path runs instead")


@needs_kernel
def test_compiles_where_a_c_compiler_exists():
    assert native.available()


def _sums64(a, b, same=False):
    """(S, Ga, Gb) in float64 from explicit (N, M, d) differences: the definition."""
    a, b = a.double(), b.double()
    diff = a.unsqueeze(1) - b.unsqueeze(0)
    dist = diff.norm(dim=2)
    unit = diff / torch.where(dist > 0, dist, torch.ones_like(dist)).unsqueeze(-1)
    if same:
        unit.diagonal(dim1=0, dim2=1).zero_()
    return dist.sum(), unit.sum(1), -unit.sum(0)


@needs_kernel
@pytest.mark.parametrize("n,m,d,tile", [(1, 1, 1, 4096), (1, 70, 2, 4096), (70, 1, 2, 4096),
                                        (37, 131, 2, 4096), (129, 67, 1, 7), (65, 300, 2, 64),
                                        (33, 97, 3, 4096), (41, 130, 5, 64), (19, 200, 8, 4096)])
def test_matches_float64_definition(n, m, d, tile, monkeypatch):
    """Odd sizes, partial 64-column chunks, several column tiles (tile 7, 64), N = 1, M = 1."""
    monkeypatch.setattr(native, "_TILE", tile)
    a = torch.randn(n, d) * 1.5 + 0.3
    b = torch.randn(m, d)
    b[: min(n, m) // 3] = a[: min(n, m) // 3]  # coinciding points: unit vector 0
    got = native.pair_sums(a, b, grad_a=True, grad_b=True, same=False)
    again = native.pair_sums(a, b, grad_a=True, grad_b=True, same=False)
    # fp32 differences summed in double: each pair is off by a few fp32 ulps of |a| + |b|
    ulps = float(a.abs().max() + b.abs().max()) * 1e-6
    for g, g2, w, pairs, what in zip(got, again, _sums64(a, b), (n * m, m, n), ("S", "Ga", "Gb")):
        assert g.dtype == (torch.float64 if what == "S" else torch.float32), what
        assert float((g.double() - w).abs().max()) <= ulps * pairs, what
        assert torch.equal(g, g2), f"{what} is not deterministic"


@needs_kernel
def test_same_set_skips_the_diagonal():
    a = torch.randn(90, 2)
    s, ga, gb = native.pair_sums(a, a, grad_a=True, grad_b=True, same=True)
    s64, ga64, gb64 = _sums64(a, a, same=True)
    torch.testing.assert_close(s, s64, rtol=1e-6, atol=0)
    torch.testing.assert_close(ga.double(), ga64, rtol=0, atol=1e-4)
    torch.testing.assert_close(gb.double(), gb64, rtol=0, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("n,m,d", [(1, 3, 1), (37, 50, 2), (200, 4100, 2), (45, 300, 8)])
def test_energy_distance_on_the_kernel_matches_reference(n, m, d):
    """energy_distance in fp32 (kernel) against float64, with fp32 autograd setting the tolerance."""
    assert native.usable(torch.zeros(1, d), torch.zeros(1, d))
    a, b = torch.randn(n, d) * 2.0 + 1.0, torch.randn(m, d)
    outs = {}
    for name, dtype, fn in (("fast", torch.float32, energy.energy_distance),
                            ("lowp", torch.float32, reference.energy_distance),
                            ("ref64", torch.float64, reference.energy_distance)):
        aa, bb = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        v = fn(aa, bb)
        outs[name] = (v, *torch.autograd.grad(v, [aa, bb]))
    for k, what in enumerate(("value", "grad_a", "grad_b")):
        assert_close_to_ref(outs["fast"][k], outs["ref64"][k], outs["lowp"][k], what)


def test_disabled_or_without_compiler_the_torch_path_runs(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native._library.cache_clear()
    try:
        assert not native.available()
        a, b = torch.randn(40, 2), torch.randn(30, 2)
        s, ga, gb = pair_sums.pair_distance_sums(a, b, grad_a=True, grad_b=True)
        s64, ga64, gb64 = _sums64(a, b)
        torch.testing.assert_close(s, s64, rtol=1e-6, atol=0)
        torch.testing.assert_close(ga.double(), ga64, rtol=0, atol=1e-4)
    finally:
        native._library.cache_clear()


@needs_kernel
def test_dispatch_takes_the_kernel_up_to_max_d_only():
    """Above MAX_D the torch path's GEMM form is faster (native.py's timings)."""
    z = torch.zeros(1, native.MAX_D)
    assert native.usable(z, z)
    z = torch.zeros(1, native.MAX_D + 1)
    assert not native.usable(z, z)
    assert not native.usable(z[:, :2].double(), z[:, :2].double())
