/* The model through the public API: cancellation and its cascade, causes,
 * deadlines, values, lifetimes.  Nothing here looks at an fd except to prove
 * that none was needed. */
#include <criterion/criterion.h>

#include "helpers.h"

#include <inttypes.h>
#include <string.h>

/* Keys are compared by address: distinct objects, even with equal contents. */
static const char key_a[] = "same";
static const char key_b[] = "same";
static int key_c;

/* ------------------------------------------------------------------------ */
/* Cancellation and its cascade */

Test(cancel, reaches_children_and_grandchildren)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c1 = ctx_with_cancel(p);
	ctx_t *c2 = ctx_with_cancel(p);
	ctx_t *g1 = ctx_with_cancel(c1);
	ctx_t *g2 = ctx_with_cancel(c2);
	ctx_t *gg = ctx_with_cancel(g1);
	ctx_t *all[] = {p, c1, c2, g1, g2, gg};
	for (size_t i = 0; i < 6; i++) {
		cr_assert_not_null(all[i]);
		cr_assert_eq(ctx_err(all[i]), 0);
		cr_assert_eq(ctx_cause(all[i]), 0);
	}
	cr_assert_eq(ctx_cancel(p), 0);
	for (size_t i = 0; i < 6; i++) {
		cr_assert_eq(ctx_err(all[i]), ECANCELED, "context %zu", i);
		cr_assert_eq(ctx_cause(all[i]), ECANCELED, "context %zu", i);
	}
	for (size_t i = 0; i < 6; i++)
		ctx_unref(all[i]);
}

Test(cancel, reaches_descendants_through_value_and_timed_layers)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(p, &key_c, NULL, NULL);
	ctx_t *t = ctx_with_timeout(v, 3600 * CTX_SEC);
	ctx_t *v2 = ctx_with_value(t, &key_c, NULL, NULL);
	ctx_t *c = ctx_with_cancel(v2);
	ctx_t *d = ctx_with_deadline(c, ts_after(3600 * CTX_SEC));
	ctx_t *all[] = {p, v, t, v2, c, d};
	for (size_t i = 0; i < 6; i++) {
		cr_assert_not_null(all[i]);
		cr_assert_eq(ctx_err(all[i]), 0);
	}
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	for (size_t i = 0; i < 6; i++) {
		/* ECANCELED, not ETIMEDOUT: the timed layers were cancelled. */
		cr_assert_eq(ctx_err(all[i]), ECANCELED, "context %zu", i);
		cr_assert_eq(ctx_cause(all[i]), EPIPE, "context %zu", i);
	}
	cr_assert_eq(ctx_cancel(t), EALREADY);
	cr_assert_eq(ctx_cancel(d), EALREADY);
	for (size_t i = 0; i < 6; i++)
		ctx_unref(all[i]);
}

Test(cancel, does_not_reach_the_parent_or_siblings)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *a = ctx_with_cancel(p);
	ctx_t *b = ctx_with_cancel(p);
	ctx_t *ga = ctx_with_cancel(a);
	ctx_t *gb = ctx_with_cancel(b);
	cr_assert_eq(ctx_cancel(a), 0);
	cr_assert_eq(ctx_err(a), ECANCELED);
	cr_assert_eq(ctx_err(ga), ECANCELED);
	cr_assert_eq(ctx_err(p), 0);
	cr_assert_eq(ctx_err(b), 0);
	cr_assert_eq(ctx_err(gb), 0);
	cr_assert_eq(ctx_err(ctx_background()), 0);
	/* The sibling is still cancellable on its own. */
	cr_assert_eq(ctx_cancel(b), 0);
	cr_assert_eq(ctx_err(gb), ECANCELED);
	cr_assert_eq(ctx_err(p), 0);
	ctx_unref(gb);
	ctx_unref(ga);
	ctx_unref(b);
	ctx_unref(a);
	ctx_unref(p);
}

Test(cancel, returns_zero_once_then_ealready)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_cancel(c), EALREADY);
	cr_assert_eq(ctx_cancel_cause(c, EIO), EALREADY);
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), ECANCELED);
	ctx_unref(c);

	ctx_t *t = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	cr_assert_eq(ctx_cancel_cause(t, EIO), 0);
	cr_assert_eq(ctx_cancel(t), EALREADY);
	cr_assert_eq(ctx_err(t), ECANCELED);
	cr_assert_eq(ctx_cause(t), EIO);
	ctx_unref(t);
}

Test(cancel, of_a_child_already_done_through_its_parent_returns_ealready)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *t = ctx_with_timeout(p, 3600 * CTX_SEC);
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	cr_assert_eq(ctx_cancel_cause(c, EIO), EALREADY);
	cr_assert_eq(ctx_cancel_cause(t, EIO), EALREADY);
	cr_assert_eq(ctx_cause(c), EPIPE);
	cr_assert_eq(ctx_cause(t), EPIPE);
	ctx_unref(t);
	ctx_unref(c);
	ctx_unref(p);
}

Test(cancel, rejects_null_and_uncancellable_contexts_with_einval)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(p, &key_c, NULL, NULL);
	ctx_t *w = ctx_without_cancel(p);
	ctx_t *bad[] = {NULL, ctx_background(), ctx_todo(), v, w};
	for (size_t i = 0; i < 5; i++) {
		cr_assert_eq(ctx_cancel(bad[i]), EINVAL, "context %zu", i);
		cr_assert_eq(ctx_cancel_cause(bad[i], EIO), EINVAL, "context %zu", i);
	}
	/* A refused cancel changes nothing, above or below. */
	cr_assert_eq(ctx_err(p), 0);
	cr_assert_eq(ctx_err(v), 0);
	cr_assert_eq(ctx_err(w), 0);
	cr_assert_eq(ctx_err(ctx_background()), 0);
	cr_assert_eq(ctx_err(ctx_todo()), 0);
	/* The value layer over a cancelled parent still refuses. */
	cr_assert_eq(ctx_cancel(p), 0);
	cr_assert_eq(ctx_cancel(v), EINVAL);
	cr_assert_eq(ctx_cancel(w), EINVAL);
	ctx_unref(w);
	ctx_unref(v);
	ctx_unref(p);
}

Test(cancel, by_release_then_unref)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);
	ctx_release(p); /* cancels p, drops our reference; c keeps p alive */
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), ECANCELED);
	ctx_release(c);
	ctx_release(NULL);
}

static int destroyed;
static void count_destroy(void *v)
{
	(void)v;
	destroyed++;
}

Test(cancel, release_of_an_uncancellable_context_only_unrefs_it)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(p, &key_c, NULL, count_destroy);
	ctx_t *w = ctx_without_cancel(p);
	ctx_release(v);
	cr_assert_eq(destroyed, 1);
	ctx_release(w);
	cr_assert_eq(ctx_err(p), 0, "releasing a value or without-cancel child cancelled its parent");
	ctx_release(ctx_background());
	ctx_release(ctx_todo());
	cr_assert_eq(ctx_err(ctx_background()), 0);
	ctx_release(p);
}

/* ------------------------------------------------------------------------ */
/* Born done */

Test(born_done, child_of_a_cancelled_parent_has_the_parent_err_and_cause)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_cancel_cause(p, ECONNRESET), 0);
	ctx_t *kids[] = {
		ctx_with_cancel(p),
		ctx_with_timeout(p, 3600 * CTX_SEC),
		ctx_with_timeout_cause(p, 3600 * CTX_SEC, EIO),
		ctx_with_deadline(p, ts_after(3600 * CTX_SEC)),
		ctx_with_value(p, &key_c, NULL, NULL),
	};
	for (size_t i = 0; i < 5; i++) {
		cr_assert_not_null(kids[i]);
		cr_assert_eq(ctx_err(kids[i]), ECANCELED, "child %zu", i);
		cr_assert_eq(ctx_cause(kids[i]), ECONNRESET, "child %zu", i);
	}
	cr_assert_eq(ctx_cancel_cause(kids[0], EIO), EALREADY);
	cr_assert_eq(ctx_cause(kids[0]), ECONNRESET);
	/* Grandchildren through a born-done child and a value layer. */
	ctx_t *g1 = ctx_with_cancel(kids[0]);
	ctx_t *g2 = ctx_with_cancel(kids[4]);
	cr_assert_eq(ctx_err(g1), ECANCELED);
	cr_assert_eq(ctx_cause(g1), ECONNRESET);
	cr_assert_eq(ctx_err(g2), ECANCELED);
	cr_assert_eq(ctx_cause(g2), ECONNRESET);
	ctx_unref(g1);
	ctx_unref(g2);
	for (size_t i = 0; i < 5; i++)
		ctx_unref(kids[i]);
	ctx_unref(p);
}

/* Sleeps (deterministically, on the absolute clock) until just past `ts`. */
static void sleep_until(struct timespec ts)
{
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
	cr_assert_geq(now_ns(), (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec);
}

Test(born_done, child_of_a_timed_out_parent_has_etimedout_and_the_parent_cause)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *p = ctx_with_deadline_cause(ctx_background(), d, EHOSTDOWN);
	sleep_until(d);
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *t = ctx_with_timeout_cause(p, 3600 * CTX_SEC, EIO);
	ctx_t *v = ctx_with_value(p, &key_c, NULL, NULL);
	ctx_t *kids[] = {c, t, v};
	for (size_t i = 0; i < 3; i++) {
		cr_assert_eq(ctx_err(kids[i]), ETIMEDOUT, "child %zu", i);
		cr_assert_eq(ctx_cause(kids[i]), EHOSTDOWN, "child %zu", i);
	}
	cr_assert_eq(ctx_cancel(c), EALREADY);
	cr_assert_eq(ctx_cancel(t), EALREADY);
	for (size_t i = 0; i < 3; i++)
		ctx_unref(kids[i]);
	ctx_unref(p);
}

Test(born_done, with_a_past_deadline_under_a_cancelled_parent_has_the_parent_err_and_cause)
{
	/* The parent was done first: its err wins over the child's own
	 * deadline, already past at construction (as in Go). */
	ctx_t *p = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_cancel_cause(p, ECONNRESET), 0);
	struct timespec past = {0, 1};
	ctx_t *kids[] = {
		ctx_with_timeout(p, 0),
		ctx_with_timeout_cause(p, -1, EIO),
		ctx_with_deadline(p, past),
		ctx_with_deadline_cause(p, ts_after(-CTX_SEC), EIO),
	};
	for (size_t i = 0; i < 4; i++) {
		cr_assert_not_null(kids[i]);
		cr_assert_eq(ctx_err(kids[i]), ECANCELED, "child %zu", i);
		cr_assert_eq(ctx_cause(kids[i]), ECONNRESET, "child %zu", i);
		ctx_unref(kids[i]);
	}
	ctx_unref(p);
}

Test(born_done, under_a_timed_parent_cancelled_before_its_deadline_has_the_parent_err)
{
	/* The child inherits a deadline that has passed by the time it is
	 * made, but the parent was cancelled before that deadline. */
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *p = ctx_with_deadline_cause(ctx_background(), d, EHOSTDOWN);
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	sleep_until(d);
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *v = ctx_with_value(p, &key_c, NULL, NULL);
	ctx_t *g = ctx_with_timeout(v, 3600 * CTX_SEC);
	ctx_t *kids[] = {c, v, g};
	for (size_t i = 0; i < 3; i++) {
		cr_assert_eq(ctx_err(kids[i]), ECANCELED, "child %zu", i);
		cr_assert_eq(ctx_cause(kids[i]), EPIPE, "child %zu", i);
	}
	for (size_t i = 3; i-- > 0;)
		ctx_unref(kids[i]);
	ctx_unref(p);
}

/* ------------------------------------------------------------------------ */
/* Causes */

Test(cause, is_zero_until_done_and_defaults_to_the_err)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_cause(c), 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_cause(c), ECANCELED);
	ctx_unref(c);
}

Test(cause, of_the_first_cancel_wins)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_cancel_cause(c, EPIPE), 0);
	cr_assert_eq(ctx_cancel_cause(c, EIO), EALREADY);
	cr_assert_eq(ctx_cancel(c), EALREADY);
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), EPIPE);
	ctx_unref(c);
}

Test(cause, zero_means_ecanceled)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_cancel_cause(c, 0), 0);
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), ECANCELED);
	ctx_unref(c);
}

Test(cause, is_inherited_by_descendants_old_and_new)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *v = ctx_with_value(c, &key_c, NULL, NULL);
	ctx_t *g = ctx_with_timeout(v, 3600 * CTX_SEC);
	cr_assert_eq(ctx_cancel_cause(p, ENETDOWN), 0);
	ctx_t *late = ctx_with_cancel(g);
	ctx_t *all[] = {p, c, v, g, late};
	for (size_t i = 0; i < 5; i++) {
		cr_assert_eq(ctx_err(all[i]), ECANCELED, "context %zu", i);
		cr_assert_eq(ctx_cause(all[i]), ENETDOWN, "context %zu", i);
	}
	for (size_t i = 5; i-- > 0;)
		ctx_unref(all[i]);
}

Test(cause, of_a_deadline_is_reported_when_the_deadline_passes)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *a = ctx_with_deadline_cause(ctx_background(), d, EHOSTUNREACH);
	ctx_t *b = ctx_with_timeout_cause(ctx_background(), 10 * CTX_MSEC, ENETUNREACH);
	ctx_t *ca = ctx_with_cancel(a);
	cr_assert_not_null(a);
	cr_assert_not_null(b);
	sleep_until(d); /* b's deadline is earlier still */
	cr_assert_eq(ctx_err(a), ETIMEDOUT);
	cr_assert_eq(ctx_cause(a), EHOSTUNREACH);
	cr_assert_eq(ctx_err(ca), ETIMEDOUT);
	cr_assert_eq(ctx_cause(ca), EHOSTUNREACH);
	cr_assert_eq(ctx_err(b), ETIMEDOUT);
	cr_assert_eq(ctx_cause(b), ENETUNREACH);
	ctx_unref(ca);
	ctx_unref(a);
	ctx_unref(b);
}

Test(cause, of_a_deadline_zero_means_etimedout)
{
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *a = ctx_with_deadline_cause(ctx_background(), d, 0);
	ctx_t *b = ctx_with_timeout_cause(ctx_background(), 5 * CTX_MSEC, 0);
	ctx_t *c = ctx_with_deadline(ctx_background(), d);
	sleep_until(d);
	ctx_t *all[] = {a, b, c};
	for (size_t i = 0; i < 3; i++) {
		cr_assert_eq(ctx_err(all[i]), ETIMEDOUT, "context %zu", i);
		cr_assert_eq(ctx_cause(all[i]), ETIMEDOUT, "context %zu", i);
		ctx_unref(all[i]);
	}
}

Test(cause, of_a_deadline_is_not_used_when_cancelled_first)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *a = ctx_with_deadline_cause(ctx_background(), d, EHOSTUNREACH);
	ctx_t *c = ctx_with_cancel(a);
	cr_assert_eq(ctx_cancel_cause(a, EPIPE), 0);
	sleep_until(d);
	/* Done stays done: the deadline passing changes nothing. */
	cr_assert_eq(ctx_err(a), ECANCELED);
	cr_assert_eq(ctx_cause(a), EPIPE);
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), EPIPE);
	ctx_unref(c);
	ctx_unref(a);
}

Test(cause, of_an_earlier_parent_deadline_applies_to_the_child)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *p = ctx_with_deadline_cause(ctx_background(), d, EPIPE);
	struct timespec later = d;
	later.tv_sec += 10;
	ctx_t *c = ctx_with_deadline_cause(p, later, EIO);
	ctx_t *t = ctx_with_timeout_cause(p, 3600 * CTX_SEC, EIO);
	struct timespec got;
	cr_assert(ctx_deadline(c, &got));
	cr_assert_eq(got.tv_sec, d.tv_sec);
	cr_assert_eq(got.tv_nsec, d.tv_nsec);
	sleep_until(d);
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	cr_assert_eq(ctx_cause(c), EPIPE);
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	cr_assert_eq(ctx_cause(t), EPIPE);
	ctx_unref(t);
	ctx_unref(c);
	ctx_unref(p);
}

Test(cause, of_an_equal_parent_deadline_is_the_parent_cause)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *p = ctx_with_deadline_cause(ctx_background(), d, EPIPE);
	ctx_t *c = ctx_with_deadline_cause(p, d, EIO);
	sleep_until(d);
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	cr_assert_eq(ctx_cause(c), EPIPE);
	ctx_unref(c);
	ctx_unref(p);
}

Test(cause, of_an_earlier_own_deadline_is_the_child_cause)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	struct timespec later = d;
	later.tv_sec += 3600;
	ctx_t *p = ctx_with_deadline_cause(ctx_background(), later, EPIPE);
	ctx_t *c = ctx_with_deadline_cause(p, d, EIO);
	ctx_t *g = ctx_with_cancel(c);
	sleep_until(d);
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	cr_assert_eq(ctx_cause(c), EIO);
	cr_assert_eq(ctx_err(g), ETIMEDOUT);
	cr_assert_eq(ctx_cause(g), EIO);
	cr_assert_eq(ctx_err(p), 0);
	cr_assert_eq(ctx_cause(p), 0);
	ctx_unref(g);
	ctx_unref(c);
	ctx_unref(p);
}

/* ------------------------------------------------------------------------ */
/* Deadlines */

Test(deadline, err_is_etimedout_exactly_when_it_passes_with_no_fd_anywhere)
{
	int fds = open_fd_count();
	struct timespec d = ts_after(30 * CTX_MSEC);
	int64_t dns = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	ctx_t *c = ctx_with_cancel(t);
	ctx_t *v = ctx_with_value(c, &key_c, NULL, NULL);
	int before = ctx_err(v);
	if (now_ns() < dns) /* the library read the clock before we did */
		cr_assert_eq(before, 0, "done before its deadline");
	sleep_until(d);
	/* No thread and no fd: the passed deadline shows on the next read. */
	cr_assert_eq(ctx_err(v), ETIMEDOUT);
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	cr_assert_eq(ctx_cause(t), ETIMEDOUT);
	cr_assert_eq(open_fd_count(), fds, "a deadline opened an fd");
	ctx_unref(v);
	ctx_unref(c);
	ctx_unref(t);
}

/* Every read of err, from 100 ms before a deadline to past it, agrees with
 * CLOCK_MONOTONIC read around it: 0 only if the clock said "before" just
 * before the call, ETIMEDOUT only if it said "at or after" just after.  (A
 * fast path on CLOCK_MONOTONIC_COARSE was tried and dropped: the coarse
 * clock's lag behind the precise one has no bound the kernel promises.) */
Test(deadline, err_is_exact_on_every_read_before_and_after_it)
{
	struct timespec d = ts_after(100 * CTX_MSEC);
	int64_t dns = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	ctx_t *c = ctx_with_cancel(t);
	long dones = 0;
	for (;;) {
		int64_t t1 = now_ns();
		int e = ctx_err(c);
		int64_t t2 = now_ns();
		if (e == 0) {
			cr_assert_lt(t1, dns, "err 0 at %" PRId64 " ns past the deadline", t1 - dns);
		} else {
			cr_assert_eq(e, ETIMEDOUT);
			cr_assert_geq(t2, dns, "done %" PRId64 " ns before the deadline", dns - t2);
			if (++dones == 100) /* latched: stays ETIMEDOUT */
				break;
		}
	}
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	ctx_unref(c);
	ctx_unref(t);
}

Test(deadline, once_passed_makes_cancel_return_ealready_and_err_stay_etimedout)
{
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	ctx_t *c = ctx_with_cancel(t);
	sleep_until(d);
	/* Nobody has looked at t since its deadline: cancel must not win. */
	cr_assert_eq(ctx_cancel_cause(t, EPIPE), EALREADY);
	cr_assert_eq(ctx_cancel_cause(c, EPIPE), EALREADY);
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	cr_assert_eq(ctx_cause(t), ETIMEDOUT);
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	cr_assert_eq(ctx_cause(c), ETIMEDOUT);
	ctx_unref(c);
	ctx_unref(t);
}

Test(deadline, cancelling_a_parent_after_a_child_deadline_keeps_the_child_etimedout)
{
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *t = ctx_with_deadline_cause(p, d, EIO);
	ctx_t *g = ctx_with_cancel(t);
	sleep_until(d);
	/* t's deadline made it done first, though nobody looked at it. */
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	cr_assert_eq(ctx_cause(t), EIO);
	cr_assert_eq(ctx_err(g), ETIMEDOUT);
	cr_assert_eq(ctx_cause(g), EIO);
	cr_assert_eq(ctx_cause(p), EPIPE);
	ctx_unref(g);
	ctx_unref(t);
	ctx_unref(p);
}

Test(deadline, a_long_chain_sharing_it_latches_from_its_nearest_done_ancestor)
{
	/* 150 nodes (a third of them value nodes) under one deadline, the
	 * 50th cancelled before it: read from the bottom past the deadline,
	 * the ones below it take its cancel (~66 cancellable ones: more than
	 * one round of the latch's ring), the ones above it time out with the
	 * deadline's cause. */
	enum { N = 150, CUT = 50 };
	ctx_t *chain[N];
	chain[0] = ctx_with_timeout_cause(ctx_background(), 30 * CTX_MSEC, 77);
	for (int i = 1; i < N; i++)
		chain[i] = i % 3 ? ctx_with_cancel(chain[i - 1])
				 : ctx_with_value(chain[i - 1], &key_c, NULL, NULL);
	int cut = CUT % 3 ? CUT : CUT + 1;
	cr_assert_eq(ctx_cancel_cause(chain[cut], 88), 0);
	int fd = ctx_fd(chain[0]);
	cr_assert(readable_within(fd, 5000));
	cr_assert_eq(ctx_err(chain[N - 1]), ECANCELED);
	cr_assert_eq(ctx_cause(chain[N - 1]), 88);
	for (int i = 0; i < N; i++) {
		bool below = i >= cut;
		cr_assert_eq(ctx_err(chain[i]), below ? ECANCELED : ETIMEDOUT, "node %d", i);
		cr_assert_eq(ctx_cause(chain[i]), below ? 88 : 77, "node %d", i);
	}
	for (int i = N - 1; i >= 0; i--)
		ctx_unref(chain[i]);
}

Test(deadline, timeout_of_zero_or_less_is_born_done)
{
	int64_t bad[] = {0, -1, -CTX_SEC, INT64_MIN};
	for (size_t i = 0; i < 4; i++) {
		ctx_t *a = ctx_with_timeout(ctx_background(), bad[i]);
		ctx_t *b = ctx_with_timeout_cause(ctx_background(), bad[i], EIO);
		cr_assert_not_null(a);
		cr_assert_not_null(b);
		cr_assert_eq(ctx_err(a), ETIMEDOUT, "timeout %" PRId64, bad[i]);
		cr_assert_eq(ctx_cause(a), ETIMEDOUT);
		cr_assert_eq(ctx_err(b), ETIMEDOUT);
		cr_assert_eq(ctx_cause(b), EIO);
		cr_assert_eq(ctx_cancel(a), EALREADY);
		cr_assert_eq(ctx_cancel(b), EALREADY);
		ctx_unref(a);
		ctx_unref(b);
	}
}

Test(deadline, already_past_is_born_done)
{
	struct timespec past[] = {
		{0, 0},
		{0, 1},
		{-1, 0},
		ts_after(-CTX_SEC),
		ts_after(0),
	};
	for (size_t i = 0; i < 5; i++) {
		ctx_t *a = ctx_with_deadline(ctx_background(), past[i]);
		ctx_t *b = ctx_with_deadline_cause(ctx_background(), past[i], EIO);
		cr_assert_not_null(a, "deadline %zu", i);
		cr_assert_not_null(b, "deadline %zu", i);
		cr_assert_eq(ctx_err(a), ETIMEDOUT, "deadline %zu", i);
		cr_assert_eq(ctx_cause(a), ETIMEDOUT);
		cr_assert_eq(ctx_err(b), ETIMEDOUT);
		cr_assert_eq(ctx_cause(b), EIO);
		cr_assert_eq(ctx_cancel(a), EALREADY);
		ctx_unref(a);
		ctx_unref(b);
	}
}

Test(deadline, timeout_int64_max_means_none)
{
	ctx_t *c = ctx_with_timeout(ctx_background(), INT64_MAX);
	ctx_t *d = ctx_with_timeout_cause(ctx_background(), INT64_MAX, EIO);
	cr_assert_not_null(c);
	cr_assert_not_null(d);
	struct timespec got;
	cr_assert_not(ctx_deadline(c, &got));
	cr_assert_not(ctx_deadline(d, &got));
	cr_assert_eq(ctx_err(c), 0);
	cr_assert_eq(ctx_cancel(c), 0); /* still cancellable */
	cr_assert_eq(ctx_err(c), ECANCELED);
	ctx_unref(c);
	ctx_unref(d);
}

Test(deadline, huge_timeouts_saturate_instead_of_wrapping)
{
	/* now + timeout overflows: it must saturate to "never", not wrap
	 * into the past. */
	int64_t huge[] = {INT64_MAX - 1, INT64_MAX - CTX_SEC, INT64_MAX - now_ns() + 1};
	for (size_t i = 0; i < 3; i++) {
		ctx_t *c = ctx_with_timeout(ctx_background(), huge[i]);
		cr_assert_not_null(c);
		cr_assert_eq(ctx_err(c), 0, "timeout %zu wrapped", i);
		struct timespec got;
		cr_assert_not(ctx_deadline(c, &got), "a saturated deadline is no deadline");
		ctx_unref(c);
	}
	/* Far but representable: kept as given. */
	int64_t far = 100LL * 365 * 24 * 3600 * CTX_SEC;
	int64_t t0 = now_ns();
	ctx_t *c = ctx_with_timeout(ctx_background(), far);
	int64_t t1 = now_ns();
	struct timespec got;
	cr_assert(ctx_deadline(c, &got));
	int64_t g = (int64_t)got.tv_sec * CTX_SEC + got.tv_nsec;
	cr_assert_geq(g, t0 + far);
	cr_assert_leq(g, t1 + far);
	cr_assert_eq(ctx_err(c), 0);
	ctx_unref(c);
	/* The largest deadlines that fit are kept to the nanosecond; the
	 * first that does not is never. */
	struct timespec edge[] = {{9223372035, 999999999}, {9223372036, 854775806}};
	for (size_t i = 0; i < 2; i++) {
		ctx_t *e = ctx_with_deadline(ctx_background(), edge[i]);
		cr_assert_not_null(e);
		cr_assert(ctx_deadline(e, &got), "deadline %zu taken for never", i);
		cr_assert_eq(got.tv_sec, edge[i].tv_sec);
		cr_assert_eq(got.tv_nsec, edge[i].tv_nsec);
		cr_assert_eq(ctx_err(e), 0);
		ctx_unref(e);
	}
	ctx_t *e = ctx_with_deadline(ctx_background(), (struct timespec){9223372036, 854775807});
	cr_assert_not_null(e);
	cr_assert_not(ctx_deadline(e, NULL));
	ctx_unref(e);
	/* A deadline whose nanosecond count does not fit: never. */
	struct timespec never = {.tv_sec = INT64_MAX, .tv_nsec = 0};
	ctx_t *n = ctx_with_deadline(ctx_background(), never);
	cr_assert_not_null(n);
	cr_assert_eq(ctx_err(n), 0);
	cr_assert_not(ctx_deadline(n, NULL));
	ctx_unref(n);
}

Test(deadline, is_reported_exactly_as_given)
{
	struct timespec d = ts_after(3600 * CTX_SEC);
	d.tv_nsec = 123456789;
	ctx_t *c = ctx_with_deadline(ctx_background(), d);
	struct timespec got = {0, 0};
	cr_assert(ctx_deadline(c, &got));
	cr_assert_eq(got.tv_sec, d.tv_sec);
	cr_assert_eq(got.tv_nsec, d.tv_nsec);
	cr_assert(ctx_deadline(c, NULL), "out may be NULL");
	d.tv_nsec = 999999999; /* the largest valid value */
	ctx_t *e = ctx_with_deadline(ctx_background(), d);
	cr_assert_not_null(e);
	cr_assert(ctx_deadline(e, &got));
	cr_assert_eq(got.tv_nsec, 999999999);
	ctx_unref(e);
	ctx_unref(c);
}

Test(deadline, effective_is_the_earliest_of_the_ancestors)
{
	struct timespec d1 = ts_after(3600 * CTX_SEC);
	struct timespec d2 = d1, d0 = d1;
	d2.tv_sec += 60;
	d0.tv_sec -= 60;
	ctx_t *g = ctx_with_deadline(ctx_background(), d1);
	ctx_t *p = ctx_with_deadline(g, d2);         /* later: g's applies */
	ctx_t *v = ctx_with_value(p, &key_c, NULL, NULL);
	ctx_t *c = ctx_with_cancel(v);               /* inherits */
	ctx_t *e = ctx_with_deadline(c, d0);         /* earlier: its own */
	ctx_t *ev = ctx_with_value(e, &key_c, NULL, NULL);
	struct timespec got;
	ctx_t *at_d1[] = {g, p, v, c};
	for (size_t i = 0; i < 4; i++) {
		cr_assert(ctx_deadline(at_d1[i], &got), "context %zu", i);
		cr_assert_eq(got.tv_sec, d1.tv_sec, "context %zu", i);
		cr_assert_eq(got.tv_nsec, d1.tv_nsec, "context %zu", i);
	}
	cr_assert(ctx_deadline(ev, &got));
	cr_assert_eq(got.tv_sec, d0.tv_sec);
	cr_assert_eq(got.tv_nsec, d0.tv_nsec);
	ctx_t *all[] = {ev, e, c, v, p, g};
	for (size_t i = 0; i < 6; i++)
		ctx_unref(all[i]);
}

Test(deadline, is_absent_on_roots_and_plain_children)
{
	cr_assert_not(ctx_deadline(ctx_background(), NULL));
	cr_assert_not(ctx_deadline(ctx_todo(), NULL));
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(c, &key_c, NULL, NULL);
	struct timespec got = {42, 42};
	cr_assert_not(ctx_deadline(c, &got));
	cr_assert_not(ctx_deadline(v, &got));
	ctx_unref(v);
	ctx_unref(c);
}

Test(deadline, is_absent_below_without_cancel)
{
	struct timespec d = ts_after(3600 * CTX_SEC);
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	ctx_t *w = ctx_without_cancel(t);
	ctx_t *wc = ctx_with_cancel(w);
	ctx_t *wv = ctx_with_value(w, &key_c, NULL, NULL);
	cr_assert(ctx_deadline(t, NULL));
	cr_assert_not(ctx_deadline(w, NULL));
	cr_assert_not(ctx_deadline(wc, NULL));
	cr_assert_not(ctx_deadline(wv, NULL));
	/* A later deadline below it is its own, not limited by t's. */
	struct timespec later = d;
	later.tv_sec += 60;
	ctx_t *wt = ctx_with_deadline(w, later);
	struct timespec got;
	cr_assert(ctx_deadline(wt, &got));
	cr_assert_eq(got.tv_sec, later.tv_sec);
	ctx_t *all[] = {wt, wv, wc, w, t};
	for (size_t i = 0; i < 5; i++)
		ctx_unref(all[i]);
}

Test(deadline, with_invalid_nanoseconds_is_einval)
{
	struct timespec bad[] = {{1, -1}, {1, 1000000000}, {1, -1000000000}, {1, 2000000000}};
	for (size_t i = 0; i < 4; i++) {
		errno = 0;
		cr_assert_null(ctx_with_deadline(ctx_background(), bad[i]), "timespec %zu", i);
		cr_assert_eq(errno, EINVAL);
		errno = 0;
		cr_assert_null(ctx_with_deadline_cause(ctx_background(), bad[i], EIO));
		cr_assert_eq(errno, EINVAL);
	}
}

/* ------------------------------------------------------------------------ */
/* Values */

Test(value, is_found_through_cancel_timed_and_without_cancel_layers)
{
	int a = 1, b = 2;
	ctx_t *va = ctx_with_value(ctx_background(), &key_a, &a, NULL);
	ctx_t *c = ctx_with_cancel(va);
	ctx_t *t = ctx_with_timeout(c, 3600 * CTX_SEC);
	ctx_t *w = ctx_without_cancel(t);
	ctx_t *vb = ctx_with_value(w, &key_c, &b, NULL);
	ctx_t *leaf = ctx_with_cancel(vb);
	cr_assert_eq(ctx_value(leaf, &key_a), &a);
	cr_assert_eq(ctx_value(leaf, &key_c), &b);
	cr_assert_eq(ctx_value(w, &key_a), &a);
	cr_assert_null(ctx_value(w, &key_c), "a value is not visible above its binding");
	cr_assert_null(ctx_value(va, &key_c));
	/* Values survive cancellation, above and below. */
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_value(t, &key_a), &a);
	cr_assert_eq(ctx_value(leaf, &key_a), &a);
	ctx_t *all[] = {leaf, vb, w, t, c, va};
	for (size_t i = 0; i < 6; i++)
		ctx_unref(all[i]);
}

Test(value, nearest_binding_wins)
{
	int a = 1, b = 2;
	ctx_t *outer = ctx_with_value(ctx_background(), &key_a, &a, NULL);
	ctx_t *mid = ctx_with_cancel(outer);
	ctx_t *inner = ctx_with_value(mid, &key_a, &b, NULL);
	ctx_t *leaf = ctx_with_cancel(inner);
	cr_assert_eq(ctx_value(leaf, &key_a), &b);
	cr_assert_eq(ctx_value(inner, &key_a), &b);
	cr_assert_eq(ctx_value(mid, &key_a), &a);
	cr_assert_eq(ctx_value(outer, &key_a), &a);
	ctx_t *all[] = {leaf, inner, mid, outer};
	for (size_t i = 0; i < 4; i++)
		ctx_unref(all[i]);
}

Test(value, keys_are_compared_by_pointer_identity)
{
	cr_assert_str_eq(key_a, key_b);
	cr_assert_neq((const void *)key_a, (const void *)key_b);
	int a = 1, b = 2;
	ctx_t *va = ctx_with_value(ctx_background(), key_a, &a, NULL);
	cr_assert_eq(ctx_value(va, key_a), &a);
	cr_assert_null(ctx_value(va, key_b), "equal contents, distinct keys");
	char copy[sizeof key_a];
	memcpy(copy, key_a, sizeof copy);
	cr_assert_null(ctx_value(va, copy));
	ctx_t *vb = ctx_with_value(va, key_b, &b, NULL);
	cr_assert_eq(ctx_value(vb, key_a), &a);
	cr_assert_eq(ctx_value(vb, key_b), &b);
	ctx_unref(vb);
	ctx_unref(va);
}

Test(value, is_absent_on_roots)
{
	cr_assert_null(ctx_value(ctx_background(), &key_a));
	cr_assert_null(ctx_value(ctx_todo(), &key_a));
	ctx_t *c = ctx_with_cancel(ctx_todo());
	cr_assert_null(ctx_value(c, &key_a));
	ctx_unref(c);
}

Test(value, null_key_is_einval)
{
	int a = 1;
	errno = 0;
	cr_assert_null(ctx_with_value(ctx_background(), NULL, &a, count_destroy));
	cr_assert_eq(errno, EINVAL);
	cr_assert_eq(destroyed, 0, "destroy ran for a failed constructor");
	ctx_t *v = ctx_with_value(ctx_background(), &key_a, &a, NULL);
	errno = 0;
	cr_assert_null(ctx_value(v, NULL));
	cr_assert_eq(errno, EINVAL);
	ctx_unref(v);
}

/* ------------------------------------------------------------------------ */
/* Lifetimes: references and destroy functions */

/* A log of destroy calls, to see their order. */
static int log_buf[8];
static int log_len;
static void log_destroy(void *v)
{
	cr_assert_lt(log_len, 8);
	log_buf[log_len++] = *(int *)v;
}

Test(lifetime, destroy_runs_once_when_the_last_reference_is_dropped)
{
	int one = 1;
	ctx_t *v = ctx_with_value(ctx_background(), &key_a, &one, log_destroy);
	cr_assert_eq(ctx_ref(v), v);
	cr_assert_eq(ctx_ref(v), v);
	ctx_unref(v);
	ctx_unref(v);
	cr_assert_eq(log_len, 0, "destroy ran while a reference was held");
	cr_assert_eq(ctx_value(v, &key_a), &one);
	ctx_unref(v);
	cr_assert_eq(log_len, 1);
	cr_assert_eq(log_buf[0], 1);
}

Test(lifetime, destroy_waits_for_the_free_not_for_cancellation)
{
	int one = 1;
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(p, &key_a, &one, log_destroy);
	cr_assert_eq(ctx_cancel(p), 0);
	cr_assert_eq(log_len, 0);
	cr_assert_eq(ctx_value(v, &key_a), &one);
	ctx_unref(v);
	cr_assert_eq(log_len, 1);
	ctx_unref(p);
	cr_assert_eq(log_len, 1, "destroy ran twice");
}

Test(lifetime, destroy_may_be_null)
{
	int one = 1;
	ctx_t *v = ctx_with_value(ctx_background(), &key_a, &one, NULL);
	cr_assert_not_null(v);
	ctx_unref(v);
	cr_assert_eq(one, 1);
}

Test(lifetime, a_child_keeps_its_parent_alive)
{
	int one = 1, two = 2;
	ctx_t *p = ctx_with_value(ctx_background(), &key_a, &one, log_destroy);
	ctx_t *pc = ctx_with_cancel(p);
	ctx_t *c = ctx_with_value(pc, &key_b, &two, log_destroy);
	ctx_t *g = ctx_with_cancel(c);
	ctx_unref(c);
	ctx_unref(pc);
	ctx_unref(p);
	cr_assert_eq(log_len, 0, "a parent was freed while a child held it");
	/* The child still works, and reads its ancestors' values. */
	cr_assert_eq(ctx_value(g, &key_a), &one);
	cr_assert_eq(ctx_value(g, &key_b), &two);
	cr_assert_eq(ctx_err(g), 0);
	cr_assert_eq(ctx_cancel(g), 0);
	cr_assert_eq(ctx_err(g), ECANCELED);
	ctx_unref(g);
	/* The whole chain went, nearest first. */
	cr_assert_eq(log_len, 2);
	cr_assert_eq(log_buf[0], 2);
	cr_assert_eq(log_buf[1], 1);
}

Test(lifetime, dropping_a_parent_does_not_cancel_its_children)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *t = ctx_with_timeout(p, 3600 * CTX_SEC);
	ctx_unref(p);
	cr_assert_eq(ctx_err(c), 0);
	cr_assert_eq(ctx_err(t), 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_err(t), 0, "a sibling was cancelled");
	ctx_unref(c);
	ctx_unref(t);
}

Test(lifetime, ref_returns_the_same_context)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_ref(c), c);
	ctx_unref(c);
	cr_assert_eq(ctx_ref(ctx_background()), ctx_background());
	cr_assert_eq(ctx_ref(ctx_todo()), ctx_todo());
	ctx_unref(c);
}

Test(lifetime, roots_are_static_and_unref_is_a_noop_on_them)
{
	ctx_t *bg = ctx_background(), *todo = ctx_todo();
	cr_assert_not_null(bg);
	cr_assert_not_null(todo);
	cr_assert_neq(bg, todo, "todo must be a distinct object");
	cr_assert_eq(ctx_background(), bg);
	cr_assert_eq(ctx_todo(), todo);
	for (int i = 0; i < 10; i++) {
		ctx_unref(bg);
		ctx_unref(todo);
	}
	/* Still usable as parents. */
	ctx_t *c = ctx_with_cancel(bg);
	ctx_t *d = ctx_with_cancel(todo);
	cr_assert_eq(ctx_err(bg), 0);
	cr_assert_eq(ctx_cause(bg), 0);
	cr_assert_eq(ctx_err(todo), 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_cancel(d), 0);
	cr_assert_eq(ctx_err(bg), 0);
	cr_assert_eq(ctx_err(todo), 0);
	ctx_unref(c);
	ctx_unref(d);
}

/* ------------------------------------------------------------------------ */
/* Without cancel */

Test(without_cancel, is_never_done_even_when_its_parent_is_cancelled)
{
	int a = 1;
	ctx_t *v = ctx_with_value(ctx_background(), &key_a, &a, NULL);
	ctx_t *p = ctx_with_cancel(v);
	ctx_t *w = ctx_without_cancel(p);
	ctx_t *wc = ctx_with_cancel(w);
	cr_assert_eq(ctx_cancel_cause(p, EPIPE), 0);
	ctx_t *late = ctx_without_cancel(p); /* made after the cancel */
	cr_assert_eq(ctx_err(w), 0);
	cr_assert_eq(ctx_cause(w), 0);
	cr_assert_eq(ctx_err(wc), 0);
	cr_assert_eq(ctx_err(late), 0);
	/* Its values survive. */
	cr_assert_eq(ctx_value(w, &key_a), &a);
	cr_assert_eq(ctx_value(wc, &key_a), &a);
	cr_assert_eq(ctx_value(late, &key_a), &a);
	/* It cannot be cancelled itself; a child of it can. */
	cr_assert_eq(ctx_cancel(w), EINVAL);
	cr_assert_eq(ctx_cancel(wc), 0);
	cr_assert_eq(ctx_err(wc), ECANCELED);
	cr_assert_eq(ctx_err(w), 0);
	ctx_t *all[] = {late, wc, w, p, v};
	for (size_t i = 0; i < 5; i++)
		ctx_unref(all[i]);
}

Test(without_cancel, is_never_done_when_its_parent_times_out)
{
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *p = ctx_with_deadline(ctx_background(), d);
	ctx_t *w = ctx_without_cancel(p);
	ctx_t *wc = ctx_with_cancel(w);
	sleep_until(d);
	cr_assert_eq(ctx_err(p), ETIMEDOUT);
	cr_assert_eq(ctx_err(w), 0);
	cr_assert_eq(ctx_err(wc), 0);
	ctx_unref(wc);
	ctx_unref(w);
	ctx_unref(p);
}

Test(without_cancel, children_do_not_reach_back_to_its_parent)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *w = ctx_without_cancel(p);
	ctx_t *wc = ctx_with_cancel(w);
	cr_assert_eq(ctx_cancel(wc), 0);
	cr_assert_eq(ctx_err(p), 0);
	ctx_unref(wc);
	ctx_unref(w);
	ctx_unref(p);
}

/* ------------------------------------------------------------------------ */
/* CTX_AUTO */

Test(auto_release, cancels_and_unrefs_at_scope_end)
{
	ctx_t *child;
	{
		CTX_AUTO ctx_t *req = ctx_with_cancel(ctx_background());
		child = ctx_with_cancel(req);
		cr_assert_eq(ctx_err(child), 0);
	}
	cr_assert_eq(ctx_err(child), ECANCELED, "CTX_AUTO did not cancel at scope end");
	ctx_unref(child);
}

Test(auto_release, frees_the_context_at_scope_end)
{
	int one = 1;
	{
		CTX_AUTO ctx_t *v = ctx_with_value(ctx_background(), &key_a, &one, log_destroy);
		CTX_AUTO ctx_t *t = ctx_with_timeout(v, 3600 * CTX_SEC);
		cr_assert_eq(ctx_value(t, &key_a), &one);
		cr_assert_eq(log_len, 0);
	}
	cr_assert_eq(log_len, 1, "CTX_AUTO did not free the context");
}

Test(auto_release, ignores_null)
{
	{
		CTX_AUTO ctx_t *none = NULL;
		(void)none;
	} /* a crash here fails the test */
}
