"""GPU timings of LLN attention against softmax attention, and the paper's Table 2 shape.

Run on a CUDA machine from the repository root (fla, the flash-linear-attention ops package, is
optional: install the fla-core wheel and einops to compare causal LLN with its chunk_linear_attn):

    PYTHONUNBUFFERED=1 python benchmarks/lln_gpu.py --out results/lln_gpu.json

Parts (each can be skipped with --skip):
  agreement  the GPU kernels (float32, float16 and bf16 inputs; outputs and gradients) against the
             float64 kernels on the CPU, through the fused Triton path and the PyTorch path
  overhead   the steps of one LLN call timed alone at N = 1024 (what is not arithmetic)
  kernels  forward+backward time and peak memory of LLN and LLN+Diag (non-causal, causal) vs
           F.scaled_dot_product_attention (the baseline, timed in the same process), bf16 inputs,
           16 heads, d = 64, over N; LLN also through its PyTorch path (the fused Triton kernels
           switched off; causal bf16 then goes to fla when installed), and causal LLN vs fla's
           chunk_linear_attn on the same LLN features (when fla is installed).
  table2   memory and time per training iteration (forward, backward, AdamW step; batch 1, bf16
           autocast) of a RoBERTa-base-sized encoder (12 layers, hidden 768, 12 heads, random init)
           with SA eager, SA SDPA, LLN and LLN+Diag attention, N = 512 … 16384; out-of-memory marked.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import bench, run_parts  # noqa: E402

from attnstats.kernels import block_diagonal_triton, get_kernel, lln_triton  # noqa: E402


@contextlib.contextmanager
def pytorch_path():
    """LLN and LLN+Diag through their PyTorch paths: the fused Triton kernels switched off for the block."""
    real = lln_triton.applies, block_diagonal_triton.applies
    lln_triton.applies = block_diagonal_triton.applies = lambda *a: False
    try:
        yield
    finally:
        lln_triton.applies, block_diagonal_triton.applies = real


def peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fwd_bwd(f, q, k, v, g):
    def run():
        for t in (q, k, v):
            t.grad = None
        f(q, k, v).backward(g)

    return run


def lln_features(q, k):
    """LLN features with the kernel's own temperatures, stabilised as in docs/theory.md §4."""
    kern = get_kernel("lln")
    alpha, beta = kern.alpha_beta(q, k)
    lq = q.float() * alpha
    lk = k.float() * beta
    fq = torch.exp(lq - lq.amax(-1, keepdim=True).detach())
    fk = torch.exp(lk - lk.amax((-2, -1), keepdim=True).detach())
    return fq, fk


def part_kernels(dev, ns):
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as err:
        print(f"fla not importable ({type(err).__name__}: {err}); causal LLN compared with SDPA only")
        chunk_linear_attn = None
    lln, lln_diag = get_kernel("lln"), get_kernel("lln_diag")
    rows = []
    for causal in (False, True):
        for n in ns:
            gen = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(1, 16, n, 64, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
            g = torch.randn(1, 16, n, 64, device=dev, generator=gen, dtype=torch.bfloat16)
            row = dict(n=n, heads=16, d=64, causal=causal)
            impls = {
                "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                "lln": lambda q, k, v: lln(q, k, v, causal=causal),
                "lln_pytorch": lambda q, k, v: _pytorch(lln, q, k, v, causal),
                "lln_diag": lambda q, k, v: lln_diag(q, k, v, causal=causal),
            }
            if causal and chunk_linear_attn is not None:
                def fla_lln(q, k, v):
                    # the same LLN features (the kernel's temperatures), through fla's chunked kernel
                    fq, fk = lln_features(q, k)
                    o, _ = chunk_linear_attn(fq.transpose(1, 2).to(q.dtype), fk.transpose(1, 2).to(q.dtype),
                                             v.transpose(1, 2), scale=1.0, normalize=True)
                    return o.transpose(1, 2)

                impls["fla_chunk_linear_attn"] = fla_lln
            for name, f in impls.items():
                try:
                    run = fwd_bwd(f, q, k, v, g)
                    row[name + "_ms"] = bench(run)
                    row[name + "_peak_bytes"] = peak_bytes(run)
                except torch.cuda.OutOfMemoryError:
                    row[name + "_ms"] = "OOM"
                    torch.cuda.empty_cache()
                except Exception as err:
                    row[name + "_ms"] = f"error: {type(err).__name__}: {str(err)[:200]}"
            for num, den in (("lln", "sdpa"), ("lln_diag", "lln"), ("fla_chunk_linear_attn", "sdpa"),
                             ("lln", "fla_chunk_linear_attn"), ("lln", "lln_pytorch")):
                if isinstance(row.get(num + "_ms"), float) and isinstance(row.get(den + "_ms"), float):
                    row[f"{num}_over_{den}"] = row[num + "_ms"] / row[den + "_ms"]
                    row[f"{num}_over_{den}_memory"] = row[num + "_peak_bytes"] / max(1, row[den + "_peak_bytes"])
            rows.append(row)
            print("kernels", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
            del q, k, v, g
            torch.cuda.empty_cache()
    return rows


def _pytorch(kern, q, k, v, causal):
    with pytorch_path():
        return kern(q, k, v, causal=causal)


def part_agreement(dev, dtypes=("float32", "float16", "bfloat16")):
    """The GPU kernels (LLN, LLN+Diag, the block softmax alone) against the same kernels in float64 on the
    CPU, N = 2048, 4 heads: the largest relative output error for float32 and bf16 inputs, and fla's
    causal output (float32 features) against attnstats' on the same features."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2048, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.randn(1, 4, 2048, 64, generator=gen, dtype=torch.float64)
    rows = []
    # against float64 on the same inputs rounded to the dtype: the error is that of the dtype's arithmetic
    # (bf16 and float16 outputs are rounded to 2^-8 and 2^-11); gradients relative to their largest entry
    for dt in (getattr(torch, name) for name in dtypes):
        qh, kh, vh = (x.to(dt) for x in (q, k, v))
        for name in ("lln", "lln_diag", "block_diag"):
            kern = get_kernel(name)
            for causal in (False, True):
                xs = [x.double().requires_grad_() for x in (qh, kh, vh)]
                ref = kern(*xs, causal=causal)
                ref_grads = torch.autograd.grad(ref, xs, g)
                for path in ("fused", "pytorch"):
                    xd = [x.to(dev).requires_grad_() for x in (qh, kh, vh)]
                    with contextlib.nullcontext() if path == "fused" else pytorch_path():
                        out = kern(*xd, causal=causal)
                    grads = torch.autograd.grad(out, xd, g.to(dev, dt))
                    scale = max(float(r.abs().max()) for r in ref_grads)
                    row = dict(kernel=name, dtype=str(dt).replace("torch.", ""), causal=causal, path=path,
                               max_rel_error=float((out.double().cpu() - ref).abs().max() / ref.abs().max()),
                               grad_max_rel_error=max(float((a.double().cpu() - b).abs().max()) / scale
                                                      for a, b in zip(grads, ref_grads)))
                    rows.append(row)
                    print("agreement", row, flush=True)
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:
        return rows
    qd, kd, vd = (x.float().to(dev) for x in (q, k, v))
    fq, fk = lln_features(qd, kd)
    o, _ = chunk_linear_attn(fq.transpose(1, 2), fk.transpose(1, 2), vd.transpose(1, 2), scale=1.0, normalize=True)
    ref = get_kernel("lln")(q, k, v, causal=True)
    rows.append(dict(kernel="fla_chunk_linear_attn (float32 features)", causal=True,
                     max_rel_error=float((o.transpose(1, 2).double().cpu() - ref).abs().max() / ref.abs().max())))
    print("agreement", rows[-1], flush=True)
    return rows


def part_overhead(dev):
    """What one LLN call costs outside the arithmetic: its steps timed alone at N = 1024, bf16, 16 heads."""
    from attnstats.kernels.base import check_qkv

    lln = get_kernel("lln")
    q, k, v = (torch.randn(1, 16, 1024, 64, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    g = torch.randn_like(q)

    def fwd_bwd(causal):
        for t in (q, k, v):
            t.grad = None
        lln(q, k, v, causal=causal).backward(g)

    steps = {"check_qkv": lambda: check_qkv(q, k, v, False), "temperatures": lambda: lln.alpha_beta(q, k),
             "log_features": lambda: lln.log_features(q, k, torch.float32),
             "fused_moments": lambda: lln_triton.moments(q, k, v),
             "forward": lambda: lln(q, k, v), "forward_causal": lambda: lln(q, k, v, causal=True),
             "forward_backward": lambda: fwd_bwd(False), "forward_backward_causal": lambda: fwd_bwd(True)}
    row = {name + "_ms": bench(f) for name, f in steps.items()}
    print("overhead", {k_: round(v_, 3) for k_, v_ in row.items()}, flush=True)
    return [row]


def roberta(n, attn):
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=n + 2, vocab_size=50265, attn_implementation=attn)
    torch.manual_seed(0)
    return RobertaForMaskedLM(cfg)


def part_table2(dev, ns, budget_s):
    try:
        from attnstats.kernels.swap import use_kernel
    except Exception:
        from attnstats import use_kernel
    rows = []
    t_start = time.perf_counter()
    for variant in ("sa_eager", "sa_sdpa", "lln", "lln_diag"):
        oom_seen = False
        for n in ns:
            row = dict(variant=variant, n=n, batch=1)
            if oom_seen:
                row.update(status="OOM (smaller N already out of memory)")
                rows.append(row)
                print("table2", row, flush=True)
                continue
            if time.perf_counter() - t_start > budget_s:
                row.update(status="not run (time budget of this part spent)")
                rows.append(row)
                print("table2", row, flush=True)
                continue
            model = opt = swap = None
            try:
                model = roberta(n, "eager" if variant == "sa_eager" else "sdpa").to(dev)
                if variant in ("lln", "lln_diag"):
                    swap = use_kernel(model, variant)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                gen = torch.Generator(device=dev).manual_seed(0)
                ids = torch.randint(5, 50000, (1, n), device=dev, generator=gen)
                labels = ids.clone()

                def step():
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(input_ids=ids, labels=labels).loss
                    loss.backward()
                    opt.step()

                step()  # warm-up, and AdamW state allocated
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                times.sort()
                row.update(status="ok", s_per_iteration=times[1], peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except torch.cuda.OutOfMemoryError:
                row.update(status="OOM")
                oom_seen = True
            except Exception as err:
                row.update(status=f"error: {type(err).__name__}: {str(err)[:300]}")
            finally:
                if swap is not None:
                    try:
                        swap.restore()
                    except Exception:
                        pass
                del model, opt, swap
                torch.cuda.empty_cache()
            rows.append(row)
            print("table2", row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/lln_gpu.json")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--ns", nargs="*", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--table-ns", nargs="*", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--table-budget-s", type=float, default=240)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float16", "bfloat16"], help="agreement part")
    args = ap.parse_args()
    dev = torch.device("cuda")
    import triton

    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), cuda=torch.version.cuda)
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        env["fla"] = None
    print(env, flush=True)
    res = dict(env=env, command=" ".join(sys.argv))
    parts = [("agreement", lambda: part_agreement(dev, args.dtypes)),
             ("overhead", lambda: part_overhead(dev)),
             ("kernels", lambda: part_kernels(dev, args.ns)),
             ("table2", lambda: part_table2(dev, args.table_ns, args.table_budget_s))]
    run_parts(parts, args.skip, args.out, res)


if __name__ == "__main__":
    main()
