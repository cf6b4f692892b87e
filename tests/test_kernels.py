"""Every fast op in kernels/ against its plain-PyTorch reference (STYLE.md item 8), plus the
all-gather helpers in a real 2-process gloo group."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import (all_gather_nograd, all_gather_with_grad, attention, attention_reference, ema_update_,
                     ema_update_reference_, gather_masked, gather_masked_reference)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def _qkv(B, H, Tq, Tk, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for t in (Tq, Tk, Tk))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _key_mask(B, Tk, seed):
    """Random padding masks, every row keeps at least its first key (a caption always has [CLS])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, Tk + 1, (B,), generator=g)
    lengths[0] = 1  # one row with a single real key: the sharpest case
    return torch.arange(Tk)[None, :] < lengths[:, None]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (5, 9), (9, 17)])  # self, cross, cross (image memory)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_reference(dtype, atol, Tq, Tk, masked):
    torch.manual_seed(0)
    B, H, D = 3, 2, 8
    q, k, v = _qkv(B, H, Tq, Tk, D, seed=Tq * 31 + Tk, dtype=dtype)
    key_mask = _key_mask(B, Tk, seed=Tk) if masked else None
    out = attention(q, k, v, key_mask)
    ref, probs = attention_reference(q, k, v, key_mask)
    assert out.shape == ref.shape == (B, H, Tq, D) and out.dtype == ref.dtype == dtype
    assert probs.shape == (B, H, Tq, Tk)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(B, H, Tq), atol=atol, rtol=0)
    # Both paths against an fp64 statement of softmax(q k^T / sqrt(D)) v.
    s = q.double() @ k.double().transpose(-2, -1) / D ** 0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    exact = s.softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), exact, atol=atol, rtol=0)
    if masked:
        assert (probs.masked_select(~key_mask[:, None, None, :].expand_as(probs)) == 0).all()
        # The single-key row attends only to its key: its output is exactly that value.
        torch.testing.assert_close(ref[0].float(), v[0, :, :1].expand(H, Tq, D).float(), atol=atol, rtol=0)


def test_attention_mask_ignores_masked_key_content():
    """Whatever sits at a masked key (here: huge values) cannot leak into the output."""
    torch.manual_seed(0)
    q, k, v = _qkv(2, 2, 4, 6, 8, seed=1)
    key_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    k2, v2 = k.clone(), v.clone()
    k2[~key_mask[:, None, :, None].expand_as(k)] = 50.0
    v2[~key_mask[:, None, :, None].expand_as(v)] = -1e4
    torch.testing.assert_close(attention(q, k2, v2, key_mask), attention(q, k, v, key_mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_reference(q, k2, v2, key_mask)[0], attention(q, k, v, key_mask),
                               atol=1e-5, rtol=0)
    # ...and without the mask it does leak: the test above can fail.
    assert (attention(q, k2, v2) - attention(q, k, v)).abs().max() > 1.0


# ---------------------------------------------------------------------------------------------
# gather_masked
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.15, 0.5, 1.0])
def test_gather_masked_matches_reference(p):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 5)
    mask = torch.rand(3, 11) < p
    out = gather_masked(x, mask)
    assert out.shape == (int(mask.sum()), 5)
    torch.testing.assert_close(out, gather_masked_reference(x, mask), atol=0, rtol=0)
    # Row order is row-major over (B, T), the order labels[mask] uses.
    expected = [x[b, t] for b in range(3) for t in range(11) if mask[b, t]]
    if expected:
        torch.testing.assert_close(out, torch.stack(expected), atol=0, rtol=0)


def test_gather_masked_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, requires_grad=True)
    mask = torch.rand(2, 6) < 0.5
    mask[0, 0] = True
    gather_masked(x, mask).sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None].float().expand(2, 6, 4), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------
def test_ema_update_matches_reference_and_formula():
    torch.manual_seed(0)
    shapes = [(4, 3), (7,), (2, 3, 5), ()]
    online = [torch.randn(s) for s in shapes]
    mom = [torch.randn(s) for s in shapes]
    for m in (0.995, 0.9, 0.0, 1.0):
        fast, ref = [t.clone() for t in mom], [t.clone() for t in mom]
        ema_update_(fast, online, m)
        ema_update_reference_(ref, online, m)
        for f, r, pm, p in zip(fast, ref, mom, online):
            torch.testing.assert_close(f, r, atol=1e-6, rtol=0)
            torch.testing.assert_close(f, m * pm + (1 - m) * p, atol=1e-6, rtol=0)
    # In place, and the online tensors are untouched.
    keep = [t.clone() for t in online]
    ema_update_(mom, online, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(online, keep))


def test_ema_update_on_parameters_needs_no_grad_context():
    """The model calls it on nn.Parameters that require grad: must not raise or build a graph."""
    torch.manual_seed(0)
    p, pm = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3), requires_grad=False)
    before = pm.detach().clone()
    ema_update_([pm], [p], 0.75)
    torch.testing.assert_close(pm.detach(), 0.75 * before + 0.25 * p.detach(), atol=1e-6, rtol=0)
    assert pm.grad_fn is None


# ---------------------------------------------------------------------------------------------
# all-gather: single process is the identity; a real 2-process gloo group checks the semantics
# ---------------------------------------------------------------------------------------------
def test_all_gather_single_process_identity():
    assert not dist.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    y = all_gather_with_grad(x)
    torch.testing.assert_close(y, x)
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), 2.0))
    z = all_gather_nograd(x)
    torch.testing.assert_close(z, x.detach())
    assert not z.requires_grad


WORLD, B, E = 2, 3, 4


def _x(rank):  # each rank's local batch, distinct per rank
    return torch.arange(B * E, dtype=torch.float32).reshape(B, E) + 100.0 * rank


def _w(k):  # the weights of rank k's loss over the GATHERED (world * B, E) tensor
    return torch.randn(WORLD * B, E, generator=torch.Generator().manual_seed(10 + k))


def _gather_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x = _x(rank).requires_grad_(True)
        gathered = all_gather_with_grad(x)
        (_w(rank) * gathered).sum().backward()
        nograd = all_gather_nograd(_x(rank) * 2)
        ids = all_gather_nograd(torch.arange(B) + 10 * rank)  # long tensors (image ids) too
        torch.save(dict(gathered=gathered.detach(), grad=x.grad, nograd=nograd, nograd_rg=nograd.requires_grad,
                        ids=ids), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_gather_two_process_gloo(tmp_path):
    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    everyone = torch.cat([_x(r) for r in range(WORLD)])  # rank order
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["gathered"], everyone, atol=0, rtol=0)
        torch.testing.assert_close(res[r]["nograd"], everyone * 2, atol=0, rtol=0)
        torch.testing.assert_close(res[r]["ids"], torch.tensor([0, 1, 2, 10, 11, 12]), atol=0, rtol=0)
        assert not res[r]["nograd_rg"]
        # loss_k = sum(w_k * gathered) on rank k: d(sum_k loss_k)/dx_r = sum_k w_k[rows of rank r].
        expected = sum(_w(k)[r * B:(r + 1) * B] for k in range(WORLD))
        torch.testing.assert_close(res[r]["grad"], expected, atol=1e-6, rtol=0)
        # Not merely this rank's own loss (what a plain all_gather + local slice would give).
        assert not torch.allclose(res[r]["grad"], _w(r)[r * B:(r + 1) * B])
