"""A list-scheduling model of the causal attention forward's tail: per-head program order
(CALM_FAST_TRITON_HEAD_GROUP=1) against grouped heaviest-first ("auto").

    python bench/model_program_order.py [--sms 132] [--block 128] [--ctas-per-sm 1]

A model, not a measurement: programs start in launch order on the first free slot (one per SM
for 128 x 128 tiles at head dim 128), and a program's time is the key blocks it visits plus a
fixed cost of one block. It prints, per bench_attention.py --quick causal shape, the modelled
makespan and the efficiency (ideal / makespan); bench_attention.py's "triton_grouped" rows
measure the real effect on a GPU. The order itself is the kernels' _program_order, restated.
"""
import argparse
import heapq
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from calm_fast.ops.triton_xattn import auto_head_group  # noqa: E402


def program_order(n_blk: int, n_bh: int, group: int) -> list[tuple[int, int]]:
    """(query block, head) of each program in launch order, as _program_order maps them."""
    order = []
    for pid in range(n_blk * n_bh):
        g = pid // (group * n_blk)
        first = g * group
        size = min(group, n_bh - first)
        r = pid - g * group * n_blk
        order.append((n_blk - 1 - r // size, first + r % size))  # heaviest query block first
    return order


def makespan(n_blk: int, n_bh: int, group: int, slots: int) -> tuple[float, float]:
    """(modelled end time, ideal time = total work / slots), in key-block steps."""
    free = [0.0] * slots
    end = 0.0
    total = 0.0
    for m, _ in program_order(n_blk, n_bh, group):
        work = m + 1 + 1.0   # key blocks up to the diagonal, plus a fixed cost per program
        total += work
        start = heapq.heappop(free)
        heapq.heappush(free, start + work)
        end = max(end, start + work)
    return end, total / slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--ctas-per-sm", type=int, default=1)
    args = ap.parse_args()
    for t, b, heads in ((1024, 16, 16), (4096, 4, 16), (8192, 2, 16)):
        n_blk, n_bh = math.ceil(t / args.block), b * heads
        auto = auto_head_group(math.ceil(t / 128), n_bh, args.sms)   # as _attn_forward calls it
        for group in (1, auto):
            end, ideal = makespan(n_blk, n_bh, group, args.sms * args.ctas_per_sm)
            print(f"T={t:5d} blocks={n_blk:3d} B*H={n_bh:3d} group={group:3d}: "
                  f"makespan {end:6.0f}, ideal {ideal:6.0f}, efficiency {ideal / end:.3f}")


if __name__ == "__main__":
    main()
