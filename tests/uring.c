/* io_uring operations bound to contexts (include/ctx_uring.h). */
#include "helpers.h"

#include <ctx_uring.h>

#include <criterion/criterion.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static struct io_uring ring;
static unsigned ring_flags; /* the uring_sqpoll suite: IORING_SETUP_SQPOLL */
static ctx_uring_t *cu;
static int lib_cqes; /* CQEs that ctx_uring_cqe() called the library's */

static void ring_up(unsigned entries)
{
	int e = io_uring_queue_init(entries, &ring, ring_flags);
	if (e && ring_flags)
		cr_skip_test("no SQPOLL ring here: %s", strerror(-e));
	cr_assert_eq(e, 0, "io_uring_queue_init: %s", strerror(-e));
	cu = ctx_uring_new(&ring);
	cr_assert_not_null(cu, "ctx_uring_new: %s", strerror(errno));
	lib_cqes = 0;
}

static void ring_down(void)
{
	io_uring_queue_exit(&ring);
	ctx_uring_free(cu);
}

static struct io_uring_sqe recv_sqe(int fd, void *buf, size_t len, uint64_t ud)
{
	struct io_uring_sqe s = {0};
	io_uring_prep_recv(&s, fd, buf, len, 0);
	io_uring_sqe_set_data64(&s, ud);
	return s;
}

/* Queues, submitting to make room while the SQ is full. */
static void queue(ctx_t *ctx, const struct io_uring_sqe *s)
{
	int e;
	for (int tries = 0; (e = ctx_uring_queue(cu, ctx, s)) == EBUSY && tries < 1000; tries++)
		cr_assert(ctx_uring_submit(cu, 0) >= 0 || errno == EBUSY);
	cr_assert_eq(e, 0, "ctx_uring_queue: %s", strerror(e));
}

/*
 * Reaps CQEs until `want` of the caller's have arrived or `ms` have passed,
 * storing up to `cap` of them in out[].  With `submit`, the library's pending
 * work is submitted before each wait; without, the ring is never entered to
 * submit (io_uring_wait_cqe_timeout only waits, given IORING_FEAT_EXT_ARG).
 * Returns how many of the caller's CQEs arrived.
 */
static int reap(struct ctx_uring_result *out, int cap, int want, int ms, bool submit)
{
	int n = 0;
	int64_t end = now_ns() + ms * CTX_MSEC;
	while (n < want) {
		if (submit)
			cr_assert(ctx_uring_submit(cu, 0) >= 0 || errno == EBUSY, "submit: %s",
				  strerror(errno));
		int64_t left = end - now_ns();
		if (left <= 0)
			break;
		struct __kernel_timespec ts = {.tv_sec = left / CTX_SEC, .tv_nsec = left % CTX_SEC};
		struct io_uring_cqe *cqe;
		int e = io_uring_wait_cqe_timeout(&ring, &cqe, &ts);
		if (e == -ETIME || e == -EINTR)
			continue;
		cr_assert_eq(e, 0, "wait: %s", strerror(-e));
		unsigned head, k = 0;
		io_uring_for_each_cqe(&ring, head, cqe) {
			k++;
			struct ctx_uring_result r;
			if (!ctx_uring_cqe(cu, cqe, &r)) {
				lib_cqes++;
				continue;
			}
			if (n < cap)
				out[n] = r;
			n++;
		}
		io_uring_cq_advance(&ring, k);
	}
	return n;
}

static void socketpair_or_die(int sv[2])
{
	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
}

/* ------------------------------------------------------------------------ */

Test(uring, deadline_ends_read_on_empty_pipe_through_link_timeout)
{
	ring_up(8);
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_timeout(ctx_background(), 50 * CTX_MSEC);
	char buf[8];
	struct io_uring_sqe s = {0};
	io_uring_prep_read(&s, p[0], buf, sizeof(buf), 0);
	io_uring_sqe_set_data64(&s, 42);
	struct timespec d;
	cr_assert(ctx_deadline(c, &d));
	int64_t deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
	cr_assert_eq(ctx_uring_queue(cu, c, &s), 0);
	cr_assert_eq(io_uring_sq_ready(&ring), 3, "poll, read, link timeout");
	cr_assert_eq(io_uring_submit(&ring), 3);

	/* Never submit again: a cancel queued by the poll path stays in the
	 * SQ, so only the kernel's link timeout can end the read. */
	struct ctx_uring_result r;
	cr_assert_eq(reap(&r, 1, 1, 2000, false), 1);
	cr_assert_geq(now_ns(), deadline, "the read ended before the deadline");
	cr_assert_eq(r.user_data, 42);
	cr_assert_eq(r.res, -ETIMEDOUT);
	cr_assert_eq(r.ended_by, ETIMEDOUT);
	cr_assert(r.bound);
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	cr_assert_eq(ctx_uring_inflight(cu), 0);
	ring_down();
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

/* An SQ thread that serves several rings (IORING_SETUP_ATTACH_WQ) takes at
 * most 8 SQEs of a ring per pass, wherever a link chain ends.  Here the read
 * is the 8th SQE published: a split put the read in one pass, alone, and its
 * link timeout in the next (-EINVAL), so the deadline never ended the read
 * (the ring is never entered again: only the link timeout can end it). */
Test(uring_sqpoll, link_timeout_stays_with_its_op_on_a_shared_sq_thread)
{
	struct io_uring first;
	struct io_uring_params pa = {.flags = IORING_SETUP_SQPOLL};
	int e = io_uring_queue_init_params(8, &first, &pa);
	if (e == -EPERM || e == -EINVAL)
		cr_skip_test("no SQPOLL ring here: %s", strerror(-e));
	cr_assert_eq(e, 0, "io_uring_queue_init: %s", strerror(-e));
	struct io_uring_params pb = {.flags = IORING_SETUP_SQPOLL | IORING_SETUP_ATTACH_WQ,
				     .wq_fd = (unsigned)first.ring_fd};
	e = io_uring_queue_init_params(16, &ring, &pb);
	if (e == -EPERM || e == -EINVAL) {
		io_uring_queue_exit(&first);
		cr_skip_test("no shared SQ thread here: %s", strerror(-e));
	}
	cr_assert_eq(e, 0, "io_uring_queue_init: %s", strerror(-e));
	cu = ctx_uring_new(&ring);
	cr_assert_not_null(cu, "ctx_uring_new: %s", strerror(errno));
	lib_cqes = 0;

	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	int64_t t0 = now_ns(); /* the deadline is 50 ms after this, at least */
	ctx_t *c = ctx_with_timeout(ctx_background(), 50 * CTX_MSEC);
	for (int i = 0; i < 6; i++) {
		struct io_uring_sqe *n = io_uring_get_sqe(&ring);
		io_uring_prep_nop(n);
		io_uring_sqe_set_data64(n, 100 + (uint64_t)i);
	}
	char buf[8];
	struct io_uring_sqe s = {0};
	io_uring_prep_read(&s, p[0], buf, sizeof(buf), 0);
	io_uring_sqe_set_data64(&s, 42);
	cr_assert_eq(ctx_uring_queue(cu, c, &s), 0); /* poll 7th, read 8th, timeout 9th */
	cr_assert(ctx_uring_submit(cu, 0) >= 0, "submit: %s", strerror(errno));

	/* Never submit again: only the kernel's link timeout can end the read. */
	struct ctx_uring_result r[8];
	int n = reap(r, 8, 7, 2000, false);
	cr_assert_eq(n, 7, "%d of 7 CQEs: the read did not end at its deadline", n);
	int k = 0;
	while (k < 6 && r[k].user_data != 42)
		k++;
	cr_assert_eq(r[k].user_data, 42, "the NOPs' CQEs and the read's");
	cr_assert_geq(now_ns() - t0, 45 * CTX_MSEC);
	cr_assert_eq(r[k].res, -ETIMEDOUT, "res %d (%s)", r[k].res, strerror(-r[k].res));
	cr_assert_eq(r[k].ended_by, ETIMEDOUT);
	cr_assert_eq(ctx_uring_inflight(cu), 0);
	ring_down();
	io_uring_queue_exit(&first);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

/* A splice from an empty pipe blocks inside an io-wq worker, where a link
 * timeout does not reach it: the poll on the context's timerfd must. */
Test(uring, deadline_ends_op_blocked_in_io_wq_through_poll)
{
	ring_up(8);
	int in[2], out[2];
	cr_assert_eq(pipe2(in, O_CLOEXEC), 0);
	cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_timeout(ctx_background(), 50 * CTX_MSEC);
	struct io_uring_sqe s = {0};
	io_uring_prep_splice(&s, in[0], -1, out[1], -1, 4096, 0);
	io_uring_sqe_set_data64(&s, 7);
	cr_assert_eq(ctx_uring_queue(cu, c, &s), 0);
	struct ctx_uring_result r;
	cr_assert_eq(reap(&r, 1, 1, 3000, true), 1, "the splice never ended");
	cr_assert_eq(r.user_data, 7);
	cr_assert_eq(r.res, -ETIMEDOUT, "res %d (%s)", r.res, strerror(-r.res));
	cr_assert_eq(r.ended_by, ETIMEDOUT);
	ring_down();
	ctx_release(c);
	close(in[0]);
	close(in[1]);
	close(out[0]);
	close(out[1]);
}

#define MANY 1000

struct canceller {
	ctx_t *ctx;
	int go[2]; /* the test writes a byte once everything is submitted */
	int64_t at;
};

static void *cancel_later(void *arg)
{
	struct canceller *k = arg;
	char b;
	if (readable_within(k->go[0], 10000) && read(k->go[0], &b, 1) == 1) {
		k->at = now_ns();
		ctx_cancel(k->ctx);
	}
	return NULL;
}

static void one_cancel_from_another_thread_ends_a_thousand_recvs(void)
{
	ring_up(256); /* much smaller than MANY: cancels take several rounds */
	static int sv[MANY / 2][2];
	static char buf[MANY][4];
	static struct ctx_uring_result res[MANY];
	ctx_t *req = ctx_with_cancel(ctx_background());
	for (int i = 0; i < MANY / 2; i++)
		socketpair_or_die(sv[i]);
	for (int i = 0; i < MANY; i++) {
		struct io_uring_sqe s = recv_sqe(sv[i / 2][i % 2], buf[i], 4, 1000 + i);
		queue(req, &s);
	}
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	cr_assert_eq(ctx_uring_inflight(cu), MANY);

	struct canceller k = {.ctx = req};
	cr_assert_eq(pipe2(k.go, O_CLOEXEC), 0);
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, cancel_later, &k), 0);
	cr_assert_eq(write(k.go[1], "g", 1), 1);
	int n = reap(res, MANY, MANY, 10000, true);
	pthread_join(t, NULL);
	cr_assert_eq(n, MANY, "only %d of %d recvs ended", n, MANY);
	static bool seen[MANY];
	for (int i = 0; i < MANY; i++) {
		cr_assert_eq(res[i].res, -ECANCELED, "op %d: %d", i, res[i].res);
		cr_assert_eq(res[i].ended_by, ECANCELED);
		uint64_t j = res[i].user_data - 1000;
		cr_assert_lt(j, MANY);
		cr_assert_not(seen[j], "user_data %llu twice", (unsigned long long)j);
		seen[j] = true;
	}
	cr_assert_eq(ctx_uring_inflight(cu), 0);
	ring_down();
	ctx_unref(req);
	for (int i = 0; i < MANY / 2; i++) {
		close(sv[i][0]);
		close(sv[i][1]);
	}
	close(k.go[0]);
	close(k.go[1]);
}
Test(uring, one_cancel_from_another_thread_ends_a_thousand_recvs) { one_cancel_from_another_thread_ends_a_thousand_recvs(); }

/* A kernel thread takes the SQ's entries (IORING_SETUP_SQPOLL): a submit
 * must still give the SQ its room back. */
Test(uring_sqpoll, one_cancel_from_another_thread_ends_a_thousand_recvs)
{
	ring_flags = IORING_SETUP_SQPOLL;
	one_cancel_from_another_thread_ends_a_thousand_recvs();
}

Test(uring, cancelling_a_parent_ends_ops_bound_to_grandchildren)
{
	ring_up(16);
	static const int key;
	ctx_t *parent = ctx_with_cancel(ctx_background());
	ctx_t *child = ctx_with_value(parent, &key, NULL, NULL);
	ctx_t *timed = ctx_with_timeout(child, 60 * CTX_SEC); /* a timerfd */
	ctx_t *plain = ctx_with_cancel(child);                /* an eventfd */
	int a[2], b[2];
	socketpair_or_die(a);
	socketpair_or_die(b);
	char x[4], y[4];
	struct io_uring_sqe s1 = recv_sqe(a[0], x, 4, 1), s2 = recv_sqe(b[0], y, 4, 2);
	queue(timed, &s1);
	queue(plain, &s2);
	struct ctx_uring_result r[2];
	cr_assert_eq(reap(r, 2, 1, 50, true), 0, "ended before the cancel");
	cr_assert_eq(ctx_cancel(parent), 0);
	cr_assert_eq(reap(r, 2, 2, 3000, true), 2);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(r[i].res, -ECANCELED);
		cr_assert_eq(r[i].ended_by, ECANCELED);
	}
	cr_assert_eq(r[0].user_data + r[1].user_data, 3);
	ring_down();
	ctx_release(timed);
	ctx_release(plain);
	ctx_unref(child);
	ctx_unref(parent);
	close(a[0]), close(a[1]), close(b[0]), close(b[1]);
}

Test(uring, reused_user_data_survives_cancel_of_the_first_context)
{
	ring_up(16);
	ctx_t *A = ctx_with_cancel(ctx_background());
	ctx_t *B = ctx_with_cancel(ctx_background());
	int a[2], b[2];
	socketpair_or_die(a);
	socketpair_or_die(b);
	char x[4], y[4];
	struct io_uring_sqe s1 = recv_sqe(a[0], x, 4, 7);
	queue(A, &s1);
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	cr_assert_eq(write(a[1], "1", 1), 1);
	struct ctx_uring_result r;
	cr_assert_eq(reap(&r, 1, 1, 2000, true), 1);
	cr_assert_eq(r.user_data, 7);
	cr_assert_eq(r.res, 1);

	struct io_uring_sqe s2 = recv_sqe(b[0], y, 4, 7); /* same user_data */
	queue(B, &s2);
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	cr_assert_eq(ctx_cancel(A), 0);
	cr_assert_eq(reap(&r, 1, 1, 100, true), 0, "the op on B ended: res %d", r.res);
	cr_assert_eq(ctx_uring_inflight(cu), 1);
	cr_assert_eq(write(b[1], "22", 2), 2);
	cr_assert_eq(reap(&r, 1, 1, 2000, true), 1);
	cr_assert_eq(r.user_data, 7);
	cr_assert_eq(r.res, 2);
	cr_assert_eq(r.ended_by, 0);
	ring_down();
	ctx_unref(A);
	ctx_release(B);
	close(a[0]), close(a[1]), close(b[0]), close(b[1]);
}

/* The race itself: the poll of A fires while the op bound to A is still in
 * flight, so a cancel for it is queued; the op completes before that cancel
 * reaches the kernel, and its slot is reused by a new op (same user_data)
 * bound to B.  The stale cancel must find nothing. */
Test(uring, stale_cancel_does_not_hit_the_next_op_with_the_same_user_data)
{
	ring_up(16);
	ctx_t *A = ctx_with_cancel(ctx_background());
	ctx_t *B = ctx_with_cancel(ctx_background());
	int a[2], b[2];
	socketpair_or_die(a);
	socketpair_or_die(b);
	char x[4], y[4];
	struct io_uring_sqe s1 = recv_sqe(a[0], x, 4, 7);
	queue(A, &s1);
	cr_assert(ctx_uring_submit(cu, 0) >= 0);

	cr_assert_eq(ctx_cancel(A), 0);
	struct io_uring_cqe *cqe;
	struct __kernel_timespec ts = {.tv_sec = 2};
	cr_assert_eq(io_uring_wait_cqe_timeout(&ring, &cqe, &ts), 0); /* A's poll */
	cr_assert_eq(write(a[1], "1", 1), 1);                         /* op1 wins */
	for (int64_t end = now_ns() + 2 * CTX_SEC; io_uring_cq_ready(&ring) < 2 && now_ns() < end;)
		(void)readable_within(ring.ring_fd, 10); /* the ring fd polls readable on a CQE */
	cr_assert_eq(io_uring_cq_ready(&ring), 2);

	struct ctx_uring_result r;
	cr_assert_eq(io_uring_peek_cqe(&ring, &cqe), 0);
	cr_assert_not(ctx_uring_cqe(cu, cqe, &r), "the poll is the library's");
	io_uring_cqe_seen(&ring, cqe);
	cr_assert_eq(io_uring_sq_ready(&ring), 1, "a cancel for op1 waits in the SQ");
	cr_assert_eq(io_uring_peek_cqe(&ring, &cqe), 0);
	cr_assert(ctx_uring_cqe(cu, cqe, &r));
	io_uring_cqe_seen(&ring, cqe);
	cr_assert_eq(r.user_data, 7);
	cr_assert_eq(r.res, 1, "op1 moved its byte: %d", r.res);

	struct io_uring_sqe s2 = recv_sqe(b[0], y, 4, 7);
	queue(B, &s2); /* reuses op1's slot, with the next generation */
	cr_assert(ctx_uring_submit(cu, 0) >= 0); /* the stale cancel goes in */
	cr_assert_eq(reap(&r, 1, 1, 100, true), 0, "the op on B ended: res %d", r.res);
	cr_assert_eq(write(b[1], "22", 2), 2);
	cr_assert_eq(reap(&r, 1, 1, 2000, true), 1);
	cr_assert_eq(r.user_data, 7);
	cr_assert_eq(r.res, 2);
	ring_down();
	ctx_unref(A);
	ctx_release(B);
	close(a[0]), close(a[1]), close(b[0]), close(b[1]);
}

Test(uring, library_cqes_mix_with_the_callers_unbound_ops)
{
	ring_up(16);
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_timeout(ctx_background(), 30 * CTX_MSEC);
	static int marker;
	uint64_t ptr = (uint64_t)(uintptr_t)&marker;

	struct io_uring_sqe *raw = io_uring_get_sqe(&ring);
	io_uring_prep_nop(raw);
	io_uring_sqe_set_data64(raw, 0x1234);
	char buf[4];
	struct io_uring_sqe s = {0};
	io_uring_prep_read(&s, p[0], buf, sizeof(buf), 0);
	io_uring_sqe_set_data64(&s, ptr);
	queue(c, &s);
	struct io_uring_sqe n2 = {0};
	io_uring_prep_nop(&n2);
	io_uring_sqe_set_data64(&n2, 99);
	queue(ctx_background(), &n2); /* never done: tagged, nothing added */
	raw = io_uring_get_sqe(&ring);
	io_uring_prep_nop(raw);
	io_uring_sqe_set_data64(raw, ~(uint64_t)0);

	struct ctx_uring_result r[4];
	cr_assert_eq(reap(r, 4, 4, 2000, true), 4);
	bool saw[4] = {0};
	for (int i = 0; i < 4; i++) {
		if (r[i].user_data == 0x1234) {
			cr_assert_not(r[i].bound);
			cr_assert_eq(r[i].res, 0);
			saw[0] = true;
		} else if (r[i].user_data == ~(uint64_t)0) {
			cr_assert_not(r[i].bound);
			saw[1] = true;
		} else if (r[i].user_data == 99) {
			cr_assert(r[i].bound);
			cr_assert_eq(r[i].res, 0);
			saw[2] = true;
		} else {
			cr_assert_eq(r[i].user_data, ptr);
			cr_assert(r[i].bound);
			cr_assert_eq(r[i].res, -ETIMEDOUT);
			saw[3] = true;
		}
	}
	cr_assert(saw[0] && saw[1] && saw[2] && saw[3]);
	cr_assert_geq(lib_cqes, 1, "the poll and the link timeout are the library's");
	cr_assert_eq(ctx_uring_inflight(cu), 0);
	ring_down();
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

Test(uring, op_on_a_done_context_completes_at_once_with_its_err)
{
	ring_up(16);
	int sv[2];
	socketpair_or_die(sv);
	cr_assert_eq(write(sv[1], "data", 4), 4); /* the recv could succeed */
	ctx_t *cancelled = ctx_with_cancel(ctx_background());
	ctx_cancel(cancelled);
	ctx_t *child = ctx_with_cancel(cancelled);
	ctx_t *expired = ctx_with_timeout(ctx_background(), 0);
	ctx_t *passed = ctx_with_timeout(ctx_background(), 1);
	struct timespec ms = {0, CTX_MSEC};
	nanosleep(&ms, NULL); /* `passed` is past its deadline, never observed */
	ctx_t *cs[] = {cancelled, child, expired, passed};
	int want[] = {ECANCELED, ECANCELED, ETIMEDOUT, ETIMEDOUT};
	char buf[4][4];
	for (int i = 0; i < 4; i++) {
		struct io_uring_sqe s = recv_sqe(sv[0], buf[i], 4, (uint64_t)i);
		cr_assert_eq(ctx_uring_queue(cu, cs[i], &s), 0);
		cr_assert_eq(io_uring_sq_ready(&ring), (unsigned)i + 1, "one SQE, no poll, no timeout");
	}
	struct ctx_uring_result r[4];
	cr_assert_eq(reap(r, 4, 4, 2000, true), 4);
	for (int i = 0; i < 4; i++) {
		int k = (int)r[i].user_data;
		cr_assert_eq(r[i].res, -want[k], "ctx %d: %d", k, r[i].res);
		cr_assert_eq(r[i].ended_by, want[k]);
		cr_assert_eq(ctx_err(cs[k]), want[k]);
	}
	char got[8];
	cr_assert_eq(recv(sv[0], got, sizeof(got), MSG_DONTWAIT), 4, "no recv ran");
	ring_down();
	for (int i = 0; i < 4; i++)
		ctx_release(cs[i]);
	close(sv[0]);
	close(sv[1]);
}

static void full_submission_queue_gives_ebusy_and_queues_nothing(void)
{
	ring_up(4);
	ctx_t *timed = ctx_with_timeout(ctx_background(), 60 * CTX_SEC);
	ctx_t *done = ctx_with_cancel(ctx_background());
	ctx_cancel(done);
	int sv[2];
	socketpair_or_die(sv);
	char buf[4];
	struct io_uring_sqe s = recv_sqe(sv[0], buf, 4, 1);
	for (int i = 0; i < 2; i++)
		io_uring_prep_nop(io_uring_get_sqe(&ring));
	/* Room for two, but the first op on `timed` needs three. */
	cr_assert_eq(ctx_uring_queue(cu, timed, &s), EBUSY);
	cr_assert_eq(io_uring_sq_ready(&ring), 2, "nothing half-queued");
	io_uring_prep_nop(io_uring_get_sqe(&ring));
	io_uring_prep_nop(io_uring_get_sqe(&ring));
	cr_assert_eq(ctx_uring_queue(cu, done, &s), EBUSY);
	cr_assert_eq(ctx_uring_queue(cu, ctx_background(), &s), EBUSY);
	cr_assert_eq(io_uring_sq_ready(&ring), 4);
	cr_assert_eq(ctx_uring_inflight(cu), 0);

	cr_assert_eq(ctx_uring_submit(cu, 0), 4);
	cr_assert_eq(ctx_uring_queue(cu, timed, &s), 0);
	cr_assert_eq(io_uring_sq_ready(&ring), 3);
	struct io_uring_sqe linked = s;
	linked.flags |= IOSQE_IO_LINK;
	cr_assert_eq(ctx_uring_queue(cu, timed, &linked), EINVAL);
	cr_assert_eq(ctx_uring_queue(NULL, timed, &s), EINVAL);
	cr_assert_eq(ctx_uring_queue(cu, NULL, &s), EINVAL);
	ring_down();
	ctx_release(timed);
	ctx_release(done);
	close(sv[0]);
	close(sv[1]);
}
Test(uring, full_submission_queue_gives_ebusy_and_queues_nothing) { full_submission_queue_gives_ebusy_and_queues_nothing(); }

/* A kernel thread takes the SQ's entries (IORING_SETUP_SQPOLL): a submit
 * must still give the SQ its room back. */
Test(uring_sqpoll, full_submission_queue_gives_ebusy_and_queues_nothing)
{
	ring_flags = IORING_SETUP_SQPOLL;
	full_submission_queue_gives_ebusy_and_queues_nothing();
}

/* Many contexts on one ring: each cancel reaches exactly its own ops. */
static void each_cancel_reaches_only_its_own_contexts_ops(void)
{
	enum { N = 300 };
	ring_up(64);
	static int sv[N][2];
	static char buf[N][4];
	static ctx_t *cs[N];
	static struct ctx_uring_result r[N];
	for (int i = 0; i < N; i++) {
		socketpair_or_die(sv[i]);
		cs[i] = i % 3 ? ctx_with_cancel(ctx_background())
			      : ctx_with_timeout(ctx_background(), 60 * CTX_SEC);
		struct io_uring_sqe s = recv_sqe(sv[i][0], buf[i], 4, (uint64_t)i);
		queue(cs[i], &s);
	}
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	for (int i = 0; i < N; i++) {
		if (i % 2)
			cr_assert_eq(write(sv[i][1], "ab", 2), 2);
		else
			ctx_cancel(cs[i]);
	}
	cr_assert_eq(reap(r, N, N, 5000, true), N);
	for (int i = 0; i < N; i++) {
		int k = (int)r[i].user_data;
		cr_assert_eq(r[i].res, k % 2 ? 2 : -ECANCELED, "op %d: %d", k, r[i].res);
	}
	ring_down();
	for (int i = 0; i < N; i++) {
		ctx_release(cs[i]);
		close(sv[i][0]);
		close(sv[i][1]);
	}
}
Test(uring, each_cancel_reaches_only_its_own_contexts_ops) { each_cancel_reaches_only_its_own_contexts_ops(); }

/* A kernel thread takes the SQ's entries (IORING_SETUP_SQPOLL): a submit
 * must still give the SQ its room back. */
Test(uring_sqpoll, each_cancel_reaches_only_its_own_contexts_ops)
{
	ring_flags = IORING_SETUP_SQPOLL;
	each_cancel_reaches_only_its_own_contexts_ops();
}

/* A multishot poll cannot head a link: it stays bound through its
 * IORING_CQE_F_MORE completions and the deadline ends it through the poll on
 * the context's timerfd. */
Test(uring, multishot_op_stays_bound_until_the_deadline_ends_it)
{
	ring_up(16);
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
	ctx_t *c = ctx_with_timeout(ctx_background(), 200 * CTX_MSEC);
	struct io_uring_sqe s = {0};
	io_uring_prep_poll_multishot(&s, p[0], POLLIN);
	io_uring_sqe_set_data64(&s, 5);
	cr_assert_eq(ctx_uring_queue(cu, c, &s), 0);
	cr_assert_eq(io_uring_sq_ready(&ring), 2, "poll of the context, the op: no link timeout");
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	char b;
	struct ctx_uring_result r;
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(write(p[1], "x", 1), 1);
		cr_assert_eq(reap(&r, 1, 1, 2000, true), 1);
		cr_assert_eq(r.user_data, 5);
		cr_assert(r.res > 0 && (r.flags & IORING_CQE_F_MORE), "res %d flags %u", r.res, r.flags);
		cr_assert_eq(read(p[0], &b, 1), 1);
		cr_assert_eq(ctx_uring_inflight(cu), 1);
	}
	cr_assert_eq(reap(&r, 1, 1, 3000, true), 1);
	cr_assert_eq(r.user_data, 5);
	cr_assert_eq(r.res, -ETIMEDOUT);
	cr_assert_not(r.flags & IORING_CQE_F_MORE);
	cr_assert_eq(ctx_uring_inflight(cu), 0);
	ring_down();
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

/* A context that only loses its references (never cancelled) is not kept
 * alive by the ring: its poll is removed and its fd closed. */
Test(uring, idle_context_is_released_by_the_ring)
{
	ring_up(16);
	int sv[2];
	socketpair_or_die(sv);
	int base = open_fd_count();
	ctx_t *c = ctx_with_cancel(ctx_background());
	char buf[4];
	struct io_uring_sqe s = recv_sqe(sv[0], buf, 4, 1);
	queue(c, &s);
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	cr_assert_eq(open_fd_count(), base + 1, "the context's eventfd");
	cr_assert_eq(write(sv[1], "x", 1), 1);
	struct ctx_uring_result r;
	cr_assert_eq(reap(&r, 1, 1, 2000, true), 1);
	cr_assert_eq(r.res, 1);
	ctx_unref(c); /* the binding's reference is the last one now */
	int64_t end = now_ns() + 2 * CTX_SEC;
	while (open_fd_count() != base && now_ns() < end)
		reap(&r, 1, 1, 10, true);
	cr_assert_eq(open_fd_count(), base, "the context was never freed");
	ring_down();
	close(sv[0]);
	close(sv[1]);
}

/* A caller's cancel-any also ends the library's poll of an idle binding (its
 * op has completed).  An op queued on the same context before the next
 * ctx_uring_submit() must not join that binding without a poll: ctx_cancel()
 * could never reach it (it stayed in flight for good). */
Test(uring, op_after_a_cancel_any_ended_the_idle_poll_is_still_cancellable)
{
	ring_up(16);
	ctx_t *c = ctx_with_cancel(ctx_background());
	int a[2], b[2];
	socketpair_or_die(a);
	socketpair_or_die(b);
	char x[4], y[4];
	struct io_uring_sqe s1 = recv_sqe(a[0], x, 4, 1);
	queue(c, &s1);
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	cr_assert_eq(write(a[1], "1", 1), 1);
	struct ctx_uring_result r;
	cr_assert_eq(reap(&r, 1, 1, 2000, true), 1);
	cr_assert_eq(r.res, 1);

	struct io_uring_sqe *any = io_uring_get_sqe(&ring);
	io_uring_prep_cancel64(any, 0, IORING_ASYNC_CANCEL_ANY);
	io_uring_sqe_set_data64(any, 99);
	cr_assert_eq(io_uring_submit(&ring), 1);
	int lib0 = lib_cqes;
	cr_assert_eq(reap(&r, 1, 1, 2000, false), 1);
	cr_assert_eq(r.user_data, 99);
	cr_assert_eq(r.res, 1, "the cancel-any found the library's poll");
	for (int64_t end = now_ns() + 2 * CTX_SEC; lib_cqes == lib0 && now_ns() < end;)
		reap(&r, 1, 0, 10, false);
	cr_assert_eq(lib_cqes, lib0 + 1, "the poll's -ECANCELED");

	struct io_uring_sqe s2 = recv_sqe(b[0], y, 4, 2); /* same loop turn */
	cr_assert_eq(ctx_uring_queue(cu, c, &s2), 0);
	cr_assert(ctx_uring_submit(cu, 0) >= 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(reap(&r, 1, 1, 2000, true), 1, "ctx_cancel() never reached the op");
	cr_assert_eq(r.user_data, 2);
	cr_assert_eq(r.res, -ECANCELED);
	cr_assert_eq(r.ended_by, ECANCELED);
	ring_down();
	ctx_unref(c);
	close(a[0]), close(a[1]), close(b[0]), close(b[1]);
}

/* Run in a time namespace: the first test's read, ended by the link timeout
 * alone (the ring is entered to submit only once).  Exit 0 if it ended at
 * its deadline with -ETIMEDOUT. */
static int timens_read_check(void)
{
	struct io_uring rg;
	if (io_uring_queue_init(8, &rg, 0))
		return 10;
	ctx_uring_t *u = ctx_uring_new(&rg);
	int p[2];
	if (!u || pipe2(p, O_CLOEXEC))
		return 11;
	ctx_t *c = ctx_with_timeout(ctx_background(), 100 * CTX_MSEC);
	char buf[8];
	struct io_uring_sqe s = {0};
	io_uring_prep_read(&s, p[0], buf, sizeof(buf), 0);
	io_uring_sqe_set_data64(&s, 42);
	int64_t t0 = now_ns();
	if (ctx_uring_queue(u, c, &s) || io_uring_submit(&rg) != 3)
		return 12;
	for (;;) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_sec = 2};
		if (io_uring_wait_cqe_timeout(&rg, &cqe, &ts)) {
			printf("timens: the read did not end within 2 s\n");
			return 1;
		}
		struct ctx_uring_result r;
		bool mine = ctx_uring_cqe(u, cqe, &r);
		io_uring_cqe_seen(&rg, cqe);
		if (!mine)
			continue;
		int64_t ms = (now_ns() - t0) / CTX_MSEC;
		if (ms < 90 || r.res != -ETIMEDOUT) {
			printf("timens: the read ended after %lld ms with %d, ended_by %d\n", (long long)ms,
			       r.res, r.ended_by);
			return 2;
		}
		return 0;
	}
}

/* Runs timens_read_check() in a new time namespace whose CLOCK_MONOTONIC is
 * offset by `sec`.  Returns its exit status, or 77 if no namespace. */
static int in_time_namespace(long long sec)
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		if (unshare(CLONE_NEWTIME) && unshare(CLONE_NEWUSER | CLONE_NEWTIME))
			_exit(77);
		char line[64];
		int n = snprintf(line, sizeof(line), "monotonic %lld 0\n", sec);
		int fd = open("/proc/self/timens_offsets", O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, line, (size_t)n) != n)
			_exit(77);
		close(fd);
		pid_t g = fork(); /* the first process in the namespace */
		if (g == 0)
			_exit(timens_read_check());
		int st;
		if (g < 0 || waitpid(g, &st, 0) != g || !WIFEXITED(st))
			_exit(13);
		_exit(WEXITSTATUS(st));
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(WIFEXITED(st));
	return WEXITSTATUS(st);
}

/* io_uring reads absolute timeouts on the host's clock, not the namespace's:
 * unconverted, a deadline 100 ms ahead fired at once behind a negative
 * offset (-ECANCELED, ended_by 0) and 1000 s late behind a positive one. */
Test(uring, link_timeout_deadline_holds_in_a_time_namespace)
{
	int neg = in_time_namespace(-1000), pos = in_time_namespace(1000);
	if (neg == 77 && pos == 77)
		cr_skip_test("no time namespace here");
	if (neg != 77)
		cr_assert_eq(neg, 0, "offset -1000 s: check failed (%d)", neg);
	if (pos != 77)
		cr_assert_eq(pos, 0, "offset +1000 s: check failed (%d)", pos);
}

/* A drained SQE holds back every later SQE until it completes, the library's
 * cancels included: the cancel of an earlier op bound to a cancelled context
 * waited for the drained op, which waited for that op (for good). */
Test(uring, drained_sqe_is_refused)
{
	ring_up(8);
	ctx_t *c = ctx_with_cancel(ctx_background());
	int sv[2];
	socketpair_or_die(sv);
	char buf[4];
	struct io_uring_sqe s = recv_sqe(sv[0], buf, 4, 1);
	s.flags |= IOSQE_IO_DRAIN;
	cr_assert_eq(ctx_uring_queue(cu, c, &s), EINVAL);
	cr_assert_eq(ctx_uring_queue(cu, ctx_background(), &s), EINVAL);
	cr_assert_eq(io_uring_sq_ready(&ring), 0);
	cr_assert_eq(ctx_uring_inflight(cu), 0);
	ring_down();
	ctx_unref(c);
	close(sv[0]);
	close(sv[1]);
}

/* Rings the binding cannot serve are refused up front: on an IOPOLL ring the
 * context's poll fails (-EINVAL), so ctx_cancel() reached no op; on a ring of
 * fewer than 3 SQ entries the first op on a timed context was EBUSY forever. */
Test(uring, iopoll_and_tiny_rings_are_refused)
{
	struct io_uring rg;
	cr_assert_eq(io_uring_queue_init(8, &rg, IORING_SETUP_IOPOLL), 0);
	errno = 0;
	cr_assert_null(ctx_uring_new(&rg));
	cr_assert_eq(errno, EINVAL);
	io_uring_queue_exit(&rg);
	cr_assert_eq(io_uring_queue_init(2, &rg, 0), 0);
	errno = 0;
	cr_assert_null(ctx_uring_new(&rg));
	cr_assert_eq(errno, EINVAL);
	io_uring_queue_exit(&rg);
	cr_assert_eq(io_uring_queue_init(4, &rg, 0), 0);
	ctx_uring_t *u = ctx_uring_new(&rg);
	cr_assert_not_null(u);
	ctx_uring_free(u);
	io_uring_queue_exit(&rg);
}

/* ------------------------------------------------------------------------ */
/* examples/uring_echo */

static bool read_line(int fd, char *line, size_t cap, int ms)
{
	size_t n = 0;
	int64_t end = now_ns() + ms * CTX_MSEC;
	while (n + 1 < cap) {
		int left = (int)((end - now_ns()) / CTX_MSEC);
		if (left <= 0 || !readable_within(fd, left) || read(fd, line + n, 1) != 1)
			return false;
		if (line[n++] == '\n')
			break;
	}
	line[n] = 0;
	return true;
}

static int dial(int port)
{
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET,
				.sin_port = htons((uint16_t)port),
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
	return s;
}

/* The peer closed: recv returns 0 (or ECONNRESET) within ms. */
static bool closed_within(int s, int ms)
{
	char b[16];
	return readable_within(s, ms) && recv(s, b, sizeof(b), MSG_DONTWAIT) <= 0;
}

Test(uring, echo_example_serves_drops_idle_clients_and_shuts_down)
{
	char exe[PATH_MAX], path[PATH_MAX + 32];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	cr_assert_gt(n, 0);
	exe[n] = 0;
	snprintf(path, sizeof(path), "%s/../examples/uring_echo", dirname(exe));
	cr_assert_eq(access(path, X_OK), 0, "%s not built", path);

	int out[2];
	cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed test leaves no server */
		dup2(out[1], STDOUT_FILENO);
		execl(path, path, "-i", "300", (char *)NULL);
		_exit(127);
	}
	close(out[1]);
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	cr_assert_geq(pidfd, 0);

	char line[256];
	int port = 0;
	cr_assert(read_line(out[0], line, sizeof(line), 5000), "no output");
	cr_assert_eq(sscanf(line, "listening on 127.0.0.1:%d", &port), 1, "%s", line);

	/* Serves a client. */
	int a = dial(port);
	cr_assert_eq(send(a, "hello", 5, 0), 5);
	char buf[16];
	cr_assert(readable_within(a, 2000));
	cr_assert_eq(recv(a, buf, sizeof(buf), 0), 5);
	cr_assert_eq(memcmp(buf, "hello", 5), 0);

	/* Drops an idle one after about 300 ms. */
	int b = dial(port);
	int64_t t0 = now_ns();
	cr_assert(closed_within(b, 5000), "idle client not dropped");
	cr_assert_geq(now_ns() - t0, 250 * CTX_MSEC);
	cr_assert(read_line(out[0], line, sizeof(line), 2000));
	cr_assert(strstr(line, "idle"), "%s", line);

	/* Shuts down on SIGTERM with a client connected and reading. */
	int c = dial(port);
	cr_assert_eq(send(c, "x", 1, 0), 1);
	cr_assert(readable_within(c, 2000));
	cr_assert_eq(recv(c, buf, sizeof(buf), 0), 1);
	cr_assert_eq(kill(pid, SIGTERM), 0);
	cr_assert(closed_within(c, 5000), "connection not closed at shutdown");
	cr_assert(readable_within(pidfd, 5000), "server did not exit");
	int status;
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	bool saw_zero = false;
	while (read_line(out[0], line, sizeof(line), 1000))
		saw_zero |= strcmp(line, "open fds at exit: 0\n") == 0;
	cr_assert(saw_zero, "no `open fds at exit: 0`");
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %#x", status);
	close(a);
	close(b);
	close(c);
	close(out[0]);
	close(pidfd);
}
