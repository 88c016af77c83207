/* Between processes: ctx_with_fd, ctx_with_signals, ctx_send_ctx,
 * ctx_recv_ctx. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "internal.h" /* ctxi_watch_count, ctxi_fail_allocs, ctxi_skip_allocs */

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

/* ---- helpers ---- */

/* true once every watch has been freed and the process has `fds` open fds,
 * within timeout_ms: the watch thread frees watches a moment after their
 * context is done. */
static bool settles_within(int fds, int timeout_ms)
{
	int64_t end = now_ns() + (int64_t)timeout_ms * CTX_MSEC;
	for (;;) {
		if (ctxi_watch_count() == 0 && open_fd_count() == fds)
			return true;
		if (now_ns() > end)
			return false;
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
}

/* Asserts that the watches are all freed and the fd count is back to `fds`,
 * saying what is left if not. */
#define assert_settled(fds)                                                          \
	cr_assert(settles_within((fds), 5000), "%d watches, %d fds (expected %d)", \
		  ctxi_watch_count(), open_fd_count(), (fds))

/* Starts the watch thread (its epoll set and eventfd stay open for good),
 * so that fd counts taken afterwards compare like with like. */
static void warm_up(void)
{
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], 0);
	cr_assert_not_null(c);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
	int64_t end = now_ns() + 5 * CTX_SEC;
	while (ctxi_watch_count() && now_ns() < end) {
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	cr_assert_eq(ctxi_watch_count(), 0);
}

/* Which fds are open, as a bitmap of the first 4096. */
struct fdset {
	unsigned char open[4096 / 8];
};

static void fd_snapshot(struct fdset *s)
{
	memset(s, 0, sizeof(*s));
	for (int fd = 0; fd < 4096; fd++)
		if (fcntl(fd, F_GETFD) >= 0)
			s->open[fd / 8] |= (unsigned char)(1u << (fd % 8));
}

/* Number of fds opened since the snapshot, and how many of them lack
 * FD_CLOEXEC (in *not_cloexec). */
static int fds_opened_since(const struct fdset *s, int *not_cloexec)
{
	int n = 0;
	*not_cloexec = 0;
	for (int fd = 0; fd < 4096; fd++) {
		if (s->open[fd / 8] & (1u << (fd % 8)))
			continue;
		int f = fcntl(fd, F_GETFD);
		if (f < 0)
			continue;
		n++;
		if (!(f & FD_CLOEXEC))
			(*not_cloexec)++;
	}
	return n;
}


/* Number of fds registered in this process's epoll sets: the "tfd:" lines of
 * /proc/self/fdinfo, one per registered fd (-1 if /proc cannot be read). */
static int epoll_entries(void)
{
	DIR *d = opendir("/proc/self/fdinfo");
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
		FILE *f = fd < 0 ? NULL : fdopen(fd, "r");
		if (!f) { /* closed meanwhile */
			if (fd >= 0)
				close(fd);
			continue;
		}
		char line[256];
		while (fgets(line, sizeof(line), f))
			n += strncmp(line, "tfd:", 4) == 0;
		fclose(f);
	}
	closedir(d);
	return n;
}

static int64_t ts_ns(struct timespec ts) { return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec; }

/* ---- ctx_with_fd ---- */

Test(with_fd, a_byte_on_a_pipe_cancels_it_and_its_descendants_with_the_cause)
{
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], EPIPE);
	cr_assert_not_null(c);
	ctx_t *child = ctx_with_cancel(c);
	ctx_t *grandchild = ctx_with_timeout(child, 3600 * CTX_SEC);
	int fd = ctx_fd(c), cfd = ctx_fd(child), gfd = ctx_fd(grandchild);
	cr_assert(fd >= 0 && cfd >= 0 && gfd >= 0);
	cr_assert_not(readable_now(fd));
	cr_assert_eq(ctx_err(c), 0);
	cr_assert_eq(write(p[1], "x", 1), 1);
	cr_assert(readable_within(fd, 5000));
	/* The cancel runs on the watch thread, which writes c's fd before its
	 * descendants': an observer may see c's first. */
	cr_assert(readable_within(cfd, 5000));
	cr_assert(readable_within(gfd, 5000));
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), EPIPE);
	cr_assert_eq(ctx_cause(grandchild), EPIPE);
	char b;
	cr_assert_eq(read(p[0], &b, 1), 1, "the library must not read the watched fd");
	ctx_release(grandchild);
	ctx_release(child);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

Test(with_fd, the_writer_closing_cancels_it_with_ecanceled_by_default)
{
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], 0);
	cr_assert_not_null(c);
	close(p[0]); /* the library watches its own copy */
	cr_assert_not(readable_now(ctx_fd(c)));
	close(p[1]);
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), ECANCELED);
	ctx_release(c);
}

Test(with_fd, a_pidfd_ends_it_when_the_process_exits)
{
	int go[2];
	cr_assert_eq(pipe2(go, O_CLOEXEC), 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		char b;
		_exit(read(go[0], &b, 1) == 1 ? 7 : 8);
	}
	close(go[0]);
	int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pfd < 0 && errno == ENOSYS) {
		close(go[1]);
		waitpid_within(pid, 5000);
		cr_skip_test("pidfd_open: ENOSYS");
	}
	cr_assert_geq(pfd, 0);
	ctx_t *c = ctx_with_fd(ctx_background(), pfd, ECHILD);
	cr_assert_not_null(c);
	close(pfd);
	cr_assert_not(readable_within(ctx_fd(c), 20), "done while the process runs");
	cr_assert_eq(write(go[1], "x", 1), 1);
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_cause(c), ECHILD);
	int status = waitpid_within(pid, 5000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 7);
	ctx_release(c);
	close(go[1]);
}

Test(with_fd, an_fd_already_readable_gives_a_context_done_soon)
{
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	close(p[1]);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], ENOLINK);
	cr_assert_not_null(c);
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_cause(c), ENOLINK);
	ctx_release(c);
	close(p[0]);
}

Test(with_fd, cancelling_the_parent_first_removes_the_watch_and_closes_its_fd)
{
	warm_up();
	int before = open_fd_count();
	for (int round = 0; round < 200; round++) {
		int p[2];
		cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
		ctx_t *parent = ctx_with_cancel(ctx_background());
		ctx_t *c = ctx_with_fd(parent, p[0], EPIPE);
		cr_assert_not_null(c);
		cr_assert_eq(ctx_cancel_cause(parent, EIO), 0);
		cr_assert_eq(ctx_cause(c), EIO);
		ctx_release(c);
		ctx_release(parent);
		/* A byte after the context is gone must not reach anything. */
		cr_assert_eq(write(p[1], "x", 1), 1);
		close(p[0]);
		close(p[1]);
	}
	assert_settled(before);
}

Test(with_fd, its_own_cancel_or_deadline_frees_the_watch_and_its_fd)
{
	warm_up();
	int before = open_fd_count();
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *a = ctx_with_fd(ctx_background(), p[0], 0);
	ctx_t *t = ctx_with_timeout(ctx_background(), 10 * CTX_MSEC);
	ctx_t *b = ctx_with_fd(t, p[0], 0);
	cr_assert(a && b);
	cr_assert_eq(ctxi_watch_count(), 2);
	ctx_release(a); /* its own cancel */
	cr_assert(readable_within(ctx_fd(b), 5000));
	cr_assert_eq(ctx_err(b), ETIMEDOUT);
	ctx_unref(b); /* done by the deadline: a plain unref is enough */
	ctx_release(t);
	close(p[0]);
	close(p[1]);
	assert_settled(before);
}

Test(with_fd, a_done_parent_gives_a_child_born_done_and_nothing_leaks)
{
	warm_up();
	int before = open_fd_count();
	ctx_t *parent = ctx_with_cancel(ctx_background());
	ctx_cancel_cause(parent, EIO);
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(parent, p[0], 0);
	cr_assert_not_null(c);
	cr_assert_eq(ctx_cause(c), EIO);
	ctx_release(c);
	ctx_release(parent);
	close(p[0]);
	close(p[1]);
	assert_settled(before);
}

/* An open, unlinked regular file: an fd epoll refuses (EPERM). */
static int regular_file(void)
{
	char path[] = "/tmp/ctx-xproc-XXXXXX";
	int file = mkostemp(path, O_CLOEXEC);
	cr_assert_geq(file, 0);
	unlink(path);
	return file;
}

Test(with_fd, bad_arguments_fail_with_a_clear_errno_and_leak_nothing)
{
	warm_up();
	int before = open_fd_count();
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	errno = 0;
	cr_assert_null(ctx_with_fd(NULL, p[0], 0));
	cr_assert_eq(errno, EINVAL);
	cr_assert_null(ctx_with_fd(ctx_background(), -1, 0));
	cr_assert_eq(errno, EBADF);
	cr_assert_null(ctx_with_fd(ctx_background(), 4000, 0)); /* not open */
	cr_assert_eq(errno, EBADF);
	int file = regular_file();
	cr_assert_null(ctx_with_fd(ctx_background(), file, 0)); /* not pollable */
	cr_assert_eq(errno, EPERM);
	close(file);
	close(p[0]);
	close(p[1]);
	assert_settled(before);
}

Test(with_fd, out_of_memory_fails_with_enomem_and_leaks_nothing)
{
	warm_up();
	int before = open_fd_count();
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	atomic_store(&ctxi_fail_allocs, 1);
	errno = 0;
	cr_assert_null(ctx_with_fd(ctx_background(), p[0], 0));
	cr_assert_eq(errno, ENOMEM);
	atomic_store(&ctxi_fail_allocs, 0);
	close(p[0]);
	close(p[1]);
	assert_settled(before);
}

/*
 * ctx_with_fd() allocates three times: the context, the watch record, and the
 * after-function registration that hands the watch back to the watch thread
 * once the context is done.  The third comes after the duplicate fd is in the
 * watch thread's epoll set, where that thread can already report it; its
 * failure must undo the watch through that thread (lib/xproc.c, watch()).
 */
Test(with_fd, enomem_after_the_fd_is_armed_undoes_the_watch_and_leaves_the_callers_fd)
{
	warm_up();
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	int before = open_fd_count(), entries = epoll_entries();
	cr_assert_geq(entries, 1, "the watch thread's control eventfd");

	/* Exactly three allocations: with three let through, no fault is hit,
	 * so the third one (the fault below) is the last, after the arming. */
	atomic_store(&ctxi_skip_allocs, 3);
	atomic_store(&ctxi_fail_allocs, 1);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], EPIPE);
	cr_assert_not_null(c);
	cr_assert_eq(atomic_load(&ctxi_fail_allocs), 1, "more than three allocations");
	atomic_store(&ctxi_fail_allocs, 0);
	cr_assert_eq(atomic_load(&ctxi_skip_allocs), 0, "fewer than three allocations");
	ctx_release(c);
	assert_settled(before);

	atomic_store(&ctxi_skip_allocs, 2);
	atomic_store(&ctxi_fail_allocs, 1);
	errno = 0;
	cr_assert_null(ctx_with_fd(ctx_background(), p[0], EPIPE));
	cr_assert_eq(errno, ENOMEM);
	cr_assert_eq(atomic_load(&ctxi_fail_allocs), 0, "the fault was not reached");
	/* The watch thread takes the duplicate out of its epoll set, closes it
	 * and drops the context a moment later. */
	assert_settled(before);
	cr_assert_eq(epoll_entries(), entries, "the duplicate is still in the watch thread's epoll set");

	/* The caller's fd is still theirs: open, the same pipe, never read. */
	cr_assert_eq(write(p[1], "x", 1), 1);
	char b = 0;
	cr_assert_eq(read(p[0], &b, 1), 1);
	cr_assert_eq(b, 'x');
	/* And it can be watched again.  The new duplicate takes the lowest free
	 * number, the failed one's: a stale epoll entry for it would fail the
	 * call (EEXIST) or report into a freed record. */
	c = ctx_with_fd(ctx_background(), p[0], EPIPE);
	cr_assert_not_null(c, "errno %d", errno);
	cr_assert_not(readable_within(ctx_fd(c), 20));
	cr_assert_eq(write(p[1], "y", 1), 1);
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_cause(c), EPIPE);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
	assert_settled(before - 2);
	cr_assert_eq(epoll_entries(), entries);
}

Test(with_fd, out_of_fds_fails_with_emfile_and_leaks_nothing)
{
	warm_up();
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	int before = open_fd_count();
	struct rlimit old, low;
	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
	low = old;
	low.rlim_cur = (rlim_t)p[1] + 8;
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
	int fill[64], n = 0; /* take every fd left under the limit */
	while (n < 64 && (fill[n] = fcntl(p[0], F_DUPFD_CLOEXEC, 0)) >= 0)
		n++;
	cr_assert_lt(n, 64);
	errno = 0;
	cr_assert_null(ctx_with_fd(ctx_background(), p[0], 0));
	cr_assert_eq(errno, EMFILE);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	errno = 0;
	cr_assert_null(ctx_with_signals(ctx_background(), &set, 0));
	cr_assert_eq(errno, EMFILE);
	while (n)
		close(fill[--n]);
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
	assert_settled(before);
	close(p[0]);
	close(p[1]);
}

Test(with_fd, every_fd_it_opens_is_close_on_exec)
{
	struct fdset s;
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	fd_snapshot(&s);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], 0); /* also starts the thread */
	cr_assert_not_null(c);
	cr_assert_geq(ctx_fd(c), 0);
	int bad, n = fds_opened_since(&s, &bad);
	cr_assert_geq(n, 2, "the duplicate and the context's fd at least, got %d", n);
	cr_assert_eq(bad, 0, "%d of %d new fds lack FD_CLOEXEC", bad, n);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

/* The watched fd becomes readable while another thread cancels the context:
 * one of them wins, the loser changes nothing, and nothing leaks. */
struct race {
	ctx_t *c;
	atomic_int ready, go;
	int64_t delay_ns; /* spreads the cancel across the watch thread's path */
};

static void *race_cancel(void *arg)
{
	struct race *r = arg;
	atomic_store(&r->ready, 1);
	while (!atomic_load(&r->go))
		;
	int64_t until = now_ns() + r->delay_ns;
	while (now_ns() < until)
		;
	ctx_cancel_cause(r->c, EIO);
	return NULL;
}

Test(with_fd, readiness_racing_a_cancel_leaks_nothing_and_never_crashes)
{
	warm_up();
	int before = open_fd_count();
	int by_fd = 0, rounds = 300;
	for (int i = 0; i < rounds; i++) {
		int p[2];
		cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
		struct race r = {.c = ctx_with_fd(ctx_background(), p[0], EPIPE),
				 .delay_ns = (i % 30) * CTX_USEC};
		cr_assert_not_null(r.c);
		pthread_t t;
		cr_assert_eq(pthread_create(&t, NULL, race_cancel, &r), 0);
		while (!atomic_load(&r.ready))
			;
		atomic_store(&r.go, 1);
		if (i % 2)
			close(p[1]);
		else
			cr_assert_eq(write(p[1], "x", 1), 1);
		cr_assert(joined_within(t, 5000));
		cr_assert(readable_within(ctx_fd(r.c), 5000));
		int cause = ctx_cause(r.c);
		cr_assert(cause == EIO || cause == EPIPE, "cause %d", cause);
		by_fd += cause == EPIPE;
		ctx_release(r.c);
		close(p[0]);
		if (!(i % 2))
			close(p[1]);
	}
	cr_log_info("the fd won %d of %d rounds", by_fd, rounds);
	assert_settled(before);
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* Measures (and logs) the median from write() on a watched pipe to the
 * context's fd polling readable; asserts only that each one got there. */
Test(with_fd, a_write_reaches_the_context_fd_latency_logged)
{
	enum { N = 200 };
	static int64_t lat[N];
	warm_up();
	for (int i = 0; i < N; i++) {
		int p[2];
		cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
		ctx_t *c = ctx_with_fd(ctx_background(), p[0], 0);
		cr_assert_not_null(c);
		int fd = ctx_fd(c);
		cr_assert_geq(fd, 0);
		int64_t t0 = now_ns();
		cr_assert_eq(write(p[1], "x", 1), 1);
		cr_assert(readable_within(fd, 5000));
		lat[i] = now_ns() - t0;
		ctx_release(c);
		close(p[0]);
		close(p[1]);
	}
	qsort(lat, N, sizeof(lat[0]), cmp_i64);
	cr_log_info("write -> ctx fd readable: median %.1f us, p90 %.1f us (%d rounds)",
		    (double)lat[N / 2] / 1000, (double)lat[N * 9 / 10] / 1000, N);
}

/* ---- ctx_with_signals ---- */

/* Blocks SIGUSR1 in this thread; the test process has no other thread that
 * does not block it (the library's threads block every signal). */
static sigset_t block_usr1(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	cr_assert_eq(pthread_sigmask(SIG_BLOCK, &set, NULL), 0);
	return set;
}

static bool usr1_pending(void)
{
	sigset_t p;
	sigpending(&p);
	return sigismember(&p, SIGUSR1);
}

Test(signals, a_process_directed_signal_cancels_it_and_is_consumed)
{
	sigset_t set = block_usr1();
	ctx_t *c = ctx_with_signals(ctx_background(), &set, 0);
	cr_assert_not_null(c);
	cr_assert_not(readable_within(ctx_fd(c), 20));
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_err(c), ECANCELED);
	cr_assert_eq(ctx_cause(c), EINTR);
	/* Consumed a moment after the cancel, on the watch thread. */
	int64_t end = now_ns() + 5 * CTX_SEC;
	while (usr1_pending() && now_ns() < end) {
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	cr_assert_not(usr1_pending());
	ctx_release(c);
	/* So a new one is not born done. */
	ctx_t *d = ctx_with_signals(ctx_background(), &set, ESHUTDOWN);
	cr_assert_not_null(d);
	cr_assert_not(readable_within(ctx_fd(d), 50));
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	cr_assert(readable_within(ctx_fd(d), 5000));
	cr_assert_eq(ctx_cause(d), ESHUTDOWN);
	ctx_release(d);
}

Test(signals, one_signal_ends_every_context_waiting_for_it)
{
	sigset_t set = block_usr1();
	ctx_t *a = ctx_with_signals(ctx_background(), &set, 0);
	ctx_t *b = ctx_with_signals(ctx_background(), &set, 0);
	cr_assert(a && b);
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	cr_assert(readable_within(ctx_fd(a), 5000));
	cr_assert(readable_within(ctx_fd(b), 5000));
	ctx_release(a);
	ctx_release(b);
}

Test(signals, a_signal_after_the_context_is_done_stays_pending)
{
	sigset_t set = block_usr1();
	warm_up();
	int before = open_fd_count();
	ctx_t *c = ctx_with_signals(ctx_background(), &set, 0);
	cr_assert_not_null(c);
	ctx_release(c);
	assert_settled(before); /* the signalfd is closed */
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	cr_assert(usr1_pending());
	struct timespec zero = {0};
	cr_assert_eq(sigtimedwait(&set, NULL, &zero), SIGUSR1);
}

Test(signals, bad_arguments_fail_with_einval)
{
	sigset_t empty, set;
	sigemptyset(&empty);
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	errno = 0;
	cr_assert_null(ctx_with_signals(NULL, &set, 0));
	cr_assert_eq(errno, EINVAL);
	errno = 0;
	cr_assert_null(ctx_with_signals(ctx_background(), NULL, 0));
	cr_assert_eq(errno, EINVAL);
	errno = 0;
	cr_assert_null(ctx_with_signals(ctx_background(), &empty, 0));
	cr_assert_eq(errno, EINVAL);
}

/* Waits (bounded) for the watch thread to consume the pending SIGUSR1. */
static bool usr1_consumed_within(int timeout_ms)
{
	int64_t end = now_ns() + (int64_t)timeout_ms * CTX_MSEC;
	while (usr1_pending() && now_ns() < end) {
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	return !usr1_pending();
}

/* In a forked child: s (live, no fd yet) ends by SIGUSR1 with `cause`, its
 * fd becomes readable and the signal is consumed.  0, or the exit code
 * telling which step failed (6: no watch thread in the child saw it). */
static int child_signal_ends(ctx_t *s, int cause)
{
	if (ctx_err(s))
		return 2;
	int fd = ctx_fd(s);
	if (fd < 0)
		return 3;
	if (readable_now(fd))
		return 4;
	if (kill(getpid(), SIGUSR1) != 0)
		return 5;
	if (!readable_within(fd, 5000))
		return 6;
	if (ctx_err(s) != ECANCELED || ctx_cause(s) != cause)
		return 7;
	if (!usr1_consumed_within(5000))
		return 8;
	return 0;
}

/*
 * A signal context made before fork() works in the child: the library's fork
 * handler starts a watch thread in the child and re-arms the inherited
 * signalfd there, so a signal sent to the child cancels the child's copy of
 * the context (and is consumed there), while the parent's copy stays live
 * and keeps its own watch.  The child reports through its exit status.
 */
Test(signals, a_forked_child_re_arms_an_inherited_context_and_the_parents_stays_live)
{
	SKIP_FORK_WITH_THREADS();
	sigset_t set = block_usr1(); /* the child inherits the mask */
	ctx_t *s = ctx_with_signals(ctx_background(), &set, ESHUTDOWN);
	cr_assert_not_null(s);
	/* No ctx_fd(s) before the fork: that fd would be one open file in both
	 * processes, so the child's cancel would make it readable here too
	 * (README, "fork").  Each process makes its own after the fork. */
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		int code = child_signal_ends(s, ESHUTDOWN);
		if (code)
			_exit(code);
		ctx_release(s);
		_exit(0);
	}
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
	/* The child's signal and cancel did not reach the parent's copy. */
	int fd = ctx_fd(s);
	cr_assert_geq(fd, 0);
	cr_assert_eq(ctx_err(s), 0);
	cr_assert_not(readable_within(fd, 20));
	/* And the parent's watch survived the fork. */
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	cr_assert(readable_within(fd, 5000), "the parent's watch must survive the fork");
	cr_assert_eq(ctx_err(s), ECANCELED);
	cr_assert_eq(ctx_cause(s), ESHUTDOWN);
	cr_assert(usr1_consumed_within(5000));
	ctx_release(s);
}

/*
 * A child forked while the watch thread runs but watches nothing: the fork
 * handler only drops the parent's epoll set (shared with the parent, never
 * to be touched here), and the child's first ctx_with_signals() starts a
 * watch thread of its own.  The parent's thread keeps working.
 */
Test(signals, a_forked_child_makes_its_own_signal_context_and_leaks_nothing)
{
	SKIP_FORK_WITH_THREADS();
	sigset_t set = block_usr1();
	warm_up(); /* the watch thread runs, with no watch */
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		int before = open_fd_count();
		ctx_t *s = ctx_with_signals(ctx_background(), &set, 0);
		if (!s)
			_exit(2);
		int code = child_signal_ends(s, EINTR);
		if (code)
			_exit(code);
		ctx_release(s);
		/* The child's epoll set, eventfd and thread stay; the watch, its
		 * signalfd and the context's fd go. */
		if (!settles_within(before + 2, 5000))
			_exit(9);
		_exit(0);
	}
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
	cr_assert_not(usr1_pending(), "the child's signal reached the parent");
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], EPIPE);
	cr_assert_not_null(c);
	cr_assert_eq(write(p[1], "x", 1), 1);
	cr_assert(readable_within(ctx_fd(c), 5000), "the parent's watch thread must survive the fork");
	cr_assert_eq(ctx_cause(c), EPIPE);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

/* ---- ctx_send_ctx, ctx_recv_ctx ---- */

static void pair(int type, int sv[2])
{
	cr_assert_eq(socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv), 0);
}

static void live_context_travels(int type)
{
	int sv[2];
	pair(type, sv);
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert_not_null(r, "errno %d", errno);
	cr_assert_not(ctx_deadline(r, NULL));
	cr_assert_not(readable_within(ctx_fd(r), 20));
	cr_assert_eq(ctx_cancel_cause(c, EIO), 0);
	cr_assert(readable_within(ctx_fd(r), 5000));
	cr_assert_eq(ctx_err(r), ECANCELED);
	cr_assert_eq(ctx_cause(r), ECANCELED);
	ctx_release(r);
	ctx_release(c);
	close(sv[0]);
	close(sv[1]);
}

Test(send, a_live_context_cancelled_later_ends_the_receivers_child_seqpacket)
{
	live_context_travels(SOCK_SEQPACKET);
}

Test(send, a_live_context_cancelled_later_ends_the_receivers_child_stream)
{
	live_context_travels(SOCK_STREAM);
}

Test(send, the_deadline_travels_and_fires_at_the_same_instant_with_its_cause)
{
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	ctx_t *c = ctx_with_timeout_cause(ctx_background(), 50 * CTX_MSEC, ENOLINK);
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert_not_null(r);
	struct timespec dc, dr;
	cr_assert(ctx_deadline(c, &dc));
	cr_assert(ctx_deadline(r, &dr));
	cr_assert_eq(ts_ns(dr), ts_ns(dc));
	cr_assert(readable_within(ctx_fd(r), 5000));
	cr_assert_geq(now_ns(), ts_ns(dc));
	cr_assert_eq(ctx_err(r), ETIMEDOUT);
	cr_assert_eq(ctx_cause(r), ENOLINK);
	ctx_release(r);
	ctx_release(c);
	close(sv[0]);
	close(sv[1]);
}

Test(send, a_done_context_gives_a_child_born_done_with_its_err_and_cause)
{
	warm_up();
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	int before = open_fd_count();
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_cancel_cause(c, EIO);
	ctx_t *t = ctx_with_timeout_cause(ctx_background(), 0, ENOLINK);
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	cr_assert_eq(ctx_send_ctx(sv[0], t), 0);
	ctx_t *rc = ctx_recv_ctx(sv[1], ctx_background());
	ctx_t *rt = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert(rc && rt);
	cr_assert_eq(ctx_err(rc), ECANCELED);
	cr_assert_eq(ctx_cause(rc), EIO);
	cr_assert_eq(ctx_err(rt), ETIMEDOUT);
	cr_assert_eq(ctx_cause(rt), ENOLINK);
	cr_assert_eq(ctxi_watch_count(), 0, "a done context needs no watch");
	cr_assert(readable_now(ctx_fd(rc)));
	cr_assert(readable_now(ctx_fd(rt)));
	ctx_release(rc);
	ctx_release(rt);
	ctx_release(c);
	ctx_release(t);
	cr_assert_eq(open_fd_count(), before);
	close(sv[0]);
	close(sv[1]);
}

Test(send, a_context_never_done_travels_without_an_fd_as_a_plain_child)
{
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	ctx_t *w = ctx_without_cancel(ctx_background());
	cr_assert_eq(ctx_send_ctx(sv[0], ctx_background()), 0);
	cr_assert_eq(ctx_send_ctx(sv[0], w), 0);
	for (int i = 0; i < 2; i++) {
		int before = open_fd_count();
		ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
		cr_assert_not_null(r);
		cr_assert_eq(open_fd_count(), before, "no fd travelled");
		cr_assert_eq(ctxi_watch_count(), 0);
		cr_assert_eq(ctx_err(r), 0);
		cr_assert_not(ctx_deadline(r, NULL));
		cr_assert_eq(ctx_cancel(r), 0, "a cancellable child");
		ctx_release(r);
	}
	ctx_unref(w);
	close(sv[0]);
	close(sv[1]);
}

Test(send, the_receivers_child_is_below_its_parent)
{
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_t *parent = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	ctx_t *r = ctx_recv_ctx(sv[1], parent);
	cr_assert_not_null(r);
	ctx_cancel_cause(parent, ESHUTDOWN);
	cr_assert(readable_now(ctx_fd(r)));
	cr_assert_eq(ctx_cause(r), ESHUTDOWN);
	cr_assert_eq(ctx_err(c), 0, "nothing travels back to the sender");
	ctx_release(r);
	ctx_release(parent);
	ctx_release(c);
	close(sv[0]);
	close(sv[1]);
}

Test(send, received_and_watched_fds_are_close_on_exec_and_freed_with_the_child)
{
	warm_up();
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_geq(ctx_fd(c), 0);
	int before = open_fd_count();
	struct fdset s;
	fd_snapshot(&s);
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert_not_null(r);
	cr_assert_geq(ctx_fd(r), 0);
	int bad, n = fds_opened_since(&s, &bad);
	cr_assert_eq(n, 2, "the received fd and the child's own, got %d", n);
	cr_assert_eq(bad, 0);
	ctx_release(r);
	assert_settled(before);
	cr_assert_eq(ctx_err(c), 0);
	ctx_release(c);
	close(sv[0]);
	close(sv[1]);
}

/* A real second process: the child receives the context, tells the parent,
 * and exits with a code saying what it saw. */
Test(send, a_second_process_sees_the_cancel_and_the_deadline)
{
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	/* Fork first, while this process has no thread: the child starts its
	 * own watch thread (also under TSan, which forbids threads after a
	 * multi-threaded fork). */
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		close(sv[0]);
		int code = 0;
		for (int i = 0; i < 2; i++) {
			ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
			if (!r)
				_exit(10 + i);
			bool timed = ctx_deadline(r, NULL);
			if (send(sv[1], "r", 1, 0) != 1)
				_exit(20);
			if (!readable_within(ctx_fd(r), 5000))
				_exit(30 + i);
			int want = i == 0 ? ECANCELED : ETIMEDOUT;
			if (ctx_err(r) != want || timed != (i == 1))
				code |= 1 << i;
			ctx_release(r);
		}
		_exit(code);
	}
	close(sv[1]);
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_t *t = ctx_with_timeout(ctx_background(), 30 * CTX_MSEC);
	char b;
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	cr_assert(readable_within(sv[0], 5000));
	cr_assert_eq(recv(sv[0], &b, 1, 0), 1);
	ctx_cancel(c);
	cr_assert_eq(ctx_send_ctx(sv[0], t), 0);
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
	ctx_release(c);
	ctx_release(t);
	close(sv[0]);
}

/* Captures a real message (payload and fd) as sent by ctx_send_ctx. */
static ssize_t capture(ctx_t *c, char *buf, size_t len, int *fd)
{
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cb;
	struct iovec iov = {.iov_base = buf, .iov_len = len};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cb.b,
			   .msg_controllen = sizeof(cb.b)};
	ssize_t n = recvmsg(sv[0 + 1], &m, MSG_CMSG_CLOEXEC);
	*fd = -1;
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	if (h && h->cmsg_type == SCM_RIGHTS)
		memcpy(fd, CMSG_DATA(h), sizeof(int));
	close(sv[0]);
	close(sv[1]);
	return n;
}

/* Sends buf with nfds copies of fd. */
static void send_raw(int sock, const void *buf, size_t len, int fd, int nfds)
{
	union {
		char b[CMSG_SPACE(4 * sizeof(int))];
		struct cmsghdr align;
	} cb;
	memset(&cb, 0, sizeof(cb));
	struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
	if (nfds) {
		m.msg_control = cb.b;
		m.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
		struct cmsghdr *h = CMSG_FIRSTHDR(&m);
		h->cmsg_level = SOL_SOCKET;
		h->cmsg_type = SCM_RIGHTS;
		h->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
		for (int i = 0; i < nfds; i++)
			memcpy(CMSG_DATA(h) + (size_t)i * sizeof(int), &fd, sizeof(int));
	}
	cr_assert_eq(sendmsg(sock, &m, 0), (ssize_t)len);
}

Test(send, malformed_messages_fail_with_ebadmsg_and_close_every_fd)
{
	warm_up();
	ctx_t *c = ctx_with_cancel(ctx_background());
	char good[64];
	int fd;
	ssize_t len = capture(c, good, sizeof(good), &fd);
	cr_assert_gt(len, 8);
	cr_assert_geq(fd, 0);
	ctx_t *done = ctx_with_cancel(ctx_background());
	ctx_cancel(done);
	char dmsg[64];
	int nofd;
	ssize_t dlen = capture(done, dmsg, sizeof(dmsg), &nofd);
	cr_assert_eq(dlen, len);
	cr_assert_eq(nofd, -1);

	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	int before = open_fd_count();
	char garbage[64];
	for (size_t i = 0; i < sizeof(garbage); i++)
		garbage[i] = (char)(i * 37 + 11);
	char badmagic[64];
	memcpy(badmagic, good, (size_t)len);
	badmagic[0] ^= 0x55;
	char longer[65] = {0};
	memcpy(longer, good, (size_t)len);
	struct {
		const char *what;
		const void *buf;
		size_t len;
		int nfds;
	} cases[] = {
		{"garbage", garbage, (size_t)len, 1},
		{"wrong magic", badmagic, (size_t)len, 1},
		{"short", good, 3, 1},
		{"longer", longer, (size_t)len + 1, 1},
		{"live without an fd", good, (size_t)len, 0},
		{"live with two fds", good, (size_t)len, 2},
		{"live with four fds", good, (size_t)len, 4},
		{"done with an fd", dmsg, (size_t)len, 1},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		send_raw(sv[0], cases[i].buf, cases[i].len, fd, cases[i].nfds);
		errno = 0;
		ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
		cr_assert_null(r, "%s: accepted", cases[i].what);
		cr_assert_eq(errno, EBADMSG, "%s: errno %d", cases[i].what, errno);
		cr_assert_eq(open_fd_count(), before, "%s: an fd leaked", cases[i].what);
	}
	/* The good message itself is accepted. */
	send_raw(sv[0], good, (size_t)len, fd, 1);
	ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert_not_null(r, "errno %d", errno);
	ctx_release(r);
	/* An empty message, then the peer gone. */
	send_raw(sv[0], good, 0, -1, 0);
	errno = 0;
	cr_assert_null(ctx_recv_ctx(sv[1], ctx_background()));
	cr_assert_eq(errno, ECONNRESET);
	close(sv[0]);
	errno = 0;
	cr_assert_null(ctx_recv_ctx(sv[1], ctx_background()));
	cr_assert_eq(errno, ECONNRESET);
	close(sv[1]);
	close(fd);
	ctx_release(c);
	ctx_release(done);
}

Test(send, bad_arguments_fail_with_a_clear_errno)
{
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_cancel(ctx_background());
	errno = 0;
	cr_assert_eq(ctx_send_ctx(sv[0], NULL), -1);
	cr_assert_eq(errno, EINVAL);
	cr_assert_eq(ctx_send_ctx(-1, c), -1);
	cr_assert_eq(errno, EBADF);
	cr_assert_eq(ctx_send_ctx(p[1], c), -1);
	cr_assert_eq(errno, ENOTSOCK);
	errno = 0;
	cr_assert_null(ctx_recv_ctx(sv[1], NULL));
	cr_assert_eq(errno, EINVAL);
	cr_assert_null(ctx_recv_ctx(-1, ctx_background()));
	cr_assert_eq(errno, EBADF);
	cr_assert_null(ctx_recv_ctx(p[0], ctx_background()));
	cr_assert_eq(errno, ENOTSOCK);
	fcntl(sv[1], F_SETFL, O_NONBLOCK);
	cr_assert_null(ctx_recv_ctx(sv[1], ctx_background()));
	cr_assert_eq(errno, EAGAIN);
	ctx_release(c);
	close(sv[0]);
	close(sv[1]);
	close(p[0]);
	close(p[1]);
}

/* A forked child inherits the parent's watches: it re-arms them on a watch
 * thread of its own, and leaves the parent's epoll set alone. */
Test(with_fd, a_forked_child_keeps_its_inherited_watches_and_the_parent_too)
{
	SKIP_FORK_WITH_THREADS();
	int p[2], ready[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	cr_assert_eq(pipe2(ready, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], EPIPE);
	cr_assert_not_null(c);
	int fd = ctx_fd(c);
	cr_assert_geq(fd, 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		/* The context fd is the parent's eventfd (an open file both
		 * share), so the parent's cancel makes it readable here too:
		 * wait for the child's own copy of the state instead. */
		if (ctx_err(c))
			_exit(2);
		if (write(ready[1], "r", 1) != 1)
			_exit(3);
		int64_t end = now_ns() + 5 * CTX_SEC;
		while (!ctx_err(c) && now_ns() < end) {
			struct timespec ms = {.tv_nsec = CTX_MSEC};
			nanosleep(&ms, NULL);
		}
		_exit(ctx_cause(c) == EPIPE ? 0 : 5);
	}
	cr_assert(readable_within(ready[0], 5000));
	cr_assert_not(readable_now(fd));
	cr_assert_eq(write(p[1], "x", 1), 1);
	cr_assert(readable_within(fd, 5000), "the parent's watch must survive the fork");
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
	close(ready[0]);
	close(ready[1]);
}

/*
 * Fork handlers run in the order they were registered, and a process whose
 * first library call is a watch registers lib/xproc.c's before
 * lib/after.c's.  xproc's child handler starts the child's watch thread,
 * which may at once report an inherited watch whose fd is readable and fire
 * its context's after-functions (among them the watch's own hand-back).  They
 * must still run in the child, even if that happens before after.c's child
 * handler has forgotten the parent's after thread.  A handler of the test's
 * own, registered between the two, holds that window open: it makes the fd
 * readable and returns once the child's watch thread has handled it.
 */
static ctx_t *window_ctx; /* set around the fork only */
static int window_wfd = -1;
static _Atomic pid_t after_ran_in;

static void note_pid(void *unused)
{
	(void)unused;
	atomic_store(&after_ran_in, getpid());
}

/* The lowest thread id of this process other than the caller's: in a
 * forked child, the first thread the library started there. */
static pid_t other_thread(void)
{
	pid_t self = (pid_t)syscall(SYS_gettid), best = 0;
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		pid_t t = (pid_t)atoi(e->d_name);
		if (t > 0 && t != self && (!best || t < best))
			best = t;
	}
	closedir(d);
	return best;
}

static void hold_the_window_open(void)
{
	if (!window_ctx)
		return;
	if (write(window_wfd, "x", 1) != 1)
		return;
	int64_t end = now_ns() + 5 * CTX_SEC;
	while (!ctx_err(window_ctx) && now_ns() < end) {
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	/* Done: the watch thread is in the cancel or past it.  Asleep again
	 * in epoll_wait: it has handed the after-functions over. */
	int sfd = thread_stat_open(other_thread());
	if (sfd >= 0) {
		thread_blocked_within(sfd, 2000);
		close(sfd);
	}
}

Test(with_fd, a_forked_child_runs_the_after_functions_its_inherited_watch_fires)
{
	SKIP_FORK_WITH_THREADS();
	/* A watch that fails (a regular file cannot be polled) once it has
	 * registered xproc's fork handlers, before any after-function has
	 * registered after.c's: ours go between. */
	int file = regular_file();
	cr_assert_null(ctx_with_fd(ctx_background(), file, 0));
	cr_assert_eq(errno, EPERM);
	close(file);
	cr_assert_eq(pthread_atfork(NULL, NULL, hold_the_window_open), 0);

	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	ctx_t *c = ctx_with_fd(ctx_background(), p[0], EPIPE);
	cr_assert_not_null(c);
	cr_assert_eq(ctx_after_func(c, note_pid, NULL, NULL), 0);
	window_ctx = c;
	window_wfd = p[1];
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		if (ctx_cause(c) != EPIPE)
			_exit(2); /* the child's watch thread did not report it */
		int64_t end = now_ns() + 5 * CTX_SEC;
		while ((atomic_load(&after_ran_in) != getpid() || ctxi_watch_count()) &&
		       now_ns() < end) {
			struct timespec ms = {.tv_nsec = CTX_MSEC};
			nanosleep(&ms, NULL);
		}
		if (atomic_load(&after_ran_in) != getpid())
			_exit(3); /* the after-function never ran in the child */
		if (ctxi_watch_count())
			_exit(4); /* nor did the watch's hand-back */
		ctx_release(c);
		_exit(0);
	}
	window_ctx = NULL;
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
	/* The byte the child's handler wrote reached the parent's watch too. */
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_cause(c), EPIPE);
	ctx_release(c);
	close(p[0]);
	close(p[1]);
}

/* ---- helper bug hunt (xproc): reproducers ---- */

#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76
#endif
#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

/*
 * A receiving socket with SO_PASSCRED gets an SCM_CREDENTIALS message before
 * the fds; with SO_PASSPIDFD (Linux 6.5+) an SCM_PIDFD, which installs a
 * pidfd of the sender in the receiver.  Both are ordinary settings of a
 * server that authenticates its peer: a live context must still be received,
 * and the pidfd, an fd the call receives and does not keep, closed.
 */
static void recv_with_option(int type, int opt)
{
	int sv[2];
	pair(type, sv);
	int one = 1;
	if (setsockopt(sv[1], SOL_SOCKET, opt, &one, sizeof(one)) != 0) {
		cr_assert_eq(errno, ENOPROTOOPT, "setsockopt errno %d", errno);
		close(sv[0]);
		close(sv[1]);
		return; /* an older kernel */
	}
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_geq(ctx_fd(c), 0);
	ctx_t *done = ctx_with_cancel(ctx_background());
	ctx_cancel_cause(done, EIO);
	int before = open_fd_count();
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	errno = 0;
	ctx_t *r = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert_not_null(r, "type %d, option %d: live context refused, errno %d", type, opt, errno);
	cr_assert_eq(ctx_cancel_cause(c, EIO), 0);
	cr_assert(readable_within(ctx_fd(r), 5000));
	ctx_release(r);
	cr_assert_eq(ctx_send_ctx(sv[0], done), 0);
	r = ctx_recv_ctx(sv[1], ctx_background());
	cr_assert_not_null(r, "type %d, option %d: done context refused, errno %d", type, opt, errno);
	cr_assert_eq(ctx_cause(r), EIO);
	ctx_release(r);
	cr_assert(settles_within(before, 5000), /* r's fd and the watch's are closed */
		  "type %d, option %d: %d fds open, %d before", type, opt, open_fd_count(), before);
	ctx_release(c);
	ctx_release(done);
	close(sv[0]);
	close(sv[1]);
}

static const int sock_types[] = {SOCK_SEQPACKET, SOCK_STREAM, SOCK_DGRAM};

Test(send, a_receiver_with_so_passcred_gets_a_live_context)
{
	warm_up();
	for (size_t i = 0; i < sizeof(sock_types) / sizeof(sock_types[0]); i++)
		recv_with_option(sock_types[i], SO_PASSCRED);
}

Test(send, a_receiver_with_so_passpidfd_closes_the_pidfd_it_gets)
{
	warm_up();
	for (size_t i = 0; i < sizeof(sock_types) / sizeof(sock_types[0]); i++)
		recv_with_option(sock_types[i], SO_PASSPIDFD);
}

/*
 * The header: "a signal that arrives after the context is done for another
 * reason stays pending".  A cancelled signal context's watch stays armed
 * until its hand-back (an after-function) reaches the watch thread; a signal
 * in that window must not be consumed.  An after-function that holds the
 * after thread keeps the window open.
 */
static _Atomic int blocker;

static void hold_after_thread(void *unused)
{
	(void)unused;
	atomic_store(&blocker, 1);
	struct timespec t = {.tv_nsec = 300 * CTX_MSEC};
	nanosleep(&t, NULL);
	atomic_store(&blocker, 2);
}

Test(signals, a_signal_after_a_cancel_stays_pending_before_the_watch_is_handed_back)
{
	sigset_t set = block_usr1();
	warm_up();
	ctx_t *x = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_after_func(x, hold_after_thread, NULL, NULL), 0);
	ctx_cancel(x);
	int64_t end = now_ns() + 5 * CTX_SEC;
	while (atomic_load(&blocker) != 1 && now_ns() < end)
		sched_yield();
	cr_assert_eq(atomic_load(&blocker), 1);
	int before = open_fd_count();
	ctx_t *c = ctx_with_signals(ctx_background(), &set, 0);
	cr_assert_not_null(c);
	ctx_release(c); /* done: ECANCELED; its hand-back waits behind the blocker */
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	end = now_ns() + 5 * CTX_SEC;
	while (atomic_load(&blocker) != 2 && now_ns() < end) {
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	assert_settled(before); /* the signalfd is gone */
	cr_assert(usr1_pending(), "the signal was consumed by a context already done");
	struct timespec zero = {0};
	cr_assert_eq(sigtimedwait(&set, NULL, &zero), SIGUSR1);
	ctx_release(x);
}

/*
 * Out of fds, the kernel cannot install the received fd and sets MSG_CTRUNC:
 * the call must say EMFILE (SPEC §3: out of fds -> EMFILE; the header lists
 * ctx_with_fd()'s errors), not EBADMSG, which tells the caller the peer sent
 * garbage.
 */
Test(send, out_of_fds_a_live_context_fails_with_emfile)
{
	warm_up();
	int sv[2];
	pair(SOCK_SEQPACKET, sv);
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_send_ctx(sv[0], c), 0);
	int before = open_fd_count();
	struct rlimit old, low;
	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
	low = old;
	low.rlim_cur = (rlim_t)sv[1] + 8;
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
	int fill[64], n = 0;
	while (n < 64 && (fill[n] = fcntl(sv[1], F_DUPFD_CLOEXEC, 0)) >= 0)
		n++;
	cr_assert_lt(n, 64);
	errno = 0;
	cr_assert_null(ctx_recv_ctx(sv[1], ctx_background()));
	int e = errno;
	while (n)
		close(fill[--n]);
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
	cr_assert_eq(e, EMFILE, "errno %d", e);
	assert_settled(before);
	ctx_release(c);
	close(sv[0]);
	close(sv[1]);
}

/*
 * "Two contexts on one signal both end": the watch thread takes at most 64
 * reports per epoll_wait and consumed the signal after each batch, so with
 * more contexts than that on one signal, those left for the next batch
 * found it gone (the kernel re-polls a signalfd before reporting it) and
 * never ended.
 */
Test(signals, one_signal_ends_every_context_waiting_for_it_even_past_a_batch)
{
	sigset_t set = block_usr1();
	enum { N = 150 };
	ctx_t *c[N];
	for (int i = 0; i < N; i++) {
		c[i] = ctx_with_signals(ctx_background(), &set, 0);
		cr_assert_not_null(c[i], "errno %d", errno);
	}
	cr_assert_eq(kill(getpid(), SIGUSR1), 0);
	int live = 0;
	int64_t end = now_ns() + 3 * CTX_SEC;
	for (int i = 0; i < N; i++) {
		int64_t left = (end - now_ns()) / CTX_MSEC;
		live += !readable_within(ctx_fd(c[i]), left > 0 ? (int)left : 0);
	}
	cr_assert_eq(live, 0, "%d of %d contexts never saw the signal", live, N);
	cr_assert(usr1_consumed_within(5000));
	for (int i = 0; i < N; i++)
		ctx_release(c[i]);
}

/*
 * Other socket families take an SCM_RIGHTS control message and drop it
 * silently (the kernel's sock_cmsg_send ignores it): ctx_send_ctx reported
 * success and the peer got a live context's message without its fd.  A UDP
 * socket connected to itself shows it.
 */
Test(send, a_socket_not_af_unix_is_refused_with_eafnosupport)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(s, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	cr_assert_eq(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(getsockname(s, (struct sockaddr *)&a, &alen), 0);
	cr_assert_eq(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
	ctx_t *c = ctx_with_cancel(ctx_background());
	errno = 0;
	int r = ctx_send_ctx(s, c);
	int e = errno;
	char buf[64];
	ssize_t n = recv(s, buf, sizeof(buf), MSG_DONTWAIT);
	cr_assert_eq(r, -1, "sent (%zd bytes arrived, with no fd)", n);
	cr_assert_eq(e, EAFNOSUPPORT, "errno %d", e);
	ctx_release(c);
	close(s);
}
