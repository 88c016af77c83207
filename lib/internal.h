/*
 * The one private header of ctx: object layout, the lock, the state word.
 *
 * Internal symbols are named ctxi_* so that the version script (lib/ctx.map),
 * which exports ctx_* only, can never leak one.
 *
 * Locking.  Every cancellable node has one small futex lock (ctxi_lock).  It
 * guards that node's children list, the list links (next, pprev) of the
 * children registered with it, and the creation of its fd.
 * Every locker reads the node's state after taking the lock, with ctxi_lock's
 * seq_cst CAS and ctxi_state's seq_cst load: the cascade's quiet-leaf fast
 * path depends on that (lib/tree.c), so keep both seq_cst.
 *
 * Lock order: parent before child, within one subtree.  Only the cancel
 * cascade holds more than one node lock (the locks of the path from the
 * cancelled node to the node it visits, and of nodes below it that it has
 * finished but not yet flushed, see lib/tree.c); every other path holds at
 * most one and never blocks while holding it.  The after-function lock (lib/after.c) is never held
 * with a node lock.
 */
#ifndef CTX_INTERNAL_H
#define CTX_INTERNAL_H

#include "ctx.h"

#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

enum ctxi_kind {
	CTXI_ROOT,    /* background, todo: static, never done */
	CTXI_WITHOUT, /* ctx_without_cancel: never done, values pass through */
	CTXI_VALUE,   /* ctx_with_value: done exactly when its parent is */
	CTXI_CANCEL,  /* cancellable, no effective deadline: struct ctxi_cancel */
	CTXI_TIMED,   /* cancellable, with an effective deadline: struct ctxi_timed */
	CTXI_AFTER,   /* an after-function registration (lib/after.c); never a
			 context, only a member of an anchor's children list */
};

enum { CTXI_REG_LAZY, CTXI_REG_LINKED, CTXI_REG_TOP };

struct ctx {
	_Atomic uint32_t refs; /* unused on CTXI_ROOT */
	uint8_t kind;
	/* Cancellable nodes: 1 while in the anchor's children list.  Set under
	 * the anchor's lock before the node is shared; cleared by a cascade
	 * (release) only once it will not touch the node any more, or by
	 * ctxi_unlink() under the anchor's lock; so ctxi_unlink() can skip the
	 * anchor's lock when it reads 0 (acquire). */
	_Atomic uint8_t linked;
	/* Cancellable nodes: CTXI_REG_LAZY on a lazy leaf (see "Lazy
	 * registration" in lib/tree.c), whose state is its own or, if that is
	 * 0, its anchor's; otherwise cancel cascades keep its state: it has no
	 * anchor (CTXI_REG_TOP) or was linked into its anchor's list
	 * (CTXI_REG_LINKED).  Set once, never back to LAZY.  A node that
	 * ctxi_register() found born done stays LAZY: its state is final. */
	_Atomic uint8_t reg;
	ctx_t *parent; /* holds a reference; NULL on roots */
};

/*
 * A cancellable node.  Kept at 56 bytes so that malloc serves it from a
 * 64-byte chunk.  A node registers with its nearest cancellable ancestor (its
 * "anchor", found by walking up through value nodes; none above a
 * without-cancel node) by sitting in the anchor's children list.
 */
struct ctxi_cancel {
	struct ctx base;
	/* err << 32 | (uint32_t)cause; 0 while not done.  Set once, by CAS. */
	_Atomic uint64_t state;
	/* -1 until ctx_fd() creates it; then fd << 1, | 1 for a timerfd (so
	 * the kind is read with the fd, without the lock). */
	_Atomic int fd;
	_Atomic uint32_t lock;
	struct ctxi_cancel *children;
	/* Links in the anchor's list, under the anchor's lock.  pprev == NULL
	 * means "not in any list".  While a cancel cascade holds a node on its
	 * private work list, `next` links that list instead. */
	struct ctxi_cancel *next;
	struct ctxi_cancel **pprev;
};

/* A cancellable node with an effective deadline (its own or inherited).
 * 72 bytes: an 80-byte malloc chunk. */
struct ctxi_timed {
	struct ctxi_cancel c;
	int64_t deadline; /* CLOCK_MONOTONIC ns; immutable */
	int dcause;       /* cause reported when the deadline makes it done */
};

/* 40 bytes: a 48-byte malloc chunk. */
struct ctxi_value {
	struct ctx base;
	const void *key;
	void *value;
	void (*destroy)(void *);
};

#define CTXI_NEVER INT64_MAX

static inline uint64_t ctxi_mkstate(int err, int cause)
{
	return (uint64_t)(uint32_t)err << 32 | (uint32_t)cause;
}

/*
 * A cancel that has claimed a node whose fd it may still have to write marks
 * the state PENDING, writes the fd, then stores the state without the bit.
 * Internally a PENDING node is done (nothing else may claim it); ctx_err()
 * and ctx_cause() wait for the bit to clear, so that they never report a
 * node done before its fd is readable, as Go's Err() never reports before
 * Done() is closed.
 */
#define CTXI_PENDING (UINT64_C(1) << 63)

static inline uint64_t ctxi_final(uint64_t s) { return s & ~CTXI_PENDING; }
static inline int ctxi_state_err(uint64_t s) { return (int)(uint32_t)(ctxi_final(s) >> 32); }
static inline int ctxi_state_cause(uint64_t s) { return (int)(uint32_t)s; }

static inline bool ctxi_cancellable(const ctx_t *c)
{
	return c->kind == CTXI_CANCEL || c->kind == CTXI_TIMED;
}

static inline int64_t ctxi_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;
}

static inline struct timespec ctxi_ts(int64_t ns)
{
	struct timespec ts = {.tv_sec = ns / CTX_SEC, .tv_nsec = ns % CTX_SEC};
	return ts;
}

/* The timed half of ctxi_state(), out of line (lib/tree.c). */
uint64_t ctxi_state_timed(struct ctxi_cancel *c);

/*
 * The state of a cancellable node, latching ETIMEDOUT if its deadline has
 * passed.  Latching by CAS makes err final: whoever first observes the node
 * done (a canceller or a reader past the deadline) fixes err and cause.
 */
static inline uint64_t ctxi_state(struct ctxi_cancel *c)
{
	/* seq_cst (a plain load on x86, ldar on arm64, as acquire is): the
	 * cascade's leaf fast path in lib/tree.c pairs with it. */
	uint64_t s = atomic_load_explicit(&c->state, memory_order_seq_cst);
	if (s || c->base.kind != CTXI_TIMED)
		return s;
	return ctxi_state_timed(c);
}

/* lib/tree.c: the state of a lazy node that has none of its own: its
 * anchor's, latched into it, or 0. */
uint64_t ctxi_derive(struct ctxi_cancel *c);

/*
 * The state of a cancellable node as readers must see it: its own, or, on a
 * lazy node, the state it inherits from its anchor.  Never PENDING on a lazy
 * node; may be on a registered one (the caller waits, as ctx_err() does).
 */
static inline uint64_t ctxi_state_full(struct ctxi_cancel *c)
{
	uint64_t s = ctxi_state(c);
	if (s || atomic_load_explicit(&c->base.reg, memory_order_acquire))
		return s;
	return ctxi_derive(c);
}

/* lib/tree.c: makes a lazy node registered (or done), so that cancel
 * cascades keep its state from now on.  Call before linking anything under
 * `c` or creating its fd; takes and releases c's anchor's lock. */
void ctxi_register(struct ctxi_cancel *c);

/* lib/tree.c: takes a's lock and returns a's state, waiting out a cancel
 * that has marked `a` but not yet written its fd (never PENDING). */
uint64_t ctxi_lock_settled(struct ctxi_cancel *a);

/* The cancellable node that decides whether `c` is done, or NULL if `c` can
 * never be done.  Value nodes are transparent. */
static inline struct ctxi_cancel *ctxi_anchor(ctx_t *c)
{
	while (c->kind == CTXI_VALUE)
		c = c->parent;
	return ctxi_cancellable(c) ? (struct ctxi_cancel *)c : NULL;
}

static inline void ctxi_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* A 3-state futex mutex (0 free, 1 locked, 2 locked with waiters): 4 bytes
 * instead of pthread_mutex_t's 40, which keeps a node in a 64-byte chunk. */
/* FUTEX_WAIT (until *addr != val, or the relative timeout, NULL: none) or
 * FUTEX_WAKE (val waiters), process-private. */
static inline void ctxi_futex(_Atomic uint32_t *addr, int op, uint32_t val,
			      const struct timespec *timeout)
{
	syscall(SYS_futex, addr, op | FUTEX_PRIVATE_FLAG, val, timeout, NULL, 0);
}

/* Acquiring is seq_cst (free on x86, where every locked instruction is a
 * full barrier): the cascade's leaf fast path reads a node's lock word after
 * marking it done, and relies on a locker that comes later seeing the mark. */
static inline void ctxi_lock(_Atomic uint32_t *l)
{
	uint32_t c = 0;
	if (atomic_compare_exchange_strong_explicit(l, &c, 1, memory_order_seq_cst,
						    memory_order_relaxed))
		return;
	for (int spin = 0; spin < 100 && c != 0; spin++) {
		ctxi_cpu_relax();
		c = atomic_load_explicit(l, memory_order_relaxed);
		if (c == 0 && atomic_compare_exchange_weak_explicit(
				      l, &c, 1, memory_order_seq_cst, memory_order_relaxed))
			return;
	}
	if (c != 2)
		c = atomic_exchange_explicit(l, 2, memory_order_seq_cst);
	while (c != 0) {
		ctxi_futex(l, FUTEX_WAIT, 2, NULL);
		c = atomic_exchange_explicit(l, 2, memory_order_seq_cst);
	}
}

static inline void ctxi_unlock(_Atomic uint32_t *l)
{
	if (atomic_exchange_explicit(l, 0, memory_order_release) != 1)
		ctxi_futex(l, FUTEX_WAKE, 1, NULL);
}

/* Allocation, with a fault-injection hook for the tests: while
 * ctxi_fail_allocs > 0, each allocation first uses up ctxi_skip_allocs (and
 * succeeds), then decrements ctxi_fail_allocs and fails.  So skip = k and
 * fail = 1 fail the (k+1)-th allocation only, which reaches failure paths
 * behind earlier allocations (tests/xproc.c).  The fast path still reads
 * ctxi_fail_allocs alone. */
extern _Atomic int ctxi_fail_allocs, ctxi_skip_allocs;

static inline void *ctxi_alloc(size_t n)
{
	if (__builtin_expect(atomic_load_explicit(&ctxi_fail_allocs, memory_order_relaxed) > 0, 0)) {
		if (atomic_load(&ctxi_skip_allocs) > 0 && atomic_fetch_sub(&ctxi_skip_allocs, 1) > 0)
			return malloc(n);
		if (atomic_fetch_sub(&ctxi_fail_allocs, 1) > 0) {
			errno = ENOMEM;
			return NULL;
		}
	}
	return malloc(n);
}

/* A test hook: if set, ctx_after_func() calls it right after it has linked
 * a registration, with the context, to let a test run a cancel in that
 * window. */
extern void (*ctxi_after_linked_hook)(ctx_t *ctx);

/* Test hooks for the race of a deadline with a cancel (lib/tree.c):
 * ctx_cancel_cause() calls the first after it found the node live and
 * before its claim; ctxi_state_timed() calls the second after it looked up
 * the chain it is about to latch and before it latches it. */
extern void (*ctxi_cancel_checked_hook)(struct ctxi_cancel *c);
extern void (*ctxi_latch_hook)(struct ctxi_cancel *c);

/* lib/tree.c */
void ctxi_link(struct ctxi_cancel *anchor, struct ctxi_cancel *c); /* under anchor's lock */
void ctxi_unlink(struct ctxi_cancel *c); /* from its anchor's list, if there */

/* lib/after.c: hands registrations fired by a cancel cascade (linked through
 * `next`) to the after-function thread. */
void ctxi_after_fire(struct ctxi_cancel *list);

/* lib/wait.c: the fd-less wait, for when the process is out of fds.  Waits
 * until `ctx` is done or CLOCK_MONOTONIC reaches `until` (CTXI_NEVER: no
 * limit); returns the context's err, or 0 at `until`. */
int ctxi_wait_nofd(ctx_t *ctx, int64_t until);
void ctxi_wake_nofd_waiters(void); /* after every successful cancel */

/* lib/fd.c */
void ctxi_fd_expire(struct ctxi_cancel *c); /* a passed deadline: fire its timerfd now */
void ctxi_fd_signal(struct ctxi_cancel *c); /* under c's lock, c done */
void ctxi_eventfd_write(int fd);            /* makes an eventfd readable */
void ctxi_fd_close(struct ctxi_cancel *c);  /* at free */

/* lib/after.c: starts a detached library thread running fn(NULL) with every
 * signal blocked (signals belong to the program; a signalfd must see them
 * pending, not delivered to us).  0 or EAGAIN. */
int ctxi_spawn(pthread_t *t, void *(*fn)(void *));

/* lib/after.c: registers the after-function fork handlers (once).  Child
 * handlers run in the order they were registered, and this one must run
 * before any that starts a library thread in the child (lib/xproc.c's): such
 * a thread may fire after-functions at once, and they must find the after
 * thread already forgotten, so that a new one starts for them. */
void ctxi_after_atfork_init(void);

/* lib/xproc.c: the number of fd watches not yet freed by the watch thread
 * (for the tests' leak checks). */
int ctxi_watch_count(void);

#endif
