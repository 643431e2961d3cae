"""The inner models f(x) = x + LN(g(x; W)) and their mini-batch gradient step in dual form.

Within a mini-batch of b tokens every token's gradient is taken at the weights W0 that the
mini-batch starts from, and position i reads with W_i = W0 - sum_{j<=i} eta_ij grad_j(W0).
The dual form computes those reads without materialising any W_i (Sun et al., 2024, sec. 2.7):
for a linear map, q_i W_i = q_i W0 - sum_j eta_ij (q_i . k_j) grad_z_j, an attention-like
product. Only the last position's weights are kept as the new state. LN gradients are written
out by hand so the step is a plain differentiable function for the outer backward.
``moshi_ttt.ttt.reference`` builds every W_i explicitly with autograd: what this file must equal.

Shapes: fast weights carry [B, H, ...]; token blocks are [B, H, b, d]; ``ln`` is the per-head
LayerNorm (weight [1, H, 1, d], bias [1, H, 1, d], eps) shared by all samples.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from moshi_ttt.ttt.config import config_key

Tensor = torch.Tensor
Weights = dict[str, Tensor]
LNParams = tuple[Tensor, Tensor, float | None]  # eps None: no LayerNorm in f (ttt.ttt_layer.inner_norm=false)


def _normalise(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    zc = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((zc * zc).mean(-1, keepdim=True) + eps)
    return zc * rstd, rstd


def layer_norm(z: Tensor, ln: LNParams) -> Tensor:
    """Per-head LayerNorm over the last dim (biased variance, as torch's); eps None: the identity."""
    weight, bias, eps = ln
    if eps is None:
        return z
    return _normalise(z, eps)[0] * weight + bias


def ln_l2_grad(z: Tensor, target: Tensor, ln: LNParams) -> Tensor:
    """d/dz of 0.5 * ||LN(z) - target||^2, per token: the inner loss gradient at the LN input
    (eps None: of 0.5 * ||z - target||^2, the delta rule's error)."""
    weight, bias, eps = ln
    if eps is None:
        return z - target
    xh, rstd = _normalise(z, eps)
    gxh = (xh * weight + bias - target) * weight
    return rstd * (gxh - gxh.mean(-1, keepdim=True) - xh * (gxh * xh).mean(-1, keepdim=True))


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, the activation of the MLP inner model."""
    return F.gelu(x)


def gelu_grad(x: Tensor) -> Tensor:
    """Derivative of the exact GELU, written out so the inner gradient stays differentiable."""
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0)))) + x * torch.exp(-0.5 * x * x) / math.sqrt(
        2.0 * math.pi
    )


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class InnerModel(ABC):
    """g(x; W) of one head, with its write step and its dual-form read."""

    kind: str
    names: tuple[str, ...]

    @abstractmethod
    def init_weights(self, num_heads: int, std: float) -> Weights:
        """Initial fast weights [H, ...] (learned as outer parameters)."""

    @abstractmethod
    def forward(self, w: Weights, x: Tensor) -> Tensor:
        """g(x; W) for tokens x [B, H, n, d], before the LayerNorm and the residual."""

    @abstractmethod
    def write(self, w: Weights, k: Tensor, target: Tensor, eta_last: Tensor, ln: LNParams) -> Weights:
        """Weights after one mini-batch: W0 - sum_j eta_last_j grad_j(W0); eta_last is [B, H, b, 1]."""

    @abstractmethod
    def dual(
        self,
        w: Weights,
        kq: Tensor,
        target: Tensor,
        attn: Tensor,
        eta: Tensor,
        eta_last: Tensor,
        ln: LNParams,
        commit: bool,
    ) -> tuple[Tensor, Weights]:
        """Read g(q_i; W_i) for every position of the mini-batch, and optionally write it.

        ``kq`` is keys then queries along the token axis [B, H, 2b, d] (one matmul for both);
        ``eta`` the causal [B, H, b, b] matrix eta_ij = tok_i * lr_j (zero above the diagonal);
        ``attn`` = eta * (q k^T + 1), the first layer's dual-form kernel (the +1 is the bias).
        Returns the pre-LN read [B, H, b, d] and the new weights (``w`` itself if not commit).
        """


class LinearInner(InnerModel):
    """TTT-Linear: g(x) = x W + b, W [d, d]."""

    kind = "linear"
    names = ("W", "b")

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def init_weights(self, num_heads: int, std: float) -> Weights:
        d = self.head_dim
        return {"W": torch.randn(num_heads, d, d) * std, "b": torch.zeros(num_heads, 1, d)}

    def forward(self, w: Weights, x: Tensor) -> Tensor:
        return x @ w["W"] + w["b"]

    def write(self, w: Weights, k: Tensor, target: Tensor, eta_last: Tensor, ln: LNParams) -> Weights:
        g = ln_l2_grad(self.forward(w, k), target, ln)
        return {"W": w["W"] - _t(k * eta_last) @ g, "b": w["b"] - _t(eta_last) @ g}

    def dual(self, w, kq, target, attn, eta, eta_last, ln, commit):
        n = target.shape[-2]
        zz = kq @ w["W"] + w["b"]
        g = ln_l2_grad(zz[..., :n, :], target, ln)
        zq = zz[..., n:, :] - attn @ g
        if not commit:
            return zq, w
        k = kq[..., :n, :]
        return zq, {"W": w["W"] - _t(k * eta_last) @ g, "b": w["b"] - _t(eta_last) @ g}


class MLPInner(InnerModel):
    """TTT-MLP: g(x) = GELU(x W1 + b1) W2 + b2, hidden width = expansion * d."""

    kind = "mlp"
    names = ("W1", "b1", "W2", "b2")

    def __init__(self, head_dim: int, expansion: int = 4):
        self.head_dim = head_dim
        self.hidden = head_dim * expansion

    def init_weights(self, num_heads: int, std: float) -> Weights:
        d, m = self.head_dim, self.hidden
        return {
            "W1": torch.randn(num_heads, d, m) * std,
            "b1": torch.zeros(num_heads, 1, m),
            "W2": torch.randn(num_heads, m, d) * std,
            "b2": torch.zeros(num_heads, 1, d),
        }

    def forward(self, w: Weights, x: Tensor) -> Tensor:
        return gelu(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]

    def _grads(self, w: Weights, z1: Tensor, target: Tensor, ln: LNParams) -> tuple[Tensor, Tensor, Tensor]:
        x2 = gelu(z1)
        g2 = ln_l2_grad(x2 @ w["W2"] + w["b2"], target, ln)
        g1 = (g2 @ _t(w["W2"])) * gelu_grad(z1)
        return x2, g1, g2

    @staticmethod
    def _update(w: Weights, k: Tensor, x2: Tensor, g1: Tensor, g2: Tensor, eta_last: Tensor) -> Weights:
        et = _t(eta_last)
        return {
            "W1": w["W1"] - _t(k * eta_last) @ g1,
            "b1": w["b1"] - et @ g1,
            "W2": w["W2"] - _t(x2 * eta_last) @ g2,
            "b2": w["b2"] - et @ g2,
        }

    def write(self, w: Weights, k: Tensor, target: Tensor, eta_last: Tensor, ln: LNParams) -> Weights:
        x2, g1, g2 = self._grads(w, k @ w["W1"] + w["b1"], target, ln)
        return self._update(w, k, x2, g1, g2, eta_last)

    def dual(self, w, kq, target, attn, eta, eta_last, ln, commit):
        n = target.shape[-2]
        zz1 = kq @ w["W1"] + w["b1"]
        x2, g1, g2 = self._grads(w, zz1[..., :n, :], target, ln)
        xq2 = gelu(zz1[..., n:, :] - attn @ g1)
        zq = xq2 @ w["W2"] + w["b2"] - (eta * (xq2 @ _t(x2) + 1.0)) @ g2
        if not commit:
            return zq, w
        return zq, self._update(w, kq[..., :n, :], x2, g1, g2, eta_last)


def make_inner(kind: str, head_dim: int, mlp_expansion: int = 4) -> InnerModel:
    """The inner model named by ``ttt.inner``."""
    if kind == "linear":
        return LinearInner(head_dim)
    if kind == "mlp":
        return MLPInner(head_dim, mlp_expansion)
    raise ValueError(f"{config_key('inner')}={kind!r} must be 'linear' or 'mlp'")
