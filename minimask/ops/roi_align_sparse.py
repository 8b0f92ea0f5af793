"""RoIAlign as sparse matrix products: the fast form of `minimask.ops.roi_align` (same numbers, see there for the
definition).

Why it is written this way: RoIAlign computed sample by sample, as its definition reads (`roi_align_reference`), or
with a gather per sample, spends its time in small indexing operations and scatters its gradient with atomics; this
form is 8-30x faster than torchvision's compiled CPU kernel for forward + backward on 1,000 RoIs (BENCHMARKS.md,
"Ops"), and is checked against the definition in tests/test_roi_align.py.

How it is computed. The validity test and the bilinear weights factor into a y part and an x part, so a bin is
    out[k, c, ph, pw] = sum_r sum_s Ay[k, ph, r] * F[b_k, c, r, s] * Ax[k, pw, s] / count_k.
For each bin we list the map rows r with Ay != 0 and the columns s with Ax != 0 (two corners per sample when the grid
is fixed; in adaptive mode the samples are at most one pixel apart, so the window of rows a bin touches, about
grid+1 long, is shorter than 2*grid corners). The bin is then a weighted sum of Ly*Lx map pixels, i.e. one row of a
sparse matrix S (bins x pixels), and the whole op is `out = S @ F` with F as (N*H*W, C): `F.embedding_bag` in "sum"
mode with per-sample weights computes exactly that, reading each pixel's C channels contiguously. The backward is
`grad_F = S^T @ grad_out`: the entries are sorted by pixel and reduced with the same primitive, so there are no
atomics and no per-RoI copy of the feature map. RoIs are processed in chunks so the temporaries stay under
`_CHUNK_BYTES`; in adaptive mode RoIs are grouped by window size so that a chunk is padded only a little.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Upper bound for the temporaries of one chunk; ~32 bytes per (bin, pixel) entry while building (indices, weights,
# masks) and ~64 while sorting in the backward.
_CHUNK_BYTES = 256 * 2**20
# Padding entries a chunk may take on to absorb RoIs of a larger window rather than start a chunk of its own.
_MERGE_SLACK = 2**16


def roi_align_sparse(features: list[Tensor], rois: Tensor, levels: Tensor | None, scales: list[float],
                     output_size: tuple[int, int], sampling_ratio: int, aligned: bool) -> Tensor:
    """`roi_align` of each RoI on its own map, every map in one sparse product (`roi_align` and
    `minimask.ops.poolers.multiscale_roi_align` check the inputs).

    features: L maps (N_l, C, H_l, W_l) of one dtype and device; rois (K, 5) (batch_index, x1, y1, x2, y2) on their
    device, the batch index into the RoI's map; levels (K,) int64 index of each RoI's map (None: all on
    features[0]); scales: L spatial scales. Returns (K, C, oh, ow); differentiable w.r.t. every map.
    """
    if levels is None:
        levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return _RoIAlign.apply(rois, levels, tuple(float(s) for s in scales), tuple(output_size), int(sampling_ratio),
                           bool(aligned), *features)


class _RoIAlign(torch.autograd.Function):
    """out = S @ F (forward) and grad_F = S^T @ grad_out (backward), S built chunk by chunk; F is every map's pixels
    as rows of one table, so RoIs of all levels are pooled together."""

    @staticmethod
    def forward(ctx, rois, levels, scales, output_size, sampling_ratio, aligned, *features):
        c = features[0].shape[1]
        oh, ow = output_size
        k = rois.shape[0]
        dtype, device = features[0].dtype, features[0].device
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32  # compute / accumulate dtype
        shapes = [(f.shape[0], f.shape[2], f.shape[3]) for f in features]  # (N_l, H_l, W_l)
        rows = [n * h * w for n, h, w in shapes]
        # int32 entries halve the memory kept for backward and make its sort faster.
        idtype = torch.int32 if max(sum(rows) + 1, k * oh * ow) < 2**31 else torch.int64
        ctx.shapes, ctx.dtype, ctx.output_size, ctx.rows = [f.shape for f in features], dtype, output_size, rows
        ctx.chunks = []
        if k == 0 or c == 0 or sum(rows) == 0:
            return features[0].new_zeros((k, c, oh, ow))

        # Every map's pixels as rows of one (sum N*H_l*W_l + 1, C) table: each pixel's channels are contiguous, and
        # the extra last row is zero so entries with zero weight can point there and never read (possibly
        # non-finite) features.
        table = torch.empty((sum(rows) + 1, c), dtype=cdtype, device=device)  # (sum NHW + 1, C)
        table[-1] = 0
        for f, part in zip(features, table[:-1].split(rows)):
            part.view(f.shape[0], f.shape[2], f.shape[3], c).copy_(f.permute(0, 2, 3, 1))
        maps = _maps_of(rois.detach().to(cdtype), levels, scales, shapes, aligned)
        # RoIs without any sample inside the map (possible in adaptive mode) are never written: start from zeros.
        out = (torch.empty if sampling_ratio > 0 else torch.zeros)((k, c, oh * ow), dtype=dtype,
                                                                   device=device)  # (K, C, oh*ow)
        for roi_ids, idx, wts in _sampling_chunks(maps, output_size, sampling_ratio, sum(rows), idtype):
            pooled = F.embedding_bag(idx, table, mode="sum", per_sample_weights=wts)  # (R*oh*ow, C)
            out.index_copy_(0, roi_ids, pooled.view(-1, oh * ow, c).transpose(1, 2).to(dtype))
            if any(ctx.needs_input_grad[6:]):
                ctx.chunks.append((roi_ids, idx, wts))
        return out.view(k, c, oh, ow)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        oh, ow = ctx.output_size
        no_grads = (None,) * 6
        if not ctx.chunks:
            return *no_grads, *(torch.zeros(s, dtype=ctx.dtype, device=grad_output.device) for s in ctx.shapes)
        c = ctx.shapes[0][1]
        idtype, cdtype = ctx.chunks[0][1].dtype, ctx.chunks[0][2].dtype
        grad_rows = grad_output.permute(0, 2, 3, 1).reshape(-1, c).to(cdtype)  # (K*oh*ow, C), one row per bin
        bins_per_roi = oh * ow
        grad_table = None
        for group in _batches(ctx.chunks, max(1, _CHUNK_BYTES // 64)):
            # The entries of these chunks as (pixel, bin, weight) triples.
            pixel = torch.cat([idx.reshape(-1) for _, idx, _ in group])  # (E,)
            weight = torch.cat([wts.reshape(-1) for _, _, wts in group])  # (E,)
            bins = torch.cat([
                (roi_ids[:, None] * bins_per_roi + torch.arange(bins_per_roi, device=roi_ids.device))
                .to(idtype).reshape(-1).repeat_interleave(idx.shape[1]) for roi_ids, idx, _ in group])  # (E,)
            # S^T @ grad_out without atomics: sort the entries by pixel; each pixel is then one weighted bag of bins.
            pixel, order = torch.sort(pixel)
            counts = torch.zeros(sum(ctx.rows) + 1, dtype=torch.int64, device=pixel.device)
            counts.index_add_(0, pixel.long(), torch.ones_like(pixel, dtype=torch.int64))  # (rows + 1,), no sync
            offsets = (counts.cumsum(0) - counts).to(idtype)
            part = F.embedding_bag(bins[order], grad_rows, offsets, mode="sum",
                                   per_sample_weights=weight[order])  # (rows + 1, C)
            grad_table = part if grad_table is None else grad_table.add_(part)
        grads = [part.view(s[0], s[2], s[3], c).permute(0, 3, 1, 2).to(ctx.dtype, memory_format=torch.contiguous_format)
                 for part, s in zip(grad_table[:-1].split(ctx.rows), ctx.shapes)]  # each (N_l, C, H_l, W_l)
        return *no_grads, *grads


def _batches(chunks, max_entries):
    """Split the list of chunks into consecutive runs of at most `max_entries` entries (at least one chunk each)."""
    runs, size = [[]], 0
    for chunk in chunks:
        if runs[-1] and size + chunk[1].numel() > max_entries:
            runs.append([])
            size = 0
        runs[-1].append(chunk)
        size += chunk[1].numel()
    return runs


def _maps_of(rois: Tensor, levels: Tensor, scales, shapes: list[tuple[int, int, int]], aligned: bool) -> dict:
    """Each RoI's geometry on its own map, as (K,) tensors: its box in that map's cells (x0, y0, width, height), the
    map's height and width, and its first row in the table (that map's offset + the image's). `shapes`: the maps'
    (N_l, H_l, W_l)."""
    first_rows = [sum(n * h * w for n, h, w in shapes[:level]) for level in range(len(shapes))]
    per_level = torch.tensor([(n, h, w, first) for (n, h, w), first in zip(shapes, first_rows)], device=rois.device)
    n, map_h, map_w, first_row = per_level[levels].unbind(dim=1)  # (K,) each
    scale = torch.tensor(scales, dtype=rois.dtype, device=rois.device)[levels]  # (K,)
    batch = torch.min(rois[:, 0].long().clamp(min=0), n - 1)  # (K,)
    offset = 0.5 if aligned else 0.0  # detectron2 ROIAlignV2: pixel centres at +0.5
    x0 = rois[:, 1] * scale - offset  # (K,)
    y0 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x0
    roi_h = rois[:, 4] * scale - offset - y0
    if not aligned:  # original RoIAlign: force malformed boxes to be at least 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    return dict(x0=x0, y0=y0, roi_w=roi_w, roi_h=roi_h, map_h=map_h, map_w=map_w,
                max_size=max(max(h, w) for _, h, w in shapes), base=first_row + batch * map_h * map_w)


def _sampling_chunks(maps: dict, output_size, sampling_ratio, dummy: int, idtype):
    """Yield (roi_ids (R,), idx (R*oh*ow, Ly*Lx), weights (R*oh*ow, Ly*Lx)) for chunks of RoIs.

    Row j of a chunk is bin (roi_ids[j // (oh*ow)], ph, pw) in row-major order; its entries are rows of the table
    (dtype `idtype`; `dummy` is its zero row) and weights whose weighted sum is that bin's output (1/count included).
    """
    oh, ow = output_size
    x0, y0, roi_w, roi_h, map_h, map_w = (maps[key] for key in ("x0", "y0", "roi_w", "roi_h", "map_h", "map_w"))
    k = x0.shape[0]
    bin_w, bin_h = roi_w / ow, roi_h / oh  # (K,)
    max_entries = max(1, _CHUNK_BYTES // 32)

    def combine(ids, ry, wy, rx, wx):
        return ids, *_combine(maps["base"][ids], map_w[ids], ry, wy, rx, wx, dummy, idtype)

    # Both axes at once: rows 0..K-1 of these are the RoIs' y axis, rows K..2K-1 their x axis, with max(oh, ow) bins
    # each (the shorter axis's extra bins are cut off again).
    start, bin_size, size = torch.cat([y0, x0]), torch.cat([bin_h, bin_w]), torch.cat([map_h, map_w])  # (2K,)
    pooled = max(oh, ow)
    if sampling_ratio > 0:
        # Fixed grid: two corner rows per sample, 2*sr entries per axis for every RoI; static shapes, no sync.
        count = float(sampling_ratio * sampling_ratio)
        per_roi = oh * ow * (2 * sampling_ratio) ** 2
        rows, weights = _corner_taps(start, bin_size, sampling_ratio, pooled, size)  # (2K, P, 2sr)
        ry, wy, rx, wx = rows[:k, :oh], weights[:k, :oh] / count, rows[k:, :ow], weights[k:, :ow]
        for ids in torch.arange(k, device=x0.device).split(max(1, max_entries // per_roi)):
            yield combine(ids, ry[ids], wy[ids], rx[ids], wx[ids])
        return

    # Adaptive grid: ceil(roi_size / output_size) samples per bin and axis; <= 0 (empty or NaN box) means none.
    grid_h = torch.where(torch.isfinite(roi_h), torch.ceil(roi_h / oh), 0.0).clamp(min=0).long()  # (K,)
    grid_w = torch.where(torch.isfinite(roi_w), torch.ceil(roi_w / ow), 0.0).clamp(min=0).long()
    count = (grid_h * grid_w).clamp(min=1).to(x0.dtype)  # (K,)
    grid = torch.cat([grid_h, grid_w])  # (2K,)
    rows, weights = _window_taps(start, bin_size, grid, int(grid.max()), pooled, size, maps["max_size"])  # host sync
    ry, wy, rx, wx = rows[:k, :oh], weights[:k, :oh] / count[:, None, None], rows[k:, :ow], weights[k:, :ow]
    # Chunks of RoIs of similar window size, so that small RoIs are not padded to the largest one's window (padding
    # all to it costs 10 % more time per training step of the CPU demo): the second host sync.
    slot = torch.arange(1, weights.shape[2] + 1, device=x0.device)  # (S,)
    len_y, len_x = torch.stack([((wy != 0) * slot).amax(dim=(1, 2)), ((wx != 0) * slot).amax(dim=(1, 2))]).cpu()
    for ids, ly, lx in _plan_chunks(len_y, len_x, oh * ow, max_entries):
        ids = ids.to(x0.device)
        yield combine(ids, ry[ids, :, :ly], wy[ids, :, :ly], rx[ids, :, :lx], wx[ids, :, :lx])


def _samples(start: Tensor, bin_size: Tensor, grid, slots: int, pooled: int, size: Tensor):
    """Bilinear taps of the samples along one axis for R RoIs: `grid` samples (an int, or (R,) per RoI) in each of
    `pooled` bins, laid out in `slots` >= grid slots, on maps of `size` (R,) cells along that axis.

    Returns low, high (R, P, slots) int64 in [0, size-1], their weights (R, P, slots) and the validity mask.
    """
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)[:, None]  # (P, 1)
    i = torch.arange(slots, device=start.device, dtype=start.dtype)  # (G,)
    if isinstance(grid, Tensor):
        grid = grid.to(start.dtype)[:, None, None]  # (R, 1, 1)
    start, bin_size, size = start[:, None, None], bin_size[:, None, None], size[:, None, None]  # (R, 1, 1)
    # Same expression and evaluation order as the reference kernel, so the floors agree bit for bit.
    pos = start + p * bin_size + (i + 0.5) * bin_size / grid  # (R, P, G)
    valid = (pos >= -1.0) & (pos <= size) & (i < grid)  # kernel: y < -1 or y > H contributes 0; NaN never valid
    pos = torch.where(valid, pos, 0.0).clamp(min=0.0)  # kernel: y <= 0 -> 0
    low = pos.floor()
    at_edge = low >= size - 1  # kernel: y_low >= H-1 -> y_low = y_high = H-1, y = y_low
    low = low.clamp(max=size - 1)
    frac = torch.where(at_edge, 0.0, pos - low)
    low = low.long()
    high = torch.where(at_edge, low, low + 1)
    return low, high, (1.0 - frac) * valid, frac * valid, valid


def _corner_taps(start, bin_size, grid: int, pooled: int, size: Tensor):
    """Per-axis taps for a fixed grid: (R, P, 2*grid) rows and weights, the low and high corner of each sample."""
    low, high, w_low, w_high, _ = _samples(start, bin_size, grid, grid, pooled, size)
    r, p = low.shape[:2]
    return torch.stack([low, high], -1).view(r, p, -1), torch.stack([w_low, w_high], -1).view(r, p, -1)


def _window_taps(start, bin_size, grid: Tensor, gmax: int, pooled: int, size: Tensor, max_size: int):
    """Per-axis taps for an adaptive grid, merged into the window of consecutive rows each bin touches.

    Samples are bin/ceil(bin) <= 1 apart, so a bin's taps lie in rows [r0, r0 + grid + 1] (one extra row of slack
    for rounding), and never beyond the map (`size` (K,) cells; `max_size` the largest map's, `gmax` the largest
    grid). Returns rows and weights (K, P, S) with S = min(gmax + 2, max_size).
    """
    k = start.shape[0]
    slots = min(gmax + 2, max_size)
    rows, weights = [], []
    # The (R, P, gmax) sample temporaries take ~64 bytes per sample; bound them for very large boxes.
    for ids in torch.arange(k, device=start.device).split(max(1, _CHUNK_BYTES // (64 * pooled * max(gmax, 1)))):
        low, high, w_low, w_high, valid = _samples(start[ids], bin_size[ids], grid[ids], max(gmax, 1), pooled,
                                                   size[ids])
        last_row = (size[ids] - 1)[:, None, None]  # (R, 1, 1)
        r0 = torch.min(torch.where(valid, low, last_row + 1).amin(-1, keepdim=True), last_row)  # (R, P, 1) first row
        w = torch.zeros(low.shape[:2] + (slots,), dtype=w_low.dtype, device=low.device)  # (R, P, S)
        w.scatter_add_(2, (low - r0).clamp(0, slots - 1), w_low)
        w.scatter_add_(2, (high - r0).clamp(0, slots - 1), w_high)
        rows.append(torch.min(r0 + torch.arange(slots, device=low.device), last_row))  # (R, P, S)
        weights.append(w)
    return torch.cat(rows), torch.cat(weights)


def _plan_chunks(len_y: Tensor, len_x: Tensor, bins_per_roi: int, max_entries: int):
    """Group RoIs (host side) into chunks of similar window size: yields (roi_ids, Ly, Lx).

    RoIs are sorted by (Ly, Lx); consecutive ones are merged while padding them to the chunk's largest window costs
    at most 25% extra entries or at most `_MERGE_SLACK` entries (a chunk costs a dozen small operations: a few
    large RoIs should not each make one), and a chunk is split so it has at most `max_entries` entries.
    """
    ids = torch.nonzero((len_y > 0) & (len_x > 0)).squeeze(1)  # RoIs with no sample in the map stay zero
    if len(ids) == 0:
        return
    ids = ids[torch.argsort(len_y[ids] * (int(len_x.max()) + 1) + len_x[ids], stable=True)]
    ly_sorted, lx_sorted = len_y[ids].tolist(), len_x[ids].tolist()

    def flush(lo, hi, ly, lx):
        per_roi = bins_per_roi * ly * lx
        for part in ids[lo:hi].split(max(1, max_entries // per_roi)):
            yield part, ly, lx

    lo, max_y, max_x, exact = 0, 0, 0, 0
    for j, (ly, lx) in enumerate(zip(ly_sorted, lx_sorted)):
        new_y, new_x = max(max_y, ly), max(max_x, lx)
        padded, needed = (j + 1 - lo) * new_y * new_x, exact + ly * lx
        if j > lo and padded > 1.25 * needed and (padded - needed) * bins_per_roi > _MERGE_SLACK:
            yield from flush(lo, j, max_y, max_x)
            lo, new_y, new_x, exact = j, ly, lx, 0
        max_y, max_x, exact = new_y, new_x, exact + ly * lx
    yield from flush(lo, len(ids), max_y, max_x)


def _combine(base, map_w, ry, wy, rx, wx, dummy: int, idtype):
    """Outer product of the y and x taps of every bin: (R*oh*ow, Ly*Lx) table rows and weights. `base` (R,) is each
    RoI's first table row (its map's and image's), `map_w` (R,) the width of its map.

    Entries with zero weight point at the zero row `dummy`, so they read nothing from the maps.
    """
    r, oh, ly = ry.shape
    ow, lx = rx.shape[1], rx.shape[2]
    base, map_w = base[:, None, None, None, None], map_w[:, None, None, None, None]  # (R, 1, 1, 1, 1)
    idx = base + ry[:, :, None, :, None] * map_w + rx[:, None, :, None, :]  # (R, oh, ow, Ly, Lx)
    wts = wy[:, :, None, :, None] * wx[:, None, :, None, :]  # (R, oh, ow, Ly, Lx)
    idx = torch.where(wts != 0, idx, dummy).to(idtype)
    return idx.view(r * oh * ow, ly * lx), wts.view(r * oh * ow, ly * lx)
