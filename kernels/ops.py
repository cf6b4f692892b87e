"""Element-wise and collective helpers used by the model and the losses, each with a reference."""
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------
# Masked-position gather: run a vocabulary or pixel head only where there is something to predict.
# MLM masks ~15% of the tokens and MIM ~30% of the patches, so evaluating a (C -> V) head on every
# position would waste 85% of its FLOPs (the MLM head is the largest matmul of the text side).
# ---------------------------------------------------------------------------------------------
def gather_masked(x, mask):
    """x (B, T, C), mask (B, T) bool -> (M, C), rows in row-major order of the True positions."""
    idx = mask.flatten().nonzero().squeeze(1)  # (M,) flat positions
    return x.flatten(0, 1).index_select(0, idx)  # (B*T, C) -> (M, C)


def gather_masked_reference(x, mask):
    return x[mask]


# ---------------------------------------------------------------------------------------------
# Momentum (EMA) update: theta_m <- m * theta_m + (1 - m) * theta (SIMLA.md, momentum 0.995).
# The foreach version is a handful of multi-tensor kernels instead of two per parameter tensor.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update_(momentum_params, online_params, m):
    # lerp(a, b, w) = a + w * (b - a) = (1 - w) * a + w * b, with w = 1 - m.
    torch._foreach_lerp_(momentum_params, online_params, 1.0 - m)


@torch.no_grad()
def ema_update_reference_(momentum_params, online_params, m):
    for pm, p in zip(momentum_params, online_params):
        pm.mul_(m).add_(p, alpha=1.0 - m)


# ---------------------------------------------------------------------------------------------
# All-gather across ranks. Single process: the identity, so nothing needs torch.distributed.
# ---------------------------------------------------------------------------------------------
def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_nograd(x):
    """(B, ...) on each rank -> (world * B, ...) in rank order; no gradient (momentum features, eval)."""
    if _world() == 1:
        return x.detach()  # the same contract as with several ranks: the result never carries a graph
    out = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(_world())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every rank's x: the gradient of x_r is the SUM over ranks of
        # d(loss_k)/d(x_r). All-reduce the full gradient, then keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        b = grad.shape[0] // _world()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]


def all_gather_with_grad(x):
    """(B, ...) -> (world * B, ...). Gradient semantics: d/dx_r of sum_k loss_k (all-reduced, summed),
    which DDP's gradient averaging then turns into the gradient of the mean loss over ranks."""
    return x if _world() == 1 else _GatherWithGrad.apply(x)
