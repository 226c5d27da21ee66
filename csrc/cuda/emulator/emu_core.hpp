// calm_fast's CUDA emulator: runs the CUDA kernels of csrc/cuda on the CPU, each CUDA thread
// a fiber (ucontext) of one OS thread, so that their logic is tested where no GPU is (CI).
// Not a model of timing: it checks indexing, masking, reductions, the collectives' data flow
// and the phases of the cooperative decode step (and, under ThreadSanitizer, the ordering of
// memory accesses between threads; see below).
//
// The headers in this folder stand in for cuda_runtime.h, cuda_bf16.h, cuda_fp16.h, mma.h and
// cooperative_groups.h; the .cu files compile unchanged with
//   g++ -std=c++20 -DCF_CUDA_EMULATOR -I csrc/cuda/emulator -I csrc -x c++ FILE.cu
// (tests/test_cuda_emulated.py). Kernels launch through cf::cuda::launch_kernel /
// launch_cooperative (common.cuh), which land in cf_emu::launch here.
//
// Semantics kept: every warp collective (__shfl*_sync, __any_sync, __syncwarp) is a rendezvous
// of the warp's lanes, __syncthreads of the block's threads, grid.sync() of the whole grid
// (a cooperative launch runs every block at once; others run block after block). A fiber
// runs until it reaches a collective, so lanes interleave only there, as a warp's lanes in
// lockstep do. A collective that some thread never reaches (divergent code: a hang on a GPU)
// fails the launch at once with the collective's name.
//
// Built with -fsanitize=thread (tests/test_cuda_racecheck.py), the emulator is a race checker
// for the kernels: every CUDA thread is a ThreadSanitizer fiber, fibers switch without implying
// any order, and order comes only from what orders memory between GPU threads: the launch
// (inputs before every thread, every thread before the outputs are read), __syncwarp,
// __syncthreads and grid.sync() (each thread releases at arrival and acquires on leaving),
// and __threadfence (modelled as one global sequentially consistent fence; atomics are relaxed).
// Shuffles, __any_sync, ldmatrix and mma.sync move registers only and order nothing. All blocks
// of a launch then run at once, so TSan reports any two accesses to shared or global memory
// from different CUDA threads, one of them a write, that no barrier orders: a missing
// __syncthreads / __syncwarp, a block writing what another block reads.
#pragma once
#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CF_EMU_TSAN 1
extern "C" void __tsan_ignore_thread_begin(void);
extern "C" void __tsan_ignore_thread_end(void);
#else
#define CF_EMU_TSAN 0
#endif

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace cf_emu {

// ThreadSanitizer's fibers and happens-before edges (no-ops in other builds).
namespace tsan {
#if CF_EMU_TSAN
// Not instrumented themselves: a switch inside an instrumented function would enter it in one
// fiber's shadow stack and leave it in another's.
#define CF_EMU_UNINSTRUMENTED __attribute__((no_sanitize_thread))
CF_EMU_UNINSTRUMENTED inline void* current() { return __tsan_get_current_fiber(); }
CF_EMU_UNINSTRUMENTED inline void* create() { return __tsan_create_fiber(0); }
CF_EMU_UNINSTRUMENTED inline void destroy(void* f) { __tsan_destroy_fiber(f); }
CF_EMU_UNINSTRUMENTED inline void switch_to(void* f) { __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync); }
CF_EMU_UNINSTRUMENTED inline void release(const void* token) { __tsan_release(const_cast<void*>(token)); }
CF_EMU_UNINSTRUMENTED inline void acquire(const void* token) { __tsan_acquire(const_cast<void*>(token)); }
// The emulator's own bookkeeping (scheduler, barrier queues, shuffle slots) is not GPU memory:
// the calling thread's accesses are not checked while one of these lives.
struct Unchecked {
  Unchecked() { __tsan_ignore_thread_begin(); }
  ~Unchecked() { __tsan_ignore_thread_end(); }
  Unchecked(const Unchecked&) = delete;
  Unchecked& operator=(const Unchecked&) = delete;
};
#else
inline void* current() { return nullptr; }
inline void* create() { return nullptr; }
inline void destroy(void*) {}
inline void switch_to(void*) {}
inline void release(const void*) {}
inline void acquire(const void*) {}
struct Unchecked {
  Unchecked() {}   // user-provided: a guard, not an unused variable
  ~Unchecked() {}
};
#endif
}  // namespace tsan

struct Fiber;
class Barrier;

struct Warp;
struct Block;
struct ThreadCtx {
  Block* block = nullptr;
  Warp* warp = nullptr;
  Barrier* grid = nullptr;  // cooperative launches only
  Fiber* fiber = nullptr;
  int lane = 0;
};
inline thread_local ThreadCtx ctx;

struct Fiber {
  enum State { kReady, kWaiting, kDone };
  ucontext_t uc;
  std::unique_ptr<char[]> stack;
  State state = kReady;
  const char* waiting_on = nullptr;
  ThreadCtx tctx;
  uint3 tid{}, bid{};
  std::function<void()> body;
  // cp.async: copies of each committed group (and the open one), done when a wait retires them.
  struct Copy { void* dst; const void* src; bool valid; };
  std::vector<std::vector<Copy>> cp_groups;
  std::vector<Copy> cp_open;
  long polls = 0;  // __nanosleep calls: a spin-wait that never ends aborts
  void* tsan = nullptr;  // this thread's ThreadSanitizer fiber (race-checking builds)
};

struct Scheduler {
  ucontext_t main;
  Fiber* current = nullptr;
  std::string fault;  // set by misuse(): the launch stops and fails with this message
  void* tsan_main = nullptr;         // the scheduler's own ThreadSanitizer context
  char launch_token = 0, done_token = 0;  // the launch's happens-before edges (see tsan)
};
inline thread_local Scheduler* sched = nullptr;
inline thread_local std::string last_failure;  // why the last launch failed

inline void yield() {
  tsan::switch_to(sched->tsan_main);
  swapcontext(&sched->current->uc, &sched->main);
}

// A reusable rendezvous whose party shrinks as threads exit (exited GPU threads no longer
// take part in __syncthreads). `orders_memory`: what each thread did before it is visible to
// every thread after it (the barriers; not the register exchanges of shuffles). Two tokens by
// generation, so that a thread already at the next generation cannot hand its later accesses
// to one still leaving this one.
class Barrier {
 public:
  explicit Barrier(int parties) : expected_(parties) {}
  void wait(const char* what, bool orders_memory = true) {
    tsan::Unchecked unchecked;
    const unsigned gen = generation_;
    if (orders_memory) tsan::release(&token_[gen & 1]);
    if (int(waiting_.size()) + 1 >= expected_) {
      release();
    } else {
      Fiber* me = sched->current;
      me->state = Fiber::kWaiting;
      me->waiting_on = what;
      waiting_.push_back(me);
      yield();
    }
    if (orders_memory) tsan::acquire(&token_[gen & 1]);
  }
  void drop() {
    tsan::Unchecked unchecked;
    --expected_;
    if (!waiting_.empty() && int(waiting_.size()) >= expected_) release();
  }

 private:
  void release() {
    for (Fiber* f : waiting_) f->state = Fiber::kReady;
    waiting_.clear();
    ++generation_;
  }
  int expected_;
  unsigned generation_ = 0;
  char token_[2] = {};
  std::vector<Fiber*> waiting_;
};

struct Warp {
  explicit Warp(int n) : size(n), bar(n) {}
  int size;
  Barrier bar;
  uint64_t slots[2][32] = {};  // shuffle values, alternating buffers: one rendezvous per shuffle
  int parity[32] = {};
  unsigned char wide[2][32][64] = {};  // gather_all: up to 64 bytes per lane, alternating buffers
  int wide_parity[32] = {};
};

struct Block {
  Block(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes + 128) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
  unsigned char* smem_base() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(smem.data());
    return reinterpret_cast<unsigned char*>((p + 127) / 128 * 128);
  }
};

inline unsigned char* dynamic_smem() { return ctx.block->smem_base(); }

// Lane `src`'s value v in the calling warp (every lane of the warp calls). Buffers alternate,
// so a lane that runs ahead to the next shuffle cannot overwrite a value still to be read.
template <typename T>
T exchange(T v, int src, const char* what) {
  tsan::Unchecked unchecked;
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Warp& w = *ctx.warp;
  const int buf = w.parity[ctx.lane];
  w.parity[ctx.lane] ^= 1;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  w.slots[buf][ctx.lane] = bits;
  w.bar.wait(what, false);
  const uint64_t got = w.slots[buf][src & 31];
  T out;
  std::memcpy(&out, &got, sizeof out);
  return out;
}

// Every lane's v, indexed by lane (every lane of the warp calls): the emulated tensor-core
// instructions read whole matrices from their fragments this way.
template <typename T>
void gather_all(const T& v, T (&all)[32], const char* what) {
  tsan::Unchecked unchecked;
  static_assert(sizeof(T) <= 64, "gather_all moves at most 64 bytes per lane");
  Warp& w = *ctx.warp;
  const int buf = w.wide_parity[ctx.lane];
  w.wide_parity[ctx.lane] ^= 1;
  std::memcpy(w.wide[buf][ctx.lane], &v, sizeof v);
  w.bar.wait(what, false);
  for (int i = 0; i < 32; ++i) std::memcpy(&all[i], w.wide[buf][i], sizeof v);
}

// A kernel did what faults on a GPU (a misaligned address, a spin that never ends): the launch
// stops and fails with this message; the calling fiber is never resumed (its stack is freed).
[[noreturn]] inline void misuse(const std::string& what) {
  tsan::Unchecked unchecked;
  sched->fault = "calm_fast CUDA emulator: " + what;
  sched->current->state = Fiber::kWaiting;
  sched->current->waiting_on = "a fault";
  yield();
  std::abort();  // not reached: the scheduler never resumes a faulted fiber
}

// Not instrumented: it ends in the scheduler's ThreadSanitizer context (its return would
// otherwise pop the scheduler's shadow stack).
#if CF_EMU_TSAN
CF_EMU_UNINSTRUMENTED
#endif
inline void trampoline() {
  Fiber* f = sched->current;
  tsan::acquire(&sched->launch_token);  // the launch's inputs were written before
  f->body();
  tsan::release(&sched->done_token);    // ... and its outputs are read after
  {
    tsan::Unchecked unchecked;
    f->state = Fiber::kDone;
    ctx.warp->bar.drop();
    ctx.block->bar.drop();
    if (ctx.grid != nullptr) ctx.grid->drop();
  }
  tsan::switch_to(sched->tsan_main);
}  // returns to uc_link: the scheduler

// Runs the fibers until all are done; false (and last_failure set) on a deadlock or a fault.
inline bool run_fibers(std::vector<std::unique_ptr<Fiber>>& fibers) {
  tsan::Unchecked unchecked;
  Scheduler s;
  s.tsan_main = tsan::current();
  for (auto& f : fibers) {  // a fiber that returns resumes the scheduler
    f->uc.uc_link = &s.main;
    makecontext(&f->uc, trampoline, 0);
    f->tsan = tsan::create();
  }
  Scheduler* outer = sched;
  sched = &s;
  tsan::release(&s.launch_token);
  bool ok = true;
  // Visiting order: launch order, or (CF_EMU_SEED=n) shuffled anew each round with each ready
  // fiber skipped half the time, so that warps drift apart and a missing barrier or wait shows
  // whichever thread the code wrongly assumes has run first.
  std::vector<size_t> order(fibers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  const char* seed_env = std::getenv("CF_EMU_SEED");
  uint64_t seed = seed_env != nullptr ? std::strtoull(seed_env, nullptr, 10) : 0;
  for (;;) {
    bool ran = false, left = false;
    if (seed != 0)
      for (size_t i = order.size(); i > 1; --i) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i - 1], order[(seed >> 33) % i]);
      }
    bool ready = false;
    for (size_t i : order) {
      auto& f = fibers[i];
      if (f->state == Fiber::kDone) continue;
      left = true;
      if (f->state != Fiber::kReady) continue;
      ready = true;
      if (seed != 0) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        if ((seed >> 62) & 1) continue;  // this round without it
      }
      ran = true;
      s.current = f.get();
      ctx = f->tctx;
      threadIdx = f->tid;
      blockIdx = f->bid;
      tsan::switch_to(f->tsan);
      swapcontext(&s.main, &f->uc);
      if (!s.fault.empty()) break;
    }
    if (!s.fault.empty()) {
      last_failure = s.fault;
      std::fprintf(stderr, "%s\n", last_failure.c_str());
      ok = false;
      break;
    }
    if (!left) break;
    if (!ran && ready) continue;  // every ready fiber was skipped this round
    if (!ran) {  // everyone waits: name what they wait at
      std::string what;
      for (auto& f : fibers)
        if (f->state == Fiber::kWaiting && what.find(f->waiting_on) == std::string::npos)
          what += std::string(what.empty() ? "" : ", ") + f->waiting_on;
      last_failure = "calm_fast CUDA emulator: deadlock: threads wait at " + what +
                     " that other threads of the same warp/block/grid never reach (divergent collective)";
      std::fprintf(stderr, "%s\n", last_failure.c_str());
      ok = false;
      break;
    }
  }
  tsan::acquire(&s.done_token);
  for (auto& f : fibers) tsan::destroy(f->tsan);
  sched = outer;
  return ok;
}

constexpr size_t kStackBytes = 256 * 1024;

// Runs kernel(args...) over grid x block threads. Blocks of a cooperative launch run at
// once (grid.sync() is a barrier of all of them); otherwise one block after another, except
// when race checking, where they run at once too (blocks of a launch are unordered).
template <typename... KArgs>
bool run_blocks(bool cooperative, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                const std::tuple<KArgs...>& args) {
  const int threads = int(block.x * block.y * block.z);
  const long blocks = long(grid.x) * grid.y * grid.z;
  std::unique_ptr<Barrier> grid_bar(cooperative ? new Barrier(int(blocks * threads)) : nullptr);
  blockDim = block;
  gridDim = grid;
  auto run_group = [&](long first, long count) {
    std::vector<std::unique_ptr<Block>> states;
    std::vector<std::unique_ptr<Fiber>> fibers;
    for (long i = 0; i < count; ++i) {
      states.emplace_back(new Block(threads, smem));
      const long id = first + i;
      const uint3 bid{unsigned(id % grid.x), unsigned(id / grid.x % grid.y), unsigned(id / (long(grid.x) * grid.y))};
      for (int t = 0; t < threads; ++t) {
        auto f = std::make_unique<Fiber>();
        f->stack.reset(new char[kStackBytes]);
        getcontext(&f->uc);
        f->uc.uc_stack.ss_sp = f->stack.get();
        f->uc.uc_stack.ss_size = kStackBytes;
        f->tctx = ThreadCtx{states.back().get(), states.back()->warps[size_t(t / 32)].get(), grid_bar.get(), f.get(),
                            t % 32};
        f->tid = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (block.x * block.y))};
        f->bid = bid;
        f->body = [kernel, &args] { std::apply(kernel, args); };
        fibers.push_back(std::move(f));
      }
    }
    return run_fibers(fibers);
  };
  if (cooperative || CF_EMU_TSAN) return run_group(0, blocks);
  for (long id = 0; id < blocks; ++id)
    if (!run_group(id, 1)) return false;
  return true;
}

}  // namespace cf_emu
