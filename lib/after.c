/*
 * After-functions: fn(arg) runs once on a library-owned thread after a
 * context is done.
 *
 * A registration is a pseudo-child (kind CTXI_AFTER) in the children list of
 * the context's anchor, so the cancel cascade finds it like any child.  Its
 * `state` word decides, by CAS from 0 (AFTER_ARMED), who owns its fate: the
 * cascade (which writes the context's err << 32 | cause, as for any child) or
 * the deadline timer (AFTER_FIRED): fn will run; or ctx_after_stop()
 * (AFTER_STOPPED).  Any value but AFTER_ARMED means "fired or stopped".
 *
 * Deadlines: a registration on a context with a deadline also sits in a
 * min-heap (under `lk`); the thread sleeps on a futex until the earliest
 * deadline, so an after-function fires at a deadline nobody else watches.
 *
 * Hand-over: fired registrations are pushed on `incoming`, a lock-free stack
 * the thread empties in one exchange, so neither the canceller nor the
 * thread takes `lk` for a registration without a deadline.  The thread
 * announces that it is about to sleep (`idle`) before its last look at
 * `incoming`; a pusher looks at `idle` after pushing, and only then bumps
 * `wake_seq` and wakes it.  All four are seq_cst, so a push is never missed.
 *
 * Lock order: a node lock (ctxi_lock) may be taken with `lk` free only; `lk`
 * is never held while taking a node lock or while running fn.  The cascade
 * hands fired registrations over after dropping every node lock.
 *
 * Lifetime: `refs` counts the registration itself (dropped after fn returns
 * or when stopped), the handle (dropped by ctx_after_stop), heap membership,
 * and ctx_after_func()'s own while it runs.
 */
#include "internal.h"

#include <pthread.h>
#include <signal.h>
#include <string.h>

enum { AFTER_ARMED = 0, AFTER_FIRED = 1, AFTER_STOPPED = 2 };

struct ctx_after {
	struct ctxi_cancel node; /* node.base.parent = the context (referenced) */
	void (*fn)(void *);
	void *arg;
	_Atomic uint32_t refs;
	int heap_idx;   /* under lk; -1 when not in the heap */
	_Atomic bool finished; /* fn has returned */
	int64_t deadline; /* 0: the context has none (never in the heap) */
	struct ctx_after *qnext; /* `incoming` link */
};

static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t finished; /* ctx_after_stop_wait(), with lk */
static _Atomic uint32_t stop_waiters; /* threads in ctx_after_stop_wait() */
static _Atomic bool started; /* written under lk; read without it to skip lk */
static pthread_t thread;
static _Atomic(struct ctx_after *) incoming;
static _Atomic uint32_t wake_seq; /* the thread's futex */
static _Atomic bool idle;         /* the thread is about to sleep on wake_seq */
static struct ctx_after **heap;
/* The thread's current batch, oldest first: taken from `incoming` under lk,
 * each registration unlinked from it before its fn starts, so that a fork()
 * (which happens with lk held) finds in it exactly those not yet started,
 * and the child hands them to its own thread (atfork_child). */
static struct ctx_after *batch;
/* The registration whose fn the thread is running (or about to run). */
static struct ctx_after *current;
static int heap_len, heap_cap, heap_reserved;

static _Thread_local bool on_after_thread;

void (*ctxi_after_linked_hook)(ctx_t *ctx);

/*
 * Registrations are recycled through a small cache.  Most are allocated by
 * the caller of ctx_after_func() and freed on the after thread, and glibc's
 * malloc serves such a cross-thread pair through its arena lock (the
 * caller's per-thread cache stays empty, the after thread's overflows).
 */
#if defined(__SANITIZE_ADDRESS__)
#define REG_CACHE_MAX 0 /* let ASan see every use after free */
#else
#define REG_CACHE_MAX 256
#endif
static _Atomic uint32_t reg_cache_lock;
static struct ctx_after *reg_cache; /* linked through qnext */
static int reg_cache_len;

static struct ctx_after *reg_alloc(void)
{
	/* The fault-injection hook (ctxi_alloc) goes first, cache or not. */
	if (atomic_load_explicit(&ctxi_fail_allocs, memory_order_relaxed) > 0)
		return ctxi_alloc(sizeof(struct ctx_after));
	struct ctx_after *a = NULL;
	if (__atomic_load_n(&reg_cache, __ATOMIC_RELAXED)) {
		ctxi_lock(&reg_cache_lock);
		if ((a = reg_cache)) {
			__atomic_store_n(&reg_cache, a->qnext, __ATOMIC_RELAXED);
			reg_cache_len--;
		}
		ctxi_unlock(&reg_cache_lock);
	}
	return a ? a : malloc(sizeof(*a));
}

static void reg_free(struct ctx_after *a)
{
	ctxi_lock(&reg_cache_lock);
	bool kept = reg_cache_len < REG_CACHE_MAX;
	if (kept) {
		a->qnext = reg_cache;
		__atomic_store_n(&reg_cache, a, __ATOMIC_RELAXED);
		reg_cache_len++;
	}
	ctxi_unlock(&reg_cache_lock);
	if (!kept)
		free(a);
}

static void put(struct ctx_after *a)
{
	if (atomic_fetch_sub_explicit(&a->refs, 1, memory_order_acq_rel) == 1) {
		ctx_unref(a->node.base.parent); /* NULL once fn has run */
		reg_free(a);
	}
}

/* ---- the deadline heap, under lk ---- */

static void heap_set(int i, struct ctx_after *a)
{
	heap[i] = a;
	a->heap_idx = i;
}

static void heap_fix(int i)
{
	struct ctx_after *a = heap[i];
	while (i > 0 && heap[(i - 1) / 2]->deadline > a->deadline) {
		heap_set(i, heap[(i - 1) / 2]);
		i = (i - 1) / 2;
	}
	for (;;) {
		int c = 2 * i + 1;
		if (c >= heap_len)
			break;
		if (c + 1 < heap_len && heap[c + 1]->deadline < heap[c]->deadline)
			c++;
		if (heap[c]->deadline >= a->deadline)
			break;
		heap_set(i, heap[c]);
		i = c;
	}
	heap_set(i, a);
}

/* Removes `a` from the heap if it is there; the caller drops the heap's
 * reference when this returns true. */
static bool heap_remove(struct ctx_after *a)
{
	int i = a->heap_idx;
	if (i < 0)
		return false;
	a->heap_idx = -1;
	struct ctx_after *last = heap[--heap_len];
	if (last != a) {
		heap_set(i, last);
		heap_fix(i);
	}
	return true;
}

/* Room for one more entry beyond those in the heap and those reserved by
 * registrations on their way in. */
static bool heap_reserve(void)
{
	if (heap_len + heap_reserved < heap_cap)
		return true;
	int cap = heap_cap ? 2 * heap_cap : 64;
	struct ctx_after **h = realloc(heap, (size_t)cap * sizeof(*h));
	if (!h)
		return false;
	heap = h;
	heap_cap = cap;
	return true;
}

/* ---- the thread ---- */

static void wake_thread(void)
{
	atomic_fetch_add_explicit(&wake_seq, 1, memory_order_seq_cst);
	ctxi_futex(&wake_seq, FUTEX_WAKE, 1, NULL);
}

static void run(struct ctx_after *a)
{
	__atomic_store_n(&current, a, __ATOMIC_RELAXED);
	a->fn(a->arg);
	/* The registration holds the context until fn has run, not until the
	 * handle is stopped.  Once fired, `parent` is read only by put(), after
	 * the last reference (acq_rel) has gone. */
	ctx_unref(a->node.base.parent);
	a->node.base.parent = NULL;
	/* seq_cst, against ctx_after_stop_wait(): it counts itself in
	 * stop_waiters, then reads `finished` under lk. */
	atomic_store_explicit(&a->finished, true, memory_order_seq_cst);
	__atomic_store_n(&current, NULL, __ATOMIC_RELAXED);
	if (atomic_load_explicit(&stop_waiters, memory_order_seq_cst)) {
		pthread_mutex_lock(&lk);
		pthread_cond_broadcast(&finished);
		pthread_mutex_unlock(&lk);
	}
	put(a); /* the registration's reference */
}

/* Takes the registrations pushed on `incoming` into `batch`, oldest first,
 * under lk (so that a fork never sees them in neither place). */
static bool take_incoming(void)
{
	if (!atomic_load_explicit(&incoming, memory_order_relaxed))
		return false;
	pthread_mutex_lock(&lk);
	struct ctx_after *list = atomic_exchange_explicit(&incoming, NULL, memory_order_acquire);
	struct ctx_after *fifo = NULL;
	while (list) { /* the stack is newest first */
		struct ctx_after *next = list->qnext;
		list->qnext = fifo;
		fifo = list;
		list = next;
	}
	__atomic_store_n(&batch, fifo, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&lk);
	return fifo != NULL;
}

/* Runs the registrations in `batch`, oldest first. */
static void run_incoming(void)
{
	struct ctx_after *a;
	while ((a = __atomic_load_n(&batch, __ATOMIC_RELAXED))) {
		__atomic_store_n(&batch, a->qnext, __ATOMIC_RELAXED);
		bool in_heap = false;
		if (a->deadline) { /* fired by a cancel before its deadline */
			pthread_mutex_lock(&lk);
			in_heap = heap_remove(a);
			pthread_mutex_unlock(&lk);
		}
		run(a);
		if (in_heap)
			put(a); /* the heap's reference */
	}
}

/* Fires the registrations whose deadline has passed; returns the earliest
 * deadline left (CTXI_NEVER if none). */
static int64_t run_deadlines(void)
{
	pthread_mutex_lock(&lk);
	for (;;) {
		if (!heap_len) {
			pthread_mutex_unlock(&lk);
			return CTXI_NEVER;
		}
		struct ctx_after *a = heap[0];
		if (ctxi_now() < a->deadline) {
			int64_t next = a->deadline;
			pthread_mutex_unlock(&lk);
			return next;
		}
		heap_remove(a);
		pthread_mutex_unlock(&lk);
		/* The context's deadline has passed, so it is done; unless a
		 * cancel or a stop got here first, this thread fires it. */
		uint64_t armed = AFTER_ARMED;
		if (atomic_compare_exchange_strong(&a->node.state, &armed, AFTER_FIRED)) {
			ctxi_unlink(&a->node);
			run(a);
		}
		put(a); /* the heap's reference */
		pthread_mutex_lock(&lk);
	}
}

/*
 * In a burst of cancels (a server shedding requests), the thread watches
 * `incoming` for a while before it sleeps (AFTER_SPIN_NS, never past the next
 * deadline): a futex sleep and wake-up costs the thread a few microseconds
 * and the canceller a system call.  A burst is recognised by the last sleep
 * having been short (under AFTER_HOT_NS).  Spinning only then matters: on
 * this VM any spin (even 64 `pause`s) before a sleep made the next wake-up
 * ~3x slower (cancel -> fn starts, p50 2.6 -> 5-8 us), so a thread woken
 * rarely must not spin.  The spin runs with `idle` false, so pushers do not
 * wake the thread meanwhile; it ends by going through the full idle protocol.
 */
#define AFTER_SPIN_NS 2000
#define AFTER_HOT_NS 20000

static bool spin_for_incoming(int64_t next, uint32_t seq)
{
	int64_t until = ctxi_now() + AFTER_SPIN_NS;
	if (until > next)
		until = next;
	/* The clock is read every 8 pauses (64 took 1.6 us here); a bumped
	 * wake_seq (an earlier deadline) ends the spin too. */
	while (ctxi_now() < until &&
	       atomic_load_explicit(&wake_seq, memory_order_relaxed) == seq) {
		for (int k = 0; k < 8; k++) {
			if (atomic_load_explicit(&incoming, memory_order_relaxed))
				return true;
			ctxi_cpu_relax();
		}
	}
	return false;
}

static void *loop(void *unused)
{
	(void)unused;
	on_after_thread = true;
	bool hot = false; /* the last sleep was short: cancels come in a burst */
	uint32_t seq = 0;
	int64_t next = 0; /* the earliest deadline; 0: run them first */
	for (;;) {
		if (take_incoming()) {
			run_incoming();
			/* A stream of cancels must not keep the thread from a
			 * deadline that is due, or from an earlier one inserted
			 * meanwhile (which bumps wake_seq). */
			if ((next == CTXI_NEVER || ctxi_now() < next) &&
			    atomic_load_explicit(&wake_seq, memory_order_relaxed) == seq)
				continue;
		}
		/* The sequence is read before the heap: an earlier deadline
		 * inserted after this point bumps it, and the wait returns. */
		seq = atomic_load_explicit(&wake_seq, memory_order_seq_cst);
		next = run_deadlines();
		if (hot && spin_for_incoming(next, seq))
			continue; /* deadlines were run first: none starves */
		atomic_store_explicit(&idle, true, memory_order_seq_cst);
		if (!atomic_load_explicit(&incoming, memory_order_seq_cst)) {
			struct timespec rel, *timeout = NULL;
			int64_t now = ctxi_now();
			if (next != CTXI_NEVER) {
				int64_t left = next - now;
				rel = ctxi_ts(left > 0 ? left : 0);
				timeout = &rel;
			}
			ctxi_futex(&wake_seq, FUTEX_WAIT, seq, timeout);
			hot = ctxi_now() - now < AFTER_HOT_NS;
		}
		atomic_store_explicit(&idle, false, memory_order_relaxed);
	}
	return NULL;
}


/* fork() happens with lk held, so the run queue (`incoming` and `batch`) and
 * the heap are whole in the child.  Only the forking thread exists there:
 * forget ours and re-create the lock state; the child starts a thread at
 * once if it inherited queued registrations or deadlines, else on demand
 * (at its next registration or cancel that fires one). */
static int start_thread(void);

static void atfork_prepare(void)
{
	pthread_mutex_lock(&lk);
	ctxi_lock(&reg_cache_lock);
}

static void atfork_parent(void)
{
	ctxi_unlock(&reg_cache_lock);
	pthread_mutex_unlock(&lk);
}

static void atfork_child(void)
{
	atomic_store_explicit(&reg_cache_lock, 0, memory_order_relaxed);
	pthread_mutex_init(&lk, NULL);
	pthread_cond_init(&finished, NULL);
	atomic_store_explicit(&started, false, memory_order_relaxed);
	atomic_store_explicit(&idle, false, memory_order_relaxed);
	/* The parent's thread had taken these but not started them: under
	 * the oldest entries of `incoming`, for the child's thread. */
	struct ctx_after *rev = NULL, *a = batch;
	while (a) {
		struct ctx_after *next = a->qnext;
		a->qnext = rev;
		rev = a;
		a = next;
	}
	batch = NULL;
	/* A fn the parent's thread was running never returns here (unless
	 * this is that thread, forking from inside fn): ctx_after_stop_wait()
	 * must not wait for it. */
	if (current && !on_after_thread)
		atomic_store_explicit(&current->finished, true, memory_order_relaxed);
	current = NULL;
	if (rev) {
		struct ctx_after *top = atomic_load_explicit(&incoming, memory_order_relaxed);
		if (!top) {
			atomic_store_explicit(&incoming, rev, memory_order_relaxed);
		} else {
			while (top->qnext)
				top = top->qnext;
			top->qnext = rev;
		}
	}
	/* Deadlines in the heap are due here too, with nobody else to watch
	 * them; if the thread cannot start, the next registration retries. */
	if (heap_len || atomic_load_explicit(&incoming, memory_order_relaxed))
		start_thread();
}

static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init_once(void)
{
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

void ctxi_after_atfork_init(void) { pthread_once(&once, init_once); }

int ctxi_spawn(pthread_t *t, void *(*fn)(void *))
{
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int r = pthread_create(t, &attr, fn, NULL);
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return r ? EAGAIN : 0;
}

/* Under lk. */
static int start_thread(void)
{
	if (atomic_load_explicit(&started, memory_order_relaxed))
		return 0;
	if (ctxi_spawn(&thread, loop))
		return EAGAIN;
	atomic_store_explicit(&started, true, memory_order_relaxed);
	return 0;
}

/* Hands registrations whose state a cascade or ctx_after_func() has already
 * moved off AFTER_ARMED to the thread, without lk. */
void ctxi_after_fire(struct ctxi_cancel *list)
{
	/* Normally running already; not in a forked child that inherited
	 * registrations.  If it cannot start, the next registration retries. */
	if (!atomic_load_explicit(&started, memory_order_relaxed)) {
		pthread_mutex_lock(&lk);
		start_thread();
		pthread_mutex_unlock(&lk);
	}
	while (list) {
		struct ctx_after *a = (struct ctx_after *)list;
		list = list->next;
		a->node.next = NULL;
		a->qnext = atomic_load_explicit(&incoming, memory_order_relaxed);
		while (!atomic_compare_exchange_weak_explicit(&incoming, &a->qnext, a,
							      memory_order_seq_cst,
							      memory_order_relaxed))
			;
	}
	if (atomic_load_explicit(&idle, memory_order_seq_cst))
		wake_thread();
}

int ctx_after_func(ctx_t *ctx, void (*fn)(void *), void *arg, ctx_after_t **stop)
{
	if (stop)
		*stop = NULL;
	if (!ctx || !fn)
		return EINVAL;
	ctxi_after_atfork_init(); /* the fork handlers, before any lock use */
	struct ctx_after *a = reg_alloc();
	if (!a)
		return ENOMEM;
	memset(a, 0, sizeof(*a));
	a->node.base.kind = CTXI_AFTER;
	a->node.base.parent = ctx_ref(ctx);
	atomic_init(&a->node.fd, -1);
	a->fn = fn;
	a->arg = arg;
	a->heap_idx = -1;
	atomic_init(&a->refs, stop ? 2 : 1);

	struct ctxi_cancel *anchor = ctxi_anchor(ctx);
	if (!anchor) { /* never done: fn never runs; only a handle remains */
		if (stop)
			*stop = a;
		else
			put(a);
		return 0;
	}
	bool timed = anchor->base.kind == CTXI_TIMED;
	if (timed)
		a->deadline = ((struct ctxi_timed *)anchor)->deadline;
	int err = 0;
	/* Without a deadline, and with the thread running, there is nothing
	 * to do under lk. */
	if (timed || !atomic_load_explicit(&started, memory_order_relaxed)) {
		pthread_mutex_lock(&lk);
		err = start_thread();
		/* Reserve the heap slot now: once linked, the registration
		 * must not fail for want of memory. */
		if (!err && timed) {
			if (heap_reserve())
				heap_reserved++;
			else
				err = ENOMEM;
		}
		pthread_mutex_unlock(&lk);
	}
	if (err) {
		if (stop)
			put(a);
		put(a);
		return err;
	}

	/* Our own reference while this call uses `a`: once it is linked, a
	 * cancel may fire it, and the thread run fn and drop the rest. */
	atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
	ctxi_register(anchor); /* so that cancels reach the registration */
	bool done = ctxi_lock_settled(anchor) != 0;
	if (!done)
		ctxi_link(anchor, &a->node);
	ctxi_unlock(&anchor->lock);
	if (ctxi_after_linked_hook)
		ctxi_after_linked_hook(ctx);

	if (done) {
		atomic_store(&a->node.state, AFTER_FIRED);
		ctxi_after_fire(&a->node);
	}
	if (timed) {
		bool earliest = false;
		pthread_mutex_lock(&lk);
		heap_reserved--;
		/* Not if a cancel fired it since it was linked: then it needs
		 * no timer (ctxi_after_fire() takes lk after its CAS). */
		if (atomic_load(&a->node.state) == AFTER_ARMED) {
			atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
			heap_len++;
			heap_set(heap_len - 1, a);
			heap_fix(heap_len - 1);
			earliest = heap[0] == a;
		}
		pthread_mutex_unlock(&lk);
		if (earliest) /* the thread may sleep until a later deadline */
			wake_thread();
	}
	if (stop)
		*stop = a;
	put(a); /* ours */
	return 0;
}

static bool stop(ctx_after_t *a, bool wait)
{
	if (!a) {
		errno = EINVAL;
		return false;
	}
	uint64_t armed = AFTER_ARMED;
	bool stopped = false;
	if (a->deadline && ctxi_now() >= a->deadline) {
		/* The context is done by its deadline, and ctx_err() may have
		 * said so already: as in Go, fn is then on its way and a stop
		 * cannot prevent it.  The thread may not have looked yet (it
		 * may be running another fn): fire it here, as it would. */
		if (atomic_compare_exchange_strong(&a->node.state, &armed, AFTER_FIRED)) {
			ctxi_unlink(&a->node);
			a->node.next = NULL;
			ctxi_after_fire(&a->node); /* its heap entry is dropped unfired */
		}
	} else {
		stopped = atomic_compare_exchange_strong(&a->node.state, &armed, AFTER_STOPPED);
	}
	if (stopped) {
		ctxi_unlink(&a->node);
		pthread_mutex_lock(&lk);
		bool in_heap = heap_remove(a);
		pthread_mutex_unlock(&lk);
		if (in_heap)
			put(a);
		put(a); /* the registration's: fn will never run */
	} else if (wait && !on_after_thread) {
		atomic_fetch_add_explicit(&stop_waiters, 1, memory_order_seq_cst);
		pthread_mutex_lock(&lk);
		while (!atomic_load_explicit(&a->finished, memory_order_seq_cst))
			pthread_cond_wait(&finished, &lk);
		pthread_mutex_unlock(&lk);
		atomic_fetch_sub_explicit(&stop_waiters, 1, memory_order_relaxed);
	}
	put(a); /* the handle's */
	return stopped;
}

bool ctx_after_stop(ctx_after_t *a) { return stop(a, false); }

bool ctx_after_stop_wait(ctx_after_t *a) { return stop(a, true); }
