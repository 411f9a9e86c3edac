"""`python -m bench` (`make bench`): every benchmark of issue #8, each in its own process, outputs under out/bench/.

Default: --full on a CUDA GPU, --quick (CPU-sized, about 15 min on 2 cores) otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

SCRIPTS = ("storage", "penalty", "fisher", "overhead")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU-sized runs")
    mode.add_argument("--full", action="store_true", help="full sizes (32 7B-like layers, 30 steps per setting)")
    p.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {SCRIPTS}")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every benchmark")
    p.add_argument("--with-4k", action="store_true",
                   help="also time one 7B-like layer's LoRA step on 4096 tokens against the penalty (bench.penalty "
                        "section 7b4k; ~1 min more on one CPU core; a GPU run's 7b section already uses 4096 tokens)")
    p.add_argument("--out", default="out/bench", help="folder for the outputs (one .txt per benchmark)")
    args = p.parse_args()
    import torch

    quick = args.quick or (not args.full and not torch.cuda.is_available())
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    failed = []
    for name in args.only.split(","):
        cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick and name != "storage" else [])
        cmd += ["--threads", str(args.threads)] if args.threads and name != "storage" else []
        if name == "penalty" and args.with_4k:
            cmd += ["--sections", "smollm,dense,floor,7b,70b,scaling,7b4k"]
        print(f"\n=== {' '.join(cmd[1:])}  ({datetime.datetime.now():%Y-%m-%d %H:%M})", flush=True)
        start = time.perf_counter()
        path = os.path.join(args.out, f"{name}.txt")
        with open(path + ".tmp", "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:  # progress on the console, the record in out/bench/<name>.txt
                if "Warning" in line or line.startswith(("Loading weights", "{'")):
                    continue
                print(line, end="", flush=True)
                log.write(line)
            rc = proc.wait()
        os.replace(path + ".tmp", path)
        print(f"=== {name}: exit {rc}, {time.perf_counter() - start:.0f} s, output in {path}", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
