"""Independent NumPy float64 references for the kernels: the yardstick, never the product.

Written from the definitions, not from the kernels' algorithms: the conv sums one kernel tap at
a time over a zero-padded input with strided slices (no im2col, no GEMM tiling), so a bug in the
kernels cannot hide in a shared formulation. Inputs are converted to float64; results are
float64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

Pair = Tuple[int, int]


def sq_error_loss(x, t, v=None, count_factor: float = 1.0) -> Tuple[float, float]:
    """(loss, count): loss = sum(((x - t) v)^2) / (count * count_factor), 0 when count == 0."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    d = x - t
    if v is None:
        count = float(d.size)
    else:
        v = np.asarray(v, np.float64)
        d = d * v
        count = float(v.sum())
    total = float((d * d).sum())
    return (total / (count * count_factor) if count != 0 else 0.0), count


def sq_error_loss_grad(x, t, v=None, count_factor: float = 1.0, grad_loss: float = 1.0):
    """(gx, gt) of sq_error_loss, the exact derivative: 2 g (x - t) v^2 / (count * factor)."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    weight = np.ones_like(x) if v is None else np.asarray(v, np.float64) ** 2
    count = float(x.size) if v is None else float(np.asarray(v, np.float64).sum())
    if count == 0:
        gx = np.zeros_like(x)
    else:
        gx = 2.0 * grad_loss * (x - t) * weight / (count * count_factor)
    return gx, -gx


def _taps(shape_hw: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair):
    """Yields (r, q, rows, cols): the padded-input slices that kernel tap (r, q) reads."""
    (h, w), (kh, kw) = shape_hw, kernel
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    for r in range(kh):
        rows = slice(r * dilation[0], r * dilation[0] + stride[0] * (out_h - 1) + 1, stride[0])
        for q in range(kw):
            cols = slice(q * dilation[1], q * dilation[1] + stride[1] * (out_w - 1) + 1,
                         stride[1])
            yield r, q, rows, cols


def _pad(x, padding: Pair):
    return np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])))


def conv2d(x, w, b=None, stride: Pair = (1, 1), padding: Pair = (0, 0),
           dilation: Pair = (1, 1)):
    """NCHW cross-correlation, weight (Cout, Cin, kh, kw), in float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    xp = _pad(x, padding)
    y = None
    for r, q, rows, cols in _taps(x.shape[2:], w.shape[2:], stride, padding, dilation):
        term = np.einsum("bchw,oc->bohw", xp[:, :, rows, cols], w[:, :, r, q])
        y = term if y is None else y + term
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv2d_grads(x, w, gy, stride: Pair = (1, 1), padding: Pair = (0, 0),
                 dilation: Pair = (1, 1)):
    """(gx, gw, gb) of conv2d for upstream gradient gy, in float64."""
    x, w, gy = (np.asarray(a, np.float64) for a in (x, w, gy))
    xp = _pad(x, padding)
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    for r, q, rows, cols in _taps(x.shape[2:], w.shape[2:], stride, padding, dilation):
        gxp[:, :, rows, cols] += np.einsum("bohw,oc->bchw", gy, w[:, :, r, q])
        gw[:, :, r, q] = np.einsum("bohw,bchw->oc", gy, xp[:, :, rows, cols])
    h, wd = x.shape[2:]
    gx = gxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd]
    return gx, gw, gy.sum(axis=(0, 2, 3))


def conv2d_error_bound(x, w, b=None, gy: Optional[np.ndarray] = None, stride: Pair = (1, 1),
                       padding: Pair = (0, 0), dilation: Pair = (1, 1), eps: float = 2.0 ** -23):
    """Elementwise bounds on the rounding error of a float computation of conv2d and its grads.

    A sum of n products in precision eps is off by at most about n * eps * sum|terms|; the
    bounds are that with the absolute values, i.e. the same reference run on |x|, |w|, |gy|.
    Used to compare float32 kernels with a tolerance that is tight and still cannot fail on
    honest rounding: (y_bound, gx_bound, gw_bound), the last two None without gy. The default
    eps is twice float32's unit roundoff, a margin for the order-dependent constant.
    """
    ax, aw = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(w, np.float64))
    taps = w.shape[1] * w.shape[2] * w.shape[3]
    ab = None if b is None else np.abs(np.asarray(b, np.float64))
    y_bound = conv2d(ax, aw, ab, stride, padding, dilation) * (taps + 2) * eps
    if gy is None:
        return y_bound, None, None
    agy = np.abs(np.asarray(gy, np.float64))
    gx_abs, gw_abs, _ = conv2d_grads(ax, aw, agy, stride, padding, dilation)
    terms_gx = w.shape[0] * w.shape[2] * w.shape[3]
    terms_gw = gy.shape[0] * gy.shape[2] * gy.shape[3]
    return y_bound, gx_abs * (terms_gx + 2) * eps, gw_abs * (terms_gw + 2) * eps
