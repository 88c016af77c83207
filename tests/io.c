/* Waiting and cancellable I/O: ctx_wait, ctx_sleep, ctx_poll, ctx_read,
 * ctx_write, ctx_recv, ctx_send, ctx_accept, ctx_connect.
 *
 * A blocking call runs on a worker thread ("job"); the test waits, with a
 * bound, until the thread is asleep in the kernel, then ends the wait from
 * outside and joins with a bound.  Every wait is bounded, so a call that
 * never returns fails its test instead of hanging the suite. */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "internal.h" /* ctxi_fail_allocs */

#define BOUND_MS 5000 /* how long anything may take before the test fails */
#define DEADLINE (50 * CTX_MSEC)

/* A last resort for calls made on the test's own thread. */
#define SUITE(name) TestSuite(name, .timeout = 30)
SUITE(read);
SUITE(write);
SUITE(recv);
SUITE(send);
SUITE(accept);
SUITE(connect);
SUITE(poll);
SUITE(sleep);
SUITE(wait);
SUITE(already_done);
SUITE(eintr);
SUITE(no_fds);
SUITE(shared_fd);
SUITE(null_context);
SUITE(errors);

/* ------------------------------------------------------------------------ */
/* Jobs: one blocking call on a worker thread */

enum op { OP_READ, OP_WRITE, OP_RECV, OP_SEND, OP_ACCEPT, OP_CONNECT, OP_POLL, OP_SLEEP, OP_WAIT };

static const char *const op_name[] = {"ctx_read",    "ctx_write",   "ctx_recv",
				      "ctx_send",    "ctx_accept",  "ctx_connect",
				      "ctx_poll",    "ctx_sleep",   "ctx_wait"};

struct job {
	enum op op;
	ctx_t *ctx;
	int fd;
	char buf[64];
	size_t len;           /* default 1 */
	const char *wbuf;     /* write/send: data (default buf) */
	int flags;            /* accept4 flags */
	struct sockaddr_storage addr;
	socklen_t addrlen;
	int64_t ns;           /* sleep */
	int timeout_ms;       /* poll; 0 means -1 */
	_Atomic pid_t tid;
	atomic_bool hold;     /* set before job_start(): wait for job_go() */
	atomic_bool entered, done;
	int statfd;           /* thread_stat_open() */
	pthread_t thread;
	ssize_t ret;          /* the call's return value */
	int err;              /* errno after it */
	int64_t t_call, t_ret;
};

static void *job_main(void *arg)
{
	struct job *j = arg;
	atomic_store(&j->tid, gettid());
	while (atomic_load(&j->hold))
		sched_yield();
	size_t len = j->len ? j->len : 1;
	const char *w = j->wbuf ? j->wbuf : j->buf;
	struct pollfd p = {.fd = j->fd, .events = POLLIN};
	j->t_call = now_ns();
	atomic_store(&j->entered, true);
	errno = 0;
	switch (j->op) {
	case OP_READ: j->ret = ctx_read(j->ctx, j->fd, j->buf, len); break;
	case OP_WRITE: j->ret = ctx_write(j->ctx, j->fd, w, len); break;
	case OP_RECV: j->ret = ctx_recv(j->ctx, j->fd, j->buf, len, 0); break;
	case OP_SEND: j->ret = ctx_send(j->ctx, j->fd, w, len, 0); break;
	case OP_ACCEPT:
		j->addrlen = sizeof(j->addr);
		j->ret = ctx_accept(j->ctx, j->fd, (struct sockaddr *)&j->addr, &j->addrlen, j->flags);
		break;
	case OP_CONNECT:
		j->ret = ctx_connect(j->ctx, j->fd, (struct sockaddr *)&j->addr, j->addrlen);
		break;
	case OP_POLL:
		j->ret = ctx_poll(j->ctx, &p, 1, j->timeout_ms ? j->timeout_ms : -1);
		break;
	case OP_SLEEP: j->ret = ctx_sleep(j->ctx, j->ns); break;
	case OP_WAIT: j->ret = ctx_wait(j->ctx); break;
	}
	j->err = errno;
	j->t_ret = now_ns();
	atomic_store(&j->done, true);
	return NULL;
}

/* Lets a held job make its call; with `blocked`, waits until it is asleep
 * in the kernel and asserts that the call has not returned. */
static void job_go(struct job *j, bool blocked)
{
	atomic_store(&j->hold, false);
	int64_t end = now_ns() + BOUND_MS * CTX_MSEC;
	while (!atomic_load(&j->entered) && now_ns() < end)
		sched_yield();
	cr_assert(atomic_load(&j->entered), "the job thread did not start");
	if (!blocked)
		return;
	cr_assert(thread_blocked_within(j->statfd, BOUND_MS), "%s did not block", op_name[j->op]);
	cr_assert_not(atomic_load(&j->done), "%s returned %zd (errno %d) instead of blocking",
		      op_name[j->op], j->ret, j->err);
}

/* Starts the job's thread.  Unless j->hold was set, the call goes ahead at
 * once, as with job_go(j, blocked). */
static void job_start(struct job *j, bool blocked)
{
	bool hold = atomic_load(&j->hold);
	atomic_store(&j->hold, true); /* until the stat fd is open */
	cr_assert_eq(pthread_create(&j->thread, NULL, job_main, j), 0);
	int64_t end = now_ns() + BOUND_MS * CTX_MSEC;
	while (!atomic_load(&j->tid) && now_ns() < end)
		sched_yield();
	cr_assert_neq(atomic_load(&j->tid), 0, "the job thread did not start");
	j->statfd = thread_stat_open(atomic_load(&j->tid));
	cr_assert_geq(j->statfd, 0);
	if (!hold)
		job_go(j, blocked);
}

static void job_join(struct job *j)
{
	cr_assert(joined_within(j->thread, BOUND_MS), "%s is still blocked after %d ms",
		  op_name[j->op], BOUND_MS);
	close(j->statfd);
}

/* ------------------------------------------------------------------------ */
/* Fixtures */

/* The context's deadline, in now_ns() terms. */
static int64_t deadline_of(ctx_t *ctx)
{
	struct timespec d;
	cr_assert(ctx_deadline(ctx, &d));
	return (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
}

static void set_nonblock(int fd, bool on)
{
	int fl = fcntl(fd, F_GETFL);
	cr_assert_geq(fl, 0);
	cr_assert_eq(fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK), 0);
}

static bool is_nonblock(int fd) { return fcntl(fd, F_GETFL) & O_NONBLOCK; }

static bool writable_within(int fd, int timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = POLLOUT};
	return poll(&p, 1, timeout_ms) == 1;
}

/* A loopback TCP listener on an ephemeral port; its address in *a. */
static int tcp_listener(int backlog, struct sockaddr_in *a)
{
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(l, 0);
	*a = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(*a);
	cr_assert_eq(bind(l, (struct sockaddr *)a, len), 0);
	cr_assert_eq(getsockname(l, (struct sockaddr *)a, &len), 0);
	cr_assert_eq(listen(l, backlog), 0);
	return l;
}

/* A listener on an abstract AF_UNIX address unique to this process. */
static int unix_listener(int backlog, struct sockaddr_un *a, socklen_t *alen)
{
	static int seq;
	int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(l, 0);
	*a = (struct sockaddr_un){.sun_family = AF_UNIX};
	int n = snprintf(a->sun_path + 1, sizeof(a->sun_path) - 1, "ctx-io-%d-%d", getpid(), seq++);
	*alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
	cr_assert_eq(bind(l, (struct sockaddr *)a, *alen), 0);
	cr_assert_eq(listen(l, backlog), 0);
	return l;
}

/* A situation in which `op` on rig.fd blocks. */
struct rig {
	int fd;
	int peer;     /* the other end of a pipe or socketpair, or -1 */
	int fill[2];  /* connect: sockets that fill the listener's backlog */
	int nfill;
	struct sockaddr_in addr; /* accept/connect: the listener's address */
};

/* Fills the accept queue of a listen(fd, 0) listener: once one connection
 * is established and not accepted, the kernel drops every new SYN, so a
 * connect stays EINPROGRESS (the client retries the SYN for minutes). */
static void fill_backlog(struct rig *r)
{
	int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	cr_assert_geq(c, 0);
	r->fill[r->nfill++] = c;
	int rc = connect(c, (struct sockaddr *)&r->addr, sizeof(r->addr));
	cr_assert(rc == 0 || errno == EINPROGRESS, "connect: %s", strerror(errno));
	cr_assert(writable_within(c, BOUND_MS), "the first connection did not complete");
	/* Check the claim: a second connect must stay in progress. */
	int probe = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	r->fill[r->nfill++] = probe;
	cr_assert_eq(connect(probe, (struct sockaddr *)&r->addr, sizeof(r->addr)), -1);
	cr_assert_eq(errno, EINPROGRESS);
	cr_assert_not(writable_within(probe, 20), "a full backlog admitted a connection");
}

static void rig_up(struct rig *r, enum op op, bool nonblock)
{
	*r = (struct rig){.fd = -1, .peer = -1};
	int two[2];
	switch (op) {
	case OP_READ:
	case OP_WRITE:
	case OP_POLL:
		cr_assert_eq(pipe2(two, O_CLOEXEC), 0);
		if (op == OP_WRITE) {
			r->fd = two[1], r->peer = two[0];
			cr_assert_geq(fcntl(r->fd, F_SETPIPE_SZ, 4096), 0);
			set_nonblock(r->fd, true);
			char page[4096] = {0};
			while (write(r->fd, page, sizeof(page)) > 0)
				;
			while (write(r->fd, page, 1) > 0)
				;
			cr_assert_eq(errno, EAGAIN);
		} else {
			r->fd = two[0], r->peer = two[1];
		}
		break;
	case OP_RECV:
	case OP_SEND:
		cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, two), 0);
		r->fd = two[0], r->peer = two[1];
		if (op == OP_SEND) {
			int small = 4096;
			setsockopt(r->fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
			char chunk[1024] = {0};
			while (send(r->fd, chunk, sizeof(chunk), MSG_DONTWAIT) > 0)
				;
			while (send(r->fd, chunk, 1, MSG_DONTWAIT) > 0)
				;
			cr_assert_eq(errno, EAGAIN);
		}
		break;
	case OP_ACCEPT:
		r->fd = tcp_listener(16, &r->addr);
		break;
	case OP_CONNECT:
		r->peer = tcp_listener(0, &r->addr);
		fill_backlog(r);
		r->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		cr_assert_geq(r->fd, 0);
		break;
	default:
		cr_assert_fail("no rig for %s", op_name[op]);
	}
	set_nonblock(r->fd, nonblock);
}

static void rig_down(struct rig *r)
{
	for (int i = 0; i < r->nfill; i++)
		close(r->fill[i]);
	if (r->peer >= 0)
		close(r->peer);
	close(r->fd);
}

static void job_on_rig(struct job *j, enum op op, ctx_t *ctx, struct rig *r)
{
	*j = (struct job){.op = op, .ctx = ctx, .fd = r->fd};
	if (op == OP_CONNECT) {
		memcpy(&j->addr, &r->addr, sizeof(r->addr));
		j->addrlen = sizeof(r->addr);
	}
}

/* `op` blocks on a blocking and on a non-blocking fd until another thread
 * cancels the context; then it fails with ECANCELED, restores the fd's
 * flags, and nothing leaks. */
static void check_wakes_on_cancel(enum op op)
{
	for (int nb = 0; nb <= 1; nb++) {
		int fds = open_fd_count();
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		struct rig r;
		rig_up(&r, op, nb);
		struct job j;
		job_on_rig(&j, op, ctx, &r);
		job_start(&j, true);
		cr_assert_eq(ctx_cancel(ctx), 0);
		job_join(&j);
		cr_assert_eq(j.ret, -1, "%s (%s fd) returned %zd", op_name[op],
			     nb ? "non-blocking" : "blocking", j.ret);
		cr_assert_eq(j.err, ECANCELED, "%s: errno %d", op_name[op], j.err);
		cr_assert_eq(is_nonblock(r.fd), (bool)nb, "%s changed the fd's flags", op_name[op]);
		rig_down(&r);
		ctx_unref(ctx);
		cr_assert_eq(open_fd_count(), fds, "%s leaked an fd", op_name[op]);
	}
}

/* `op` blocks until the context's deadline, not before, then fails with
 * ETIMEDOUT, on a blocking and on a non-blocking fd. */
static void check_ends_at_deadline(enum op op)
{
	for (int nb = 0; nb <= 1; nb++) {
		int fds = open_fd_count();
		struct rig r;
		rig_up(&r, op, nb);
		ctx_t *ctx = ctx_with_timeout(ctx_background(), DEADLINE);
		struct job j;
		job_on_rig(&j, op, ctx, &r);
		job_start(&j, false);
		job_join(&j);
		cr_assert_eq(j.ret, -1, "%s (%s fd) returned %zd", op_name[op],
			     nb ? "non-blocking" : "blocking", j.ret);
		cr_assert_eq(j.err, ETIMEDOUT, "%s: errno %d", op_name[op], j.err);
		cr_assert_geq(j.t_ret, deadline_of(ctx), "%s returned before the deadline",
			      op_name[op]);
		cr_assert_eq(is_nonblock(r.fd), (bool)nb, "%s changed the fd's flags", op_name[op]);
		rig_down(&r);
		ctx_unref(ctx);
		cr_assert_eq(open_fd_count(), fds, "%s leaked an fd", op_name[op]);
	}
}

/* ------------------------------------------------------------------------ */
/* Cancelled by another thread, ended by a deadline */

Test(read, wakes_when_cancelled_by_another_thread) { check_wakes_on_cancel(OP_READ); }
Test(read, ends_at_the_context_deadline) { check_ends_at_deadline(OP_READ); }
Test(write, wakes_when_cancelled_by_another_thread) { check_wakes_on_cancel(OP_WRITE); }
Test(write, ends_at_the_context_deadline) { check_ends_at_deadline(OP_WRITE); }
Test(recv, wakes_when_cancelled_by_another_thread) { check_wakes_on_cancel(OP_RECV); }
Test(recv, ends_at_the_context_deadline) { check_ends_at_deadline(OP_RECV); }
Test(send, wakes_when_cancelled_by_another_thread) { check_wakes_on_cancel(OP_SEND); }
Test(send, ends_at_the_context_deadline) { check_ends_at_deadline(OP_SEND); }
Test(accept, wakes_when_cancelled_by_another_thread) { check_wakes_on_cancel(OP_ACCEPT); }
Test(accept, ends_at_the_context_deadline) { check_ends_at_deadline(OP_ACCEPT); }
Test(connect, wakes_when_cancelled_by_another_thread_while_the_backlog_is_full)
{
	check_wakes_on_cancel(OP_CONNECT);
}
Test(connect, ends_at_the_context_deadline_while_the_backlog_is_full)
{
	check_ends_at_deadline(OP_CONNECT);
}
Test(poll, fails_with_ECANCELED_when_cancelled_by_another_thread)
{
	check_wakes_on_cancel(OP_POLL);
}
Test(poll, fails_with_ETIMEDOUT_when_the_context_deadline_comes_first)
{
	check_ends_at_deadline(OP_POLL);
}

Test(read, wakes_when_an_ancestor_is_cancelled)
{
	ctx_t *root = ctx_with_cancel(ctx_background());
	ctx_t *val = ctx_with_value(root, &root, NULL, NULL);
	ctx_t *leaf = ctx_with_cancel(val);
	struct rig r;
	rig_up(&r, OP_READ, false);
	struct job j;
	job_on_rig(&j, OP_READ, leaf, &r);
	job_start(&j, true);
	cr_assert_eq(ctx_cancel(root), 0);
	job_join(&j);
	cr_assert_eq(j.ret, -1);
	cr_assert_eq(j.err, ECANCELED);
	rig_down(&r);
	ctx_unref(leaf);
	ctx_unref(val);
	ctx_unref(root);
}

/* ------------------------------------------------------------------------ */
/* Data first */

Test(read, returns_data_already_present_without_creating_a_context_fd)
{
	for (int nb = 0; nb <= 1; nb++) {
		struct rig r;
		rig_up(&r, OP_READ, nb);
		cr_assert_eq(write(r.peer, "hello", 5), 5);
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		int fds = open_fd_count();
		char buf[16] = {0};
		cr_assert_eq(ctx_read(ctx, r.fd, buf, sizeof(buf)), 5);
		cr_assert_str_eq(buf, "hello");
		cr_assert_eq(open_fd_count(), fds, "the context got an fd it did not need");
		ctx_release(ctx);
		rig_down(&r);
	}
}

Test(recv, returns_data_already_present)
{
	for (int nb = 0; nb <= 1; nb++) {
		struct rig r;
		rig_up(&r, OP_RECV, nb);
		cr_assert_eq(send(r.peer, "hello", 5, 0), 5);
		ctx_t *ctx = ctx_with_timeout(ctx_background(), 10 * CTX_SEC);
		char buf[16] = {0};
		cr_assert_eq(ctx_recv(ctx, r.fd, buf, 3, 0), 3);
		cr_assert_str_eq(buf, "hel");
		cr_assert_eq(ctx_recv(ctx, r.fd, buf, sizeof(buf), 0), 2);
		ctx_release(ctx);
		rig_down(&r);
	}
}

Test(read, returns_data_written_while_it_waits)
{
	for (int nb = 0; nb <= 1; nb++) {
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		struct rig r;
		rig_up(&r, OP_READ, nb);
		struct job j;
		job_on_rig(&j, OP_READ, ctx, &r);
		j.len = sizeof(j.buf);
		job_start(&j, true);
		cr_assert_eq(write(r.peer, "late", 4), 4);
		job_join(&j);
		cr_assert_eq(j.ret, 4);
		cr_assert_arr_eq(j.buf, "late", 4);
		cr_assert_eq(ctx_err(ctx), 0);
		rig_down(&r);
		ctx_release(ctx);
	}
}

Test(read, returns_zero_at_end_of_file)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	close(r.peer);
	r.peer = -1;
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	char c;
	cr_assert_eq(ctx_read(ctx, r.fd, &c, 1), 0);
	ctx_release(ctx);
	rig_down(&r);
}

Test(read, reads_a_regular_file)
{
	char path[] = "/tmp/ctx-io-XXXXXX";
	int fd = mkstemp(path);
	cr_assert_geq(fd, 0);
	unlink(path);
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_write(ctx, fd, "on disk", 7), 7);
	cr_assert_eq(lseek(fd, 0, SEEK_SET), 0);
	char buf[16] = {0};
	cr_assert_eq(ctx_read(ctx, fd, buf, sizeof(buf)), 7);
	cr_assert_str_eq(buf, "on disk");
	ctx_release(ctx);
	close(fd);
}

Test(write, proceeds_when_the_reader_makes_room)
{
	for (int nb = 0; nb <= 1; nb++) {
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		struct rig r;
		rig_up(&r, OP_WRITE, nb);
		struct job j;
		job_on_rig(&j, OP_WRITE, ctx, &r);
		j.wbuf = "x";
		job_start(&j, true);
		char page[4096];
		cr_assert_gt(read(r.peer, page, sizeof(page)), 0);
		job_join(&j);
		cr_assert_eq(j.ret, 1);
		rig_down(&r);
		ctx_release(ctx);
	}
}

/* A blocking write(2) of more than the pipe holds would sleep in the kernel
 * until a reader drains it, out of the context's reach. */
Test(write, returns_a_short_count_instead_of_blocking_on_a_blocking_pipe)
{
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	cr_assert_geq(fcntl(p[1], F_SETPIPE_SZ, 4096), 0);
	static char big[1 << 16];
	struct job j = {.op = OP_WRITE, .ctx = ctx_with_cancel(ctx_background()), .fd = p[1]};
	j.wbuf = big;
	j.len = sizeof(big);
	job_start(&j, false);
	job_join(&j);
	cr_assert_gt(j.ret, 0);
	cr_assert_lt(j.ret, (ssize_t)sizeof(big));
	ctx_release(j.ctx);
	close(p[0]);
	close(p[1]);
}

Test(send, returns_a_short_count_instead_of_blocking_on_a_blocking_socket)
{
	int s[2];
	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s), 0);
	int small = 4096;
	setsockopt(s[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
	static char big[1 << 20];
	struct job j = {.op = OP_SEND, .ctx = ctx_with_cancel(ctx_background()), .fd = s[0]};
	j.wbuf = big;
	j.len = sizeof(big);
	job_start(&j, false);
	job_join(&j);
	cr_assert_gt(j.ret, 0);
	cr_assert_lt(j.ret, (ssize_t)sizeof(big));
	ctx_release(j.ctx);
	close(s[0]);
	close(s[1]);
}

/* ------------------------------------------------------------------------ */
/* A context already done fails at once without touching the fd */

static ctx_t *done_ctx(int how)
{
	if (how == 0) {
		ctx_t *c = ctx_with_cancel(ctx_background());
		ctx_cancel(c);
		return c;
	}
	return ctx_with_timeout(ctx_background(), 0); /* born done, ETIMEDOUT */
}

static int done_err(int how) { return how == 0 ? ECANCELED : ETIMEDOUT; }

Test(already_done, read_fails_at_once_and_leaves_the_data_in_the_pipe)
{
	for (int how = 0; how <= 1; how++) {
		struct rig r;
		rig_up(&r, OP_READ, false);
		cr_assert_eq(write(r.peer, "kept", 4), 4);
		ctx_t *ctx = done_ctx(how);
		char buf[8] = {0};
		errno = 0;
		cr_assert_eq(ctx_read(ctx, r.fd, buf, sizeof(buf)), -1);
		cr_assert_eq(errno, done_err(how));
		cr_assert_eq(read(r.fd, buf, sizeof(buf)), 4);
		cr_assert_arr_eq(buf, "kept", 4);
		ctx_unref(ctx);
		rig_down(&r);
	}
}

Test(already_done, write_and_send_fail_at_once_and_write_nothing)
{
	for (int how = 0; how <= 1; how++) {
		ctx_t *ctx = done_ctx(how);
		int p[2], s[2];
		cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
		cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s), 0);
		errno = 0;
		cr_assert_eq(ctx_write(ctx, p[1], "x", 1), -1);
		cr_assert_eq(errno, done_err(how));
		errno = 0;
		cr_assert_eq(ctx_send(ctx, s[0], "x", 1, 0), -1);
		cr_assert_eq(errno, done_err(how));
		cr_assert_not(readable_now(p[0]));
		cr_assert_not(readable_now(s[1]));
		close(p[0]), close(p[1]), close(s[0]), close(s[1]);
		ctx_unref(ctx);
	}
}

Test(already_done, recv_fails_at_once_and_leaves_the_data_queued)
{
	struct rig r;
	rig_up(&r, OP_RECV, true);
	cr_assert_eq(send(r.peer, "kept", 4, 0), 4);
	ctx_t *ctx = done_ctx(0);
	char buf[8];
	cr_assert_eq(ctx_recv(ctx, r.fd, buf, sizeof(buf), 0), -1);
	cr_assert_eq(errno, ECANCELED);
	cr_assert_eq(recv(r.fd, buf, sizeof(buf), 0), 4);
	ctx_unref(ctx);
	rig_down(&r);
}

Test(already_done, accept_fails_at_once_and_leaves_the_connection_pending)
{
	struct rig r;
	rig_up(&r, OP_ACCEPT, false);
	int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_eq(connect(c, (struct sockaddr *)&r.addr, sizeof(r.addr)), 0);
	ctx_t *ctx = done_ctx(1);
	cr_assert_eq(ctx_accept(ctx, r.fd, NULL, NULL, 0), -1);
	cr_assert_eq(errno, ETIMEDOUT);
	cr_assert(readable_within(r.fd, BOUND_MS), "the pending connection is gone");
	int a = accept4(r.fd, NULL, NULL, SOCK_CLOEXEC);
	cr_assert_geq(a, 0);
	close(a);
	close(c);
	ctx_unref(ctx);
	rig_down(&r);
}

Test(already_done, connect_fails_at_once_and_leaves_the_socket_alone)
{
	struct sockaddr_in a;
	int l = tcp_listener(16, &a);
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ctx_t *ctx = done_ctx(0);
	cr_assert_eq(ctx_connect(ctx, s, (struct sockaddr *)&a, sizeof(a)), -1);
	cr_assert_eq(errno, ECANCELED);
	struct sockaddr_in peer;
	socklen_t len = sizeof(peer);
	cr_assert_eq(getpeername(s, (struct sockaddr *)&peer, &len), -1);
	cr_assert_eq(errno, ENOTCONN);
	cr_assert_not(is_nonblock(s));
	cr_assert_not(readable_now(l), "a connection reached the listener");
	close(s);
	close(l);
	ctx_unref(ctx);
}

Test(already_done, poll_fails_at_once_without_polling)
{
	for (int how = 0; how <= 1; how++) {
		struct rig r;
		rig_up(&r, OP_READ, false);
		cr_assert_eq(write(r.peer, "x", 1), 1);
		ctx_t *ctx = done_ctx(how);
		struct pollfd p = {.fd = r.fd, .events = POLLIN, .revents = 0x7777};
		errno = 0;
		cr_assert_eq(ctx_poll(ctx, &p, 1, -1), -1);
		cr_assert_eq(errno, done_err(how));
		cr_assert_eq(p.revents, 0x7777, "the fds were polled");
		ctx_unref(ctx);
		rig_down(&r);
	}
}

Test(already_done, wait_and_sleep_return_the_err_at_once)
{
	for (int how = 0; how <= 1; how++) {
		ctx_t *ctx = done_ctx(how);
		int64_t t0 = now_ns();
		cr_assert_eq(ctx_wait(ctx), done_err(how));
		cr_assert_eq(ctx_sleep(ctx, 60 * CTX_SEC), done_err(how));
		cr_assert_eq(ctx_sleep(ctx, 0), done_err(how));
		cr_assert_lt(now_ns() - t0, BOUND_MS * CTX_MSEC);
		ctx_unref(ctx);
	}
}

/* ------------------------------------------------------------------------ */
/* ctx_poll */

Test(poll, returns_the_number_of_ready_entries_and_only_sets_revents)
{
	struct rig a, b, c;
	rig_up(&a, OP_READ, false);
	rig_up(&b, OP_READ, false);
	rig_up(&c, OP_READ, false);
	cr_assert_eq(write(a.peer, "a", 1), 1);
	cr_assert_eq(write(c.peer, "c", 1), 1);
	ctx_t *ctx = ctx_with_timeout(ctx_background(), 10 * CTX_SEC);
	struct pollfd p[4] = {{.fd = a.fd, .events = POLLIN},
			      {.fd = b.fd, .events = POLLIN},
			      {.fd = -1, .events = POLLIN, .revents = 0x10},
			      {.fd = c.fd, .events = POLLIN | POLLPRI}};
	cr_assert_eq(ctx_poll(ctx, p, 4, -1), 2);
	cr_assert_eq(p[0].revents, POLLIN);
	cr_assert_eq(p[1].revents, 0);
	cr_assert_eq(p[2].revents, 0);
	cr_assert_eq(p[3].revents, POLLIN);
	cr_assert(p[0].fd == a.fd && p[1].fd == b.fd && p[2].fd == -1 && p[3].fd == c.fd);
	cr_assert(p[0].events == POLLIN && p[3].events == (POLLIN | POLLPRI));
	ctx_release(ctx);
	rig_down(&a);
	rig_down(&b);
	rig_down(&c);
}

Test(poll, handles_a_set_too_large_for_the_stack)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	cr_assert_eq(write(r.peer, "x", 1), 1);
	enum { N = 300 };
	struct pollfd *p = calloc(N, sizeof(*p));
	for (int i = 0; i < N; i++)
		p[i] = (struct pollfd){.fd = i % 2 ? r.fd : r.peer, .events = POLLIN};
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_poll(ctx, p, N, -1), N / 2);
	for (int i = 0; i < N; i++)
		cr_assert_eq(p[i].revents, i % 2 ? POLLIN : 0);
	/* The same with the copy's allocation failing. */
	atomic_store(&ctxi_fail_allocs, 1);
	errno = 0;
	int rc = ctx_poll(ctx, p, N, -1);
	int e = errno;
	atomic_store(&ctxi_fail_allocs, 0);
	cr_assert_eq(rc, -1);
	cr_assert_eq(e, ENOMEM);
	ctx_release(ctx);
	free(p);
	rig_down(&r);
}

Test(poll, returns_zero_when_its_own_timeout_elapses)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	ctx_t *ctx = ctx_with_timeout(ctx_background(), 10 * CTX_SEC);
	struct pollfd p = {.fd = r.fd, .events = POLLIN};
	int64_t t0 = now_ns();
	cr_assert_eq(ctx_poll(ctx, &p, 1, 30), 0);
	int64_t took = now_ns() - t0;
	cr_assert_geq(took, 30 * CTX_MSEC, "returned after %lld ns", (long long)took);
	cr_assert_lt(took, BOUND_MS * CTX_MSEC);
	cr_assert_eq(p.revents, 0);
	cr_assert_eq(ctx_poll(ctx, NULL, 0, 0), 0);
	ctx_release(ctx);
	rig_down(&r);
}

Test(poll, with_a_zero_timeout_polls_once_without_creating_a_context_fd)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	int fds = open_fd_count();
	struct pollfd p = {.fd = r.fd, .events = POLLIN};
	cr_assert_eq(ctx_poll(ctx, &p, 1, 0), 0);
	cr_assert_eq(write(r.peer, "x", 1), 1);
	cr_assert_eq(ctx_poll(ctx, &p, 1, 0), 1);
	cr_assert_eq(p.revents, POLLIN);
	cr_assert_eq(open_fd_count(), fds, "the context got an fd it did not need");
	ctx_cancel(ctx);
	cr_assert_eq(ctx_poll(ctx, &p, 1, 0), -1, "a done context fails even with timeout 0");
	cr_assert_eq(errno, ECANCELED);
	ctx_unref(ctx);
	rig_down(&r);
}

Test(poll, returns_the_ready_entry_when_it_comes_before_the_cancel)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct rig r;
	rig_up(&r, OP_READ, false);
	struct job j;
	job_on_rig(&j, OP_POLL, ctx, &r);
	job_start(&j, true);
	cr_assert_eq(write(r.peer, "x", 1), 1);
	job_join(&j);
	cr_assert_eq(j.ret, 1);
	ctx_release(ctx);
	rig_down(&r);
}

/* ------------------------------------------------------------------------ */
/* ctx_accept and ctx_connect over loopback */

Test(accept, returns_a_connection_made_while_it_waits)
{
	for (int nb = 0; nb <= 1; nb++) {
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		struct rig r;
		rig_up(&r, OP_ACCEPT, nb);
		struct job j;
		job_on_rig(&j, OP_ACCEPT, ctx, &r);
		j.flags = SOCK_NONBLOCK | SOCK_CLOEXEC;
		job_start(&j, true);
		int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		cr_assert_eq(connect(c, (struct sockaddr *)&r.addr, sizeof(r.addr)), 0);
		job_join(&j);
		cr_assert_geq(j.ret, 0, "errno %d", j.err);
		int a = (int)j.ret;
		cr_assert(is_nonblock(a), "SOCK_NONBLOCK was not applied");
		cr_assert(fcntl(a, F_GETFD) & FD_CLOEXEC, "SOCK_CLOEXEC was not applied");
		cr_assert_eq(((struct sockaddr_in *)&j.addr)->sin_family, AF_INET);
		cr_assert_eq(j.addrlen, sizeof(struct sockaddr_in));
		cr_assert_eq(send(c, "hi", 2, 0), 2);
		char buf[2];
		cr_assert_eq(ctx_recv(ctx, a, buf, 2, MSG_WAITALL), 2);
		close(a);
		close(c);
		rig_down(&r);
		ctx_release(ctx);
	}
}

Test(accept, bad_flags_fail_at_once_before_any_wait)
{
	struct sockaddr_in a;
	int l = tcp_listener(16, &a);
	ctx_t *ctx = ctx_with_timeout(ctx_background(), 2 * CTX_SEC);
	int64_t t0 = now_ns();
	int rc = ctx_accept(ctx, l, NULL, NULL, 0x40000000);
	int e = errno;
	int64_t took = now_ns() - t0;
	cr_assert_eq(rc, -1);
	cr_assert_eq(e, EINVAL, "errno %d after %lld ms", e, (long long)(took / CTX_MSEC));
	cr_assert_lt(took, CTX_SEC, "bad flags waited for a connection");
	ctx_release(ctx);
	close(l);
}

Test(connect, completes_over_loopback_and_keeps_the_socket_mode)
{
	for (int nb = 0; nb <= 1; nb++) {
		struct sockaddr_in a;
		int l = tcp_listener(16, &a);
		int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nb ? SOCK_NONBLOCK : 0), 0);
		ctx_t *ctx = ctx_with_timeout(ctx_background(), 10 * CTX_SEC);
		cr_assert_eq(ctx_connect(ctx, s, (struct sockaddr *)&a, sizeof(a)), 0,
			     "errno %d", errno);
		cr_assert_eq(is_nonblock(s), (bool)nb);
		int acc = ctx_accept(ctx, l, NULL, NULL, SOCK_CLOEXEC);
		cr_assert_geq(acc, 0);
		cr_assert_eq(ctx_send(ctx, s, "ping", 4, 0), 4);
		char buf[4];
		cr_assert_eq(ctx_recv(ctx, acc, buf, 4, MSG_WAITALL), 4);
		cr_assert_arr_eq(buf, "ping", 4);
		close(acc);
		close(s);
		close(l);
		ctx_release(ctx);
	}
}

Test(connect, reports_a_refused_connection)
{
	/* A port that was bound but never listened on refuses connections. */
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int holder = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	socklen_t len = sizeof(a);
	cr_assert_eq(bind(holder, (struct sockaddr *)&a, len), 0);
	cr_assert_eq(getsockname(holder, (struct sockaddr *)&a, &len), 0);
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	errno = 0;
	cr_assert_eq(ctx_connect(ctx, s, (struct sockaddr *)&a, sizeof(a)), -1);
	cr_assert_eq(errno, ECONNREFUSED);
	cr_assert_not(is_nonblock(s));
	close(s);
	close(holder);
	ctx_release(ctx);
}

/* A blocking AF_UNIX connect waits for room in a full backlog, where a
 * non-blocking one fails with EAGAIN; ctx_connect waits in both modes. */
Test(connect, waits_for_room_in_a_full_unix_backlog)
{
	for (int nb = 0; nb <= 1; nb++) {
		struct sockaddr_un ua;
		socklen_t ualen;
		int l = unix_listener(0, &ua, &ualen);
		int first = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		cr_assert_eq(connect(first, (struct sockaddr *)&ua, ualen), 0);
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		struct job j = {.op = OP_CONNECT, .ctx = ctx, .addrlen = ualen};
		memcpy(&j.addr, &ua, ualen);
		j.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nb ? SOCK_NONBLOCK : 0), 0);
		job_start(&j, true);
		int a = accept4(l, NULL, NULL, SOCK_CLOEXEC); /* makes room */
		cr_assert_geq(a, 0);
		job_join(&j);
		cr_assert_eq(j.ret, 0, "errno %d", j.err);
		cr_assert_eq(is_nonblock(j.fd), (bool)nb);
		close(a);
		close(j.fd);
		close(first);
		close(l);
		ctx_release(ctx);
	}
}

Test(connect, gives_up_on_a_full_unix_backlog_at_the_deadline)
{
	struct sockaddr_un ua;
	socklen_t ualen;
	int l = unix_listener(0, &ua, &ualen);
	int first = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_eq(connect(first, (struct sockaddr *)&ua, ualen), 0);
	ctx_t *ctx = ctx_with_timeout(ctx_background(), DEADLINE);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	errno = 0;
	cr_assert_eq(ctx_connect(ctx, s, (struct sockaddr *)&ua, ualen), -1);
	cr_assert_eq(errno, ETIMEDOUT);
	cr_assert_geq(now_ns(), deadline_of(ctx), "returned before the deadline");
	cr_assert_not(is_nonblock(s));
	close(s);
	close(first);
	close(l);
	ctx_release(ctx);
}

/* ------------------------------------------------------------------------ */
/* ctx_sleep and ctx_wait */

Test(sleep, returns_zero_after_the_time_has_elapsed)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	int64_t t0 = now_ns();
	cr_assert_eq(ctx_sleep(ctx, 30 * CTX_MSEC), 0);
	int64_t took = now_ns() - t0;
	cr_assert_geq(took, 30 * CTX_MSEC, "returned after %lld ns", (long long)took);
	cr_assert_lt(took, BOUND_MS * CTX_MSEC);
	cr_assert_eq(ctx_sleep(ctx_background(), CTX_MSEC), 0);
	cr_assert_eq(ctx_sleep(ctx, 0), 0);
	cr_assert_eq(ctx_sleep(ctx, -1), 0);
	ctx_release(ctx);
}

Test(sleep, never_returns_early)
{
	ctx_t *ctx = ctx_with_timeout(ctx_background(), 60 * CTX_SEC);
	static const int64_t ns[] = {1, 1000, 50 * CTX_USEC, 333 * CTX_USEC, CTX_MSEC,
				     2500 * CTX_USEC, 7 * CTX_MSEC};
	for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
		int64_t t0 = now_ns();
		cr_assert_eq(ctx_sleep(ctx, ns[i]), 0);
		int64_t took = now_ns() - t0;
		cr_assert_geq(took, ns[i], "ctx_sleep(%lld) returned after %lld ns",
			      (long long)ns[i], (long long)took);
	}
	ctx_release(ctx);
}

Test(sleep, returns_ECANCELED_when_cancelled_by_another_thread)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct job j = {.op = OP_SLEEP, .ctx = ctx, .ns = 60 * CTX_SEC};
	job_start(&j, true);
	cr_assert_eq(ctx_cancel(ctx), 0);
	job_join(&j);
	cr_assert_eq(j.ret, ECANCELED);
	ctx_unref(ctx);
}

Test(sleep, returns_ETIMEDOUT_when_the_deadline_comes_first)
{
	ctx_t *ctx = ctx_with_timeout(ctx_background(), DEADLINE);
	int64_t t0 = now_ns();
	cr_assert_eq(ctx_sleep(ctx, 60 * CTX_SEC), ETIMEDOUT);
	int64_t now = now_ns();
	cr_assert_geq(now, deadline_of(ctx), "returned before the deadline");
	cr_assert_lt(now - t0, BOUND_MS * CTX_MSEC);
	ctx_release(ctx);
}

Test(wait, returns_ECANCELED_when_cancelled_by_another_thread)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct job j = {.op = OP_WAIT, .ctx = ctx};
	job_start(&j, true);
	cr_assert_eq(ctx_cancel(ctx), 0);
	job_join(&j);
	cr_assert_eq(j.ret, ECANCELED);
	ctx_unref(ctx);
}

Test(wait, returns_ETIMEDOUT_at_the_deadline_and_not_before)
{
	ctx_t *ctx = ctx_with_timeout(ctx_background(), DEADLINE);
	cr_assert_eq(ctx_wait(ctx), ETIMEDOUT);
	cr_assert_geq(now_ns(), deadline_of(ctx));
	ctx_release(ctx);
}

Test(wait, returns_the_err_of_the_ancestor_that_was_cancelled)
{
	ctx_t *root = ctx_with_cancel(ctx_background());
	ctx_t *val = ctx_with_value(root, &root, NULL, NULL);
	struct job j = {.op = OP_WAIT, .ctx = val};
	job_start(&j, true);
	cr_assert_eq(ctx_cancel_cause(root, EPIPE), 0);
	job_join(&j);
	cr_assert_eq(j.ret, ECANCELED);
	ctx_unref(val);
	ctx_unref(root);
}

/* ------------------------------------------------------------------------ */
/* EINTR: a signal handler installed without SA_RESTART */

static _Atomic pid_t signalled_tid;

static void on_usr1(int sig)
{
	(void)sig;
	atomic_store(&signalled_tid, gettid());
}

static void install_usr1(void)
{
	struct sigaction sa = {.sa_handler = on_usr1}; /* no SA_RESTART */
	sigemptyset(&sa.sa_mask);
	cr_assert_eq(sigaction(SIGUSR1, &sa, NULL), 0);
}

/* Interrupts the blocked job with SIGUSR1 and waits, bounded, until its
 * handler has run and the job is blocked again. */
static void interrupt(struct job *j)
{
	cr_assert_eq(pthread_kill(j->thread, SIGUSR1), 0);
	int64_t end = now_ns() + BOUND_MS * CTX_MSEC;
	while (atomic_load(&signalled_tid) != atomic_load(&j->tid) && now_ns() < end)
		sched_yield();
	cr_assert_eq(atomic_load(&signalled_tid), atomic_load(&j->tid), "the handler did not run");
	cr_assert(thread_blocked_within(j->statfd, BOUND_MS));
}

Test(eintr, read_keeps_waiting_through_a_signal_and_returns_data_written_afterwards)
{
	install_usr1();
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct rig r;
	rig_up(&r, OP_READ, false);
	struct job j;
	job_on_rig(&j, OP_READ, ctx, &r);
	j.len = sizeof(j.buf);
	job_start(&j, true);
	interrupt(&j);
	cr_assert_not(atomic_load(&j.done), "ctx_read returned %zd, errno %d, on a signal", j.ret,
		      j.err);
	cr_assert_eq(write(r.peer, "after", 5), 5);
	job_join(&j);
	cr_assert_eq(j.ret, 5);
	cr_assert_arr_eq(j.buf, "after", 5);
	rig_down(&r);
	ctx_release(ctx);
}

Test(eintr, sleep_is_not_shortened_by_a_signal)
{
	install_usr1();
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct job j = {.op = OP_SLEEP, .ctx = ctx, .ns = 200 * CTX_MSEC};
	job_start(&j, true);
	interrupt(&j);
	job_join(&j);
	cr_assert_eq(j.ret, 0);
	cr_assert_geq(j.t_ret - j.t_call, 200 * CTX_MSEC);
	ctx_release(ctx);
}

Test(eintr, poll_keeps_waiting_through_a_signal_until_the_cancel)
{
	install_usr1();
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct rig r;
	rig_up(&r, OP_READ, false);
	struct job j;
	job_on_rig(&j, OP_POLL, ctx, &r);
	job_start(&j, true);
	interrupt(&j);
	cr_assert_not(atomic_load(&j.done));
	cr_assert_eq(ctx_cancel(ctx), 0);
	job_join(&j);
	cr_assert_eq(j.ret, -1);
	cr_assert_eq(j.err, ECANCELED);
	rig_down(&r);
	ctx_unref(ctx);
}

/* ------------------------------------------------------------------------ */
/* Out of fds: ctx_fd() fails with EMFILE */

struct fd_famine {
	struct rlimit saved;
	int fill[64];
	int nfill;
};

/* Lowers RLIMIT_NOFILE to the number of open fds and fills any hole below
 * it, so that the next fd fails with EMFILE.  Criterion runs each test in its
 * own process, so the other tests never see this. */
static void starve_fds(struct fd_famine *f)
{
	f->nfill = 0;
	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &f->saved), 0);
	struct rlimit low = {.rlim_cur = (rlim_t)open_fd_count(), .rlim_max = f->saved.rlim_max};
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
	int fd;
	while (f->nfill < 64 && (fd = dup(2)) >= 0)
		f->fill[f->nfill++] = fd;
	cr_assert_eq(errno, EMFILE);
}

static void feed_fds(struct fd_famine *f)
{
	for (int i = 0; i < f->nfill; i++)
		close(f->fill[i]);
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &f->saved), 0);
}

Test(no_fds, wait_wakes_when_cancelled_by_another_thread)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct job j = {.op = OP_WAIT, .ctx = ctx, .hold = true};
	job_start(&j, true);
	struct fd_famine f;
	starve_fds(&f);
	cr_assert_eq(ctx_fd(ctx), -1);
	cr_assert_eq(errno, EMFILE);
	job_go(&j, true);
	cr_assert_eq(ctx_cancel(ctx), 0);
	job_join(&j);
	cr_assert_eq(j.ret, ECANCELED);
	feed_fds(&f);
	ctx_unref(ctx);
}

Test(no_fds, wait_ends_at_the_deadline)
{
	ctx_t *ctx = ctx_with_timeout(ctx_background(), DEADLINE);
	int64_t deadline = deadline_of(ctx);
	struct fd_famine f;
	starve_fds(&f);
	cr_assert_eq(ctx_fd(ctx), -1);
	cr_assert_eq(ctx_wait(ctx), ETIMEDOUT);
	int64_t now = now_ns();
	feed_fds(&f);
	cr_assert_geq(now, deadline);
	ctx_release(ctx);
}

Test(no_fds, sleep_returns_zero_after_the_time_and_the_err_when_cancelled)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct job j = {.op = OP_SLEEP, .ctx = ctx, .ns = 60 * CTX_SEC, .hold = true};
	job_start(&j, true);
	struct fd_famine f;
	starve_fds(&f);
	int64_t t0 = now_ns();
	int rc = ctx_sleep(ctx, 30 * CTX_MSEC);
	int64_t took = now_ns() - t0;
	job_go(&j, true);
	cr_assert_eq(ctx_cancel(ctx), 0);
	job_join(&j);
	feed_fds(&f);
	cr_assert_eq(rc, 0);
	cr_assert_geq(took, 30 * CTX_MSEC);
	cr_assert_eq(j.ret, ECANCELED);
	ctx_unref(ctx);
}

Test(no_fds, io_calls_fail_with_EMFILE_but_data_already_present_is_returned)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	struct sockaddr_in a;
	int l = tcp_listener(16, &a);
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct fd_famine f;
	starve_fds(&f);
	char buf[8];
	int e[4];
	ssize_t rc[4];
	rc[0] = ctx_read(ctx, r.fd, buf, sizeof(buf)), e[0] = errno;
	struct pollfd p = {.fd = r.fd, .events = POLLIN};
	rc[1] = ctx_poll(ctx, &p, 1, -1), e[1] = errno;
	/* A connect is under way before it may have to wait: it waits
	 * without the context's fd rather than fail half done. */
	rc[2] = ctx_connect(ctx, s, (struct sockaddr *)&a, sizeof(a)), e[2] = errno;
	rc[3] = write(r.peer, "x", 1);
	ssize_t got = ctx_read(ctx, r.fd, buf, sizeof(buf));
	feed_fds(&f);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(rc[i], -1, "call %d returned %zd", i, rc[i]);
		cr_assert_eq(e[i], EMFILE, "call %d: errno %d", i, e[i]);
	}
	cr_assert_eq(rc[2], 0, "connect over loopback: errno %d", e[2]);
	cr_assert_not(is_nonblock(s));
	cr_assert_eq(rc[3], 1);
	cr_assert_eq(got, 1, "data present: %zd", got);
	close(s);
	close(l);
	rig_down(&r);
	ctx_release(ctx);
}

Test(no_fds, connect_that_completes_at_once_needs_no_fd)
{
	/* An AF_UNIX listener with room completes a connect at once: out
	 * of fds, that must succeed, for any context. */
	struct sockaddr_un ua;
	socklen_t ualen;
	int l = unix_listener(16, &ua, &ualen);
	ctx_t *ctxs[] = {ctx_background(), ctx_with_cancel(ctx_background()),
			 ctx_with_timeout(ctx_background(), 3600 * CTX_SEC)};
	int s[3];
	for (int i = 0; i < 3; i++) {
		s[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		cr_assert_geq(s[i], 0);
	}
	struct fd_famine f;
	starve_fds(&f);
	int rc[3], e[3];
	for (int i = 0; i < 3; i++)
		rc[i] = ctx_connect(ctxs[i], s[i], (struct sockaddr *)&ua, ualen), e[i] = errno;
	feed_fds(&f);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(rc[i], 0, "context %d: errno %d", i, e[i]);
		cr_assert_not(is_nonblock(s[i]));
		struct sockaddr_un peer;
		socklen_t plen = sizeof(peer);
		cr_assert_eq(getpeername(s[i], (struct sockaddr *)&peer, &plen), 0);
		close(s[i]);
		ctx_release(ctxs[i]);
	}
	close(l);
}

Test(no_fds, connect_that_must_wait_ends_when_cancelled_and_at_the_deadline)
{
	/* A full backlog keeps a TCP connect in progress; out of fds, the
	 * wait goes on without the context's fd and still ends with it. */
	for (int timed = 0; timed <= 1; timed++) {
		struct rig r;
		rig_up(&r, OP_CONNECT, false);
		ctx_t *ctx = timed ? ctx_with_timeout(ctx_background(), DEADLINE)
				   : ctx_with_cancel(ctx_background());
		int64_t deadline = timed ? deadline_of(ctx) : 0;
		struct job j;
		job_on_rig(&j, OP_CONNECT, ctx, &r);
		j.hold = true;
		job_start(&j, true);
		struct fd_famine f;
		starve_fds(&f);
		cr_assert_eq(ctx_fd(ctx), -1);
		job_go(&j, true);
		if (!timed)
			cr_assert_eq(ctx_cancel(ctx), 0);
		job_join(&j);
		feed_fds(&f);
		cr_assert_eq(j.ret, -1);
		cr_assert_eq(j.err, timed ? ETIMEDOUT : ECANCELED, "errno %d", j.err);
		cr_assert_geq(j.t_ret, deadline);
		cr_assert_not(is_nonblock(r.fd));
		rig_down(&r);
		ctx_release(ctx);
	}
}

Test(no_fds, poll_returns_entries_that_are_ready_at_once)
{
	/* ctx.h: out of fds, a call that can proceed at once succeeds. */
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	cr_assert_eq(write(p[1], "x", 1), 1);
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	struct fd_famine f;
	starve_fds(&f);
	struct pollfd pf[2] = {{.fd = p[0], .events = POLLIN}, {.fd = p[1], .events = POLLIN}};
	int rc[3], e[3];
	errno = 0;
	rc[0] = ctx_poll(ctx, pf, 2, -1), e[0] = errno;
	short rev0 = pf[0].revents, rev1 = pf[1].revents;
	errno = 0;
	rc[1] = ctx_poll(ctx_background(), pf, 1, 1000), e[1] = errno; /* no never-fd yet */
	pf[0].fd = p[1]; /* nothing to read on the write end: must wait, and cannot */
	errno = 0;
	rc[2] = ctx_poll(ctx, pf, 1, 1000), e[2] = errno;
	feed_fds(&f);
	cr_assert_eq(rc[0], 1, "ctx_poll returned %d, errno %d", rc[0], e[0]);
	cr_assert(rev0 & POLLIN);
	cr_assert_eq(rev1, 0);
	cr_assert_eq(rc[1], 1, "ctx_poll(background) returned %d, errno %d", rc[1], e[1]);
	cr_assert_eq(rc[2], -1);
	cr_assert_eq(e[2], EMFILE);
	close(p[0]);
	close(p[1]);
	ctx_release(ctx);
}

Test(no_fds, a_context_that_can_never_be_done_needs_no_fd_to_wait)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	struct job j = {.op = OP_READ, .ctx = ctx_background(), .fd = r.fd, .hold = true};
	job_start(&j, true);
	struct fd_famine f;
	starve_fds(&f); /* before the shared never-fd exists */
	job_go(&j, true);
	cr_assert_eq(write(r.peer, "y", 1), 1);
	job_join(&j);
	feed_fds(&f);
	cr_assert_eq(j.ret, 1, "ctx_read returned %zd, errno %d", j.ret, j.err);
	rig_down(&r);
}

/* ------------------------------------------------------------------------ */
/* A context fd shared with a forked process (README, "fork"): the other
 * process's cancel makes it readable while ctx_err() here says 0.  The calls
 * must still honour their own timeouts, block without spinning, and end on a
 * cancel or deadline of this process. */

static void cancel_in_a_forked_child(ctx_t *ctx)
{
	int fd = ctx_fd(ctx);
	cr_assert_geq(fd, 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		ctx_cancel(ctx);
		_exit(0);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(readable_now(fd));
	cr_assert_eq(ctx_err(ctx), 0);
}

static int64_t cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;
}

Test(shared_fd, sleep_and_poll_end_at_their_own_time_without_spinning)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	cancel_in_a_forked_child(ctx);
	struct job j[2] = {{.op = OP_SLEEP, .ctx = ctx, .ns = 100 * CTX_MSEC},
			   {.op = OP_POLL, .ctx = ctx, .fd = r.fd, .timeout_ms = 100}};
	for (int i = 0; i < 2; i++) {
		int64_t cpu0 = cpu_ns();
		job_start(&j[i], false);
		job_join(&j[i]);
		int64_t cpu = cpu_ns() - cpu0;
		cr_assert_eq(j[i].ret, 0, "%s returned %zd (errno %d)", op_name[j[i].op], j[i].ret,
			     j[i].err);
		cr_assert_geq(j[i].t_ret - j[i].t_call, 100 * CTX_MSEC);
		cr_assert_lt(cpu, 50 * CTX_MSEC, "%s spun: %lld ns of CPU", op_name[j[i].op],
			     (long long)cpu);
	}
	ctx_release(ctx);
	rig_down(&r);
}

Test(shared_fd, waits_block_and_end_on_a_cancel_here)
{
	enum op ops[] = {OP_WAIT, OP_READ, OP_POLL};
	for (int i = 0; i < 3; i++) {
		struct rig r;
		rig_up(&r, OP_READ, false);
		ctx_t *ctx = ctx_with_cancel(ctx_background());
		cancel_in_a_forked_child(ctx);
		struct job j = {.op = ops[i], .ctx = ctx, .fd = r.fd};
		job_start(&j, true); /* asleep in the kernel, not spinning */
		cr_assert_eq(ctx_cancel(ctx), 0);
		job_join(&j);
		if (ops[i] == OP_WAIT) {
			cr_assert_eq(j.ret, ECANCELED);
		} else {
			cr_assert_eq(j.ret, -1, "%s returned %zd", op_name[ops[i]], j.ret);
			cr_assert_eq(j.err, ECANCELED);
		}
		ctx_release(ctx);
		rig_down(&r);
	}
}

Test(shared_fd, read_ends_at_the_context_deadline)
{
	struct rig r;
	rig_up(&r, OP_READ, false);
	ctx_t *ctx = ctx_with_timeout(ctx_background(), 300 * CTX_MSEC);
	int64_t deadline = deadline_of(ctx);
	cancel_in_a_forked_child(ctx);
	struct job j = {.op = OP_READ, .ctx = ctx, .fd = r.fd};
	job_start(&j, true);
	job_join(&j);
	cr_assert_eq(j.ret, -1);
	cr_assert_eq(j.err, ETIMEDOUT);
	cr_assert_geq(j.t_ret, deadline);
	ctx_release(ctx);
	rig_down(&r);
}

/* ------------------------------------------------------------------------ */
/* NULL */

Test(null_context, gives_EINVAL_everywhere)
{
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	cr_assert_eq(write(p[1], "x", 1), 1);
	char c;
	struct pollfd pf = {.fd = p[0], .events = POLLIN};
	struct sockaddr_in a = {.sin_family = AF_INET};
	cr_assert_eq(ctx_wait(NULL), EINVAL);
	cr_assert_eq(ctx_sleep(NULL, CTX_MSEC), EINVAL);
	cr_assert_eq(ctx_sleep(NULL, 0), EINVAL);
#define EXPECT_EINVAL(call)                                                                        \
	do {                                                                                       \
		errno = 0;                                                                         \
		cr_assert_eq((call), -1, #call);                                                   \
		cr_assert_eq(errno, EINVAL, #call);                                                \
	} while (0)
	EXPECT_EINVAL(ctx_poll(NULL, &pf, 1, 0));
	EXPECT_EINVAL(ctx_read(NULL, p[0], &c, 1));
	EXPECT_EINVAL(ctx_write(NULL, p[1], &c, 1));
	EXPECT_EINVAL(ctx_recv(NULL, p[0], &c, 1, 0));
	EXPECT_EINVAL(ctx_send(NULL, p[1], &c, 1, 0));
	EXPECT_EINVAL(ctx_accept(NULL, p[0], NULL, NULL, 0));
	EXPECT_EINVAL(ctx_connect(NULL, p[0], (struct sockaddr *)&a, sizeof(a)));
#undef EXPECT_EINVAL
	cr_assert(readable_now(p[0]), "a call with a NULL context touched the fd");
	close(p[0]);
	close(p[1]);
}

Test(errors, the_system_calls_own_errors_come_through)
{
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	char c;
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	errno = 0;
	cr_assert_eq(ctx_read(ctx, -1, &c, 1), -1);
	cr_assert_eq(errno, EBADF);
	errno = 0;
	cr_assert_eq(ctx_accept(ctx, -1, NULL, NULL, 0), -1);
	cr_assert_eq(errno, EBADF);
	errno = 0;
	cr_assert_eq(ctx_recv(ctx, p[0], &c, 1, 0), -1);
	cr_assert_eq(errno, ENOTSOCK);
	cr_assert_eq(write(p[1], "x", 1), 1); /* so that the pipe polls ready */
	errno = 0;
	cr_assert_eq(ctx_accept(ctx, p[0], NULL, NULL, 0), -1, "accept on a pipe");
	cr_assert_eq(errno, ENOTSOCK);
	close(p[0]);
	close(p[1]);
	ctx_release(ctx);
}
