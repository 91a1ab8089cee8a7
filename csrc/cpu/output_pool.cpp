// The output pool of output_pool.h: a c10::Allocator whose deleter keeps the block.
#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace abd_fast {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinPooled = size_t(1) << 20;

size_t limit_from_env() {
  const char* v = std::getenv("ABD_FAST_CPU_POOL_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(errno == 0 && *end == '\0' && mb >= 0 && mb < (1LL << 40),
              "ABD_FAST_CPU_POOL_MB must be a whole number of megabytes >= 0 (0 turns the CPU "
              "output pool off), got '", v, "'");
  return size_t(mb) << 20;
}

class Pool final : public c10::Allocator {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: tensors may die after static teardown
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &Pool::deleter, c10::Device(c10::kCPU)};
    const size_t bytes = (n + kHuge - 1) / kHuge * kHuge;
    void* p = take(bytes);
    if (p == nullptr) {
      p = std::aligned_alloc(kHuge, bytes);
      TORCH_CHECK(p != nullptr, "abd_fast: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      // Huge pages: the first touch faults 2 MB at a time instead of 4 KB (a hint only).
      madvise(p, bytes, MADV_HUGEPAGE);
#endif
      try {
        std::lock_guard<std::mutex> lock(mu_);
        live_.emplace(p, bytes);
        live_bytes_ += bytes;
        ++fresh_;
      } catch (...) {  // no memory for the bookkeeping: the block is not handed out
        std::free(p);
        throw;
      }
    }
    return {p, p, &Pool::deleter, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Pool::deleter; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(cached_bytes_), int64_t(live_bytes_), reused_, fresh_, int64_t(limit_),
            unknown_};
  }

  // Tests only: the deleter on a block the pool never handed out, and the lock held by the
  // calling thread for `ms` milliseconds (a fork meanwhile must not deadlock the child).
  void give_back_unknown() {
    static char not_a_block;
    deleter(&not_a_block);
  }
  void hold_lock(int64_t ms) {
    std::lock_guard<std::mutex> lock(mu_);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  }

  // Keeps at most `limit` bytes from now on, freeing the oldest kept blocks over it; returns
  // the previous limit.
  size_t set_limit(size_t limit) {
    std::vector<void*> gone;
    size_t old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = limit_;
      limit_ = limit;
      evict_until_room(0, gone);
    }
    for (void* q : gone) std::free(q);
    return old;
  }

  void release_all() {
    std::vector<void*> gone;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& block : free_) gone.push_back(block.second);
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* q : gone) std::free(q);
  }

 private:
  Pool() : limit_(limit_from_env()) {
#if defined(__linux__)
    // fork() copies the lock in whatever state another thread holds it, and that thread does
    // not exist in the child: the child's first pooled allocation (or deleter) would wait
    // forever. So fork waits for the lock (prepare) and both sides release it after.
    pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); },
                   [] { get().mu_.unlock(); });
#endif
  }

  // A kept block of exactly `bytes` (the newest one), or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i].first != bytes) continue;
      void* p = free_[i].second;
      live_.emplace(p, bytes);  // first: if it throws (no memory), the block stays kept
      free_.erase(free_.begin() + i);
      cached_bytes_ -= bytes;
      live_bytes_ += bytes;
      ++reused_;
      return p;
    }
    return nullptr;
  }

  // The tensors' deleter: runs wherever a tensor dies (destructors, the interpreter's
  // teardown), so it never throws.
  static void deleter(void* p) noexcept { get().give_back(p); }

  // Keeps the block, freeing the oldest kept blocks to stay within the limit. A block the
  // pool does not know (never handed out, or given back twice) is counted and left alone:
  // freeing memory the pool cannot vouch for could corrupt the heap, leaving it costs its
  // size at most. Allocation-free after the block leaves live_: with no memory for the list
  // of kept blocks, the block is freed instead.
  void give_back(void* p) noexcept {
    if (p == nullptr) return;
    std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
    try {
      lock.lock();
    } catch (...) {  // std::mutex::lock throws only on a broken mutex: leave the block
      return;
    }
    auto it = live_.find(p);
    if (it == live_.end()) {
      ++unknown_;
      return;
    }
    const size_t bytes = it->second;
    bool keep = bytes <= limit_;
    if (keep && free_.size() == free_.capacity()) {
      try {
        free_.reserve(2 * free_.size() + 8);
      } catch (...) {
        keep = false;
      }
    }
    live_.erase(it);
    live_bytes_ -= bytes;
    if (!keep) {
      lock.unlock();
      std::free(p);
      return;
    }
    free_.emplace_back(bytes, p);  // no allocation: there is room (above)
    cached_bytes_ += bytes;
    // The block just kept is the newest and fits the limit, so only older ones go; each is
    // freed outside the lock (releasing a large mapping takes a while).
    while (cached_bytes_ > limit_) {
      const auto oldest = free_.front();
      free_.erase(free_.begin());
      cached_bytes_ -= oldest.first;
      lock.unlock();
      std::free(oldest.second);
      try {
        lock.lock();
      } catch (...) {  // the rest of the eviction waits for the next call
        return;
      }
    }
  }

  // Under mu_: moves the oldest kept blocks to `gone` until `room` more bytes fit the limit.
  void evict_until_room(size_t room, std::vector<void*>& gone) {
    size_t drop = 0;
    while (drop < free_.size() && cached_bytes_ + room > limit_) {
      cached_bytes_ -= free_[drop].first;
      gone.push_back(free_[drop++].second);
    }
    free_.erase(free_.begin(), free_.begin() + drop);
  }

  size_t limit_;
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;  // kept blocks, oldest first
  std::unordered_map<void*, size_t> live_;
  size_t cached_bytes_ = 0, live_bytes_ = 0;
  int64_t reused_ = 0, fresh_ = 0, unknown_ = 0;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(c10::elementSize(dtype));
  if (size_t(bytes) < kMinPooled) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &Pool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

PoolStats pool_stats() { return Pool::get().stats(); }

int64_t set_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the CPU output pool limit must be >= 0 bytes, got ", bytes);
  return int64_t(Pool::get().set_limit(size_t(bytes)));
}

void release_pool() { Pool::get().release_all(); }

void pool_give_back_unknown_for_test() { Pool::get().give_back_unknown(); }

void pool_hold_lock_for_test(int64_t ms) { Pool::get().hold_lock(ms); }

}  // namespace abd_fast
