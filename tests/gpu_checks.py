"""Checks of AdamWPrune's GPU fast path (``adamwprune.optim.gpu_kernels``) against
its plain path. tests/test_gpu_kernels.py runs them on CUDA where there is a GPU,
else here as a script under Triton's interpreter on the CPU
(``TRITON_INTERPRET=1 python tests/gpu_checks.py``), which exercises the same
kernels and host code."""
from __future__ import annotations

import sys
from typing import Callable

import torch

from adamwprune.optim import adamwprune as awp
from adamwprune.optim import adamwprune_gpu as awp_gpu
from adamwprune.optim import gpu_kernels

SHAPES = [(36, 40), (40,), (24, 50), (7,)]  # 1,440 and 1,200: each one full 1,024-entry tile + a partial one


def _pair(device: str, fast: bool, base: str = "adamw", ties: bool = False, **kw):
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen)
        if ties:  # few distinct magnitudes: massive exact ties at the threshold
            w = torch.round(w * 2) / 2 + 0.25
        params.append(torch.nn.Parameter(w.to(device)))
    groups = [{"params": [params[0], params[2]], "prune": True},
              {"params": [params[1], params[3]], "weight_decay": 0.0}]
    kw = {"lr": 1e-2, "target_sparsity": 0.7, "start_step": 2, "end_step": 30,
          "interval": 3, **kw}
    return params, awp.AdamWPrune(groups, base=base, fast=fast, **kw)


def _grads(params_list, step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(step)
    for i, shape in enumerate(SHAPES):
        g = torch.randn(shape, generator=gen) * scale
        for params in params_list:
            params[i].grad = g.to(params[i].device).clone()


def _compare(a, oa, b, ob, label: str) -> None:
    for i, (pa, pb) in enumerate(zip(a, b)):
        assert torch.equal(pa == 0, pb == 0), f"{label}: masks differ in tensor {i}"
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6, msg=f"{label}: weights {i}")
        assert oa.state[pa]["step"].item() == ob.state[pb]["step"].item(), f"{label}: step {i}"
        if "exp_avg_sq" in ob.state[pb]:  # the pruned-entry mark (v = -0.0) agrees
            assert torch.equal(awp.pruned_in(oa.state[pa]["exp_avg_sq"]).cpu(),
                               awp.pruned_in(ob.state[pb]["exp_avg_sq"]).cpu()), \
                f"{label}: pruned marks differ in tensor {i}"
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in ob.state[pb]:
                torch.testing.assert_close(oa.state[pa][key], ob.state[pb][key], rtol=2e-5,
                                           atol=2e-6, msg=f"{label}: {key} {i}")


def _run(device: str, steps: int, label: str, **kw):
    a, oa = _pair(device, True, **kw)
    b, ob = _pair(device, False, **kw)
    for step in range(steps):
        _grads([a, b], step)
        oa.step()
        ob.step()
    _compare(a, oa, b, ob, label)
    return a, oa


def check_matches_plain(device: str) -> None:
    """Fused step + fused mask update == plain path, across bases and variants; the
    fused update really ran (no fallback) and reached the target exactly."""
    for kw in ({}, {"variant": "bitter1"}, {"amsgrad": True}, {"base": "adam"},
               {"base": "adamwadv", "max_grad_norm": 0.0}):
        a, oa = _run(device, 36, f"fast vs plain {kw}", **kw)
        assert set(oa.update_paths) == {"gpu-fused"} and oa.update_paths["gpu-fused"] >= 10, \
            oa.update_paths
        pruned = int((a[0] == 0).sum() + (a[2] == 0).sum())
        assert pruned == round(0.7 * (a[0].numel() + a[2].numel()))
        assert int((a[1] == 0).sum() + (a[3] == 0).sum()) == 0  # group without "prune"


def check_live_zeros_are_not_pruned(device: str) -> None:
    """Weights that are 0 with zero gradient (so w = m = v = 0) while alive are not
    taken for pruned: exactly k entries carry the mark, as on the plain path."""
    def zero_rows(params):  # 610 live zeros, fewer than the k = 792 entries to prune
        with torch.no_grad():
            params[0][:9] = 0
            params[2][:5] = 0

    a, oa = _pair(device, True, target_sparsity=0.3)
    b, ob = _pair(device, False, target_sparsity=0.3)
    zero_rows(a)
    zero_rows(b)
    for step in range(36):
        _grads([a, b], step)
        if step < 20:
            for params in (a, b):
                params[0].grad[:9] = 0
                params[2].grad[:5] = 0
        oa.step()
        ob.step()
    _compare(a, oa, b, ob, "live zeros")
    marked = sum(int(awp.pruned_in(oa.state[p]["exp_avg_sq"]).sum()) for p in (a[0], a[2]))
    assert marked == round(0.3 * (a[0].numel() + a[2].numel()))
    assert oa.update_paths["gpu-fused"] >= 1, oa.update_paths


def check_clipping_sees_the_masked_gradient(device: str) -> None:
    """clip_grad_norm_ before each step: the GPU path equals the plain path."""
    from adamwprune.optim.clipping import clip_grad_norm_

    a, oa = _pair(device, True)
    b, ob = _pair(device, False)
    for step in range(36):
        _grads([a, b], step)
        na, nb = clip_grad_norm_(oa, 0.5), clip_grad_norm_(ob, 0.5)
        torch.testing.assert_close(na, nb, rtol=1e-5, atol=1e-6)
        oa.step()
        ob.step()
    _compare(a, oa, b, ob, "clipping")


def check_ties(device: str) -> None:
    """Exact ties at the threshold go to the lower index, as the plain path."""
    _, oa = _run(device, 12, "ties", variant="bitter1", ties=True)
    assert oa.update_paths["gpu-fused"] + oa.update_paths["gpu"] >= 1


def check_missed_bracket(device: str) -> None:
    """A bracket that misses the k-th score changes nothing; the stand-alone update
    and then the plain one finish exactly."""
    original: Callable = awp_gpu._gpu_bracket

    def wrong(plan, scal, step, variant, k):
        bounds, cap = original(plan, scal, step, variant, k)
        # far above the k-th key: every entry lies below the bracket
        return torch.full_like(bounds, gpu_kernels.KEY_MAX - 1) + torch.arange(2, device=bounds.device), cap

    awp_gpu._gpu_bracket = wrong
    try:
        _, oa = _run(device, 12, "missed bracket")
    finally:
        awp_gpu._gpu_bracket = original
    # the update at sparsity 0 needs no bracket; every other one missed twice
    assert oa.update_paths["gpu-fused"] <= 1 and oa.update_paths["gpu"] == 0, oa.update_paths
    assert oa.update_paths["plain"] + oa.update_paths["cpu"] >= 3, oa.update_paths


def check_small_candidate_buffer(device: str) -> None:
    """An overflowing candidate buffer is a miss, not a wrong answer."""
    original: Callable = awp_gpu._gpu_bracket
    awp_gpu._gpu_bracket = lambda *args: (original(*args)[0], 1)
    try:
        _, oa = _run(device, 9, "candidate overflow")
    finally:
        awp_gpu._gpu_bracket = original
    assert oa.update_paths["gpu-fused"] <= 1, oa.update_paths


def check_standalone(device: str) -> None:
    """SPAM's step has no GPU kernel: plain step, stand-alone GPU mask update."""
    _, oa = _run(device, 12, "adamwspam stand-alone", base="adamwspam")
    assert oa.update_paths["gpu"] >= 3 and oa.update_paths["plain"] == 0, oa.update_paths


def check_state_dict_between_paths(device: str) -> None:
    """A state_dict saved by the fast path continues on the plain path and back."""
    a, oa = _pair(device, True)
    b, ob = _pair(device, False)
    for step in range(10):
        _grads([a, b], step)
        oa.step()
        ob.step()
    sa = oa.state_dict()
    c, oc = _pair(device, False)
    with torch.no_grad():
        for pc, pa in zip(c, a):
            pc.copy_(pa)
    oc.load_state_dict(sa)
    for step in range(10, 20):
        _grads([c, b], step)
        oc.step()
        ob.step()
    _compare(c, oc, b, ob, "fast -> plain")


def check_step_vs_torch(device: str) -> None:
    """Without pruning, the kernel's step is torch.optim.AdamW's (foreach) step."""
    a, oa = _pair(device, True, target_sparsity=0.0)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ob = torch.optim.AdamW([{"params": [b[0], b[2]]},
                            {"params": [b[1], b[3]], "weight_decay": 0.0}],
                           lr=1e-2, foreach=True)
    for step in range(20):
        _grads([a, b], step, scale=10.0 ** (step % 5 - 2))
        for group in (oa.param_groups, ob.param_groups):
            for g in group:
                g["lr"] = 1e-2 * (1 - step / 40)
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


CHECKS = [check_step_vs_torch, check_matches_plain, check_ties, check_missed_bracket,
          check_small_candidate_buffer, check_standalone, check_state_dict_between_paths,
          check_live_zeros_are_not_pruned, check_clipping_sees_the_masked_gradient]


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not gpu_kernels.INTERPRET:
        print("no GPU: run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    for check in CHECKS:
        check(device)
        print(f"ok {check.__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
