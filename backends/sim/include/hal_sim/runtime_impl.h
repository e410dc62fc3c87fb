// hal_sim/runtime_impl.h: the emulator runtime (fibers, scheduler, barriers, warp collectives,
// worker pool). Compiled once per (mode, warp size) as its own translation unit, which the
// executor generates as `#include <hal_sim/runtime_impl.h>`, and linked into every kernel library.
#pragma once
#include "hal_sim/runtime.h"
#include "hal_sim/entry.h"

#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

// In the "tsan" mode this translation unit is built WITHOUT -fsanitize=thread and with
// -DHAL_SIM_TSAN=1: fibers switch with __tsan_switch_to_fiber_no_sync, so the scheduler's own
// bookkeeping (run queue, fiber records, collective slots), which the hardware does not have,
// must stay invisible to TSan. Only the kernel's code is instrumented, and the only ordering TSan
// sees between the block's threads is what the annotations below state: barriers and warp
// collectives (release on arrival, acquire on departure), and block after block on a worker.
#if defined(__SANITIZE_THREAD__) && !defined(HAL_SIM_TSAN)
#define HAL_SIM_TSAN 1
#endif
#if HAL_SIM_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif
#if defined(__SANITIZE_ADDRESS__)
#define HAL_SIM_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

#if defined(__x86_64__) && !defined(HAL_SIM_UCONTEXT)
#define HAL_SIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#define HAL_SIM_EXPORT extern "C" __attribute__((visibility("default")))

extern const int warpSize = HAL_SIM_WARP;

namespace hal_sim {

constexpr int W = HAL_SIM_WARP;

#if HAL_SIM_ASM_SWITCH
// Saves the callee-saved registers of the System V ABI on the current stack, stores the stack
// pointer to *save and continues on `next` (a stack in the same layout). The FP control words are
// not switched: every fiber of the emulator runs with the same ones.
extern "C" void hal_sim_switch(void** save, void* next);
asm(R"(
    .text
    .p2align 4
    .globl hal_sim_switch
    .hidden hal_sim_switch
    .type hal_sim_switch, @function
hal_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size hal_sim_switch, .-hal_sim_switch
)");
#endif

// ---- data structures -------------------------------------------------------------------------

enum class State : uint8_t { Runnable, WaitBarrier, WaitWarp, Exited };

struct Block;

struct Fiber {
    ThreadView view;  // first: tl_current points here
    Block* block = nullptr;
    State state = State::Runnable;
    Loc loc;  // where it waits
    const char* op = nullptr;
    void* token = nullptr;  // TSan sync address it acquires when released
#if HAL_SIM_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
    char* stack_lo = nullptr;
    size_t stack_size = 0;
    void* tsan_fiber = nullptr;
    void* asan_fake = nullptr;
};

struct Group {  // one pending warp collective
    uint64_t mask = 0, arrived = 0;
    int flags = 0;
    Compute compute = nullptr;
    const char* op = nullptr;
    Loc loc;
    void* token = nullptr;
    void* payload[64];
};

struct Warp {
    uint64_t exists = 0, exited = 0;
    std::vector<Group> groups;
};

struct Launch {
    const LaunchDesc* desc;
    const char* kernel;
    void (*body)(void*);
    void* ctx;
    dim3 grid, block;
    uint64_t nblocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::string error;
    void fail(const std::string& message) {
        std::lock_guard<std::mutex> lock(m);
        if (!failed.load()) { error = message; failed.store(true); }
    }
};

struct Block {
    Launch* launch = nullptr;
    uint3 idx{};
    unsigned nthreads = 0, live = 0, exited = 0;
    int first_exited = -1;
    std::vector<Warp> warps;
    unsigned bar_arrived = 0;
    void* bar_token = nullptr;
    Loc bar_loc;
    std::vector<Fiber*> bar_waiters;
    std::vector<Fiber*> runq;  // ring buffer: every fiber is queued at most once
    size_t head = 0, count = 0;
    bool aborted = false;
    std::string error;
    char fault[256] = {0};  // written by the fault handler (no allocation there)
    void* dyn_shared = nullptr;

    void push(Fiber* f) { runq[(head + count++) % runq.size()] = f; }
    Fiber* pop() {
        if (!count) return nullptr;
        Fiber* f = runq[head];
        head = (head + 1) % runq.size();
        --count;
        return f;
    }
};

struct Worker {
    std::vector<std::unique_ptr<Fiber>> fibers;
    Block block;
#if HAL_SIM_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
    const void* os_stack_lo = nullptr;
    size_t os_stack_size = 0;
    void* tsan_sched = nullptr;
    void* asan_fake = nullptr;
    bool dirty = false;  // a block was abandoned: fiber stacks may hold sanitizer state
    std::vector<char> dyn;
    char tokens[1 << 16];  // TSan sync addresses, handed out round robin
    unsigned next_token = 0;
    char start_token = 0, exit_token = 0;

    void* new_token() { return &tokens[next_token++ & ((1u << 16) - 1)]; }
    ~Worker() {
        {
            extern void unregister_worker(Worker*);
            unregister_worker(this);
        }
        for (auto& f : fibers)
            if (f->stack_lo) munmap(f->stack_lo - page(), f->stack_size + page());
    }
    static size_t page() { static size_t p = size_t(sysconf(_SC_PAGESIZE)); return p; }
};

void unregister_worker(Worker* w);

thread_local ThreadView* tl_current = nullptr;
static thread_local Worker* tl_worker = nullptr;

inline void hb_release(void* p) {
#if HAL_SIM_TSAN
    __tsan_release(p);
#else
    (void)p;
#endif
}
inline void hb_acquire(void* p) {
#if HAL_SIM_TSAN
    __tsan_acquire(p);
#else
    (void)p;
#endif
}

static size_t stack_bytes() {
    static size_t bytes = [] {
        size_t kb = 0;
        if (const char* s = getenv("HAL_SIM_STACK_KB")) kb = size_t(atol(s));
#if HAL_SIM_TSAN || HAL_SIM_ASAN
        if (!kb) kb = 256;  // instrumented frames are larger
#else
        if (!kb) kb = 64;  // kernels keep a few hundred bytes of locals; mma gathers ~5 KB
#endif
        return (kb * 1024 + Worker::page() - 1) / Worker::page() * Worker::page();
    }();
    return bytes;
}

static Fiber* fiber_of(const ThreadView* v) { return reinterpret_cast<Fiber*>(const_cast<ThreadView*>(v)); }

// ---- context switching -----------------------------------------------------------------------

static void fiber_main();

static void switch_context(Worker& w, Fiber* from, Fiber* to, bool from_is_done) {
    tl_current = to ? &to->view : nullptr;
#if HAL_SIM_TSAN
    __tsan_switch_to_fiber(to ? to->tsan_fiber : w.tsan_sched, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
#if HAL_SIM_ASAN
    void** fake = from_is_done ? nullptr : (from ? &from->asan_fake : &w.asan_fake);
    __sanitizer_start_switch_fiber(fake, to ? to->stack_lo : w.os_stack_lo, to ? to->stack_size : w.os_stack_size);
#endif
    (void)from_is_done;
#if HAL_SIM_ASM_SWITCH
    void* dead;
    hal_sim_switch(from ? &from->sp : (from_is_done ? &dead : &w.sched_sp), to ? to->sp : w.sched_sp);
#else
    swapcontext(from ? &from->uc : &w.sched_uc, to ? &to->uc : &w.sched_uc);
#endif
#if HAL_SIM_ASAN
    __sanitizer_finish_switch_fiber(from ? from->asan_fake : w.asan_fake, nullptr, nullptr);
#endif
}

static void prepare_fiber(Worker& w, Fiber& f) {
    size_t size = stack_bytes();
    if (!f.stack_lo) {
        // A guard page below each stack turns an overflow into a fault instead of corruption.
        char* base = static_cast<char*>(mmap(nullptr, size + Worker::page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (base == MAP_FAILED) { perror("hal_sim: mmap of a fiber stack"); abort(); }
        mprotect(base, Worker::page(), PROT_NONE);
        f.stack_lo = base + Worker::page();
        f.stack_size = size;
#if HAL_SIM_TSAN
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
#if HAL_SIM_ASAN
    // A fiber leaves through frames that never return (fiber_main -> fiber_exit -> switch_context),
    // so their redzones stay poisoned at the top of its stack; the next block's fiber must not find
    // them there. A block abandoned mid-way may have left poison anywhere on the stack.
    if (w.dirty) __asan_unpoison_memory_region(f.stack_lo, f.stack_size);
    else {
        size_t top = std::min<size_t>(f.stack_size, 32 * 1024);
        __asan_unpoison_memory_region(f.stack_lo + f.stack_size - top, top);
    }
#endif
    (void)w;
#if HAL_SIM_ASM_SWITCH
    // Initial frame for hal_sim_switch: six zeroed callee-saved registers, then the address `ret`
    // jumps to, then a null return address for fiber_main, so that it starts 16-byte aligned - 8,
    // exactly as after a call.
    uintptr_t top = (uintptr_t(f.stack_lo) + f.stack_size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&fiber_main);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.sp = sp;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack_lo;
    f.uc.uc_stack.ss_size = f.stack_size;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
#endif
}

// ---- messages --------------------------------------------------------------------------------

static std::string vformat(const char* fmt, va_list ap) {
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}
static std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}
static std::string lanes(uint64_t bits) {  // "0-15,17"
    std::string s;
    for (int i = 0; i < 64;) {
        if (!((bits >> i) & 1)) { ++i; continue; }
        int j = i;
        while (j + 1 < 64 && ((bits >> (j + 1)) & 1)) ++j;
        if (!s.empty()) s += ',';
        s += j > i ? format("%d-%d", i, j) : format("%d", i);
        i = j + 1;
    }
    return s.empty() ? "none" : s;
}
static std::string where(const Loc& loc) { return format("%s:%u", loc.file_name(), unsigned(loc.line())); }
static std::string thread_name(const ThreadView& v) { return format("thread (%u,%u,%u)", v.thread_idx.x, v.thread_idx.y, v.thread_idx.z); }

// Abandons the current block with an error (a misuse the hardware would hang or misbehave on).
[[noreturn]] static void abort_block(const std::string& message) {
    Worker& w = *tl_worker;
    Fiber* f = fiber_of(tl_current);
    Block& b = w.block;
    if (b.error.empty()) b.error = message;
    b.aborted = true;
    w.dirty = true;
    switch_context(w, f, nullptr, true);
    __builtin_unreachable();
}

void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string m = vformat(fmt, ap);
    va_end(ap);
    if (!tl_current || !tl_worker) {
        fprintf(stderr, "hal_sim: %s (outside of a kernel)\n", m.c_str());
        abort();
    }
    abort_block(thread_name(*tl_current) + ": " + m);
}

// ---- scheduling --------------------------------------------------------------------------------

// Parks the current fiber (its state says why) and runs the next runnable one, or returns to the
// scheduler when none is left (all parked: either the block is done or it is deadlocked).
static void park(Fiber* f) {
    Worker& w = *tl_worker;
    switch_context(w, f, w.block.pop(), false);
}

void* dynamic_shared() { return tl_worker->block.dyn_shared; }

void syncthreads(const Loc& loc) {
    Worker& w = *tl_worker;
    Block& b = w.block;
    Fiber* f = fiber_of(tl_current);
    if (b.exited)
        fail("reached __syncthreads() at %s after %u thread(s) of the block returned (first: %s); every thread of a block must reach every "
             "__syncthreads()",
             where(loc).c_str(), b.exited, thread_name(w.fibers[b.first_exited]->view).c_str());
    if (b.bar_arrived == 0) {
        b.bar_token = w.new_token();
        b.bar_loc = loc;
    }
    b.bar_waiters[b.bar_arrived++] = f;
    hb_release(b.bar_token);  // everything before the barrier, in every thread ...
    if (b.bar_arrived == b.nthreads) {
        hb_acquire(b.bar_token);
        for (unsigned i = 0; i + 1 < b.bar_arrived; ++i) {
            b.bar_waiters[i]->state = State::Runnable;
            b.push(b.bar_waiters[i]);
        }
        b.bar_arrived = 0;
        return;
    }
    f->state = State::WaitBarrier;
    f->loc = loc;
    f->op = "__syncthreads()";
    f->token = b.bar_token;
    park(f);
    hb_acquire(f->token);  // ... happens before everything after it
}

static void complete_group(Block& b, Warp& wp, size_t gi, Fiber* self, unsigned warp_index) {
    Group& g = wp.groups[gi];
    hb_acquire(g.token);
    g.compute(g.payload, g.arrived);
    hb_release(g.token);
    uint64_t arrived = g.arrived;
    wp.groups.erase(wp.groups.begin() + long(gi));
    Worker& w = *tl_worker;
    for (int lane = 0; lane < W; ++lane) {
        if (!((arrived >> lane) & 1)) continue;
        Fiber* x = w.fibers[warp_index * W + unsigned(lane)].get();
        if (x == self) continue;
        x->state = State::Runnable;
        b.push(x);
    }
}

void collective(uint64_t mask, int flags, const char* op, Compute compute, void* payload, const Loc& loc) {
    Worker& w = *tl_worker;
    Block& b = w.block;
    Fiber* f = fiber_of(tl_current);
    unsigned warp_index = f->view.linear / W, lane = f->view.lane;
    Warp& wp = b.warps[warp_index];
    uint64_t bit = 1ull << lane;
    bool maskless = flags & kMaskless;
    if (!maskless) {
        if (!(mask & bit)) fail("%s at %s: the calling lane %u is not in the mask 0x%llx", op, where(loc).c_str(), lane, (unsigned long long)mask);
        if (mask & ~wp.exists)
            fail("%s at %s: the mask 0x%llx names lane(s) %s that do not exist (the block has %u threads; warp %u has lanes %s)", op,
                 where(loc).c_str(), (unsigned long long)mask, lanes(mask & ~wp.exists).c_str(), b.nthreads, warp_index, lanes(wp.exists).c_str());
        if (mask & wp.exited)
            fail("%s at %s: the mask 0x%llx names lane(s) %s of warp %u that have exited", op, where(loc).c_str(), (unsigned long long)mask,
                 lanes(mask & wp.exited).c_str(), warp_index);
    }
    size_t gi = wp.groups.size();
    for (size_t i = 0; i < wp.groups.size(); ++i) {
        Group& x = wp.groups[i];
        bool same = maskless ? (x.flags & kMaskless) != 0 : (!(x.flags & kMaskless) && x.mask == mask);
        if (same) { gi = i; break; }
        if (maskless || (x.flags & kMaskless) || (x.mask & mask))
            fail("lane %u of warp %u reached %s at %s (mask 0x%llx) while lanes %s wait in %s at %s (mask 0x%llx): lanes of a warp must meet "
                 "in the same collective with the same mask",
                 lane, warp_index, op, where(loc).c_str(), (unsigned long long)mask, lanes(x.arrived).c_str(), x.op, where(x.loc).c_str(),
                 (unsigned long long)x.mask);
    }
    if (gi == wp.groups.size()) {
        wp.groups.emplace_back();
        Group& g = wp.groups.back();
        g.mask = maskless ? 0 : mask;
        g.flags = flags;
        g.compute = compute;
        g.op = op;
        g.loc = loc;
        g.token = w.new_token();
        std::memset(g.payload, 0, sizeof g.payload);
    }
    Group& g = wp.groups[gi];
    if (g.compute != compute || std::strcmp(g.op, op) != 0)
        fail("lane %u of warp %u reached %s at %s while lanes %s wait in %s at %s: lanes of a warp must meet in the same collective", lane,
             warp_index, op, where(loc).c_str(), lanes(g.arrived).c_str(), g.op, where(g.loc).c_str());
    g.arrived |= bit;
    g.payload[lane] = payload;
    hb_release(g.token);
    uint64_t expected = maskless ? (wp.exists & ~wp.exited) : g.mask;
    if (g.arrived == expected) {
        complete_group(b, wp, gi, f, warp_index);
        return;
    }
    void* token = g.token;
    f->state = State::WaitWarp;
    f->loc = loc;
    f->op = op;
    f->token = token;
    park(f);
    hb_acquire(token);
}


// ---- faults in kernel code (release mode) -------------------------------------------------------
// A wild pointer in a kernel must not take the Python process down: a fault raised while a fiber
// of this library runs abandons the block (like any other error) and the launch fails with the
// fault's description. The handler runs on an alternate signal stack (a fiber stack overflow hits
// the guard page), never returns to the faulting code, and passes every other fault on to the
// handler that was installed before (Python's faulthandler, for instance). The sanitizer modes
// leave faults to the sanitizers, which report them with a stack.
#if !HAL_SIM_TSAN && !HAL_SIM_ASAN
static struct sigaction previous_action[32];
static const int fault_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};

static void on_fault(int sig, siginfo_t* info, void* context) {
    Worker* w = tl_worker;
    if (w && tl_current && w->block.launch) {
        Block& b = w->block;
        const char* what = sig == SIGSEGV ? "SIGSEGV (invalid memory access)" : sig == SIGBUS ? "SIGBUS (misaligned or invalid access)"
                         : sig == SIGFPE ? "SIGFPE (integer division by zero or overflow)" : "SIGILL (trap or unreachable code reached)";
        const ThreadView& v = *tl_current;
        uintptr_t addr = uintptr_t(info->si_addr);
        Fiber* f = fiber_of(tl_current);
        bool overflow = sig == SIGSEGV && addr >= uintptr_t(f->stack_lo) - Worker::page() && addr < uintptr_t(f->stack_lo);
        snprintf(b.fault, sizeof b.fault, "thread (%u,%u,%u): the kernel faulted: %s at address 0x%lx%s", v.thread_idx.x, v.thread_idx.y,
                 v.thread_idx.z, what, (unsigned long)addr, overflow ? " (fiber stack overflow: raise HAL_SIM_STACK_KB)" : "");
        b.aborted = true;
        w->dirty = true;
        tl_current = nullptr;
#if HAL_SIM_ASM_SWITCH
        void* dead;
        hal_sim_switch(&dead, w->sched_sp);  // the signal frame on the alternate stack is abandoned
#else
        setcontext(&w->sched_uc);
#endif
    }
    struct sigaction& prev = previous_action[sig];
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) { prev.sa_sigaction(sig, info, context); return; }
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);  // returning re-executes the faulting instruction, which now terminates
}

static void install_fault_handlers() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;  // NODEFER: the handler never returns to unblock it
    sigemptyset(&sa.sa_mask);
    for (int sig : fault_signals) sigaction(sig, &sa, &previous_action[sig]);
}

static void ensure_alternate_stack() {
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && !(current.ss_flags & SS_DISABLE) && current.ss_size >= 16384) return;
    stack_t st;
    st.ss_size = 64 * 1024;
    st.ss_sp = malloc(st.ss_size);  // kept for the thread's life
    st.ss_flags = 0;
    if (st.ss_sp) sigaltstack(&st, nullptr);
}
#else
static void install_fault_handlers() {}
static void ensure_alternate_stack() {}
#endif

static void fiber_exit(Worker& w, Fiber* f) {
    Block& b = w.block;
    unsigned warp_index = f->view.linear / W;
    Warp& wp = b.warps[warp_index];
    uint64_t bit = 1ull << f->view.lane;
    f->state = State::Exited;
    --b.live;
    if (b.exited++ == 0) b.first_exited = int(f->view.linear);
    wp.exited |= bit;
    if (b.bar_arrived)
        fail("returned while %u thread(s) of the block wait at __syncthreads() (%s); every thread of a block must reach every __syncthreads()",
             b.bar_arrived, where(b.bar_loc).c_str());
    for (size_t i = 0; i < wp.groups.size(); ++i) {
        Group& g = wp.groups[i];
        if (!(g.flags & kMaskless) && (g.mask & bit))
            fail("lane %u of warp %u returned while lanes %s wait for it in %s at %s (mask 0x%llx)", f->view.lane, warp_index, lanes(g.arrived).c_str(),
                 g.op, where(g.loc).c_str(), (unsigned long long)g.mask);
    }
    for (size_t i = 0; i < wp.groups.size();) {  // a maskless group may now be complete
        Group& g = wp.groups[i];
        if ((g.flags & kMaskless) && g.arrived == (wp.exists & ~wp.exited)) complete_group(b, wp, i, f, warp_index);
        else ++i;
    }
    hb_release(&w.exit_token);
    switch_context(w, f, b.pop(), true);
    __builtin_unreachable();
}

static void fiber_main() {
    Worker& w = *tl_worker;
#if HAL_SIM_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    hb_acquire(&w.start_token);
    Fiber* f = fiber_of(tl_current);
    Launch& L = *w.block.launch;
    try {
        L.body(L.ctx);
    } catch (const std::exception& e) {
        fail("the kernel threw an exception: %s", e.what());
    } catch (...) {
        fail("the kernel threw an exception");
    }
    fiber_exit(w, f);
}

static std::string deadlock_report(Worker& w) {
    Block& b = w.block;
    std::string s = format("deadlock: %u of %u threads can never continue:", b.live, b.nthreads);
    if (b.bar_arrived) s += format(" %u thread(s) wait at __syncthreads() (%s);", b.bar_arrived, where(b.bar_loc).c_str());
    for (size_t wi = 0; wi < b.warps.size(); ++wi) {
        Warp& wp = b.warps[wi];
        for (auto& g : wp.groups) {
            uint64_t expected = (g.flags & kMaskless) ? (wp.exists & ~wp.exited) : g.mask;
            uint64_t missing = expected & ~g.arrived;
            s += format(" warp %zu: lanes %s wait in %s at %s for lanes %s", wi, lanes(g.arrived).c_str(), g.op, where(g.loc).c_str(),
                        lanes(missing).c_str());
            for (int lane = 0; lane < W; ++lane) {
                if (!((missing >> lane) & 1)) continue;
                Fiber* x = w.fibers[wi * W + unsigned(lane)].get();
                s += format(" (lane %d is in %s at %s)", lane, x->op ? x->op : "?", where(x->loc).c_str());
                break;
            }
            s += ";";
        }
    }
    if (!s.empty() && s.back() == ';') s.pop_back();
    return s;
}

static bool run_block(Worker& w, Launch& L, uint64_t linear) {
    Block& b = w.block;
    const dim3 bd = L.block, gd = L.grid;
    unsigned n = bd.x * bd.y * bd.z, nwarps = (n + W - 1) / W;
    b.launch = &L;
    b.idx = {unsigned(linear % gd.x), unsigned((linear / gd.x) % gd.y), unsigned(linear / (uint64_t(gd.x) * gd.y))};
    b.nthreads = b.live = n;
    b.exited = 0;
    b.first_exited = -1;
    b.bar_arrived = 0;
    b.aborted = false;
    b.error.clear();
    b.fault[0] = 0;
    if (b.bar_waiters.size() < n) b.bar_waiters.resize(n);
    b.runq.assign(n, nullptr);
    b.head = b.count = 0;
    if (b.warps.size() < nwarps) b.warps.resize(nwarps);
    for (unsigned i = 0; i < nwarps; ++i) {
        unsigned lanes_here = std::min<unsigned>(W, n - i * W);
        b.warps[i].exists = lanes_here == 64 ? ~0ull : ((1ull << lanes_here) - 1);
        b.warps[i].exited = 0;
        b.warps[i].groups.clear();
    }
    // Dynamic shared memory: undefined contents on the device; NaN bytes here.
    size_t sb = L.desc->shared_bytes;
#if HAL_SIM_ASAN
    b.dyn_shared = malloc(sb ? sb : 1);  // its own allocation, so that ASan sees the bounds
#else
    if (w.dyn.size() < sb + 64) w.dyn.resize(sb + 64);
    b.dyn_shared = reinterpret_cast<void*>((uintptr_t(w.dyn.data()) + 63) & ~uintptr_t(63));
#endif
    std::memset(b.dyn_shared, 0xFF, sb);
    while (w.fibers.size() < n) w.fibers.push_back(std::make_unique<Fiber>());
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = *w.fibers[i];
        prepare_fiber(w, f);
        f.view.thread_idx = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        f.view.block_idx = b.idx;
        f.view.block_dim = bd;
        f.view.grid_dim = gd;
        f.view.linear = i;
        f.view.lane = i % W;
        f.block = &b;
        f.state = State::Runnable;
        f.op = nullptr;
#if HAL_SIM_TSAN
        // TSan calls fibers threads ("T257"); its report then names the GPU thread.
        std::string name = format("%s block (%u,%u,%u) thread (%u,%u,%u)", L.kernel, b.idx.x, b.idx.y, b.idx.z, f.view.thread_idx.x,
                                  f.view.thread_idx.y, f.view.thread_idx.z);
        __tsan_set_fiber_name(f.tsan_fiber, name.c_str());
#endif
        b.push(&f);
    }
    w.dirty = false;
    hb_release(&w.start_token);  // the previous block on this worker happens before this one
    while (!b.aborted) {
        Fiber* f = b.pop();
        if (!f) break;
        switch_context(w, nullptr, f, false);
    }
    hb_acquire(&w.exit_token);
#if HAL_SIM_ASAN
    free(b.dyn_shared);
#endif
    b.dyn_shared = nullptr;
    tl_current = nullptr;
    b.launch = nullptr;
    std::string error;
    if (b.aborted) error = b.fault[0] ? std::string(b.fault) : b.error;
    else if (b.live) { error = deadlock_report(w); w.dirty = true; }
    if (!error.empty()) {
        L.fail(format("%s: block (%u,%u,%u): %s", L.kernel, b.idx.x, b.idx.y, b.idx.z, error.c_str()));
        return false;
    }
    return true;
}

// Initialized when the library loads, before any worker exists (a function-local static would be
// initialized under a guard that, in this uninstrumented file, TSan cannot see).
static std::mutex registry_m;
static std::vector<Worker*>* const registry_v = new std::vector<Worker*>();
static std::mutex& registry_mutex() { return registry_m; }
static std::vector<Worker*>& registry() { return *registry_v; }

static Worker& this_worker() {
    static thread_local std::unique_ptr<Worker> mine;
    if (!mine) {
        mine = std::make_unique<Worker>();
        {
            std::lock_guard<std::mutex> lock(registry_mutex());
            registry().push_back(mine.get());
        }
        pthread_attr_t attr;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            void* lo;
            size_t size;
            pthread_attr_getstack(&attr, &lo, &size);
            mine->os_stack_lo = lo;
            mine->os_stack_size = size;
            pthread_attr_destroy(&attr);
        }
#if HAL_SIM_TSAN
        mine->tsan_sched = __tsan_get_current_fiber();
#endif
        ensure_alternate_stack();
    }
    tl_worker = mine.get();
    return *mine;
}

void unregister_worker(Worker* w) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto& r = registry();
    for (size_t i = 0; i < r.size(); ++i)
        if (r[i] == w) { r.erase(r.begin() + long(i)); break; }
}

static void work(Launch& L) {
    Worker& w = this_worker();
    while (!L.failed.load(std::memory_order_relaxed)) {
        uint64_t b = L.next.fetch_add(1);
        if (b >= L.nblocks) break;
        if (!run_block(w, L, b)) break;
    }
}

// ---- worker pool -------------------------------------------------------------------------------

struct Pool {
    std::mutex m;
    std::condition_variable wake, done;
    Launch* job = nullptr;
    uint64_t generation = 0;
    int busy = 0, wanted = 0;
    int size = 0;
    std::vector<std::thread> threads;
    std::mutex launches;  // one launch at a time per library

    Pool() {
        size = int(std::thread::hardware_concurrency());
        if (const char* s = getenv("HAL_SIM_WORKERS")) size = atoi(s);
        if (size < 1) size = 1;
    }
    void grow(int helpers) {  // called with `launches` held
        while (int(threads.size()) < helpers) threads.emplace_back([this] { loop(); });
    }
    void loop() {
        uint64_t seen = 0;
        for (;;) {
            Launch* L;
            {
                std::unique_lock<std::mutex> lock(m);
                wake.wait(lock, [&] { return generation != seen && job && wanted > 0; });
                seen = generation;
                L = job;
                --wanted;
                ++busy;
            }
            work(*L);
            {
                std::lock_guard<std::mutex> lock(m);
                if (--busy == 0) done.notify_all();
            }
        }
    }
    void run(Launch& L) {
        int helpers = int(std::min<uint64_t>(uint64_t(size - 1), L.nblocks - 1));
        if (helpers > 0) {
            grow(helpers);
            std::lock_guard<std::mutex> lock(m);
            job = &L;
            wanted = helpers;
            ++generation;
            wake.notify_all();
        }
        work(L);  // the calling thread is a worker too
        if (helpers > 0) {
            std::unique_lock<std::mutex> lock(m);
            job = nullptr;  // helpers that did not wake up yet will not take this launch
            wanted = 0;
            done.wait(lock, [&] { return busy == 0; });
        }
    }
};

static Pool* const the_pool = new Pool();  // never destroyed: idle helpers just end with the process
[[maybe_unused]] static const bool fault_handlers_installed = (install_fault_handlers(), true);
static Pool& pool() { return *the_pool; }

int launch_error(const LaunchDesc& d, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string m = vformat(fmt, ap);
    va_end(ap);
    if (d.error && d.error_size) snprintf(d.error, d.error_size, "%s", m.c_str());
    return 1;
}

// Limits of the architecture the emulator presents (sm_80 / gfx90a).
#if HAL_SIM_WARP == 32
constexpr uint64_t kMaxDynamicShared = 163 * 1024;  // sm_80 opt-in maximum per block
#else
constexpr uint64_t kMaxDynamicShared = 64 * 1024;  // LDS per workgroup on CDNA
#endif

int run_launch(const LaunchDesc& d, const char* kernel, void (*body)(void*), void* ctx) {
    dim3 grid(d.grid[0], d.grid[1], d.grid[2]), block(d.block[0], d.block[1], d.block[2]);
    uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (!block.x || !block.y || !block.z || !grid.x || !grid.y || !grid.z)
        return launch_error(d, "%s: invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u): every dimension must be at least 1", kernel, grid.x,
                            grid.y, grid.z, block.x, block.y, block.z);
    if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        return launch_error(d, "%s: block (%u,%u,%u) has %llu threads: at most 1024 per block (x, y <= 1024, z <= 64)", kernel, block.x, block.y,
                            block.z, (unsigned long long)threads);
    if (grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535)
        return launch_error(d, "%s: grid (%u,%u,%u) too large (x < 2^31, y and z <= 65535)", kernel, grid.x, grid.y, grid.z);
    if (d.shared_bytes > kMaxDynamicShared)
        return launch_error(d, "%s: %llu bytes of dynamic shared memory requested; at most %llu per block", kernel, (unsigned long long)d.shared_bytes,
                            (unsigned long long)kMaxDynamicShared);
    Launch L;
    L.desc = &d;
    L.kernel = kernel;
    L.body = body;
    L.ctx = ctx;
    L.grid = grid;
    L.block = block;
    L.nblocks = uint64_t(grid.x) * grid.y * grid.z;
    Pool& p = pool();
    {
        std::lock_guard<std::mutex> lock(p.launches);
        p.run(L);
    }
    if (L.failed.load()) return launch_error(d, "%s", L.error.c_str());
    return 0;
}

}  // namespace hal_sim

HAL_SIM_EXPORT int hal_sim_warp_size() { return HAL_SIM_WARP; }

// Releases the sanitizer state of every worker's fibers (the driver calls it before exiting:
// a TSan process that exits with hundreds of live fibers spends a second tearing them down).
HAL_SIM_EXPORT void hal_sim_shutdown() {
#if HAL_SIM_TSAN
    std::lock_guard<std::mutex> lock(hal_sim::registry_mutex());
    for (auto* w : hal_sim::registry())
        for (auto& f : w->fibers)
            if (f->tsan_fiber) { __tsan_destroy_fiber(f->tsan_fiber); f->tsan_fiber = nullptr; }
#endif
}
HAL_SIM_EXPORT void hal_sim_set_workers(int n) {
    auto& p = hal_sim::pool();
    std::lock_guard<std::mutex> lock(p.launches);
    p.size = n < 1 ? 1 : n;
}
