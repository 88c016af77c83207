/*
 * uring_echo — a TCP echo server on io_uring where contexts end the I/O.
 *
 *   root (ctx_with_cancel)          cancelled on SIGINT/SIGTERM
 *    ├─ accept                      bound to root
 *    └─ conn ctx (with_cancel)      one per connection; writes bound to it
 *        └─ read ctx (timeout)      one per read: the idle timeout
 *
 * Each read is bound to a fresh ctx_with_timeout(conn, idle): the kernel ends
 * a read that waits longer than that (a link timeout), and the connection is
 * dropped.  SIGINT/SIGTERM arrive through a signalfd read on the same ring
 * (an unbound op, mixed with the library's); the handler cancels the root,
 * and the library cancels every accept, read and write in flight.  The
 * server then closes what is left and exits.
 *
 *   usage: uring_echo [-i idle_ms]        (default 10000)
 *
 * It prints `listening on 127.0.0.1:<port>` first, and at exit
 * `open fds at exit: N` (fds beyond those open at start); it exits 0 only
 * if N is 0.
 */
#include <ctx_uring.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum { K_ACCEPT = 1, K_READ, K_WRITE, K_SIGNAL }; /* low bits of user_data */

struct conn {
	int fd, id, inflight;
	bool closing;
	ctx_t *ctx;  /* the connection's context */
	ctx_t *rctx; /* the current read's idle timeout */
	size_t len, off;
	char buf[4096];
};

static struct io_uring ring;
static ctx_uring_t *cu;
static ctx_t *root;
static int64_t idle_ns = 10 * CTX_SEC;
static int nconns;

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return -1;
	int n = 0;
	for (struct dirent *e; (e = readdir(d));)
		n += e->d_name[0] != '.';
	closedir(d);
	return n - 1; /* the DIR's own */
}

static void die(const char *what, int err)
{
	fprintf(stderr, "uring_echo: %s: %s\n", what, strerror(err));
	exit(2);
}

static uint64_t ud(struct conn *c, int kind) { return (uint64_t)(uintptr_t)c | (uint64_t)kind; }

/* Queues `sqe` bound to `ctx`; a full SQ is submitted and the call retried. */
static void queue(ctx_t *ctx, struct io_uring_sqe *sqe)
{
	int e;
	while ((e = ctx_uring_queue(cu, ctx, sqe)) == EBUSY)
		if (ctx_uring_submit(cu, 0) < 0 && errno != EBUSY)
			die("submit", errno);
	if (e)
		die("ctx_uring_queue", e);
}

static void queue_accept(int lfd)
{
	struct io_uring_sqe s = {0};
	io_uring_prep_accept(&s, lfd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(&s, ud(NULL, K_ACCEPT));
	queue(root, &s);
}

static void queue_read(struct conn *c)
{
	c->rctx = ctx_with_timeout(c->ctx, idle_ns);
	if (!c->rctx)
		die("ctx_with_timeout", errno);
	struct io_uring_sqe s = {0};
	io_uring_prep_recv(&s, c->fd, c->buf, sizeof(c->buf), 0);
	io_uring_sqe_set_data64(&s, ud(c, K_READ));
	queue(c->rctx, &s);
	c->inflight++;
}

static void queue_write(struct conn *c)
{
	struct io_uring_sqe s = {0};
	io_uring_prep_send(&s, c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(&s, ud(c, K_WRITE));
	queue(c->ctx, &s);
	c->inflight++;
}

/* Closes the connection once nothing of it is in flight. */
static void conn_close(struct conn *c)
{
	c->closing = true;
	if (c->inflight)
		return;
	close(c->fd);
	ctx_release(c->ctx);
	free(c);
	nconns--;
}

static void on_read(struct conn *c, const struct ctx_uring_result *r)
{
	c->inflight--;
	ctx_release(c->rctx); /* its binding's poll fires, the library frees it */
	c->rctx = NULL;
	if (r->res > 0 && !c->closing) {
		c->len = (size_t)r->res;
		c->off = 0;
		queue_write(c);
		return;
	}
	if (r->ended_by == ETIMEDOUT) {
		printf("conn %d: idle for %lld ms, dropped\n", c->id, (long long)(idle_ns / CTX_MSEC));
		fflush(stdout);
	}
	conn_close(c);
}

static void on_write(struct conn *c, const struct ctx_uring_result *r)
{
	c->inflight--;
	if (r->res > 0 && !c->closing) {
		c->off += (size_t)r->res;
		if (c->off < c->len)
			queue_write(c);
		else
			queue_read(c);
		return;
	}
	conn_close(c);
}

static void on_accept(int lfd, const struct ctx_uring_result *r)
{
	if (r->res >= 0) {
		struct conn *c = calloc(1, sizeof(*c));
		if (!c)
			die("calloc", ENOMEM);
		c->fd = r->res;
		c->id = ++nconns;
		c->ctx = ctx_with_cancel(root);
		if (!c->ctx)
			die("ctx_with_cancel", errno);
		queue_read(c);
	}
	if (r->ended_by == 0) /* not cancelled: keep accepting */
		queue_accept(lfd);
}

int main(int argc, char **argv)
{
	int fds_at_start = count_fds();
	for (int o; (o = getopt(argc, argv, "i:")) != -1;) {
		if (o != 'i') {
			fprintf(stderr, "usage: %s [-i idle_ms]\n", argv[0]);
			return 2;
		}
		idle_ns = strtoll(optarg, NULL, 10) * CTX_MSEC;
	}

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
	if (sfd < 0)
		die("signalfd", errno);

	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 128) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&a, &alen) < 0)
		die("listen", errno);
	printf("listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
	fflush(stdout);

	int e = io_uring_queue_init(256, &ring, 0);
	if (e < 0)
		die("io_uring_queue_init", -e);
	if (!(cu = ctx_uring_new(&ring)))
		die("ctx_uring_new", errno);
	if (!(root = ctx_with_cancel(ctx_background())))
		die("ctx_with_cancel", errno);

	/* The signal read is the program's own op on the same ring: not bound,
	 * its CQE comes back from ctx_uring_cqe() unchanged. */
	struct signalfd_siginfo si;
	struct io_uring_sqe *sq = io_uring_get_sqe(&ring);
	io_uring_prep_read(sq, sfd, &si, sizeof(si), 0);
	io_uring_sqe_set_data64(sq, ud(NULL, K_SIGNAL));
	queue_accept(lfd);

	/* Until the root is done and every bound op has completed. */
	while (!ctx_err(root) || ctx_uring_inflight(cu) > 0) {
		if (ctx_uring_submit(cu, 0) < 0 && errno != EBUSY)
			die("submit", errno);
		struct io_uring_cqe *cqe;
		if ((e = io_uring_wait_cqe(&ring, &cqe)) < 0) {
			if (e == -EINTR)
				continue;
			die("io_uring_wait_cqe", -e);
		}
		unsigned head, n = 0;
		io_uring_for_each_cqe(&ring, head, cqe) {
			n++;
			struct ctx_uring_result r;
			if (!ctx_uring_cqe(cu, cqe, &r))
				continue; /* the library's own */
			struct conn *c = (struct conn *)(uintptr_t)(r.user_data & ~(uint64_t)7);
			switch (r.user_data & 7) {
			case K_SIGNAL:
				printf("signal %u: shutting down\n", si.ssi_signo);
				fflush(stdout);
				ctx_cancel(root);
				break;
			case K_ACCEPT:
				on_accept(lfd, &r);
				break;
			case K_READ:
				on_read(c, &r);
				break;
			case K_WRITE:
				on_write(c, &r);
				break;
			}
		}
		io_uring_cq_advance(&ring, n);
	}

	close(lfd);
	close(sfd);
	io_uring_queue_exit(&ring);
	ctx_uring_free(cu);
	ctx_release(root);
	int left = count_fds() - fds_at_start;
	printf("connections left: %d\nopen fds at exit: %d\n", nconns, left);
	fflush(stdout);
	return left == 0 && nconns == 0 ? 0 : 1;
}
