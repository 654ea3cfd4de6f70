"""Programs of one launch waiting for each other through counters in global memory (the persistent
decode kernel's stage boundaries, kernels/megakernel.py), and the global timer marks of its profile.

A producer program's threads finish their stores, meet at a CTA barrier, and one thread adds 1 to a
counter with release semantics (arrive). A consumer polls the counter with acquire loads until it
reaches the number of producer tiles (wait_count); each of its threads polls, so each thread's later loads
are ordered after the producers' stores. All programs of the launch must be resident at once (one per
SM is), else a wait can never end: the wait gives up after its budget of polls and raises a flag.
Under the interpreter programs run one after another, so only one program is launched there.
"""

from edgellm.kernels._triton import tl, triton


@triton.jit
def _load_acquire(ptr, INTERPRET: tl.constexpr):
    if INTERPRET:
        seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    else:  # every thread polls (one L2 line): each thread's later loads are then ordered after it
        seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr],
                                         dtype=tl.int32, is_pure=False, pack=1)
    return seen


@triton.jit
def wait_count(counter_ptr, target, flag_ptr, budget, INTERPRET: tl.constexpr):
    """Spins until counter >= target; returns the program's remaining budget of polls. A program whose
    budget runs out (a bug, or programs that are not all resident) raises the flag and stops waiting,
    so a broken launch ends in about a second instead of hanging the GPU."""
    seen = _load_acquire(counter_ptr, INTERPRET)
    while (seen < target) & (budget > 0):
        seen = _load_acquire(counter_ptr, INTERPRET)
        budget -= 1
    if seen < target:
        tl.atomic_xchg(flag_ptr, 1)
    tl.debug_barrier()
    return budget


@triton.jit
def mark(prof_ptr, pid, layer, n_layers, stage: tl.constexpr, slot: tl.constexpr, PROFILE: tl.constexpr):
    """PROFILE: the global timer (ns) at prof[pid, layer, stage, slot]; slot 0 before the stage's wait,
    1 after it, 2 after the program's last tile of the stage (bench/persistent.py --profile reads them)."""
    if PROFILE:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(prof_ptr + ((pid * n_layers + layer) * 5 + stage) * 3 + slot, now)


@triton.jit
def arrive(counter_ptr):
    tl.debug_barrier()  # every thread's stores of the tile are issued before the release
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
