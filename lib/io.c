/*
 * Waiting and cancellable I/O: ctx_wait, ctx_sleep, ctx_poll and the
 * system-call wrappers.
 *
 * Every call waits in ppoll on the caller's fd next to the context's fd, never
 * inside the system call: a thread blocked in read() is out of the context's
 * reach, a thread blocked in ppoll is not.  read, write, recv and send first
 * try the operation without blocking, so one that can proceed at once costs
 * one system call and never creates the context's fd.
 *
 * The non-blocking attempt works on blocking fds too: MSG_DONTWAIT for
 * recv/send, RWF_NOWAIT (preadv2/pwritev2) for read/write.  On kernel 6.18
 * RWF_NOWAIT works on pipe(2) pipes, sockets, eventfds and timerfds (a write
 * returns a short count instead of blocking) but fails with EOPNOTSUPP on
 * ptys and named FIFOs: there the call polls, then makes the plain call, so a
 * blocking write larger than the free space can still block in the kernel.
 * Regular files are ready to poll yet may refuse RWF_NOWAIT (EAGAIN on a
 * page-cache miss, EOPNOTSUPP for ext4 writes); they get the plain call at
 * once.
 */
#include "internal.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>

static int fail(int err)
{
	errno = err;
	return -1;
}

/* ppoll until CLOCK_MONOTONIC reaches `until` (CTXI_NEVER: no limit),
 * retrying EINTR with the time left so that a signal never shortens it. */
static int poll_until(struct pollfd *p, nfds_t n, int64_t until)
{
	for (;;) {
		struct timespec ts, *tp = NULL;
		if (until != CTXI_NEVER) {
			int64_t left = until - ctxi_now();
			ts = ctxi_ts(left > 0 ? left : 0);
			tp = &ts;
		}
		int r = ppoll(p, n, tp, NULL);
		if (r >= 0 || errno != EINTR)
			return r;
	}
}

/*
 * A context fd that polls readable while ctx_err() says 0 is an open file
 * shared with another process (inherited across fork(), README "fork")
 * whose cancel made it readable: it stays readable, and polling it again
 * would return at once, forever.  The calls then wait without it:
 * ctx_wait() and ctx_sleep() on the fd-less futex (lib/wait.c), the others
 * in slices of SHARED_SLICE, looking at the context between them and waking
 * at its deadline.
 */
#define SHARED_SLICE (10 * CTX_MSEC)

/* The context's fd for a poll set, or -1 with errno (out of fds).  A context
 * that can never be done needs none: if even the shared never-readable fd
 * cannot be made, *none is set and the entry gets fd -1, which poll
 * ignores. */
static int poll_fd(ctx_t *ctx, bool *none)
{
	int cfd = ctx_fd(ctx);
	*none = cfd < 0 && !ctxi_anchor(ctx);
	return cfd;
}

/* Polls p[0..n-1] next to the context's entry p[n] until CLOCK_MONOTONIC
 * reaches `until` (CTXI_NEVER: no limit).  Returns the number of ready
 * entries among p[0..n-1] (a tie goes to them: their readiness is real), 0
 * at `until`, or -1 with errno: the context's err (*done set) if it is done
 * first, or poll's own. */
static int poll_ctx(ctx_t *ctx, struct pollfd *p, nfds_t n, int64_t until, bool *done)
{
	/* p[n] was readable while not done (see SHARED_SLICE), or there was
	 * no fd for a context that can be done (ctx_connect out of fds):
	 * wait without it, in slices. */
	struct ctxi_cancel *a = ctxi_anchor(ctx);
	int64_t deadline = a && a->base.kind == CTXI_TIMED ? ((struct ctxi_timed *)a)->deadline
							   : CTXI_NEVER;
	bool shared = p[n].fd < 0 && a;
	*done = false;
	for (;;) {
		int64_t end = until;
		if (shared) {
			int64_t s = ctxi_now() + SHARED_SLICE;
			if (s < end)
				end = s;
			if (deadline < end)
				end = deadline;
		}
		int r = poll_until(p, n + 1, end);
		if (r < 0)
			return -1;
		bool cready = p[n].revents != 0;
		r -= cready;
		if (r > 0)
			return r;
		if (cready || shared) {
			int err = ctx_err(ctx);
			if (err) {
				*done = true;
				return fail(err);
			}
			if (cready) { /* see SHARED_SLICE */
				shared = true;
				p[n].fd = -1;
				p[n].revents = 0;
			}
		}
		if (ctxi_now() >= until)
			return 0;
	}
}

/* ------------------------------------------------------------------------ */
/* Waiting */

/* Waits until `ctx` is done (returns its err) or `until` passes (returns 0). */
static int wait_until(ctx_t *ctx, int64_t until)
{
	int err = ctx_err(ctx);
	if (err)
		return err;
	int cfd = ctx_fd(ctx);
	if (cfd < 0)
		return ctxi_wait_nofd(ctx, until); /* out of fds: a futex instead */
	struct pollfd p = {.fd = cfd, .events = POLLIN};
	for (;;) {
		int n = poll_until(&p, 1, until);
		if (n < 0) /* e.g. ENOMEM in the kernel: these calls have no errno */
			return ctxi_wait_nofd(ctx, until);
		if (n > 0) {
			if ((err = ctx_err(ctx)))
				return err;
			/* Readable, not done: see SHARED_SLICE. */
			return ctxi_wait_nofd(ctx, until);
		}
		if (ctxi_now() >= until)
			return 0;
	}
}

int ctx_wait(ctx_t *ctx)
{
	if (!ctx)
		return EINVAL;
	return wait_until(ctx, CTXI_NEVER);
}

int ctx_sleep(ctx_t *ctx, int64_t ns)
{
	if (!ctx)
		return EINVAL;
	int err = ctx_err(ctx);
	if (err || ns <= 0)
		return err;
	int64_t until;
	if (__builtin_add_overflow(ctxi_now(), ns, &until))
		until = CTXI_NEVER;
	return wait_until(ctx, until);
}

/* Up to this many entries (the user's plus the context's) live on the stack. */
#define POLL_STACK 32

int ctx_poll(ctx_t *ctx, struct pollfd *fds, nfds_t nfds, int timeout_ms)
{
	int n;
	if (!ctx)
		return fail(EINVAL);
	int err = ctx_err(ctx);
	if (err)
		return fail(err);
	if (nfds && !fds)
		return fail(EFAULT);
	if (timeout_ms == 0) { /* nothing to wait for: no copy, no context fd */
		while ((n = poll(fds, nfds, 0)) < 0 && errno == EINTR)
			;
		return n;
	}
	if (nfds >= SIZE_MAX / sizeof(*fds))
		return fail(EINVAL);
	bool none;
	int cfd = poll_fd(ctx, &none);
	if (cfd < 0 && !none) {
		/* Out of fds: entries that are ready now need no context fd
		 * (ctx.h: a call that can proceed at once succeeds). */
		int e = errno;
		while ((n = poll(fds, nfds, 0)) < 0 && errno == EINTR)
			;
		if (n)
			return n;
		errno = e;
		return -1;
	}
	/* A copy, so that the user's array is touched only in revents. */
	struct pollfd stack[POLL_STACK], *p = stack;
	if (nfds >= POLL_STACK && !(p = ctxi_alloc((nfds + 1) * sizeof(*p))))
		return -1;
	if (nfds)
		memcpy(p, fds, nfds * sizeof(*p));
	p[nfds] = (struct pollfd){.fd = cfd, .events = POLLIN};
	int64_t until = timeout_ms < 0 ? CTXI_NEVER : ctxi_now() + timeout_ms * CTX_MSEC;
	bool done;
	n = poll_ctx(ctx, p, nfds, until, &done);
	if (n >= 0 || done)
		for (nfds_t i = 0; i < nfds; i++)
			fds[i].revents = p[i].revents;
	if (p != stack) {
		int e = errno;
		free(p);
		errno = e;
	}
	return n;
}

/* ------------------------------------------------------------------------ */
/* I/O */

/* Waits until `fd` reports any of `events` (or an error or hangup: the call
 * that follows reports those) or `ctx` is done: -1 with its err.  The
 * context's fd is created here, so calls that never wait never create it. */
static int wait_fd(ctx_t *ctx, int fd, short events)
{
	int err = ctx_err(ctx);
	if (err)
		return fail(err);
	if (fd < 0) /* poll would ignore it and wait for the context alone */
		return fail(EBADF);
	bool none, done;
	int cfd = poll_fd(ctx, &none);
	if (cfd < 0 && !none)
		return -1;
	struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = cfd, .events = POLLIN}};
	return poll_ctx(ctx, p, 1, CTXI_NEVER, &done) < 0 ? -1 : 0;
}

/* Regular files and block devices: poll always calls them ready and RWF_NOWAIT
 * may refuse them anyway (a page-cache miss), but they block only on the
 * disk, which ends by itself: the plain call is fine. */
static bool disk_file(int fd)
{
	struct stat st;
	return fstat(fd, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode));
}

enum io_op { IO_READ, IO_WRITE, IO_RECV, IO_SEND };

struct io {
	enum io_op op;
	int fd;
	void *buf;
	size_t len;
	int flags;
};

/* One attempt; `nowait` asks for the non-blocking form. */
static ssize_t io_call(const struct io *io, bool nowait)
{
	struct iovec iov = {.iov_base = io->buf, .iov_len = io->len};
	switch (io->op) {
	case IO_READ:
		return nowait ? preadv2(io->fd, &iov, 1, -1, RWF_NOWAIT)
			      : read(io->fd, io->buf, io->len);
	case IO_WRITE:
		return nowait ? pwritev2(io->fd, &iov, 1, -1, RWF_NOWAIT)
			      : write(io->fd, io->buf, io->len);
	case IO_RECV:
		return recv(io->fd, io->buf, io->len, io->flags | MSG_DONTWAIT);
	case IO_SEND:
		return send(io->fd, io->buf, io->len, io->flags | MSG_DONTWAIT);
	}
	return fail(EINVAL);
}

static ssize_t io_run(ctx_t *ctx, struct io *io)
{
	if (!ctx)
		return fail(EINVAL);
	int err = ctx_err(ctx);
	if (err) /* before the fd is touched */
		return fail(err);
	if (io->len > SSIZE_MAX) /* read(2) caps; preadv2 would fail */
		io->len = SSIZE_MAX;
	bool rw = io->op == IO_READ || io->op == IO_WRITE;
	short events = io->op == IO_READ || io->op == IO_RECV ? POLLIN : POLLOUT;
	bool nowait = true;
	int disk = -1; /* disk_file(), asked once, only when the fast path fails */
	for (;;) {
		ssize_t r = io_call(io, nowait);
		if (r >= 0)
			return r;
		if (errno == EINTR)
			continue;
		if (rw && nowait) {
			if (errno == EOPNOTSUPP || errno == ENOSYS) {
				/* No RWF_NOWAIT for this file: poll, then the plain
				 * call, which on a blocking fd carries the header's
				 * caveat. */
				nowait = false;
			} else if (errno != EAGAIN && errno != EWOULDBLOCK) {
				return -1;
			}
			if (disk < 0)
				disk = disk_file(io->fd);
			if (disk) { /* a page-cache miss, or no RWF_NOWAIT */
				nowait = false;
				continue;
			}
		} else if (errno != EAGAIN && errno != EWOULDBLOCK) {
			return -1;
		}
		if (wait_fd(ctx, io->fd, events) < 0)
			return -1;
	}
}

ssize_t ctx_read(ctx_t *ctx, int fd, void *buf, size_t len)
{
	struct io io = {.op = IO_READ, .fd = fd, .buf = buf, .len = len};
	return io_run(ctx, &io);
}

ssize_t ctx_write(ctx_t *ctx, int fd, const void *buf, size_t len)
{
	struct io io = {.op = IO_WRITE, .fd = fd, .buf = (void *)buf, .len = len};
	return io_run(ctx, &io);
}

ssize_t ctx_recv(ctx_t *ctx, int fd, void *buf, size_t len, int flags)
{
	struct io io = {.op = IO_RECV, .fd = fd, .buf = buf, .len = len, .flags = flags};
	return io_run(ctx, &io);
}

ssize_t ctx_send(ctx_t *ctx, int fd, const void *buf, size_t len, int flags)
{
	struct io io = {.op = IO_SEND, .fd = fd, .buf = (void *)buf, .len = len, .flags = flags};
	return io_run(ctx, &io);
}

/* accept4() has no per-call non-blocking flag, so this polls first; on a
 * blocking listening socket shared between threads, another thread may take
 * the connection between the poll and the accept (see the header). */
int ctx_accept(ctx_t *ctx, int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	/* accept4 would refuse other flags only once a connection came. */
	if (!ctx || (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)))
		return fail(EINVAL);
	for (;;) {
		if (wait_fd(ctx, fd, POLLIN) < 0)
			return -1;
		int s = accept4(fd, addr, addrlen, flags);
		if (s >= 0 || (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK))
			return s;
	}
}

/* The connect itself, on a socket that is non-blocking now.  It is tried
 * before the context's fd exists, so one that completes at once needs none.
 * One that has to wait is under way, and failing for want of an fd would
 * leave it half done: out of fds, ctx_fd()'s -1 goes in the poll set and
 * poll_ctx() waits without it. */
static int connect_nb(ctx_t *ctx, int fd, const struct sockaddr *addr, socklen_t addrlen)
{
	int err;
	bool retried = false;
	int64_t backoff = CTX_MSEC;
	for (;;) {
		if (connect(fd, addr, addrlen) == 0)
			return 0;
		if (errno == EINPROGRESS || (retried && errno == EALREADY))
			break;
		if (retried && errno == EISCONN) /* completed after an EINTR */
			return 0;
		if (errno == EINTR) {
			retried = true;
			continue;
		}
		if (errno != EAGAIN || !addr || addr->sa_family != AF_UNIX)
			return -1;
		/* An AF_UNIX listener with a full backlog.  A blocking connect
		 * would wait for room, but poll cannot tell when there is some
		 * (an unconnected socket polls writable), so retry with a backoff
		 * spent waiting on the context. */
		struct pollfd p = {.fd = ctx_fd(ctx), .events = POLLIN};
		bool done;
		if (poll_ctx(ctx, &p, 0, ctxi_now() + backoff, &done) < 0)
			return -1;
		if (backoff < 64 * CTX_MSEC)
			backoff *= 2;
	}
	struct pollfd p[2] = {{.fd = fd, .events = POLLOUT}, {.fd = ctx_fd(ctx), .events = POLLIN}};
	bool done;
	if (poll_ctx(ctx, p, 1, CTXI_NEVER, &done) < 0)
		return -1;
	socklen_t len = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		return -1;
	return err ? fail(err) : 0;
}

int ctx_connect(ctx_t *ctx, int fd, const struct sockaddr *addr, socklen_t addrlen)
{
	if (!ctx)
		return fail(EINVAL);
	int err = ctx_err(ctx);
	if (err)
		return fail(err);
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		return -1;
	bool blocking = !(fl & O_NONBLOCK);
	if (blocking && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -1;
	int r = connect_nb(ctx, fd, addr, addrlen);
	if (blocking) {
		int e = errno;
		fcntl(fd, F_SETFL, fl);
		errno = e;
	}
	return r;
}
