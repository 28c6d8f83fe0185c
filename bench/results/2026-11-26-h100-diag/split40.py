"""One attention config per process (CUDA_LAUNCH_BLOCKING=1): which one faults at D=40 split (32+16)?"""
import os, subprocess, sys
if len(sys.argv) == 1:
    import flashvit.kernels.attention; A = sys.modules["flashvit.kernels.attention"]
    jobs = [(k, c) for k, tab in (("fwd", A._FWD_CONFIGS + [A._FWD_FALLBACK]), ("dkdv", A._DKDV_CONFIGS),
                                 ("dq", A._DQ_CONFIGS)) for c in tab]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    procs = [(k, c, subprocess.Popen([sys.executable, __file__, k, *map(str, c)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)) for k, c in jobs]
    for k, c, p in procs:
        try:
            out = p.communicate(timeout=150)[0]
        except subprocess.TimeoutExpired:
            p.kill(); out = "TIMEOUT"
        last = [l for l in out.strip().splitlines() if l.strip()][-1:] or [""]
        print(k, c, "rc", p.returncode, last[0][:200], flush=True)
    sys.exit(0)
import torch, triton
import flashvit.kernels.attention; A = sys.modules["flashvit.kernels.attention"]
kind, cfg = sys.argv[1], tuple(int(v) for v in sys.argv[2:])
one = [triton.Config({"BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}, num_warps=cfg[2], num_stages=cfg[3])]
fb = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
A._attn_fwd_tuned = triton.autotune(one if kind == "fwd" else fb, key=A._KEY)(A._attn_fwd)
A._attn_bwd_dkdv_tuned = triton.autotune(one if kind == "dkdv" else fb, key=A._KEY)(A._attn_bwd_dkdv)
A._attn_bwd_dq_tuned = triton.autotune(one if kind == "dq" else fb, key=A._KEY)(A._attn_bwd_dq)
torch.manual_seed(0)
B, N, H, D = 3, 50, 4, 40
q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
with A.use_head_split("split"):
    o = A.attention(q, k, v, backend="triton")
    o.float().square().sum().backward()
torch.cuda.synchronize()
ref = A.attention_reference(q.double(), k.double(), v.double())
print("ok max err", (o.double() - ref).abs().max().item())
