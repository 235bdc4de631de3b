// The int4 extension's kernel threads (its pool_handle(), work_pool.h), borrowed by specd's
// other kernel extensions (paged_attention.cpp, top_k.cpp) so that one set of workers serves
// every kernel of a step. Each extension compiles its own copy of this header: the pointer is
// per extension, set by its use_pool().
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <functional>

#include "work_pool.h"

namespace specd {

inline WorkPool*& borrowed_pool() {
  static WorkPool* pool = nullptr;
  return pool;
}

// Python's use_pool(handle): run on the threads behind the int4 extension's pool_handle().
inline void use_pool(const py::capsule& handle) {
  void* pool = PyCapsule_GetPointer(handle.ptr(), "specd.WorkPool");
  if (pool == nullptr) throw py::error_already_set();
  borrowed_pool() = static_cast<WorkPool*>(pool);
}

// fn(begin, end) over [0, n), grain 1: on the borrowed pool, or at::parallel_for until then.
inline void parallel_rows(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (borrowed_pool() != nullptr) {
    borrowed_pool()->parallel_for(n, 1, fn);
  } else {
    at::parallel_for(0, n, 1, fn);
  }
}

}  // namespace specd
