"""Multi-process serving measurements (issue 16), on this machine's CPU devices over 127.0.0.1.

    # per-step cost of sending a step to the followers: the control channel vs multihost_utils.broadcast_one_to_all
    python scripts/bench_multiprocess.py channel --processes 2
    # decode tok/s of a real model served by 1 process x D devices vs D processes x 1 device
    python scripts/bench_multiprocess.py decode --devices 3

`channel` starts the processes itself (jax.distributed + gloo, as the server does) and times, on process 0,
what one step costs it: encoding the packed arrays and writing them to every follower (the followers read and
decode them; their time is reported too), against the alternative of broadcasting the same arrays as a JAX
collective (a fixed-size header, then the payload). Shapes: a decode step (N = R = 32 rows, a 32-page table)
and a prefill step (N = 512 tokens, R = 32). `decode` launches `python -m engine.server` both ways and
streams: one request of 64 tokens (batch-1 decode), then 8 concurrent requests of 64 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = {"decode": (32, 32, 32), "prefill": (512, 32, 32)}   # N tokens, R rows, W page-table width
REPEATS = 300


def _step_arrays(N: int, R: int, W: int):
    import numpy as np
    i32 = lambda *s: np.arange(int(np.prod(s)), dtype=np.int32).reshape(s) % 1000
    return (i32(N), i32(N), i32(N), i32(R, W), i32(R), i32(R + 1), i32(R),              # StepInputs
            np.ones(R, np.float32), i32(R), np.ones(R, np.float32), np.arange(R, dtype=np.uint32), i32(R),
            np.full(N, -1, np.int32))                                                     # sampling, prev_row


def _channel_role(pid: int, n: int, port: int, out: str) -> None:
    """One process of the `channel` measurement."""
    import numpy as np
    from engine.device.control_channel import Step, receive
    from engine.device.distributed import start_group
    link = start_group(f"127.0.0.1:{port}", n, pid, 60.0, "bench")
    import jax
    from jax.experimental import multihost_utils
    results = {}
    for name, shape in SHAPES.items():
        arrays = _step_arrays(*shape)
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            if pid == 0:
                link.broadcast(Step(arrays))
            else:
                receive(link)
            times.append(time.perf_counter() - t0)
        results[f"channel_{name}_us"] = statistics.median(times[20:]) * 1e6
        multihost_utils.sync_global_devices(f"{name} channel done")
        header = np.array(shape, np.int32)
        times = []
        for _ in range(REPEATS // 10):
            t0 = time.perf_counter()
            multihost_utils.broadcast_one_to_all(header)
            multihost_utils.broadcast_one_to_all(arrays)
            times.append(time.perf_counter() - t0)
        results[f"collective_{name}_us"] = statistics.median(times[3:]) * 1e6
        results[f"{name}_bytes"] = sum(a.nbytes for a in arrays)
    multihost_utils.sync_global_devices("done")
    with open(out, "w") as f:
        json.dump({"process": pid, "devices": jax.device_count(), **results}, f)
    if pid == 0:
        link.stop()


def channel(args) -> None:
    from tests.group_launcher import free_port_pair, one_cpu_env
    port, outs, procs = free_port_pair(), [], []
    env = one_cpu_env()
    with tempfile.TemporaryDirectory() as tmp:
        for pid in range(args.processes):
            outs.append(os.path.join(tmp, f"{pid}.json"))
            procs.append(subprocess.Popen([sys.executable, __file__, "channel-role", str(pid), str(args.processes),
                                           str(port), outs[-1]], env=env, stderr=subprocess.DEVNULL))
        for p in procs:
            p.wait(timeout=600)
        for out in outs:
            with open(out) as f:
                print(json.dumps(json.load(f)))


def _serve(flags: list[str], env: dict, processes: int, log_dir: str):
    from tests.group_launcher import free_port_pair
    base = [sys.executable, "-m", "engine.server", "--port=0", "--http-port=0", "--max-batch-size=8",
            "--max-num-batched-tokens=8", "--max-length=256", "--kv-cache-page-size=16", "--kv-cache-pages=160",
            *flags]
    if processes > 1:
        base += [f"--coordinator-address=127.0.0.1:{free_port_pair()}", f"--num-processes={processes}"]
    procs = []
    for pid in range(processes):
        log = open(os.path.join(log_dir, f"{pid}.out"), "w")
        procs.append(subprocess.Popen(base + ([f"--process-id={pid}"] if processes > 1 else []), cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        m = re.search(r"serving .* on (\S+) \(", open(os.path.join(log_dir, "0.out")).read())
        if m:
            return procs, m.group(1)
        time.sleep(1)
    raise RuntimeError("the server did not start")


def _streams(address: str, n: int, tokens: int) -> float:
    """Output tok/s of n concurrent streams of `tokens` tokens each (first token to last)."""
    import grpc
    from engine.v1 import engine_pb2 as pb
    from engine.v1 import engine_pb2_grpc
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(address))
    spans = []

    def one(i):
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 100 + i, 200, 300]),
                                 sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True))
        first = None
        for _ in stub.Generate(req, timeout=600):
            first = first or time.perf_counter()
        spans.append((first, time.perf_counter()))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n * (tokens - 1) / (max(e for _, e in spans) - min(s for s, _ in spans))


def decode(args) -> None:
    d = args.devices
    from tests.group_launcher import one_cpu_env
    env0 = one_cpu_env()
    setups = {f"1 process x {d} devices": ([f"--devices=cpu:{','.join(map(str, range(d)))}"],
                                           env0 | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}, 1),
              f"{d} processes x 1 device": ([], env0, d)}
    for name, (flags, env, processes) in setups.items():
        with tempfile.TemporaryDirectory() as tmp:
            procs, address = _serve(flags, env, processes, tmp)
            try:
                _streams(address, 1, 8)   # first requests after warm-up
                one = _streams(address, 1, 64)
                eight = _streams(address, 8, 64)
                print(json.dumps({"setup": name, "batch1_tok_s": round(one, 1), "batch8_tok_s": round(eight, 1)}))
            finally:
                procs[0].terminate()
                for p in procs:
                    p.wait(timeout=120)


if __name__ == "__main__":
    if sys.argv[1] == "channel-role":
        _channel_role(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("channel").add_argument("--processes", type=int, default=2)
    sub.add_parser("decode").add_argument("--devices", type=int, default=3)
    parsed = parser.parse_args()
    {"channel": channel, "decode": decode}[parsed.what](parsed)
