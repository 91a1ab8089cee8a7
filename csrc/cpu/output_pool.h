// Large CPU outputs of the image ops come from a pool that keeps a block after its tensor
// dies and hands it to the next output of the same rounded size: the CPU counterpart of
// torch's CUDA caching allocator. Without it every call of a training loop maps a fresh
// 154 MB block (256 x 3 x 224 x 224 fp32), which the OS faults in and zeroes page by page:
// on the project's machine that costs 40 % of the op. Blocks are 2 MB aligned with a huge-
// page hint. The pool keeps at most ABD_FAST_CPU_POOL_MB (default 1024; 0 turns it off)
// of unused blocks (abd_fast.ops.set_cpu_pool_limit changes it at run time);
// abd_fast.ops.release_cpu_pool() gives them back to the OS. The tensors' deleter never
// throws, and fork() from one thread while another holds the pool's lock is safe for the
// child (pthread_atfork handlers).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace abd_fast {

// An uninitialized CPU tensor; from the pool when it is at least 1 MB, else at::empty.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

struct PoolStats {
  int64_t cached_bytes;  // unused blocks held for reuse
  int64_t live_bytes;    // blocks backing live tensors
  int64_t reused;        // allocations served from a kept block
  int64_t fresh;         // allocations that mapped a new block
  int64_t limit_bytes;   // the ABD_FAST_CPU_POOL_MB limit in bytes
  int64_t unknown_blocks;  // blocks given back that the pool never handed out (left alone)
};
PoolStats pool_stats();
int64_t set_pool_limit(int64_t bytes);  // returns the previous limit
void release_pool();  // frees every unused block

// Tests only (tests/test_output_pool.py): the deleter on a block the pool does not know, and
// the pool's lock held by the calling thread for `ms` milliseconds.
void pool_give_back_unknown_for_test();
void pool_hold_lock_for_test(int64_t ms);

}  // namespace abd_fast
