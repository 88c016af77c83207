/* The fd contract: readable exactly when done, level-triggered and permanent,
 * readable at a deadline with nobody calling the library, lazy, never
 * leaked. */
#include <criterion/criterion.h>

#include "helpers.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

static int key;

static int64_t ts_ns(struct timespec ts) { return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec; }

/* Polls `fd` (and nothing else: no call into the library) for up to
 * `bound_ms`; returns the monotonic time at which it was seen readable, or -1. */
static int64_t readable_at(int fd, int bound_ms)
{
	if (!readable_within(fd, bound_ms))
		return -1;
	return now_ns();
}

/* The number of times epoll_wait(timeout 0) reports `fd` readable, out of n. */
static int epoll_hits(int ep, int fd, int n)
{
	int hits = 0;
	for (int i = 0; i < n; i++) {
		struct epoll_event ev[4];
		int r = epoll_wait(ep, ev, 4, 0);
		for (int j = 0; j < r; j++)
			if (ev[j].data.fd == fd && (ev[j].events & EPOLLIN))
				hits++;
	}
	return hits;
}

/* ------------------------------------------------------------------------ */
/* Readable exactly when done */

Test(fd, is_readable_exactly_when_done)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	int fd = ctx_fd(c);
	cr_assert_geq(fd, 0);
	cr_assert_not(readable_within(fd, 20), "readable before done");
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert(readable_now(fd));
	ctx_unref(c);
}

Test(fd, stays_readable_across_polls)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_t *t = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	int fc = ctx_fd(c), ft = ctx_fd(t);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_cancel(t), 0);
	for (int i = 0; i < 5; i++) {
		cr_assert(readable_now(fc), "poll %d", i);
		cr_assert(readable_now(ft), "poll %d", i);
	}
	/* Further library calls do not consume the readiness. */
	cr_assert_eq(ctx_cancel(c), EALREADY);
	cr_assert_eq(ctx_err(t), ECANCELED);
	cr_assert_eq(ctx_fd(c), fc);
	cr_assert(readable_now(fc));
	cr_assert(readable_now(ft));
	ctx_unref(t);
	ctx_unref(c);
}

Test(fd, stays_readable_in_a_level_triggered_epoll_set)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *c = ctx_with_cancel(ctx_background());          /* eventfd */
	ctx_t *t = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC); /* timerfd, cancelled */
	ctx_t *e = ctx_with_deadline(ctx_background(), d);     /* timerfd, expired */
	int fds[3] = {ctx_fd(c), ctx_fd(t), ctx_fd(e)};
	int ep = epoll_create1(EPOLL_CLOEXEC);
	cr_assert_geq(ep, 0);
	for (int i = 0; i < 3; i++) {
		cr_assert_geq(fds[i], 0);
		struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
		cr_assert_eq(epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev), 0);
	}
	for (int i = 0; i < 2; i++)
		cr_assert_eq(epoll_hits(ep, fds[i], 1), 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(ctx_cancel(t), 0);
	/* Wait for e's deadline on the epoll set itself, then count. */
	struct epoll_event ev[3];
	int64_t bound = now_ns() + 5 * CTX_SEC;
	while (epoll_hits(ep, fds[2], 1) == 0 && now_ns() < bound)
		epoll_wait(ep, ev, 3, 10);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(epoll_hits(ep, fds[i], 4), 4, "fd %d not level-triggered", i);
	close(ep);
	ctx_unref(c);
	ctx_unref(t);
	ctx_unref(e);
}

Test(fd, is_the_same_on_repeated_calls)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_t *t = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	int fc = ctx_fd(c), ft = ctx_fd(t);
	cr_assert_geq(fc, 0);
	cr_assert_geq(ft, 0);
	cr_assert_neq(fc, ft);
	cr_assert_eq(ctx_fd(c), fc);
	cr_assert_eq(ctx_fd(t), ft);
	ctx_cancel(c);
	ctx_cancel(t);
	cr_assert_eq(ctx_fd(c), fc);
	cr_assert_eq(ctx_fd(t), ft);
	ctx_unref(t);
	ctx_unref(c);
}

Test(fd, is_close_on_exec_and_nonblocking)
{
	ctx_t *done = ctx_with_cancel(ctx_background());
	ctx_cancel(done);
	ctx_t *cs[] = {
		ctx_with_cancel(ctx_background()),                 /* eventfd */
		ctx_with_timeout(ctx_background(), 3600 * CTX_SEC), /* timerfd */
		done,                                               /* born readable */
		ctx_with_timeout(ctx_background(), 0),              /* born done */
		ctx_background(),                                   /* the never fd */
	};
	for (size_t i = 0; i < 5; i++) {
		int fd = ctx_fd(cs[i]);
		cr_assert_geq(fd, 0, "context %zu", i);
		int fdflags = fcntl(fd, F_GETFD);
		int flflags = fcntl(fd, F_GETFL);
		cr_assert(fdflags >= 0 && (fdflags & FD_CLOEXEC), "context %zu not close-on-exec", i);
		cr_assert(flflags >= 0 && (flflags & O_NONBLOCK), "context %zu blocking", i);
	}
	for (size_t i = 0; i < 5; i++)
		ctx_unref(cs[i]);
}

/* ------------------------------------------------------------------------ */
/* Cancellation */

Test(fd, cancel_makes_every_descendant_fd_readable_before_it_returns)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *v = ctx_with_value(c, &key, NULL, NULL);
	ctx_t *t = ctx_with_timeout(v, 3600 * CTX_SEC); /* a timerfd, fired early */
	ctx_t *g = ctx_with_cancel(t);
	ctx_t *nofd = ctx_with_cancel(g);              /* never asks for an fd */
	ctx_t *gg = ctx_with_cancel(nofd);
	ctx_t *w = ctx_without_cancel(c);              /* not a descendant in the cancel sense */
	ctx_t *wc = ctx_with_cancel(w);
	ctx_t *with_fd[] = {p, c, v, t, g, gg};
	int fds[6];
	for (size_t i = 0; i < 6; i++) {
		fds[i] = ctx_fd(with_fd[i]);
		cr_assert_geq(fds[i], 0);
		cr_assert_not(readable_now(fds[i]), "context %zu readable early", i);
	}
	int fw = ctx_fd(w), fwc = ctx_fd(wc);
	cr_assert_eq(ctx_cancel(p), 0);
	/* poll with timeout 0, right away: no later than ctx_cancel's return. */
	for (size_t i = 0; i < 6; i++)
		cr_assert(readable_now(fds[i]), "context %zu not readable when cancel returned", i);
	cr_assert_not(readable_within(fw, 10));
	cr_assert_not(readable_now(fwc));
	ctx_t *all[] = {wc, w, gg, nofd, g, t, v, c, p};
	for (size_t i = 0; i < 9; i++)
		ctx_unref(all[i]);
}

Test(fd, of_a_cancelled_timed_context_is_readable_at_once_and_stays_so_past_the_deadline)
{
	struct timespec d = ts_after(20 * CTX_MSEC);
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	int fd = ctx_fd(t);
	cr_assert_eq(ctx_cancel(t), 0);
	cr_assert(readable_now(fd));
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &d, NULL) == EINTR)
		;
	cr_assert(readable_within(fd, 0), "the expiring timer cleared the readiness");
	cr_assert(readable_within(fd, 50));
	cr_assert_eq(ctx_err(t), ECANCELED);
	ctx_unref(t);
}

Test(fd, created_after_done_is_readable_at_once)
{
	struct timespec d = ts_after(10 * CTX_MSEC);
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(p);   /* done through its parent, no fd yet */
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	ctx_t *tc = ctx_with_cancel(t);
	ctx_cancel(p);
	ctx_t *born = ctx_with_cancel(p);
	ctx_t *zero = ctx_with_timeout(ctx_background(), 0);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &d, NULL) == EINTR)
		;
	/* t and tc passed their deadline with nobody looking, and ask now. */
	ctx_t *cs[] = {p, c, born, zero, t, tc};
	for (size_t i = 0; i < 6; i++) {
		int fd = ctx_fd(cs[i]);
		cr_assert_geq(fd, 0);
		cr_assert(readable_now(fd), "context %zu", i);
	}
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	cr_assert_eq(ctx_err(tc), ETIMEDOUT);
	for (size_t i = 0; i < 6; i++)
		ctx_unref(cs[i]);
}

/* ------------------------------------------------------------------------ */
/* Deadlines, with nobody calling the library */

Test(fd, of_a_deadline_context_becomes_readable_at_the_deadline_on_its_own)
{
	struct timespec d = ts_after(60 * CTX_MSEC);
	ctx_t *t = ctx_with_deadline(ctx_background(), d);
	int fd = ctx_fd(t);
	cr_assert_geq(fd, 0);
	bool early = readable_now(fd);
	if (now_ns() < ts_ns(d))
		cr_assert_not(early, "readable before the deadline");
	int64_t at = readable_at(fd, 5000);
	cr_assert_geq(at, 0, "not readable within 5 s of a 60 ms deadline");
	cr_assert_geq(at, ts_ns(d), "readable before the deadline");
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	ctx_unref(t);
}

Test(fd, of_a_timeout_context_becomes_readable_at_the_deadline_on_its_own)
{
	int64_t t0 = now_ns();
	ctx_t *t = ctx_with_timeout_cause(ctx_background(), 50 * CTX_MSEC, EIO);
	int fd = ctx_fd(t);
	int64_t at = readable_at(fd, 5000);
	cr_assert_geq(at, 0);
	cr_assert_geq(at, t0 + 50 * CTX_MSEC, "readable before the timeout");
	cr_assert_eq(ctx_err(t), ETIMEDOUT);
	cr_assert_eq(ctx_cause(t), EIO);
	ctx_unref(t);
}

Test(fd, of_descendants_becomes_readable_at_the_parent_deadline_on_its_own)
{
	struct timespec d = ts_after(60 * CTX_MSEC);
	ctx_t *p = ctx_with_deadline(ctx_background(), d);
	ctx_t *c = ctx_with_cancel(p);
	ctx_t *v = ctx_with_value(c, &key, NULL, NULL);
	ctx_t *g = ctx_with_timeout(v, 3600 * CTX_SEC);
	int fc = ctx_fd(c), fv = ctx_fd(v), fg = ctx_fd(g);
	cr_assert_eq(fv, fc);
	/* Only the descendants' fds: p's own was never asked for, so no
	 * cascade from p can be what wakes them. */
	int64_t atc = readable_at(fc, 5000);
	int64_t atg = readable_at(fg, 5000);
	cr_assert_geq(atc, ts_ns(d));
	cr_assert_geq(atg, ts_ns(d));
	cr_assert_eq(ctx_err(g), ETIMEDOUT);
	ctx_unref(g);
	ctx_unref(v);
	ctx_unref(c);
	ctx_unref(p);
}

Test(fd, of_an_earlier_child_deadline_fires_without_the_parent)
{
	struct timespec d = ts_after(40 * CTX_MSEC);
	ctx_t *p = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	ctx_t *c = ctx_with_deadline(p, d);
	int fp = ctx_fd(p), fc = ctx_fd(c);
	int64_t at = readable_at(fc, 5000);
	cr_assert_geq(at, ts_ns(d));
	cr_assert_not(readable_now(fp), "a child's deadline made the parent readable");
	ctx_unref(c);
	ctx_unref(p);
}

Test(fd, of_a_far_deadline_is_created_and_not_readable)
{
	/* The largest deadlines that still fit in int64 nanoseconds: the timer
	 * must be armed far away, not rejected, wrapped or fired at once. */
	struct timespec far[] = {
		{9223372035, 0},
		{9223372036, 854775806},
		ts_after(100LL * 365 * 24 * 3600 * CTX_SEC),
	};
	for (size_t i = 0; i < 3; i++) {
		ctx_t *c = ctx_with_deadline(ctx_background(), far[i]);
		cr_assert_not_null(c);
		int fd = ctx_fd(c);
		cr_assert_geq(fd, 0, "deadline %zu: errno %d", i, errno);
		cr_assert_not(readable_within(fd, 10), "deadline %zu fired", i);
		cr_assert_eq(ctx_err(c), 0);
		cr_assert_eq(ctx_cancel(c), 0);
		cr_assert(readable_now(fd));
		ctx_unref(c);
	}
}

/* ------------------------------------------------------------------------ */
/* Shared and borrowed fds */

Test(fd, is_one_never_readable_fd_for_every_context_that_cannot_be_done)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *w = ctx_without_cancel(p);
	ctx_t *wv = ctx_with_value(w, &key, NULL, NULL);
	ctx_t *bv = ctx_with_value(ctx_background(), &key, NULL, NULL);
	int never = ctx_fd(ctx_background());
	cr_assert_geq(never, 0);
	cr_assert_eq(ctx_fd(ctx_todo()), never);
	cr_assert_eq(ctx_fd(w), never);
	cr_assert_eq(ctx_fd(wv), never);
	cr_assert_eq(ctx_fd(bv), never);
	cr_assert_neq(ctx_fd(p), never);
	cr_assert_eq(ctx_cancel(p), 0);
	ctx_t *w2 = ctx_without_cancel(p); /* of an already cancelled parent */
	cr_assert_eq(ctx_fd(w2), never);
	cr_assert(readable_now(ctx_fd(p)));
	cr_assert_not(readable_within(never, 20));
	/* It is never closed: freeing its users leaves it open. */
	ctx_unref(w2);
	ctx_unref(wv);
	ctx_unref(w);
	ctx_unref(bv);
	cr_assert_geq(fcntl(never, F_GETFD), 0, "the shared fd was closed");
	cr_assert_eq(ctx_fd(ctx_background()), never);
	ctx_unref(p);
}

Test(fd, of_a_value_context_is_its_parent_fd)
{
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(p, &key, NULL, NULL);
	ctx_t *vv = ctx_with_value(v, &key, NULL, NULL);
	int fv = ctx_fd(vv); /* asked through the value layers first */
	cr_assert_geq(fv, 0);
	cr_assert_eq(ctx_fd(v), fv);
	cr_assert_eq(ctx_fd(p), fv);
	cr_assert_not(readable_now(fv));
	ctx_cancel(p);
	cr_assert(readable_now(fv));
	ctx_unref(vv);
	ctx_unref(v);
	ctx_unref(p);
}

Test(fd, wakes_an_epoll_set_shared_with_a_pipe)
{
	int pp[2];
	cr_assert_eq(pipe2(pp, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_cancel(ctx_background());
	int fc = ctx_fd(c);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = pp[0]};
	cr_assert_eq(epoll_ctl(ep, EPOLL_CTL_ADD, pp[0], &ev), 0);
	ev.data.fd = fc;
	cr_assert_eq(epoll_ctl(ep, EPOLL_CTL_ADD, fc, &ev), 0);
	struct epoll_event out[2];
	cr_assert_eq(epoll_wait(ep, out, 2, 20), 0, "something ready before anything happened");
	cr_assert_eq(write(pp[1], "x", 1), 1);
	cr_assert_eq(epoll_wait(ep, out, 2, 1000), 1);
	cr_assert_eq(out[0].data.fd, pp[0], "the pipe woke, not the context");
	char b;
	cr_assert_eq(read(pp[0], &b, 1), 1);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert_eq(epoll_wait(ep, out, 2, 1000), 1);
	cr_assert_eq(out[0].data.fd, fc, "the context woke, not the pipe");
	cr_assert(out[0].events & EPOLLIN);
	close(ep);
	close(pp[0]);
	close(pp[1]);
	ctx_unref(c);
}

Test(fd, can_be_duped_to_outlive_its_context)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	int fd = ctx_fd(c);
	int mine = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	cr_assert_geq(mine, 0);
	cr_assert_eq(ctx_cancel(c), 0);
	ctx_unref(c);
	cr_assert(readable_now(mine));
	close(mine);
}

/* ------------------------------------------------------------------------ */
/* Laziness and leaks */

#define MANY 1000

Test(fd, is_not_opened_by_constructors_or_cancel)
{
	ctx_fd(ctx_background()); /* the shared fd may exist; it is not counted */
	int base = open_fd_count();
	cr_assert_geq(base, 0);
	static ctx_t *cs[MANY];
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *t = ctx_with_timeout(p, 3600 * CTX_SEC);
	for (int i = 0; i < MANY; i++) {
		switch (i % 7) {
		case 0: cs[i] = ctx_with_cancel(p); break;
		case 1: cs[i] = ctx_with_timeout(t, CTX_SEC); break;
		case 2: cs[i] = ctx_with_deadline(p, ts_after(CTX_SEC)); break;
		case 3: cs[i] = ctx_with_value(t, &key, NULL, NULL); break;
		case 4: cs[i] = ctx_without_cancel(t); break;
		case 5: cs[i] = ctx_with_timeout(p, 0); break; /* born done */
		case 6: cs[i] = ctx_with_cancel(cs[i - 2]); break; /* below without_cancel */
		}
		cr_assert_not_null(cs[i]);
	}
	cr_assert_eq(open_fd_count(), base, "constructors opened fds");
	cr_assert_eq(ctx_cancel(p), 0);
	for (int i = 0; i < MANY; i++) {
		bool never = i % 7 == 4 || i % 7 == 6;
		cr_assert_eq(ctx_err(cs[i]) != 0, !never, "context %d", i);
	}
	cr_assert_eq(open_fd_count(), base, "cancel opened fds");
	for (int i = 0; i < MANY; i++)
		ctx_unref(cs[i]);
	ctx_unref(t);
	ctx_unref(p);
	cr_assert_eq(open_fd_count(), base);
}

Test(fd, is_closed_when_the_last_reference_goes)
{
	ctx_fd(ctx_background());
	int base = open_fd_count();
	enum { N = 64 };
	ctx_t *p = ctx_with_cancel(ctx_background());
	ctx_t *cs[N];
	for (int i = 0; i < N; i++) {
		switch (i % 4) {
		case 0: cs[i] = ctx_with_cancel(p); break;
		case 1: cs[i] = ctx_with_timeout(p, 3600 * CTX_SEC); break;
		case 2: cs[i] = ctx_with_timeout(p, 0); break;
		case 3: cs[i] = ctx_with_cancel(cs[i - 1]); break;
		}
		cr_assert_geq(ctx_fd(cs[i]), 0);
	}
	cr_assert_geq(ctx_fd(p), 0);
	cr_assert_eq(open_fd_count(), base + N + 1, "one fd per cancellable context");
	/* Half of them done before being freed, half not. */
	for (int i = 0; i < N; i += 2)
		ctx_cancel(cs[i]);
	ctx_t *extra = ctx_ref(cs[0]);
	for (int i = 0; i < N; i++)
		ctx_unref(cs[i]);
	cr_assert_eq(open_fd_count(), base + 2, "fds leaked by freed contexts");
	ctx_unref(extra);
	cr_assert_eq(open_fd_count(), base + 1);
	ctx_unref(p);
	cr_assert_eq(open_fd_count(), base);
}

/* ------------------------------------------------------------------------ */
/* Kernels without TFD_IOC_SET_TICKS (no CONFIG_CHECKPOINT_RESTORE, or a
 * sandbox that filters the ioctl), simulated with a seccomp filter on this
 * test's process (Criterion runs each test in its own). */

#define SET_TICKS_IOCTL _IOW('T', 0, uint64_t)

static bool refuse_set_ticks(void)
{
#if defined(__x86_64__)
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)SET_TICKS_IOCTL, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOTTY),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof(f) / sizeof(f[0]), .filter = f};
	return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
	       prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
#else
	return false;
#endif
}

Test(fd, without_set_ticks_err_never_leads_the_fd)
{
	if (!refuse_set_ticks())
		cr_skip_test("cannot install the seccomp filter here");
	int t = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
	uint64_t one = 1;
	cr_assert_eq(ioctl(t, SET_TICKS_IOCTL, &one), -1, "the filter let SET_TICKS through");
	cr_assert_eq(errno, ENOTTY);
	close(t);
	/* Past the deadline, the first ctx_err() that reports it must find
	 * the fd readable already (the SPEC: err never leads the fd), though
	 * the library can no longer fire the timer itself. */
	for (int round = 0; round < 200; round++) {
		ctx_t *c = ctx_with_timeout(ctx_background(), CTX_MSEC);
		int fd = ctx_fd(c);
		cr_assert_geq(fd, 0);
		int64_t bound = now_ns() + 5 * CTX_SEC;
		while (ctx_err(c) == 0)
			cr_assert_lt(now_ns(), bound, "the deadline never came");
		cr_assert_eq(ctx_err(c), ETIMEDOUT);
		cr_assert(readable_now(fd), "round %d: ctx_err said ETIMEDOUT before the fd", round);
		ctx_unref(c);
	}
	/* And a cancel still makes a deadline context's fd readable before
	 * ctx_cancel returns (the re-arming fallback). */
	ctx_t *c = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	int fd = ctx_fd(c);
	cr_assert_geq(fd, 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert(readable_now(fd));
	ctx_unref(c);
}
