"""The grouped-attention kernels of KLA: softmax(q k^T * scale + bias) v per chunk, and its log-sum-exp.

Every kernel takes q `[X, h, L, d]`, k and v `[X, h, S, d]` (X = sequences x chunks, L = k*P query pixels,
S = k*P key pixels, or 2k*P with look-back), the in-patch bias `[h, P, P]` (the same P x P table for every
pair of patches) and optionally a patch-pair bias `[X, h, L/P, S/P]` (the duplicate-key correction, see
`lsh.duplicate_log_counts`); each returns the output `[X, h, L, d]` and, when asked, the log-sum-exp
`[X, h, L]` in float32 by which the rounds are merged.

- "reference": einsum, bias add, logsumexp, softmax, einsum, differentiated by autograd. The ground truth.
- "explicit": the same computation with a hand-written backward (`ExplicitAttention`): the logits are
  formed once in float32, the bias added in place by broadcasting, the probabilities are the only large
  tensor kept for backward, and the gradient of the lse (the round merge's) folds into the one softmax
  backward. Faster than "reference" and "sdpa" forward+backward on CPU (KLA b=2 at 256^2:
  142.7 ms against 175.3 and 213.7, benchmarks/RESULTS.md), exact in every precision (fp16/bf16 inputs are
  upcast; the lse comes from float32 logits). The CPU default.
  On CPU it works through the chunks in blocks of about 1 MB of logits (`CPU_BLOCK_BYTES`), so logits,
  softmax and products stay in cache; without autograd it keeps no probabilities at all.
- "sdpa": one fused `F.scaled_dot_product_attention` per call, with the bias folded into q and k and a
  "sink" key to recover the lse (see `sdpa_attention`). Exact in fp32 and bf16 (to bf16 rounding), but in
  fp16 the sink's share underflows on peaked logits and the merge silently keeps one round: refused by
  `check_precision`. It cannot add a patch-pair bias.

CUDA launches a grid of at most 65,535 blocks in its y and z dimensions; `run_in_slices` cuts every call
along X so no launch's batch exceeds that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kitdist.model.lsh import no_autocast

MAX_LAUNCH_BATCH = 65_535  # CUDA's grid limit in y and z (pytorch#146704, #142228)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    need_lse: bool,
    pair_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias [+ pair_bias]) v and its log-sum-exp, all through autograd."""
    queries, keys, pixels = q.shape[-2], k.shape[-2], bias.shape[-1]
    full_bias = bias.repeat(1, queries // pixels, keys // pixels)  # [h, L, S]: same table for every pair
    logits = torch.einsum("xhld,xhsd->xhls", q, k) * scale + full_bias
    if pair_bias is not None:
        logits = logits + pair_bias.repeat_interleave(pixels, -1).repeat_interleave(pixels, -2)
    lse = torch.logsumexp(logits, dim=-1)  # [X, h, L]
    probs = torch.exp(logits - lse.unsqueeze(-1))
    lse = lse.to(torch.promote_types(lse.dtype, torch.float32))  # float32, or float64 when given float64
    return torch.einsum("xhls,xhsd->xhld", probs, v), (lse if need_lse else None)


class ExplicitAttention(torch.autograd.Function):
    """Chunk attention with explicit float32 logits and a hand-written backward (see the module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, pair_bias):  # noqa: D102 (documented on the class)
        out, lse, probs = _explicit_forward(q, k, v, bias, scale, pair_bias, keep_probs=True)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale, ctx.pixels = scale, bias.shape[-1]
        return out.to(v.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # noqa: D102
        q, k, v, probs, out = ctx.saved_tensors
        batch, heads, queries, _ = q.shape
        keys, pixels = k.shape[-2], ctx.pixels
        grad_out = grad_out.float()
        grad_q, grad_k, grad_v = (
            torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v)
        )
        need_bias = ctx.needs_input_grad[3]
        per_pair = q.new_zeros(heads * queries * keys, dtype=torch.float32) if need_bias else None
        for block in _blocks(batch, heads * queries * keys, q.device):
            probs_b, grad_out_b, v_b = probs[block], grad_out[block], v[block].float()
            torch.matmul(probs_b.transpose(-1, -2), grad_out_b, out=grad_v[block])
            # d logits = p * (dp - <dout, out> + dlse): the softmax backward and the lse's in one pass
            row_term = (grad_out_b * out[block]).sum(-1)
            if grad_lse is not None:
                row_term = row_term - grad_lse[block]
            grad_logits = torch.matmul(grad_out_b, v_b.transpose(-1, -2)).sub_(row_term.unsqueeze(-1))
            grad_logits.mul_(probs_b)
            if need_bias:  # sum over chunks first: a contiguous reduction, then the small tiles
                per_pair += grad_logits.view(grad_logits.shape[0], -1).sum(0)
            torch.matmul(grad_logits, k[block].float(), out=grad_q[block])
            torch.matmul(grad_logits.transpose(-1, -2), q[block].float(), out=grad_k[block])
        grad_q.mul_(ctx.scale)
        grad_k.mul_(ctx.scale)
        grad_bias = None
        if need_bias:
            grad_bias = per_pair.view(heads, queries // pixels, pixels, keys // pixels, pixels).sum(
                dim=(1, 3)
            )
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_bias, None, None


# On CPU the kernel works through the chunks in blocks whose logits take about this many bytes, so that
# logits, softmax and the products stay in the core's cache instead of streaming a tensor of hundreds of
# MB through memory several times (KiT at 1024x1024: 256 MB of logits per round). On CUDA one block: a
# launch per block would cost more than it saves.
CPU_BLOCK_BYTES = 1 << 20


def _blocks(count: int, elements_per_item: int, device: torch.device) -> list[slice]:
    """Slices of `count` items (chunks) with about CPU_BLOCK_BYTES of float32 logits each; one on CUDA."""
    if device.type != "cpu":
        return [slice(0, count)]
    size = max(1, CPU_BLOCK_BYTES // (4 * elements_per_item))
    return [slice(start, start + size) for start in range(0, count, size)]


def _explicit_forward(q, k, v, bias, scale, pair_bias, keep_probs: bool):
    """out and lse (float32) of the chunks, and, with keep_probs, the probabilities for backward."""
    batch, heads, queries, _ = q.shape
    keys, pixels = k.shape[-2], bias.shape[-1]
    out = torch.empty((batch, heads, queries, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, queries), dtype=torch.float32, device=q.device)
    probs = (
        torch.empty((batch, heads, queries, keys), dtype=torch.float32, device=q.device)
        if keep_probs
        else None
    )
    tile_bias = bias.float().view(1, heads, 1, pixels, 1, pixels)
    for block in _blocks(batch, heads * queries * keys, q.device):
        q_b = q[block].float() * scale
        logits = torch.matmul(
            q_b, k[block].float().transpose(-1, -2), out=probs[block] if keep_probs else None
        )
        tiles = logits.view(-1, heads, queries // pixels, pixels, keys // pixels, pixels)
        tiles.add_(tile_bias)
        if pair_bias is not None:
            tiles.add_(pair_bias[block].float().view(-1, heads, queries // pixels, 1, keys // pixels, 1))
        # log_softmax is one fused pass (logsumexp is several); lse = x_0 - log p_0 needs no exp
        log_probs = torch.log_softmax(logits, dim=-1)
        torch.sub(logits[..., 0], log_probs[..., 0], out=lse[block])
        block_probs = torch.exp(log_probs, out=logits)
        torch.matmul(block_probs, v[block].float(), out=out[block])
    return out, lse, probs


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    need_lse: bool,
    pair_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ExplicitAttention` with the kernel signature; autocast is off inside (it upcasts itself). Without
    autograd (evaluation, inference) the probabilities are never kept whole."""
    with no_autocast(q.device.type):
        tracked = (q, k, v, bias) if pair_bias is None else (q, k, v, bias, pair_bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
            out, lse = ExplicitAttention.apply(q, k, v, bias, scale, pair_bias)
        else:
            out, lse, _ = _explicit_forward(q, k, v, bias, scale, pair_bias, keep_probs=False)
            out = out.to(v.dtype)
    return out, (lse if need_lse else None)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    need_lse: bool,
    pair_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same function through one fused `scaled_dot_product_attention` call (no mask: a mask that needs
    a gradient sends PyTorch back to the unfused math path).

    Bias: q gets its pixel's row of the P x P table (divided by scale), k a one-hot of its pixel, so
    scale * q'.k' = scale * q.k + bias. Log-sum-exp: one extra "sink" key, the mean of the chunk's keys,
    whose logit s0 = scale * q.mean(k) lies below the lse (Jensen) but not far below; v gets two extra
    channels, 1 on real keys and 1 on the sink, so the fused output carries Z / (Z + e^s0) and
    e^s0 / (Z + e^s0), and lse = s0 + log of their ratio. The identity holds for any sink key, so values and
    gradients are exact, as long as the sink's share does not underflow (it does in fp16).
    """
    if pair_bias is not None:
        raise ValueError("KLA: the 'sdpa' kernel cannot add a patch-pair bias (model.duplicate_keys='once')")
    batch_heads, head_dim, pixels = q.shape[:2], q.shape[-1], bias.shape[-1]
    queries, keys = q.shape[-2], k.shape[-2]
    width = _kernel_width(head_dim + pixels, q.device)
    q_bias = (bias / scale).to(q.dtype).repeat(1, queries // pixels, 1)  # [h, L, P]: the query's bias row
    k_onehot = torch.eye(pixels, dtype=q.dtype, device=q.device).repeat(keys // pixels, 1)  # [S, P]
    q_aug = _concat_last([q, q_bias.expand(*batch_heads, -1, -1)], width)
    k_aug = _concat_last([k, k_onehot.expand(*batch_heads, -1, -1)], width)
    if not need_lse:
        out = F.scaled_dot_product_attention(q_aug, k_aug, _concat_last([v], width), scale=scale)
        return out[..., :head_dim], None
    mean_key = k.mean(dim=-2, keepdim=True)  # [X, h, 1, d]: the sink key
    sink_logit = (q @ mean_key.transpose(-1, -2)).squeeze(-1).float() * scale  # [X, h, L]
    k_aug = torch.cat([k_aug, _concat_last([mean_key], width)], dim=-2)
    ones = v.new_ones(()).expand(*v.shape[:-1], 1)
    sink_row = torch.zeros(width, dtype=v.dtype, device=v.device)
    sink_row[head_dim + 1] = 1.0
    v_aug = torch.cat([_concat_last([v, ones], width), sink_row.expand(*batch_heads, 1, -1)], dim=-2)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=scale)
    tiny = torch.finfo(torch.float32).tiny
    real_share = out[..., head_dim].float().clamp(min=tiny)  # Z / (Z + e^s0)
    sink_share = out[..., head_dim + 1].float().clamp(min=tiny)  # e^s0 / (Z + e^s0)
    lse = sink_logit + torch.log(real_share) - torch.log(sink_share)
    return out[..., :head_dim] / real_share.unsqueeze(-1).to(out.dtype), lse


def _kernel_width(width: int, device: torch.device) -> int:
    """One head size for q, k and v: fused kernels (CPU flash included) need them equal, else PyTorch
    falls back to the unfused math path; CUDA kernels also want a multiple of 8."""
    return -(-width // 8) * 8 if device.type == "cuda" else width


def _concat_last(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenates along the last dim and zero-fills up to `width`, in one copy."""
    used = sum(part.shape[-1] for part in parts)
    if used < width:
        parts = [*parts, parts[0].new_zeros(()).expand(*parts[0].shape[:-1], width - used)]
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


CHUNK_KERNELS = {"reference": reference_attention, "explicit": explicit_attention, "sdpa": sdpa_attention}


def run_in_slices(kernel, q, k, v, bias, scale, need_lse, pair_bias=None, max_batch=MAX_LAUNCH_BATCH):
    """`kernel` over slices of at most `max_batch` along X, concatenated: no launch exceeds the grid limit."""
    if q.shape[0] <= max_batch:
        return kernel(q, k, v, bias, scale, need_lse, pair_bias)
    outs, lses = [], []
    for start in range(0, q.shape[0], max_batch):
        part = slice(start, start + max_batch)
        pair = None if pair_bias is None else pair_bias[part]
        out, lse = kernel(q[part], k[part], v[part], bias, scale, need_lse, pair)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), (torch.cat(lses) if need_lse else None)


def check_precision(precision: str, attention_impl: str, hash_rounds: int | None) -> str | None:
    """Why this precision cannot run this attention exactly, or None. Called by the run config's
    validation on the driver, before any worker starts. Only the sink-based "sdpa" kernel loses the round
    merge in fp16; with one round it needs no lse and is exact. `hash_rounds` None means the size's own
    (2 in every named size)."""
    rounds = 2 if hash_rounds is None else hash_rounds
    if precision == "fp16" and attention_impl == "sdpa" and rounds > 1:
        return (
            f"train.precision=fp16 with model.hash_rounds={rounds} and model.attention_impl=sdpa: the sdpa "
            "kernel's log-sum-exp underflows in fp16 and the round merge silently keeps one round; use "
            "train.precision=bf16, model.hash_rounds=1, or model.attention_impl=auto"
        )
    return None


def check_placement(attention_impl: str, use_gpu: bool) -> str | None:
    """Why this kernel cannot train where the run is placed, or None: Flex has no CPU backward."""
    if attention_impl == "flex" and not use_gpu:
        return (
            "model.attention_impl=flex needs CUDA (FlexAttention has no CPU backward) but dist.use_gpu is "
            "false; use model.attention_impl=auto (the explicit kernel on CPU)"
        )
    return None
