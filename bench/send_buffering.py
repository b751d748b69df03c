"""Does an NCCL send finish before its receiver posts? The fact behind `pipeline.recv_posting: "at_use"`.

    torchrun --standalone --nproc-per-node 2 bench/send_buffering.py            # 16 MB, receive 30 ms late
    NCCL_P2P_NVL_CHUNKSIZE=2097152 torchrun ... bench/send_buffering.py --json   # under other NCCL settings

Rank 0 sends `--size-mb` of bf16 to rank 1 (one `batch_isend_irecv`, as the engine does); rank 1 posts the
matching receive `--delay-ms` later. Rank 0 polls the send's work and reports, per repeat, how long after
posting it completed. A time far below the delay means NCCL buffered the whole message and the send kernel
ended without its receiver: a pipeline rank can then post receives late (behind its own compute) without
holding up the sender. The first repeat also sets up the connection and is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=16.0, help="message size (the pipeline bench's is 16 MB)")
    p.add_argument("--delay-ms", type=float, default=30.0, help="how late rank 1 posts its receive")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print one JSON line (rank 0)")
    return p.parse_args()


def main() -> None:
    args = _args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/send_buffering.py measures NCCL: it needs CUDA GPUs")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(f"--nproc-per-node must be 2, got {world}")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device())
    message = torch.ones(int(args.size_mb * 2**20) // 2, dtype=torch.bfloat16, device=device)
    done_ms: list[float] = []
    for _ in range(args.repeats):
        dist.barrier()
        torch.cuda.synchronize(device)
        if rank == 0:
            start = time.perf_counter()
            work = dist.batch_isend_irecv([dist.P2POp(dist.isend, message, 1)])[0]
            while not work.is_completed():
                pass
            done_ms.append((time.perf_counter() - start) * 1e3)
        else:
            time.sleep(args.delay_ms / 1e3)
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, message, 0)])[0].wait()
        torch.cuda.synchronize(device)
    if rank == 0:
        steady = done_ms[1:] or done_ms
        result = {"device": torch.cuda.get_device_name(device), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                  "size_mb": args.size_mb, "delay_ms": args.delay_ms, "first_ms": round(done_ms[0], 2),
                  "send_done_ms": [round(t, 2) for t in steady], "median_ms": round(statistics.median(steady), 2),
                  "buffered": statistics.median(steady) < args.delay_ms / 2,
                  "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['device']}, NCCL {result['nccl']}: a {args.size_mb:g} MB send completed after "
                  f"{result['median_ms']} ms (median; first, with connection set-up: {result['first_ms']} ms) while "
                  f"its receive was posted {args.delay_ms:g} ms late: "
                  + ("buffered, the sender did not wait" if result["buffered"] else "the sender waited"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
