// A parallel-for for specd's CPU kernels whose calling thread never waits for a worker to
// wake up.
//
// Why not at::parallel_for (OpenMP): a decode step makes ~200 kernel calls tens of
// microseconds apart. Passive OpenMP workers are woken (and waited for) at every call, which
// cost more than the second core gave, so the engine ran on one thread
// (server/model/cpu_threads.py); spinning workers made a lone engine 1.5x faster but an engine
// beside one busy process 5-10x slower, because every call's barrier waited for a worker the
// OS had descheduled.
//
// How: a call splits its range into chunks that threads claim from one atomic counter. The
// calling thread starts claiming at once; a worker joins when it is awake and claims what is
// left. So a worker that is asleep, or has lost its core to another process, costs the call
// nothing but its own share: the caller only ever waits for chunks a worker has claimed and
// not finished. Workers spin a short while after a call (the next call comes tens of
// microseconds later within a forward) and then sleep on a condition variable, so an idle
// engine uses no CPU.
//
// Which thread runs a chunk never changes what the chunk computes: kernels that are bitwise
// independent of their thread count under at::parallel_for stay so.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace specd {

class WorkPool {
 public:
  // The calling thread plus this many workers run each call.
  void set_workers(int64_t workers) {
    std::lock_guard<std::mutex> call(call_mutex_);
    stop_workers();
    for (int64_t i = 0; i < workers; ++i) threads_.emplace_back([this] { worker_loop(); });
  }

  int64_t workers() const { return static_cast<int64_t>(threads_.size()); }

  // Microseconds a worker spins for the next call before it sleeps.
  void set_spin_us(int64_t us) { spin_us_.store(std::max<int64_t>(us, 0)); }

  // fn(begin, end) over [0, n) in chunks of at least `grain`, on this thread and any worker
  // that is awake. Returns when every chunk is done.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    const int64_t threads = workers() + 1;
    // A few chunks per thread, so a late worker still finds some and the tail is short.
    const int64_t chunk = std::max<int64_t>(grain, (n + 4 * threads - 1) / (4 * threads));
    const int64_t chunks = (n + chunk - 1) / chunk;
    if (threads == 1 || chunks == 1) {
      fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);  // one call at a time
    job_.store(&fn, std::memory_order_relaxed);
    job_n_.store(n, std::memory_order_relaxed);
    job_chunk_.store(chunk, std::memory_order_relaxed);
    job_chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t id = ++job_id_;
    // Publishing the counter (job id, chunk 0) publishes the fields above with it.
    next_.store(id << kIdShift, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      generation_.store(id, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    claim_and_run();
    // Only chunks a worker has claimed can be outstanding here.
    while (done_.load(std::memory_order_acquire) < chunks) _mm_pause();
  }

  ~WorkPool() {
    std::lock_guard<std::mutex> call(call_mutex_);
    stop_workers();
  }

 private:
  // The counter next_ holds (job id << kIdShift) | next chunk. A thread claims a chunk by
  // compare-and-swap, so it can never take a chunk of a job other than the one whose fields
  // it read: job ids only grow, and a job's fields are replaced only after all its chunks are
  // done (the caller waits for them), which needs the counter to have moved on.
  static constexpr int kIdShift = 32;
  static constexpr uint64_t kChunkMask = (uint64_t{1} << kIdShift) - 1;

  void claim_and_run() {
    int64_t finished = 0;
    uint64_t v = next_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t c = static_cast<int64_t>(v & kChunkMask);
      // Relaxed: fields read while a newer job replaces them fail the exchange below.
      const int64_t chunks = job_chunks_.load(std::memory_order_relaxed);
      const int64_t size = job_chunk_.load(std::memory_order_relaxed);
      const int64_t n = job_n_.load(std::memory_order_relaxed);
      const std::function<void(int64_t, int64_t)>* fn = job_.load(std::memory_order_relaxed);
      if (c >= chunks) break;
      if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        continue;  // v now holds the counter's current value
      }
      (*fn)(c * size, std::min(n, (c + 1) * size));
      ++finished;
      v = next_.load(std::memory_order_acquire);
    }
    if (finished > 0) done_.fetch_add(finished, std::memory_order_acq_rel);
  }

  void worker_loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      // Spin for the next call, then sleep until one comes.
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_.load());
      uint64_t now = generation_.load(std::memory_order_acquire);
      while (now == seen && !stopping_.load(std::memory_order_relaxed)) {
        for (int i = 0; i < 64 && now == seen; ++i) {
          _mm_pause();
          now = generation_.load(std::memory_order_acquire);
        }
        if (now != seen || std::chrono::steady_clock::now() >= deadline) break;
      }
      if (now == seen && !stopping_.load()) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] {
          return generation_.load(std::memory_order_acquire) != seen || stopping_.load();
        });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        now = generation_.load(std::memory_order_acquire);
      }
      if (stopping_.load()) return;
      seen = now;
      claim_and_run();  // claims nothing if the job is already over
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stopping_.store(true);
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
    stopping_.store(false);
  }

  std::mutex call_mutex_;
  std::vector<std::thread> threads_;
  std::atomic<int64_t> spin_us_{200};

  // The current job (written by the caller under call_mutex_, published through next_).
  std::atomic<const std::function<void(int64_t, int64_t)>*> job_{nullptr};
  std::atomic<int64_t> job_n_{0}, job_chunk_{1}, job_chunks_{0};
  uint64_t job_id_ = 0;
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  // The last job id, which workers wait on.
  std::atomic<uint64_t> generation_{0};

  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int64_t> sleepers_{0};
  std::atomic<bool> stopping_{false};
};

}  // namespace specd
