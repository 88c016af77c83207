/* Real races with pthreads: a tree churning under a cancel, one fd for many
 * callers, one winner among cancellers, constant memory under a long-lived
 * parent, and chains too deep for recursion.
 *
 * Worker threads never call cr_assert (a failing assert is only safe on the
 * test's own thread): they count failures with CHECK, and the test asserts
 * on the count after joining them. */
#include <criterion/criterion.h>

#include "helpers.h"
#include "internal.h" /* the deadline/cancel race's test hooks */

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
/* From <sanitizer/allocator_interface.h>, which is not always installed:
 * the bytes the program has allocated and not freed (ASan's quarantine of
 * freed chunks is not counted). */
size_t __sanitizer_get_current_allocated_bytes(void);
#else
#define SANITIZED 0
#include <malloc.h>
#endif

/* Sanitizers make each call 5-20x slower: scale the loops down under them. */
#define SCALE(plain, sanitized) (SANITIZED ? (sanitized) : (plain))

static _Atomic int failures;
static _Atomic int first_failure_line;

#define CHECK(cond)                                                                   \
	do {                                                                          \
		if (!(cond)) {                                                        \
			int zero = 0;                                                 \
			atomic_compare_exchange_strong(&first_failure_line, &zero, __LINE__); \
			atomic_fetch_add(&failures, 1);                               \
		}                                                                     \
	} while (0)

#define ASSERT_NO_FAILURES()                                                          \
	cr_assert_eq(atomic_load(&failures), 0, "%d failed checks, the first at line %d", \
		     atomic_load(&failures), atomic_load(&first_failure_line))

static int key;

static void start(pthread_t *t, void *(*fn)(void *), void *arg)
{
	cr_assert_eq(pthread_create(t, NULL, fn, arg), 0);
}

static void join(pthread_t t) { cr_assert_eq(pthread_join(t, NULL), 0); }

/* ------------------------------------------------------------------------ */
/* A cancel racing with a churning tree */

#define WORKERS 4
#define KEEP_EVERY 7 /* prime to 4, 3, 5 and 2: every kind gets kept */

struct kept {
	ctx_t *c;
	int fd; /* -1 if none was asked for */
};

struct worker {
	ctx_t *parent;
	int iters;
	struct kept *kept; /* never cancelled by the worker; only by the parent */
	_Atomic int published;
};

static _Atomic int progress;

/* Creates, cancels and frees children and grandchildren of w->parent; one
 * in seven iterations keeps its contexts (published for the canceller). */
static void *churn(void *arg)
{
	struct worker *w = arg;
	ctx_t *p = w->parent;
	for (int i = 0; i < w->iters; i++) {
		ctx_t *c, *g = NULL;
		switch (i % 4) {
		case 0: c = ctx_with_cancel(p); break;
		case 1: c = ctx_with_timeout(p, 3600 * CTX_SEC); break;
		case 2: c = ctx_with_value(p, &key, NULL, NULL); break;
		default: c = ctx_with_cancel(p); break;
		}
		CHECK(c != NULL);
		if (!c)
			continue;
		if (i % 3 == 0) {
			g = i % 2 ? ctx_with_cancel(c) : ctx_with_timeout(c, 3600 * CTX_SEC);
			CHECK(g != NULL);
		}
		int fc = i % 5 == 0 ? ctx_fd(c) : -1;
		int fg = g && i % 2 ? ctx_fd(g) : -1;
		if (i % 5 == 0)
			CHECK(fc >= 0);
		if (i % KEEP_EVERY == 0) {
			int n = atomic_load_explicit(&w->published, memory_order_relaxed);
			w->kept[n] = (struct kept){c, fc};
			if (g)
				w->kept[n + 1] = (struct kept){g, fg};
			atomic_store_explicit(&w->published, n + 1 + !!g, memory_order_release);
		} else {
			int r = i % 4 == 2 ? EINVAL : 0; /* value contexts refuse */
			int got = ctx_cancel_cause(c, EIO);
			CHECK(got == r || (r == 0 && got == EALREADY));
			if (r == 0)
				CHECK(ctx_err(c) == ECANCELED);
			if (got == 0 && g) {
				/* This call did the cascade: g is done by now. */
				CHECK(ctx_err(g) == ECANCELED);
				CHECK(ctx_cause(g) == EIO);
				if (fg >= 0)
					CHECK(readable_now(fg));
			}
			if (got == 0 && fc >= 0)
				CHECK(readable_now(fc));
			if (g && i % 6 == 0)
				ctx_unref(c); /* parent first: g keeps it alive */
			if (g)
				ctx_unref(g);
			if (!g || i % 6 != 0)
				ctx_unref(c);
		}
		atomic_fetch_add_explicit(&progress, 1, memory_order_relaxed);
	}
	return NULL;
}

struct canceller {
	ctx_t *parent;
	struct worker *w;
	int after;
	int checked; /* kept contexts it checked right after its cancel */
};

/* Waits until the workers are halfway, then cancels the parent and checks
 * that everything kept so far is done, with an fd that is readable, before
 * anything else runs on this thread. */
static void *cancel_midway(void *arg)
{
	struct canceller *k = arg;
	while (atomic_load_explicit(&progress, memory_order_relaxed) < k->after)
		sched_yield();
	int seen[WORKERS];
	for (int i = 0; i < WORKERS; i++)
		seen[i] = atomic_load_explicit(&k->w[i].published, memory_order_acquire);
	CHECK(ctx_cancel_cause(k->parent, EPIPE) == 0);
	for (int i = 0; i < WORKERS; i++)
		for (int j = 0; j < seen[i]; j++) {
			struct kept *kp = &k->w[i].kept[j];
			CHECK(ctx_err(kp->c) == ECANCELED);
			CHECK(ctx_cause(kp->c) == EPIPE);
			if (kp->fd >= 0)
				CHECK(readable_now(kp->fd));
			k->checked++;
		}
	return NULL;
}

Test(threads, cancel_races_with_children_being_created_cancelled_and_freed)
{
	ctx_fd(ctx_background());
	int base = open_fd_count();
	int iters = SCALE(20000, 4000);
	ctx_t *p = ctx_with_cancel(ctx_background());
	int fp = ctx_fd(p);
	struct worker w[WORKERS];
	pthread_t tw[WORKERS], tk;
	for (int i = 0; i < WORKERS; i++) {
		w[i].parent = p;
		w[i].iters = iters;
		w[i].kept = calloc(2 * (iters / KEEP_EVERY + 1), sizeof(struct kept));
		cr_assert_not_null(w[i].kept);
		atomic_init(&w[i].published, 0);
	}
	struct canceller k = {p, w, WORKERS * iters / 2, 0};
	start(&tk, cancel_midway, &k);
	for (int i = 0; i < WORKERS; i++)
		start(&tw[i], churn, &w[i]);
	for (int i = 0; i < WORKERS; i++)
		join(tw[i]);
	join(tk);
	ASSERT_NO_FAILURES();
	cr_assert_gt(k.checked, 0, "the cancel came before any child was kept");
	cr_assert(readable_now(fp));
	/* Everything kept, made before or after the cancel, is done with the
	 * parent's err and cause; every fd is readable, asked before or now. */
	int kept = 0;
	for (int i = 0; i < WORKERS; i++) {
		for (int j = 0; j < w[i].published; j++) {
			struct kept *kp = &w[i].kept[j];
			cr_assert_eq(ctx_err(kp->c), ECANCELED);
			cr_assert_eq(ctx_cause(kp->c), EPIPE);
			if (kp->fd >= 0)
				cr_assert(readable_now(kp->fd));
			cr_assert(readable_now(ctx_fd(kp->c)));
			kept++;
		}
	}
	cr_assert_gt(kept, 0);
	for (int i = 0; i < WORKERS; i++) {
		for (int j = w[i].published; j-- > 0;)
			ctx_unref(w[i].kept[j].c);
		free(w[i].kept);
	}
	ctx_unref(p);
	cr_assert_eq(open_fd_count(), base, "fds leaked");
}

/* ------------------------------------------------------------------------ */
/* Many callers of ctx_fd on one context */

#define FD_THREADS 8

struct fd_race {
	pthread_barrier_t go, done;
	ctx_t *_Atomic ctx;
	int fds[FD_THREADS];
	int rounds;
};

struct fd_arg {
	struct fd_race *r;
	int i;
};

static void *fd_caller(void *arg)
{
	struct fd_arg *a = arg;
	for (int n = 0; n < a->r->rounds; n++) {
		pthread_barrier_wait(&a->r->go);
		a->r->fds[a->i] = ctx_fd(atomic_load(&a->r->ctx));
		pthread_barrier_wait(&a->r->done);
	}
	return NULL;
}

Test(threads, concurrent_ctx_fd_calls_all_get_the_same_fd)
{
	ctx_fd(ctx_background());
	int base = open_fd_count();
	struct fd_race r = {.rounds = SCALE(400, 100)};
	pthread_barrier_init(&r.go, NULL, FD_THREADS + 1);
	pthread_barrier_init(&r.done, NULL, FD_THREADS + 1);
	pthread_t t[FD_THREADS];
	struct fd_arg args[FD_THREADS];
	for (int i = 0; i < FD_THREADS; i++) {
		args[i] = (struct fd_arg){&r, i};
		start(&t[i], fd_caller, &args[i]);
	}
	ctx_t *p = ctx_with_cancel(ctx_background());
	for (int n = 0; n < r.rounds; n++) {
		ctx_t *c;
		switch (n % 4) {
		case 0: c = ctx_with_cancel(p); break;
		case 1: c = ctx_with_timeout(p, 3600 * CTX_SEC); break;
		case 2: { /* a value layer: its callers share its parent's fd */
			ctx_t *cc = ctx_with_cancel(p);
			c = ctx_with_value(cc, &key, NULL, NULL);
			ctx_unref(cc);
			break;
		}
		default: c = ctx_with_timeout(p, 0); break; /* born done */
		}
		atomic_store(&r.ctx, c);
		pthread_barrier_wait(&r.go);
		pthread_barrier_wait(&r.done);
		for (int i = 0; i < FD_THREADS; i++)
			cr_assert_eq(r.fds[i], r.fds[0], "round %d: thread %d got another fd", n, i);
		cr_assert_geq(r.fds[0], 0);
		cr_assert_eq(ctx_fd(c), r.fds[0]);
		cr_assert_eq(open_fd_count(), base + 1, "round %d: the losers' fds leaked", n);
		cr_assert_eq(readable_now(r.fds[0]), n % 4 == 3);
		ctx_unref(c);
		cr_assert_eq(open_fd_count(), base);
	}
	for (int i = 0; i < FD_THREADS; i++)
		join(t[i]);
	ctx_unref(p);
	pthread_barrier_destroy(&r.go);
	pthread_barrier_destroy(&r.done);
}

/* ------------------------------------------------------------------------ */
/* Many cancellers */

#define CANCEL_THREADS 8

struct cancel_race {
	pthread_barrier_t go, done;
	ctx_t *targets[CANCEL_THREADS]; /* what thread i cancels this round */
	int ret[CANCEL_THREADS];
	int rounds;
};

struct cancel_arg {
	struct cancel_race *r;
	int i;
};

static int cause_of(int thread) { return 1000 + thread; }

static void *cancel_caller(void *arg)
{
	struct cancel_arg *a = arg;
	for (int n = 0; n < a->r->rounds; n++) {
		pthread_barrier_wait(&a->r->go);
		a->r->ret[a->i] = ctx_cancel_cause(a->r->targets[a->i], cause_of(a->i));
		pthread_barrier_wait(&a->r->done);
	}
	return NULL;
}

static void cancel_race_start(struct cancel_race *r, pthread_t *t, struct cancel_arg *args)
{
	pthread_barrier_init(&r->go, NULL, CANCEL_THREADS + 1);
	pthread_barrier_init(&r->done, NULL, CANCEL_THREADS + 1);
	for (int i = 0; i < CANCEL_THREADS; i++) {
		args[i] = (struct cancel_arg){r, i};
		start(&t[i], cancel_caller, &args[i]);
	}
}

static void cancel_race_stop(struct cancel_race *r, pthread_t *t)
{
	for (int i = 0; i < CANCEL_THREADS; i++)
		join(t[i]);
	pthread_barrier_destroy(&r->go);
	pthread_barrier_destroy(&r->done);
}

Test(threads, concurrent_cancels_of_one_context_have_exactly_one_winner)
{
	struct cancel_race r = {.rounds = SCALE(400, 100)};
	pthread_t t[CANCEL_THREADS];
	struct cancel_arg args[CANCEL_THREADS];
	cancel_race_start(&r, t, args);
	for (int n = 0; n < r.rounds; n++) {
		ctx_t *c = n % 2 ? ctx_with_cancel(ctx_background())
				 : ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
		ctx_t *g = ctx_with_cancel(c);
		int fc = ctx_fd(c), fg = ctx_fd(g);
		for (int i = 0; i < CANCEL_THREADS; i++)
			r.targets[i] = c;
		pthread_barrier_wait(&r.go);
		pthread_barrier_wait(&r.done);
		int winner = -1;
		for (int i = 0; i < CANCEL_THREADS; i++) {
			if (r.ret[i] == 0) {
				cr_assert_eq(winner, -1, "round %d: threads %d and %d both won", n, winner, i);
				winner = i;
			} else {
				cr_assert_eq(r.ret[i], EALREADY, "round %d", n);
			}
		}
		cr_assert_neq(winner, -1, "round %d: nobody won", n);
		cr_assert_eq(ctx_err(c), ECANCELED);
		cr_assert_eq(ctx_cause(c), cause_of(winner), "round %d: the cause is not the winner's", n);
		cr_assert_eq(ctx_cause(g), cause_of(winner));
		cr_assert(readable_now(fc));
		cr_assert(readable_now(fg));
		ctx_unref(g);
		ctx_unref(c);
	}
	cancel_race_stop(&r, t);
}

Test(threads, concurrent_cancels_at_every_level_leave_a_consistent_readable_tree)
{
	ctx_fd(ctx_background());
	int base = open_fd_count();
	struct cancel_race r = {.rounds = SCALE(300, 80)};
	pthread_t t[CANCEL_THREADS];
	struct cancel_arg args[CANCEL_THREADS];
	cancel_race_start(&r, t, args);
	for (int n = 0; n < r.rounds; n++) {
		/* targets[0] is the root; each other thread cancels one node of
		 * a chain below it, deepest last. */
		ctx_t *all[CANCEL_THREADS * 2];
		int fds[CANCEL_THREADS * 2];
		ctx_t *cur = ctx_with_cancel(ctx_background());
		for (int i = 0; i < CANCEL_THREADS; i++) {
			if (i > 0)
				cur = i % 2 ? ctx_with_cancel(cur) : ctx_with_timeout(cur, 3600 * CTX_SEC);
			all[2 * i] = r.targets[i] = cur;
			/* An uncancelled node between every two targets. */
			cur = all[2 * i + 1] = ctx_with_cancel(cur);
		}
		for (int i = 0; i < CANCEL_THREADS * 2; i++)
			fds[i] = ctx_fd(all[i]);
		pthread_barrier_wait(&r.go);
		pthread_barrier_wait(&r.done);
		cr_assert_eq(r.ret[0], 0, "round %d: the root was not cancelled by its canceller", n);
		/* Walking down: each target is done by its own call (then it
		 * returned 0) or by an ancestor's (EALREADY), and a node below
		 * a target carries that target's cause. */
		int cause = cause_of(0);
		for (int i = 0; i < CANCEL_THREADS; i++) {
			if (r.ret[i] == 0)
				cause = cause_of(i);
			else
				cr_assert_eq(r.ret[i], EALREADY);
			for (int j = 2 * i; j < 2 * i + 2; j++) {
				cr_assert_eq(ctx_err(all[j]), ECANCELED);
				cr_assert_eq(ctx_cause(all[j]), cause, "round %d, node %d", n, j);
				cr_assert(readable_now(fds[j]), "round %d, node %d", n, j);
			}
		}
		for (int i = CANCEL_THREADS * 2; i-- > 0;)
			ctx_unref(all[i]);
		cr_assert_eq(open_fd_count(), base);
	}
	cancel_race_stop(&r, t);
}

/* ------------------------------------------------------------------------ */
/* ctx_fd racing with cancel */

struct fd_cancel_race {
	pthread_barrier_t go, done;
	ctx_t *fd_of, *cancel;
	int fd;
	int rounds;
};

static void *race_fd(void *arg)
{
	struct fd_cancel_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		r->fd = ctx_fd(r->fd_of);
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

static void *race_cancel(void *arg)
{
	struct fd_cancel_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		CHECK(ctx_cancel(r->cancel) == 0);
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

Test(threads, an_fd_created_while_the_context_is_being_cancelled_ends_up_readable)
{
	struct fd_cancel_race r = {.rounds = SCALE(2000, 300)};
	pthread_barrier_init(&r.go, NULL, 3);
	pthread_barrier_init(&r.done, NULL, 3);
	pthread_t a, b;
	start(&a, race_fd, &r);
	start(&b, race_cancel, &r);
	for (int n = 0; n < r.rounds; n++) {
		ctx_t *p = n % 2 ? ctx_with_cancel(ctx_background())
				 : ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
		ctx_t *c = n % 3 ? ctx_with_cancel(p) : ctx_with_value(p, &key, NULL, NULL);
		r.cancel = p;
		r.fd_of = n % 4 < 2 ? p : c; /* the cancelled node, or its child */
		pthread_barrier_wait(&r.go);
		pthread_barrier_wait(&r.done);
		cr_assert_geq(r.fd, 0);
		cr_assert(readable_now(r.fd), "round %d: an fd created during cancel stayed unreadable", n);
		cr_assert(readable_now(ctx_fd(c)));
		ctx_unref(c);
		ctx_unref(p);
	}
	join(a);
	join(b);
	ASSERT_NO_FAILURES();
	pthread_barrier_destroy(&r.go);
	pthread_barrier_destroy(&r.done);
}

/* ------------------------------------------------------------------------ */
/* A deadline racing with a cancel and with readers */

#define OBSERVERS 3

struct latch_race {
	ctx_t *t;
	int64_t deadline;
	int err[OBSERVERS], cause[OBSERVERS];
	int cancel_ret;
};

struct latch_arg {
	struct latch_race *r;
	int i;
};

static void *observe(void *arg)
{
	struct latch_arg *a = arg;
	int64_t bound = a->r->deadline + 5 * CTX_SEC;
	int e = 0;
	while ((e = ctx_err(a->r->t)) == 0 && now_ns() < bound)
		;
	a->r->err[a->i] = e;
	a->r->cause[a->i] = ctx_cause(a->r->t);
	return NULL;
}

static void *cancel_at_deadline(void *arg)
{
	struct latch_race *r = arg;
	while (now_ns() < r->deadline - 2 * CTX_USEC)
		;
	r->cancel_ret = ctx_cancel_cause(r->t, EPIPE);
	return NULL;
}

Test(threads, a_deadline_racing_a_cancel_latches_one_err_for_every_reader)
{
	int rounds = SCALE(60, 20), by_cancel = 0;
	for (int n = 0; n < rounds; n++) {
		struct latch_race r = {.cancel_ret = -1};
		struct timespec d = ts_after(2 * CTX_MSEC);
		r.deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
		r.t = ctx_with_deadline_cause(ctx_background(), d, EHOSTDOWN);
		int fd = n % 2 ? ctx_fd(r.t) : -1;
		pthread_t obs[OBSERVERS], k;
		struct latch_arg args[OBSERVERS];
		for (int i = 0; i < OBSERVERS; i++) {
			args[i] = (struct latch_arg){&r, i};
			start(&obs[i], observe, &args[i]);
		}
		start(&k, cancel_at_deadline, &r);
		for (int i = 0; i < OBSERVERS; i++)
			join(obs[i]);
		join(k);
		int err = ctx_err(r.t), cause = ctx_cause(r.t);
		if (r.cancel_ret == 0) {
			by_cancel++;
			cr_assert_eq(err, ECANCELED);
			cr_assert_eq(cause, EPIPE);
		} else {
			cr_assert_eq(r.cancel_ret, EALREADY);
			cr_assert_eq(err, ETIMEDOUT);
			cr_assert_eq(cause, EHOSTDOWN);
		}
		for (int i = 0; i < OBSERVERS; i++) {
			cr_assert_eq(r.err[i], err, "round %d: observer %d saw err %d, then %d", n, i,
				     r.err[i], err);
			cr_assert_eq(r.cause[i], cause);
		}
		if (fd < 0)
			fd = ctx_fd(r.t);
		cr_assert(readable_within(fd, 5000));
		ctx_unref(r.t);
	}
	cr_log_info("cancel won %d of %d rounds", by_cancel, rounds);
}

/* ------------------------------------------------------------------------ */
/* Constant memory under a long-lived parent */

static size_t heap_in_use(void)
{
#if SANITIZED
	return __sanitizer_get_current_allocated_bytes();
#else
	return mallinfo2().uordblks;
#endif
}

static long rss_bytes(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	long size = 0, res = 0;
	if (!f)
		return -1;
	if (fscanf(f, "%ld %ld", &size, &res) != 2)
		res = -1;
	fclose(f);
	return res < 0 ? -1 : res * sysconf(_SC_PAGESIZE);
}

/* One short-lived child (or small subtree) of p, gone when this returns. */
static void short_lived(ctx_t *p, int i)
{
	ctx_t *c;
	switch (i % 5) {
	case 0: /* create + cancel + unref */
		c = ctx_with_cancel(p);
		ctx_cancel(c);
		ctx_unref(c);
		break;
	case 1: /* create + unref, never cancelled */
		ctx_unref(ctx_with_cancel(p));
		break;
	case 2: /* a timed child, released */
		ctx_release(ctx_with_timeout(p, 3600 * CTX_SEC));
		break;
	case 3: { /* through a value layer, with a grandchild */
		ctx_t *v = ctx_with_value(p, &key, NULL, NULL);
		c = ctx_with_cancel(v);
		ctx_t *g = ctx_with_cancel(c);
		ctx_unref(v);
		ctx_cancel(g);
		ctx_unref(c);
		ctx_unref(g);
		break;
	}
	default: /* with an fd, now and then */
		c = ctx_with_cancel(p);
		if (i % 1000 == 4)
			ctx_fd(c);
		ctx_release(c);
		break;
	}
}

Test(threads, a_long_lived_parent_stays_at_constant_memory_through_many_children)
{
	ctx_fd(ctx_background());
	int fds = open_fd_count();
	int n = SCALE(1000000, 200000);
	/* Two long-lived parents: a plain one (its children are plain) and a
	 * timed one (its children inherit the deadline). */
	ctx_t *root = ctx_with_cancel(ctx_background());
	ctx_t *ps[2] = {ctx_with_cancel(root), ctx_with_timeout(root, 3600 * CTX_SEC)};
	int fp[2] = {ctx_fd(ps[0]), ctx_fd(ps[1])};
	for (int i = 0; i < 10000; i++) /* warm the allocator up */
		short_lived(ps[i / 5 % 2], i);
	size_t heap0 = heap_in_use();
	long rss0 = rss_bytes();
	for (int i = 0; i < n; i++)
		short_lived(ps[i / 5 % 2], i);
	/* Also in batches: many alive at once, then all gone. */
	enum { BATCH = 1000 };
	static ctx_t *batch[BATCH];
	for (int round = 0; round < n / BATCH / 10; round++) {
		ctx_t *p = ps[round % 2];
		for (int i = 0; i < BATCH; i++)
			batch[i] = i % 2 ? ctx_with_cancel(p) : ctx_with_timeout(p, CTX_SEC);
		for (int i = 0; i < BATCH; i++)
			(i % 3 ? ctx_release : ctx_unref)(batch[i]);
	}
	size_t heap1 = heap_in_use();
	long rss1 = rss_bytes();
	cr_log_info("heap %zu -> %zu bytes, rss %ld -> %ld bytes", heap0, heap1, rss0, rss1);
	/* A child left behind would cost at least 48 bytes: a million of them,
	 * or even one in a thousand, shows far above this slack. */
	cr_assert_leq(heap1, heap0 + 16 * 1024, "the parents grew by %zu bytes", heap1 - heap0);
	if (!SANITIZED) /* ASan's quarantine and TSan's shadow grow RSS on their own */
		cr_assert_leq(rss1, rss0 + 1024 * 1024, "RSS grew by %ld bytes", rss1 - rss0);
	cr_assert_eq(open_fd_count(), fds + 2);
	/* The parents are still fine, and cancelling reaches new children. */
	ctx_t *last[2] = {ctx_with_cancel(ps[0]), ctx_with_cancel(ps[1])};
	cr_assert_eq(ctx_cancel(root), 0);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(ctx_err(last[i]), ECANCELED);
		cr_assert(readable_now(fp[i]));
		ctx_unref(last[i]);
		ctx_unref(ps[i]);
	}
	ctx_unref(root);
	cr_assert_eq(open_fd_count(), fds);
}

/* ------------------------------------------------------------------------ */
/* Deep chains */

#define DEPTH 100000
/* Far less stack than any recursion over DEPTH nodes would need. */
#define SMALL_STACK (512 * 1024)

static _Atomic int chain_destroyed;
static void chain_destroy(void *v)
{
	(void)v;
	atomic_fetch_add_explicit(&chain_destroyed, 1, memory_order_relaxed);
}

struct chain_result {
	int values, err, cause, readable, value_found, has_deadline, destroyed_early,
		destroyed;
};

/* Builds a DEPTH-long chain of mixed kinds keeping only the root and the
 * leaf, cancels it from the root, then frees it all with one unref. */
static void *deep_chain(void *arg)
{
	struct chain_result *res = arg;
	static int marker;
	ctx_t *root = ctx_with_cancel(ctx_background());
	ctx_t *cur = ctx_with_value(root, &key, &marker, chain_destroy);
	res->values = 1;
	for (int i = 1; i < DEPTH; i++) {
		ctx_t *next;
		switch (i % 4) {
		case 0: next = ctx_with_value(cur, &next, NULL, chain_destroy); res->values++; break;
		case 1: next = ctx_with_cancel(cur); break;
		case 2: next = ctx_with_timeout(cur, 3600 * CTX_SEC); break;
		default: next = ctx_with_cancel(cur); break;
		}
		if (!next)
			return NULL;
		ctx_unref(cur); /* kept alive by its child only */
		cur = next;
	}
	ctx_t *leaf = cur;
	int fd = ctx_fd(leaf);
	res->has_deadline = ctx_deadline(leaf, NULL);
	res->value_found = ctx_value(leaf, &key) == &marker;
	CHECK(ctx_cancel_cause(root, EPIPE) == 0);
	res->err = ctx_err(leaf);
	res->cause = ctx_cause(leaf);
	res->readable = fd >= 0 && readable_now(fd);
	ctx_unref(root);
	res->destroyed_early = atomic_load(&chain_destroyed);
	ctx_unref(leaf); /* frees all DEPTH nodes */
	res->destroyed = atomic_load(&chain_destroyed);
	return NULL;
}

/* A DEPTH-long chain that is never cancelled, freed from its leaf. */
static void *deep_chain_uncancelled(void *arg)
{
	struct chain_result *res = arg;
	ctx_t *cur = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	for (int i = 1; i < DEPTH; i++) {
		ctx_t *next = i % 2 ? ctx_with_value(cur, &key, NULL, chain_destroy)
				    : ctx_with_cancel(cur);
		res->values += i % 2;
		if (!next)
			return NULL;
		ctx_unref(cur);
		cur = next;
	}
	res->err = ctx_err(cur);
	ctx_unref(cur);
	res->destroyed = atomic_load(&chain_destroyed);
	return NULL;
}

static void run_small_stack(void *(*fn)(void *), void *arg)
{
	pthread_attr_t attr;
	pthread_t t;
	cr_assert_eq(pthread_attr_init(&attr), 0);
	cr_assert_eq(pthread_attr_setstacksize(&attr, SMALL_STACK), 0);
	cr_assert_eq(pthread_create(&t, &attr, fn, arg), 0);
	join(t);
	pthread_attr_destroy(&attr);
}

Test(threads, a_deep_chain_is_cancelled_from_its_root_and_freed_without_recursion)
{
	ctx_fd(ctx_background());
	int fds = open_fd_count();
	struct chain_result res = {0};
	run_small_stack(deep_chain, &res);
	ASSERT_NO_FAILURES();
	cr_assert(res.value_found, "the root's value is not visible from the leaf");
	cr_assert(res.has_deadline);
	cr_assert_eq(res.err, ECANCELED);
	cr_assert_eq(res.cause, EPIPE);
	cr_assert(res.readable, "the leaf's fd is not readable after cancelling the root");
	cr_assert_eq(res.destroyed_early, 0, "nodes were freed while the leaf held them");
	cr_assert_eq(res.destroyed, res.values, "not every value of the chain was destroyed");
	cr_assert_eq(open_fd_count(), fds);
}

Test(threads, a_deep_uncancelled_chain_is_freed_without_recursion)
{
	struct chain_result res = {0};
	run_small_stack(deep_chain_uncancelled, &res);
	cr_assert_eq(res.err, 0);
	cr_assert_gt(res.values, 0);
	cr_assert_eq(res.destroyed, res.values);
}

/* Two cancels race: one on a child, one on its parent.  When the parent's
 * ctx_cancel returns 0, every descendant must be done and readable even if
 * the other thread claimed the child first (its cascade may still be
 * walking the child's subtree: the parent's cancel must wait for it). */
struct two_cancels {
	pthread_barrier_t bar;
	ctx_t *child;
};

static void *cancel_child_at_barrier(void *arg)
{
	struct two_cancels *t = arg;
	pthread_barrier_wait(&t->bar);
	ctx_cancel(t->child);
	return NULL;
}

Test(threads, a_parent_cancel_waits_for_a_concurrent_cancel_of_a_descendant)
{
	enum { CHAIN = 200 };
	int rounds = SCALE(5000, 500), bad_err = 0, bad_fd = 0;
	struct two_cancels t;
	pthread_barrier_init(&t.bar, NULL, 2);
	for (int r = 0; r < rounds; r++) {
		ctx_t *parent = ctx_with_cancel(ctx_background());
		t.child = ctx_with_cancel(parent);
		ctx_t *chain[CHAIN], *leaf = t.child;
		for (int i = 0; i < CHAIN; i++)
			chain[i] = leaf = ctx_with_cancel(leaf);
		int fd = ctx_fd(leaf);
		cr_assert_geq(fd, 0);
		pthread_t th;
		cr_assert_eq(pthread_create(&th, NULL, cancel_child_at_barrier, &t), 0);
		pthread_barrier_wait(&t.bar);
		int rc = ctx_cancel(parent);
		int err = ctx_err(leaf);
		bool ready = readable_now(fd);
		if (rc == 0 && err == 0)
			bad_err++;
		if (rc == 0 && !ready)
			bad_fd++;
		pthread_join(th, NULL);
		for (int i = CHAIN - 1; i >= 0; i--)
			ctx_unref(chain[i]);
		ctx_unref(t.child);
		ctx_unref(parent);
	}
	pthread_barrier_destroy(&t.bar);
	cr_assert_eq(bad_err, 0, "leaf not done after the parent's cancel in %d of %d rounds",
		     bad_err, rounds);
	cr_assert_eq(bad_fd, 0, "leaf fd not readable after the parent's cancel in %d of %d rounds",
		     bad_fd, rounds);
}

/* An observer that sees ctx_err() report done must find the fd readable:
 * never "err first, fd a moment later", for a cancel of the context itself
 * or of its parent racing the observer, or for a deadline (where the kernel
 * timer alone would fire the fd tens of microseconds late). */
struct err_fd_race {
	ctx_t *volatile target;
	int fd;
	atomic_int round, done_round, bad;
};

static void *observe_err_then_fd(void *arg)
{
	struct err_fd_race *r = arg;
	for (int k = 1;; k++) {
		int cur;
		while ((cur = atomic_load(&r->round)) != k)
			if (cur < 0)
				return NULL;
		while (!ctx_err(r->target))
			;
		if (!readable_now(r->fd))
			atomic_fetch_add(&r->bad, 1);
		atomic_store(&r->done_round, k);
	}
}

Test(threads, ctx_err_never_reports_done_before_the_fd_is_readable)
{
	int rounds = SCALE(4000, 400);
	struct err_fd_race r = {.round = 0};
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, observe_err_then_fd, &r), 0);
	for (int k = 1; k <= rounds; k++) {
		int how = k % 3; /* 0: cancel itself, 1: its parent, 2: a deadline */
		ctx_t *parent = ctx_with_cancel(ctx_background());
		ctx_t *c = how == 2 ? ctx_with_timeout(parent, 200 * CTX_USEC)
				    : ctx_with_cancel(parent);
		r.fd = ctx_fd(c);
		cr_assert_geq(r.fd, 0);
		r.target = c;
		atomic_store(&r.round, k);
		if (how < 2)
			ctx_cancel(how == 0 ? c : parent);
		while (atomic_load(&r.done_round) != k)
			;
		ctx_unref(c);
		ctx_unref(parent);
	}
	atomic_store(&r.round, -1);
	pthread_join(t, NULL);
	cr_assert_eq(atomic_load(&r.bad), 0, "err before fd in %d of %d rounds",
		     atomic_load(&r.bad), rounds);
}

/* Two threads cancel the same context at once: the one that gets EALREADY
 * must also find the whole subtree done and readable when its call returns
 * (as in Go, where the second cancel waits for the first's mutex). */
struct two_on_one {
	pthread_barrier_t bar;
	ctx_t *root;
	int rc;
};

static void *cancel_root_at_barrier(void *arg)
{
	struct two_on_one *t = arg;
	pthread_barrier_wait(&t->bar);
	t->rc = ctx_cancel(t->root);
	return NULL;
}

static bool subtree_done_and_readable(ctx_t **kids, const int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (ctx_err(kids[i]) != ECANCELED || !readable_now(fds[i]))
			return false;
	return true;
}

Test(threads, a_second_cancel_returns_only_when_the_first_has_finished)
{
	enum { KIDS = 300 };
	int rounds = SCALE(300, 40), bad = 0;
	static ctx_t *kids[KIDS];
	static int fds[KIDS];
	struct two_on_one t;
	pthread_barrier_init(&t.bar, NULL, 2);
	for (int r = 0; r < rounds; r++) {
		t.root = ctx_with_cancel(ctx_background());
		for (int i = 0; i < KIDS; i++) {
			kids[i] = ctx_with_cancel(t.root);
			fds[i] = ctx_fd(kids[i]);
			cr_assert_geq(fds[i], 0);
		}
		pthread_t th;
		cr_assert_eq(pthread_create(&th, NULL, cancel_root_at_barrier, &t), 0);
		pthread_barrier_wait(&t.bar);
		int rc = ctx_cancel(t.root);
		bool ok = subtree_done_and_readable(kids, fds, KIDS);
		pthread_join(th, NULL);
		cr_assert(rc == 0 || t.rc == 0, "one of the two cancels made it done");
		cr_assert(rc == EALREADY || t.rc == EALREADY);
		if (!ok)
			bad++;
		for (int i = 0; i < KIDS; i++)
			ctx_unref(kids[i]);
		ctx_unref(t.root);
	}
	pthread_barrier_destroy(&t.bar);
	cr_assert_eq(bad, 0, "subtree not done when this thread's cancel returned, %d of %d rounds",
		     bad, rounds);
}

/* A reader that sees the parent done must see every child done, with the
 * parent's err and cause if it saw the parent done before the child's own
 * deadline (a child walked last, whose deadline is near: it must not time
 * out on its own after the reader saw the parent cancelled). */
struct parent_first {
	ctx_t *volatile parent, *volatile child;
	_Atomic int64_t child_deadline;
	atomic_int round, done_round, child_live, child_wrong;
};

static void *observe_parent_then_child(void *arg)
{
	struct parent_first *r = arg;
	for (int k = 1;; k++) {
		int cur;
		while ((cur = atomic_load(&r->round)) != k)
			if (cur < 0)
				return NULL;
		while (!ctx_err(r->parent))
			;
		int64_t seen = now_ns();
		if (ctx_err(r->child) == 0)
			atomic_fetch_add(&r->child_live, 1);
		if (seen < atomic_load(&r->child_deadline)) {
			while (now_ns() < atomic_load(&r->child_deadline))
				;
			if (ctx_err(r->child) != ECANCELED || ctx_cause(r->child) != 4242)
				atomic_fetch_add(&r->child_wrong, 1);
		}
		atomic_store(&r->done_round, k);
	}
}

Test(threads, a_reader_never_sees_a_parent_done_before_its_children)
{
	enum { KIDS = 300 };
	int rounds = SCALE(40, 10);
	static ctx_t *kids[KIDS];
	struct parent_first r = {.round = 0};
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, observe_parent_then_child, &r), 0);
	for (int k = 1; k <= rounds; k++) {
		r.parent = ctx_with_cancel(ctx_background());
		/* Created first, so the cancel's walk reaches it last. */
		r.child = ctx_with_timeout_cause(r.parent, 10 * CTX_MSEC, 77);
		cr_assert_geq(ctx_fd(r.child), 0);
		for (int i = 0; i < KIDS; i++) {
			kids[i] = ctx_with_cancel(r.parent);
			cr_assert_geq(ctx_fd(kids[i]), 0);
		}
		struct timespec d;
		cr_assert(ctx_deadline(r.child, &d));
		int64_t deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
		atomic_store(&r.child_deadline, deadline);
		while (now_ns() < deadline - 2 * CTX_MSEC)
			; /* cancel the parent shortly before the child's deadline */
		atomic_store(&r.round, k);
		cr_assert_eq(ctx_cancel_cause(r.parent, 4242), 0);
		while (atomic_load(&r.done_round) != k)
			;
		for (int i = 0; i < KIDS; i++)
			ctx_unref(kids[i]);
		ctx_unref(r.child);
		ctx_unref(r.parent);
	}
	atomic_store(&r.round, -1);
	pthread_join(t, NULL);
	cr_assert_eq(atomic_load(&r.child_live), 0, "child live after parent seen done");
	cr_assert_eq(atomic_load(&r.child_wrong), 0, "child not given the parent's err and cause");
}

/* A child whose deadline is its parent's (ctx_with_cancel() of a timed
 * parent, or an equal deadline) is done because the parent is: it must
 * report the parent's err and cause, as a Go WithCancel child of a timerCtx
 * always does, even when the parent's cancel walk is still under way when
 * the deadline passes.  The walk here is long (many children) and starts
 * shortly before the deadline, so that it straddles it; a reader watches
 * the child the walk reaches last. */
struct straddle {
	ctx_t *volatile child;
	atomic_int go; /* round number; -1: quit */
	atomic_int seen_round, err, cause;
};

static void *read_last_child(void *arg)
{
	struct straddle *s = arg;
	for (int k = 1;; k++) {
		int cur;
		while ((cur = atomic_load(&s->go)) != k)
			if (cur < 0)
				return NULL;
		int e;
		int64_t bound = now_ns() + 5 * CTX_SEC;
		while ((e = ctx_err(s->child)) == 0 && now_ns() < bound)
			;
		atomic_store(&s->err, e);
		atomic_store(&s->cause, ctx_cause(s->child));
		atomic_store(&s->seen_round, k);
	}
}

Test(threads, children_with_the_parents_deadline_report_its_cancel_when_the_walk_outlasts_it)
{
	enum { KIDS = SCALE(100000, 20000) };
	static ctx_t *kids[KIDS];
	int rounds = SCALE(6, 3), straddled = 0;
	/* How long a walk over KIDS children takes here. */
	ctx_t *p = ctx_with_timeout(ctx_background(), 60 * CTX_SEC);
	for (int i = 0; i < KIDS; i++)
		kids[i] = ctx_with_cancel(p);
	int64_t t0 = now_ns();
	cr_assert_eq(ctx_cancel(p), 0);
	int64_t walk = now_ns() - t0;
	for (int i = 0; i < KIDS; i++)
		ctx_unref(kids[i]);
	ctx_unref(p);

	struct straddle s = {.go = 0};
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, read_last_child, &s), 0);
	for (int k = 1; k <= rounds; k++) {
		p = ctx_with_timeout_cause(ctx_background(), 20 * CTX_MSEC + walk, 77);
		struct timespec d;
		cr_assert(ctx_deadline(p, &d));
		int64_t deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
		for (int i = 0; i < KIDS; i++) /* kids[0] is walked last */
			kids[i] = i % 2 ? ctx_with_cancel(p) : ctx_with_deadline(p, d);
		s.child = kids[0];
		atomic_store(&s.go, k);
		while (now_ns() < deadline - walk / 2)
			;
		int rc = ctx_cancel_cause(p, 4242);
		if (rc == 0 && now_ns() > deadline)
			straddled++;
		int err = ctx_err(p), cause = ctx_cause(p);
		if (rc == 0) {
			cr_assert_eq(err, ECANCELED);
			cr_assert_eq(cause, 4242);
		} else {
			cr_assert_eq(rc, EALREADY);
			cr_assert_eq(err, ETIMEDOUT);
			cr_assert_eq(cause, 77);
		}
		int wrong = 0;
		for (int i = 0; i < KIDS; i++)
			if (ctx_err(kids[i]) != err || ctx_cause(kids[i]) != cause)
				wrong++;
		cr_assert_eq(wrong, 0, "round %d: %d of %d children do not report their parent's err %d and cause %d",
			     k, wrong, KIDS, err, cause);
		while (atomic_load(&s.seen_round) != k)
			;
		cr_assert_eq(atomic_load(&s.err), err, "round %d: a reader saw err %d on a child, then %d on its parent",
			     k, atomic_load(&s.err), err);
		cr_assert_eq(atomic_load(&s.cause), cause);
		for (int i = 0; i < KIDS; i++)
			ctx_unref(kids[i]);
		ctx_unref(p);
	}
	atomic_store(&s.go, -1);
	pthread_join(t, NULL);
	cr_log_info("the cancel's walk outlasted the deadline in %d of %d rounds", straddled, rounds);
}

/* ------------------------------------------------------------------------ */
/* Lazy leaves: a child with no deadline, no fd, no child and no
 * after-function is not in its parent's list; readers derive its state from
 * the parent (lib/tree.c, "Lazy registration").  These races aim at that. */

#define LAZY_READERS 2

struct lazy_race {
	pthread_barrier_t go, done;
	ctx_t *parent, *leaf;
	int parent_ret, leaf_ret;
	int seen[LAZY_READERS]; /* the first cause each reader saw on the leaf */
	int rounds;
};

static void *lazy_cancel_parent(void *arg)
{
	struct lazy_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		r->parent_ret = ctx_cancel_cause(r->parent, 11);
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

static void *lazy_cancel_leaf(void *arg)
{
	struct lazy_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		r->leaf_ret = ctx_cancel_cause(r->leaf, 22);
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

struct lazy_reader {
	struct lazy_race *r;
	int i;
};

/* Reads the leaf until it is done; the parent seen done first means the
 * leaf must be done too, and a leaf seen done never changes its cause. */
static void *lazy_read_leaf(void *arg)
{
	struct lazy_reader *a = arg;
	struct lazy_race *r = a->r;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		int64_t bound = now_ns() + 5 * CTX_SEC;
		int cause = 0;
		while (now_ns() < bound) {
			bool parent_done = ctx_err(r->parent) != 0;
			cause = ctx_cause(r->leaf);
			if (parent_done)
				CHECK(cause != 0);
			if (cause)
				break;
		}
		r->seen[a->i] = cause;
		CHECK(ctx_cause(r->leaf) == cause);
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

Test(threads, a_lazy_leaf_racing_its_parents_cancel_gets_one_cause_for_every_reader)
{
	struct lazy_race r = {.rounds = SCALE(3000, 300)};
	pthread_barrier_init(&r.go, NULL, 3 + LAZY_READERS);
	pthread_barrier_init(&r.done, NULL, 3 + LAZY_READERS);
	pthread_t tp, tl, tr[LAZY_READERS];
	struct lazy_reader ra[LAZY_READERS];
	start(&tp, lazy_cancel_parent, &r);
	start(&tl, lazy_cancel_leaf, &r);
	for (int i = 0; i < LAZY_READERS; i++) {
		ra[i] = (struct lazy_reader){&r, i};
		start(&tr[i], lazy_read_leaf, &ra[i]);
	}
	int leaf_won = 0, parent_won = 0;
	for (int n = 0; n < r.rounds; n++) {
		r.parent = ctx_with_cancel(ctx_background());
		/* Through a value node half of the time: its anchor is the parent. */
		ctx_t *mid = n % 2 ? ctx_with_value(r.parent, &key, NULL, NULL) : ctx_ref(r.parent);
		r.leaf = ctx_with_cancel(mid);
		pthread_barrier_wait(&r.go);
		pthread_barrier_wait(&r.done);
		cr_assert_eq(r.parent_ret, 0);
		cr_assert_eq(ctx_err(r.leaf), ECANCELED);
		int cause = ctx_cause(r.leaf);
		if (r.leaf_ret == 0) {
			cr_assert_eq(cause, 22, "round %d: the leaf's own cancel won, cause %d", n, cause);
			leaf_won++;
		} else {
			cr_assert_eq(r.leaf_ret, EALREADY);
			cr_assert_eq(cause, 11, "round %d: the parent's cancel won, cause %d", n, cause);
			parent_won++;
		}
		for (int i = 0; i < LAZY_READERS; i++)
			cr_assert_eq(r.seen[i], cause, "round %d: reader %d saw cause %d, final %d", n,
				     i, r.seen[i], cause);
		cr_assert_eq(ctx_cancel(r.leaf), EALREADY);
		cr_assert_eq(ctx_cause(r.leaf), cause);
		ctx_unref(r.leaf);
		ctx_unref(mid);
		ctx_unref(r.parent);
	}
	for (int i = 0; i < LAZY_READERS; i++)
		join(tr[i]);
	join(tp);
	join(tl);
	ASSERT_NO_FAILURES();
	cr_log_info("leaf's own cancel won %d rounds, the parent's %d", leaf_won, parent_won);
	pthread_barrier_destroy(&r.go);
	pthread_barrier_destroy(&r.done);
}

/* What turns a lazy leaf into a registered node, racing the parent's cancel:
 * whichever comes first, once the cancel has returned the leaf is done, its
 * fd readable, its child done and its after-function run. */
struct register_race {
	pthread_barrier_t go, done;
	ctx_t *parent, *leaf, *grandchild;
	int how, fd, after_efd, rounds;
};

static void after_signal(void *arg)
{
	uint64_t one = 1;
	CHECK(write(*(int *)arg, &one, sizeof one) == sizeof one);
}

static void *register_leaf(void *arg)
{
	struct register_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		switch (r->how) {
		case 0:
			r->fd = ctx_fd(r->leaf);
			break;
		case 1:
			r->grandchild = ctx_with_cancel(r->leaf);
			r->fd = ctx_fd(r->grandchild);
			break;
		case 2:
			r->grandchild = ctx_with_timeout(r->leaf, 3600 * CTX_SEC);
			break;
		default:
			CHECK(ctx_after_func(r->leaf, after_signal, &r->after_efd, NULL) == 0);
		}
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

Test(threads, a_lazy_leaf_registered_while_its_parent_is_cancelled_ends_up_done)
{
	ctx_fd(ctx_background());
	int base = open_fd_count();
	struct register_race r = {.rounds = SCALE(2000, 300)};
	r.after_efd = eventfd(0, EFD_CLOEXEC);
	cr_assert_geq(r.after_efd, 0);
	pthread_barrier_init(&r.go, NULL, 2);
	pthread_barrier_init(&r.done, NULL, 2);
	pthread_t t;
	start(&t, register_leaf, &r);
	for (int n = 0; n < r.rounds; n++) {
		r.how = n % 4;
		r.fd = -1;
		r.grandchild = NULL;
		r.parent = ctx_with_cancel(ctx_background());
		r.leaf = ctx_with_cancel(r.parent);
		pthread_barrier_wait(&r.go);
		cr_assert_eq(ctx_cancel_cause(r.parent, 33), 0);
		pthread_barrier_wait(&r.done);
		cr_assert_eq(ctx_err(r.leaf), ECANCELED);
		cr_assert_eq(ctx_cause(r.leaf), 33);
		if (r.how == 0)
			cr_assert(readable_now(r.fd), "round %d: the leaf's fd is not readable", n);
		if (r.grandchild) {
			cr_assert_eq(ctx_cause(r.grandchild), 33, "round %d (how %d)", n, r.how);
			cr_assert(readable_now(ctx_fd(r.grandchild)), "round %d (how %d)", n, r.how);
		}
		if (r.how == 3) {
			cr_assert(readable_within(r.after_efd, 5000), "round %d: fn did not run", n);
			uint64_t v;
			cr_assert_eq(read(r.after_efd, &v, sizeof v), (ssize_t)sizeof v);
		}
		ctx_unref(r.grandchild);
		ctx_unref(r.leaf);
		ctx_unref(r.parent);
	}
	join(t);
	ASSERT_NO_FAILURES();
	close(r.after_efd);
	cr_assert_eq(open_fd_count(), base);
	pthread_barrier_destroy(&r.go);
	pthread_barrier_destroy(&r.done);
}

/* Registering a lazy leaf while its parent's cancel has marked the parent
 * but not yet written its fd must not make the leaf done early: a leaf seen
 * done with the parent's cause means the parent's fd is readable. */
struct settle_race {
	pthread_barrier_t go, done;
	ctx_t *parent, **leaves;
	int parent_fd, nleaves, rounds;
	int early; /* leaf done while the parent's fd was not readable */
};

static void *settle_cancel(void *arg)
{
	struct settle_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		CHECK(ctx_cancel_cause(r->parent, 777) == 0);
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

static void *settle_register(void *arg)
{
	struct settle_race *r = arg;
	for (int n = 0; n < r->rounds; n++) {
		pthread_barrier_wait(&r->go);
		for (int i = 0; i < r->nleaves; i++) {
			ctx_t *g = ctx_with_cancel(r->leaves[i]); /* registers the leaf */
			int cause = ctx_cause(r->leaves[i]);
			if (cause == 777 && !readable_now(r->parent_fd))
				r->early++;
			ctx_unref(g);
			if (cause)
				break;
		}
		pthread_barrier_wait(&r->done);
	}
	return NULL;
}

Test(threads, a_leaf_registered_during_its_parents_cancel_is_not_done_before_the_parents_fd)
{
	enum { LEAVES = 500 };
	static ctx_t *leaves[LEAVES];
	struct settle_race r = {.leaves = leaves, .nleaves = LEAVES, .rounds = SCALE(20000, 2000)};
	pthread_barrier_init(&r.go, NULL, 3);
	pthread_barrier_init(&r.done, NULL, 3);
	pthread_t a, b;
	start(&a, settle_cancel, &r);
	start(&b, settle_register, &r);
	for (int n = 0; n < r.rounds; n++) {
		r.parent = ctx_with_cancel(ctx_background());
		r.parent_fd = ctx_fd(r.parent);
		cr_assert_geq(r.parent_fd, 0);
		for (int i = 0; i < LEAVES; i++)
			leaves[i] = ctx_with_cancel(r.parent);
		pthread_barrier_wait(&r.go);
		pthread_barrier_wait(&r.done);
		for (int i = 0; i < LEAVES; i++)
			ctx_unref(leaves[i]);
		ctx_unref(r.parent);
	}
	join(a);
	join(b);
	ASSERT_NO_FAILURES();
	cr_assert_eq(r.early, 0, "%d rounds saw a leaf done before its parent's fd was readable",
		     r.early);
	pthread_barrier_destroy(&r.go);
	pthread_barrier_destroy(&r.done);
}

/* ------------------------------------------------------------------------ */
/* A cancel that looked at a deadline context just before its deadline, and
 * claims it just after, while a reader of a child sharing that deadline has
 * looked up the chain (both live) and not yet latched it.  Hooks hold each
 * side in its window, so the interleaving is forced, not hoped for.  The
 * reader's hook also holds the parent's lock until the reader has latched:
 * otherwise the cancel's walk, which takes that lock right after its claim,
 * often latches the child first (with the claim's state, as it must), the
 * reader's latch then finds the child done, and the test could not fail on
 * a latch that ignores the claim (it passed 15 of 20 runs on one). */

static struct {
	ctx_t *parent;
	int64_t deadline;
	atomic_int canceller_in; /* the cancel has looked (before the deadline) */
	atomic_int reader_in;  /* the reader is between its look and its latch */
	atomic_int bad_waits;  /* a hook's bounded wait ran out */
	atomic_int cancelled;  /* the cancel's return */
} race;

enum { RACE_CAUSE = 4242 }; /* the cancel's cause; the deadline's is ETIMEDOUT */

static void canceller_checked(struct ctxi_cancel *n)
{
	(void)n;
	ctxi_cancel_checked_hook = NULL;
	atomic_store(&race.canceller_in, 1);
	int64_t end = now_ns() + 5 * CTX_SEC;
	while (!atomic_load(&race.reader_in))
		if (now_ns() > end) {
			atomic_fetch_add(&race.bad_waits, 1);
			break;
		}
}

static void reader_looked(struct ctxi_cancel *c)
{
	(void)c;
	ctxi_latch_hook = NULL;
	struct ctxi_cancel *p = (struct ctxi_cancel *)race.parent;
	/* Taken before the cancel claims p (it waits for reader_in), so its
	 * walk cannot reach the child before our latch; the test body lets
	 * go once the reader is back. */
	ctxi_lock(&p->lock);
	atomic_store(&race.reader_in, 1);
	int64_t end = now_ns() + 5 * CTX_SEC;
	while (!atomic_load(&p->state)) /* until the cancel's claim */
		if (now_ns() > end) {
			atomic_fetch_add(&race.bad_waits, 1);
			break;
		}
}

static void *cancel_parent(void *arg)
{
	(void)arg;
	atomic_store(&race.cancelled, ctx_cancel_cause(race.parent, RACE_CAUSE));
	return NULL;
}

/* The race, read from the bottom of `depth` cancellable nodes under the
 * parent, all sharing its deadline: once both sides are done, every one of
 * them reports the parent's err and cause. */
static void race_deadline_and_cancel(int depth)
{
	race.parent = ctx_with_timeout(ctx_background(), 500 * CTX_MSEC);
	ctx_t *chain[64];
	cr_assert(depth >= 1 && depth <= 64);
	for (int i = 0; i < depth; i++) /* each shares the deadline */
		chain[i] = ctx_with_cancel(i ? chain[i - 1] : race.parent);
	struct timespec d;
	cr_assert(ctx_deadline(race.parent, &d));
	race.deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
	atomic_store(&race.canceller_in, 0);
	atomic_store(&race.reader_in, 0);
	atomic_store(&race.bad_waits, 0);
	atomic_store(&race.cancelled, -1);
	ctxi_cancel_checked_hook = canceller_checked;
	ctxi_latch_hook = reader_looked;
	/* The cancel looks before the deadline, then waits in its window. */
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, cancel_parent, NULL), 0);
	while (!atomic_load(&race.canceller_in) && now_ns() < race.deadline)
		sched_yield();
	cr_assert(atomic_load(&race.canceller_in), "the cancel did not look before the deadline");
	while (now_ns() < race.deadline)
		sched_yield();
	int child_err = ctx_err(chain[depth - 1]);
	int child_cause = ctx_cause(chain[depth - 1]);
	/* The reader is back: let the cancel's walk go on. */
	if (atomic_load(&race.reader_in))
		ctxi_unlock(&((struct ctxi_cancel *)race.parent)->lock);
	cr_assert(joined_within(t, 5000));
	cr_assert_eq(atomic_load(&race.bad_waits), 0, "a hook was not reached");
	cr_assert_eq(atomic_load(&race.cancelled), 0, "the cancel did not claim the parent");
	int parent_err = ctx_err(race.parent);
	int parent_cause = ctx_cause(race.parent);
	cr_assert_eq(child_err, parent_err, "child err %d, parent err %d", child_err, parent_err);
	cr_assert_eq(child_cause, parent_cause, "child cause %d, parent cause %d", child_cause,
		     parent_cause);
	cr_assert_eq(parent_err, ECANCELED, "the cancel's claim came first: %d", parent_err);
	cr_assert_eq(parent_cause, RACE_CAUSE);
	for (int i = 0; i < depth; i++) {
		cr_assert_eq(ctx_err(chain[i]), parent_err, "node %d", i);
		cr_assert_eq(ctx_cause(chain[i]), parent_cause, "node %d", i);
	}
	for (int i = depth - 1; i >= 0; i--)
		ctx_unref(chain[i]);
	ctx_unref(race.parent);
}

Test(threads, a_cancel_claiming_a_parent_while_a_child_latches_its_deadline_decides_both)
{
	race_deadline_and_cancel(1);
}

/* Longer than lib/tree.c's LATCH_RING (32): the reader latches it in more
 * than one round, the cancel's state passed down through all of them. */
Test(threads, a_cancel_claiming_a_parent_while_a_long_chain_latches_its_deadline_decides_all)
{
	race_deadline_and_cancel(40);
}
