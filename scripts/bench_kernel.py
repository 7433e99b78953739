"""One layer's decode attention at a real model's shape: bf16 SDPA over the full store against
the segment kernel over FP8 / int4 / int2 stores, and today's path (dequantize, then SDPA).

    python scripts/bench_kernel.py --batch 1,8 --slots 32768 [--sweep] [--check]

Random keys and values are quantized by the project's own quantizers (FP8 per token, KIVI,
AKV's per-token int4); a quantized store keeps its last `--residual` slots at full precision,
as `quant` and `kivi` do. Each call is timed eagerly (Python launches included) and replayed
from a CUDA graph (device time only); GB/s counts every byte the call must read (codes, scales,
zero points, positions) once, against a device-to-device copy measured in the same process.
`--check` compares each kernel with the torch reference on the same data first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from arkv_bench.cache.akv import make_tier
from arkv_bench.cache.kernels import decode_attention, fp8, original, packed_int
from arkv_bench.cache.kernels import triton_decode
from arkv_bench.cache.kivi import KiviLayer
from arkv_bench.cache.quantize import fp8_quantize

HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def segment_bytes(segments) -> int:
    return sum(nbytes(s.pos, *(getattr(c, f) for c in (s.keys, s.values) for f in ("data", "scale", "zero")))
               for s in segments)


def stores(batch: int, slots: int, residual: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Full keys/values and each format's segments over the same tokens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(batch, HKV, slots, D, device="cuda", generator=g).bfloat16()
    values = torch.randn(batch, HKV, slots, D, device="cuda", generator=g).bfloat16()
    pos = torch.arange(slots, device="cuda", dtype=torch.int32).expand(batch, HKV, slots).contiguous()
    old, new = slice(0, slots - residual), slice(slots - residual, slots)
    tail = original(keys[:, :, new], values[:, :, new], pos[..., new])
    (kq, ks), (vq, vs) = fp8_quantize(keys[:, :, old]), fp8_quantize(values[:, :, old])
    made = {"bf16": [original(keys, values, pos)], "fp8": [fp8(kq, ks, vq, vs, pos[..., old]), tail]}
    for bits in (4, 2):
        kivi = KiviLayer(0, bits=bits, group_size=32)._quantize(keys[:, :, old], values[:, :, old])
        made[f"kivi{bits}"] = [packed_int(kivi, pos[..., old], bits), tail]
    made["akv4"] = [packed_int(make_tier(keys[:, :, old], values[:, :, old], 4, 32), pos[..., old], 4), tail]
    return keys, values, made


def timed(fn, iters: int) -> tuple[float, float]:
    """(eager us per call, CUDA-graph us per call)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / iters * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return eager, start.elapsed_time(end) / iters * 1e3


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint16, device="cuda")
    dst = torch.empty_like(src)
    _, us = timed(lambda: dst.copy_(src), 20)
    return 2 * nbytes(src) / us / 1e3


def today(segments):
    """What the caches do now: a full-precision copy of the quantized part, then SDPA."""
    head, tail = segments
    def run(q):
        k = torch.cat([head.keys.dequantize(torch.bfloat16), tail.keys.data], dim=2)
        v = torch.cat([head.values.dequantize(torch.bfloat16), tail.values.data], dim=2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--slots", type=int, default=32768)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--skip-today", action="store_true", help="do not time today's path (dequantize, then SDPA)")
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes, warps, stages and waves")
    parser.add_argument("--tiles", default="64/1/3/1,64/1/3/0,32/1/3/1,32/1/3/0",
                        help="--sweep: slots a tile / warps / pipeline stages / transposed (0 or 1), comma-separated")
    parser.add_argument("--json", default=None, help="append every row to this JSON-lines file")
    args = parser.parse_args()
    scaling = D ** -0.5
    hbm = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {hbm:.0f} GB/s", flush=True)
    def report(row: dict) -> None:
        gbs = row["bytes"] / row["graph_us"] / 1e3
        print(f"b{row['batch']:<2} {row['what']:<34} {row['bytes'] / 2**20:8.1f} MiB  eager {row['eager_us']:8.1f} us"
              f"  graph {row['graph_us']:8.1f} us  {gbs:6.0f} GB/s ({gbs / hbm:4.0%} of copy)", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "gb_s": gbs, "copy_gb_s": hbm, "device": torch.cuda.get_device_name()}) + "\n")

    for batch in (int(b) for b in args.batch.split(",")):
        keys, values, made = stores(batch, args.slots, args.residual)
        q = torch.randn(batch, HQ, 1, D, device="cuda").bfloat16()
        start = torch.zeros(batch, dtype=torch.int32, device="cuda")
        eager, graph = timed(lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True), args.iters)
        report({"batch": batch, "what": "SDPA bf16 (full store)", "bytes": nbytes(keys, values),
                "eager_us": eager, "graph_us": graph})
        for fmt, segments in made.items():
            try:
                measure_format(fmt, segments, q, start, scaling, args, batch, report)
            except Exception as e:  # one format's failure must not hide the others' figures
                print(f"b{batch} {fmt}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
        if args.sweep:
            tiles = [tuple(int(x) for x in t.split("/")) for t in args.tiles.split(",")]
            sweep(batch, made, q, start, scaling, args.iters, report, tiles)
        del keys, values, made
        torch.cuda.empty_cache()


def measure_format(fmt, segments, q, start, scaling, args, batch, report) -> None:
    if args.check:
        ref, ref_w = decode_attention(q, segments, start, scaling, return_weights=True, backend="torch")
        out, w = decode_attention(q, segments, start, scaling, return_weights=True, backend="triton")
        err_w = max((a - b).abs().max().item() for a, b in zip(w, ref_w))
        print(f"check b{batch} {fmt}: max |out - ref| {(out.float() - ref.float()).abs().max().item():.2e}"
              f"  max |w - ref| {err_w:.2e}  (max |ref| {ref.abs().max().item():.2f}, max w {max(x.max().item() for x in ref_w):.2e})",
              flush=True)
    for weights in (False, True):
        fn = lambda: decode_attention(q, segments, start, scaling, return_weights=weights, backend="triton")
        eager, graph = timed(fn, args.iters)
        report({"batch": batch, "what": f"kernel {fmt}{' + weights' if weights else ''}",
                "bytes": segment_bytes(segments), "eager_us": eager, "graph_us": graph})
    if fmt != "bf16" and not args.skip_today:
        eager, graph = timed(lambda: today(segments)(q), args.iters)
        report({"batch": batch, "what": f"today: dequantize {fmt} + SDPA", "bytes": segment_bytes(segments),
                "eager_us": eager, "graph_us": graph})


def sweep(batch, made, q, start, scaling, iters, report, tiles) -> None:
    """Launch settings of the segment kernel (module constants) on the FP8 and int4 stores: each tile
    setting (slots, warps, stages) for the format, under two split plans."""
    saved = dict(triton_decode.TILES), triton_decode.WAVES, triton_decode.MIN_SPLIT_SLOTS
    for fmt, key in (("fp8", "fp8"), ("kivi4", "int")):
        for tile in tiles:
            for waves, min_split in ((16, 512), (32, 256)):
                triton_decode.TILES[key] = (*tile[:3], bool(tile[3]))
                triton_decode.WAVES, triton_decode.MIN_SPLIT_SLOTS = waves, min_split
                fn = lambda: decode_attention(q, made[fmt], start, scaling, backend="triton")
                try:
                    eager, graph = timed(fn, iters)
                except Exception as e:  # a setting the compiler refuses (e.g. out of shared memory)
                    print(f"sweep {tile} {waves} {fmt}: {type(e).__name__}", file=sys.stderr)
                    continue
                block_n, warps, stages, transposed = tile
                report({"batch": batch, "what": f"sweep {fmt} n{block_n} w{warps} s{stages} t{transposed} waves{waves} min{min_split}",
                        "bytes": segment_bytes(made[fmt]), "eager_us": eager, "graph_us": graph})
    triton_decode.TILES.update(saved[0])
    triton_decode.WAVES, triton_decode.MIN_SPLIT_SLOTS = saved[1], saved[2]

if __name__ == "__main__":
    main()
