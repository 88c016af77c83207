/* Bad input and exhausted resources: NULL everywhere, out of memory, out of
 * file descriptors.  Each Criterion test runs in its own process, so a test
 * may lower its fd limit or inject allocation failures freely. */
#include <criterion/criterion.h>

#include "helpers.h"
#include "internal.h"

#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

static int key;
static int destroyed;
static void count_destroy(void *v)
{
	(void)v;
	destroyed++;
}

/* ------------------------------------------------------------------------ */
/* NULL */

/* Runs `expr`, which must yield NULL and set errno to EINVAL. */
#define NULL_EINVAL(expr)                                                             \
	do {                                                                          \
		errno = 0;                                                            \
		cr_assert_null((expr), #expr);                                        \
		cr_assert_eq(errno, EINVAL, "%s: errno %d", #expr, errno);            \
	} while (0)

Test(null, parent_makes_every_constructor_fail_with_einval)
{
	struct timespec d = ts_after(CTX_SEC);
	NULL_EINVAL(ctx_with_cancel(NULL));
	NULL_EINVAL(ctx_with_deadline(NULL, d));
	NULL_EINVAL(ctx_with_deadline_cause(NULL, d, EIO));
	NULL_EINVAL(ctx_with_timeout(NULL, CTX_SEC));
	NULL_EINVAL(ctx_with_timeout(NULL, 0));
	NULL_EINVAL(ctx_with_timeout(NULL, INT64_MAX));
	NULL_EINVAL(ctx_with_timeout_cause(NULL, CTX_SEC, EIO));
	NULL_EINVAL(ctx_with_value(NULL, &key, &key, count_destroy));
	NULL_EINVAL(ctx_without_cancel(NULL));
	cr_assert_eq(destroyed, 0, "destroy ran for a failed constructor");
}

Test(null, context_is_einval_for_every_query_and_operation)
{
	cr_assert_eq(ctx_cancel(NULL), EINVAL);
	cr_assert_eq(ctx_cancel_cause(NULL, EIO), EINVAL);
	cr_assert_eq(ctx_err(NULL), EINVAL);
	cr_assert_eq(ctx_cause(NULL), EINVAL);
	struct timespec ts;
	errno = 0;
	cr_assert_not(ctx_deadline(NULL, &ts));
	cr_assert_eq(errno, EINVAL);
	errno = 0;
	cr_assert_not(ctx_deadline(NULL, NULL));
	cr_assert_eq(errno, EINVAL);
	NULL_EINVAL(ctx_value(NULL, &key));
	NULL_EINVAL(ctx_value(NULL, NULL));
	NULL_EINVAL(ctx_ref(NULL));
	errno = 0;
	cr_assert_eq(ctx_fd(NULL), -1);
	cr_assert_eq(errno, EINVAL);
	/* Ignored, no crash. */
	ctx_unref(NULL);
	ctx_release(NULL);
}

Test(null, key_is_einval)
{
	NULL_EINVAL(ctx_with_value(ctx_background(), NULL, &key, count_destroy));
	cr_assert_eq(destroyed, 0);
	ctx_t *c = ctx_with_cancel(ctx_background());
	NULL_EINVAL(ctx_with_value(c, NULL, NULL, NULL));
	NULL_EINVAL(ctx_value(c, NULL));
	NULL_EINVAL(ctx_value(ctx_background(), NULL));
	ctx_unref(c);
}

/* ------------------------------------------------------------------------ */
/* Out of memory */

/* A parent whose destroy count shows whether a failed constructor leaked a
 * reference to it: after the failure, one unref must free it. */
struct probe {
	ctx_t *base;  /* cancellable, so failed children could leave a trace */
	ctx_t *value; /* the parent handed to the constructor */
};

static struct probe probe_new(void)
{
	struct probe p;
	p.base = ctx_with_cancel(ctx_background());
	p.value = ctx_with_value(p.base, &key, &key, count_destroy);
	cr_assert_not_null(p.value);
	return p;
}

static void probe_free(struct probe p)
{
	/* Cancelling walks whatever registered with base: a half-made child
	 * left in its list would be a use after free (ASan) here. */
	cr_assert_eq(ctx_cancel(p.base), 0);
	ctx_unref(p.value);
	cr_assert_eq(destroyed, 1, "a failed constructor kept a reference to its parent");
	ctx_unref(p.base);
}

typedef ctx_t *(*ctor_fn)(ctx_t *parent);

static ctx_t *mk_cancel(ctx_t *p) { return ctx_with_cancel(p); }
static ctx_t *mk_deadline(ctx_t *p) { return ctx_with_deadline(p, ts_after(CTX_SEC)); }
static ctx_t *mk_deadline_past(ctx_t *p) { return ctx_with_deadline(p, ts_after(-CTX_SEC)); }
static ctx_t *mk_deadline_cause(ctx_t *p) { return ctx_with_deadline_cause(p, ts_after(CTX_SEC), EIO); }
static ctx_t *mk_timeout(ctx_t *p) { return ctx_with_timeout(p, CTX_SEC); }
static ctx_t *mk_timeout_zero(ctx_t *p) { return ctx_with_timeout(p, 0); }
static ctx_t *mk_timeout_never(ctx_t *p) { return ctx_with_timeout(p, INT64_MAX); }
static ctx_t *mk_timeout_cause(ctx_t *p) { return ctx_with_timeout_cause(p, CTX_SEC, EIO); }
static ctx_t *mk_without(ctx_t *p) { return ctx_without_cancel(p); }

static void enomem_then_success(ctor_fn make, bool done_parent)
{
	struct probe p = probe_new();
	if (done_parent)
		ctx_cancel(p.base);
	int fds = open_fd_count();
	atomic_store(&ctxi_fail_allocs, 1);
	errno = 0;
	cr_assert_null(make(p.value));
	cr_assert_eq(errno, ENOMEM);
	cr_assert_eq(atomic_load(&ctxi_fail_allocs), 0);
	cr_assert_eq(open_fd_count(), fds);
	/* The next call succeeds, and the failure left no trace. */
	ctx_t *c = make(p.value);
	cr_assert_not_null(c, "a call after ENOMEM failed");
	cr_assert_eq(ctx_value(c, &key), &key);
	if (done_parent)
		cr_assert_neq(ctx_err(c), 0);
	ctx_unref(c);
	if (!done_parent)
		probe_free(p);
	else {
		ctx_unref(p.value);
		cr_assert_eq(destroyed, 1);
		ctx_unref(p.base);
	}
}

Test(enomem, with_cancel) { enomem_then_success(mk_cancel, false); }
Test(enomem, with_cancel_of_a_done_parent) { enomem_then_success(mk_cancel, true); }
Test(enomem, with_deadline) { enomem_then_success(mk_deadline, false); }
Test(enomem, with_deadline_already_past) { enomem_then_success(mk_deadline_past, false); }
Test(enomem, with_deadline_cause) { enomem_then_success(mk_deadline_cause, false); }
Test(enomem, with_timeout) { enomem_then_success(mk_timeout, false); }
Test(enomem, with_timeout_zero) { enomem_then_success(mk_timeout_zero, false); }
Test(enomem, with_timeout_int64_max) { enomem_then_success(mk_timeout_never, false); }
Test(enomem, with_timeout_cause) { enomem_then_success(mk_timeout_cause, true); }
Test(enomem, without_cancel) { enomem_then_success(mk_without, false); }

Test(enomem, with_value_does_not_call_destroy)
{
	struct probe p = probe_new();
	static int mine;
	atomic_store(&ctxi_fail_allocs, 1);
	errno = 0;
	cr_assert_null(ctx_with_value(p.value, &mine, &mine, count_destroy));
	cr_assert_eq(errno, ENOMEM);
	cr_assert_eq(destroyed, 0, "destroy ran although the value still belongs to the caller");
	ctx_t *v = ctx_with_value(p.value, &mine, &mine, count_destroy);
	cr_assert_not_null(v);
	cr_assert_eq(ctx_value(v, &mine), &mine);
	cr_assert_eq(ctx_value(v, &key), &key);
	ctx_unref(v);
	cr_assert_eq(destroyed, 1);
	destroyed = 0;
	probe_free(p);
}

Test(enomem, leaves_siblings_and_the_cascade_intact)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *a = ctx_with_cancel(p);
	atomic_store(&ctxi_fail_allocs, 3);
	cr_assert_null(ctx_with_cancel(p));
	cr_assert_null(ctx_with_timeout(p, CTX_SEC));
	cr_assert_null(ctx_with_value(p, &key, NULL, NULL));
	ctx_t *b = ctx_with_cancel(p);
	cr_assert_not_null(b);
	int fb = ctx_fd(b);
	cr_assert_eq(ctx_cancel(p), 0);
	cr_assert_eq(ctx_err(a), ECANCELED);
	cr_assert_eq(ctx_err(b), ECANCELED);
	cr_assert(readable_now(fb));
	ctx_unref(b);
	ctx_unref(a);
	ctx_unref(p);
}

/* ------------------------------------------------------------------------ */
/* Out of file descriptors */

#define FD_LIMIT 64

static void lower_fd_limit(void)
{
	struct rlimit rl;
	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
	rl.rlim_cur = FD_LIMIT;
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &rl), 0);
}

/* Opens fds until the process has none left; returns how many it holds. */
static int fill[FD_LIMIT];
static int exhaust_fds(void)
{
	int n = 0;
	for (;;) {
		cr_assert_lt(n, FD_LIMIT, "the fd limit did not hold");
		int fd = eventfd(0, EFD_CLOEXEC);
		if (fd < 0) {
			cr_assert_eq(errno, EMFILE);
			return n;
		}
		fill[n++] = fd;
	}
}

static void release_fds(int n)
{
	for (int i = 0; i < n; i++)
		close(fill[i]);
}

Test(emfile, never_bounds_how_many_contexts_exist)
{
	lower_fd_limit();
	enum { N = 10000 };
	static ctx_t *cs[N];
	ctx_t *p = ctx_with_cancel(ctx_background());
	for (int i = 0; i < N; i++) {
		switch (i % 4) {
		case 0: cs[i] = ctx_with_cancel(p); break;
		case 1: cs[i] = ctx_with_timeout(p, 3600 * CTX_SEC); break;
		case 2: cs[i] = ctx_with_value(cs[i - 1], &key, NULL, NULL); break;
		case 3: cs[i] = ctx_with_cancel(cs[i - 1]); break;
		}
		cr_assert_not_null(cs[i], "context %d: errno %d", i, errno);
		cr_assert_eq(ctx_err(cs[i]), 0);
	}
	for (int i = 0; i < N; i += 8)
		cr_assert_eq(ctx_cancel(cs[i]), 0);
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(ctx_err(cs[i]), ECANCELED);
		cr_assert_eq(ctx_cause(cs[i]), i % 8 == 0 ? ECANCELED : EPIPE, "context %d", i);
	}
	for (int i = 0; i < N; i++)
		ctx_unref(cs[i]);
	ctx_unref(p);
}

Test(emfile, makes_ctx_fd_fail_without_remembering_the_failure)
{
	lower_fd_limit();
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_t *t = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	int n = exhaust_fds();
	errno = 0;
	cr_assert_eq(ctx_fd(c), -1);
	cr_assert_eq(errno, EMFILE);
	errno = 0;
	cr_assert_eq(ctx_fd(t), -1);
	cr_assert_eq(errno, EMFILE);
	/* Still failing, still not remembered as anything else. */
	errno = 0;
	cr_assert_eq(ctx_fd(c), -1);
	cr_assert_eq(errno, EMFILE);
	close(fill[--n]);
	int fc = ctx_fd(c);
	cr_assert_geq(fc, 0, "ctx_fd remembered its failure");
	cr_assert_not(readable_now(fc));
	close(fill[--n]);
	int ft = ctx_fd(t);
	cr_assert_geq(ft, 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert(readable_now(fc));
	cr_assert_not(readable_now(ft));
	release_fds(n);
	ctx_unref(t);
	ctx_unref(c);
}

Test(emfile, leaves_the_context_usable_and_its_late_fd_readable)
{
	lower_fd_limit();
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *v = ctx_with_value(c, &key, &key, NULL);
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	int n = exhaust_fds();
	cr_assert_eq(ctx_fd(c), -1);
	cr_assert_eq(ctx_fd(v), -1);
	cr_assert_eq(ctx_fd(t), -1);
	/* Everything but the fd works meanwhile. */
	ctx_t *g = ctx_with_cancel(v);
	cr_assert_not_null(g);
	cr_assert_eq(ctx_err(c), 0);
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(g), EPIPE);
	cr_assert_eq(ctx_cancel(c), EALREADY);
	cr_assert_eq(ctx_value(v, &key), &key);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &d, NULL) == EINTR)
		;
	cr_assert_eq(ctx_err(t), ETIMEDOUT, "a deadline needed an fd");
	cr_assert_eq(ctx_fd(g), -1);
	/* With fds back, each fd is born readable, as its context is done. */
	release_fds(n);
	ctx_t *all[] = {p, c, v, g, t};
	for (size_t i = 0; i < 5; i++) {
		int fd = ctx_fd(all[i]);
		cr_assert_geq(fd, 0, "context %zu", i);
		cr_assert(readable_now(fd), "context %zu", i);
	}
	for (size_t i = 0; i < 5; i++)
		ctx_unref(all[i]);
}

Test(emfile, does_not_affect_the_shared_never_fd_once_it_exists)
{
	lower_fd_limit();
	int never = ctx_fd(ctx_background());
	cr_assert_geq(never, 0);
	ctx_t *w = ctx_without_cancel(ctx_background());
	int n = exhaust_fds();
	cr_assert_eq(ctx_fd(ctx_todo()), never);
	cr_assert_eq(ctx_fd(w), never);
	release_fds(n);
	ctx_unref(w);
}
