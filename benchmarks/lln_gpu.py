"""GPU timings of LLN attention against softmax attention, and the paper's Table 2 shape.

Run on a CUDA machine from the repository root (fla, the flash-linear-attention ops package, is
optional: install the fla-core wheel and einops to compare causal LLN with its chunk_linear_attn):

    PYTHONUNBUFFERED=1 python benchmarks/lln_gpu.py --out results/lln_gpu.json

Parts (each can be skipped with --skip):
  kernels  forward+backward time and peak memory of LLN (non-causal, causal) vs
           F.scaled_dot_product_attention (the baseline, timed in the same process), bf16 inputs,
           16 heads, d = 64, over N; causal LLN also vs fla's chunk_linear_attn on the same
           LLN features, or else the plain chunked PyTorch path alone.
  table2   memory and time per training iteration (forward, backward, AdamW step; batch 1, bf16
           autocast) of a RoBERTa-base-sized encoder (12 layers, hidden 768, 12 heads, random init)
           with SA eager, SA SDPA, LLN and LLN+Diag attention, N = 512 … 16384; out-of-memory marked.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import bench, run_parts  # noqa: E402

from attnstats.kernels import get_kernel  # noqa: E402


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
        print(f"fla not importable ({type(err).__name__}: {err}); causal LLN compared with the PyTorch path only")
        chunk_linear_attn = None
    lln = get_kernel("lln")
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
            }
            if causal and chunk_linear_attn is not None:
                def fla_lln(q, k, v):
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
            if isinstance(row.get("sdpa_ms"), float) and isinstance(row.get("lln_ms"), float):
                row["lln_over_sdpa"] = row["lln_ms"] / row["sdpa_ms"]
            if isinstance(row.get("fla_chunk_linear_attn_ms"), float) and isinstance(row.get("sdpa_ms"), float):
                row["fla_over_sdpa"] = row["fla_chunk_linear_attn_ms"] / row["sdpa_ms"]
            rows.append(row)
            print("kernels", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
            del q, k, v, g
            torch.cuda.empty_cache()
    return rows


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
    parts = [("kernels", lambda: part_kernels(dev, args.ns)),
             ("table2", lambda: part_table2(dev, args.table_ns, args.table_budget_s))]
    run_parts(parts, args.skip, args.out, res)


if __name__ == "__main__":
    main()
