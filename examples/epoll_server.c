/*
 * epoll_server — a TCP echo server on one epoll loop, where contexts are just
 * more fds in the epoll set.
 *
 *   epoll_server [-p port] [-i idle_ms]      (port 0, the default, picks one)
 *
 * The epoll set holds, side by side:
 *   - the listening socket and every client socket;
 *   - the server's root context, ctx_with_cancel(ctx_background());
 *   - one context per connection: ctx_with_timeout(root, idle).  Every time
 *     bytes arrive it is replaced by a fresh one, so it fires only after
 *     `idle` ms of silence — through the kernel's timerfd, not our code;
 *   - a signalfd for SIGINT/SIGTERM, which cancel the root with ESHUTDOWN.
 * Cancelling the root makes every connection's context fd readable too
 * (parents cascade), so shutdown is the same code path as an idle timeout:
 * "this connection's context is done, close it".  The loop never computes a
 * timeout for epoll_wait: every deadline is an fd.
 *
 * Writes: each connection has one buffer.  If send() is short (the client
 * reads slower than it writes), the rest stays pending and we stop reading
 * from that client until the kernel takes it (EPOLLOUT): backpressure,
 * bounded memory, and no byte dropped.
 *
 * Output on stdout, one line per event; the first is
 * "listening on 127.0.0.1:<port>", the last "open fds at exit: N" (fds open
 * at exit minus those open at start; the exit status is 0 only if N == 0).
 */
#include <ctx.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

/* What an epoll event is about: data.ptr points at one of these. */
enum kind { W_LISTEN, W_SIGNAL, W_ROOT, W_SOCK, W_CTX };
struct watch {
	enum kind kind;
	struct conn *conn; /* for W_SOCK and W_CTX */
};

struct conn {
	int id, fd;         /* fd is -1 once closed */
	ctx_t *ctx;         /* idle timeout, a child of the root */
	int ctx_fd;         /* ctx_fd(ctx), registered in the epoll set */
	struct watch sock_w, ctx_w;
	bool writing;       /* watching EPOLLOUT: buf[off, len) is pending */
	size_t off, len;
	char buf[4096];
	struct conn *next_dead;
};

static int ep, listen_fd = -1, open_conns;
static bool accept_paused; /* out of fds: listener out of the set for now */
static ctx_t *root;
static struct conn *dead; /* closed during this epoll batch, freed after it */
static struct watch listen_w = {W_LISTEN, NULL};

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void ep_ctl(int op, int fd, uint32_t events, struct watch *w)
{
	struct epoll_event ev = {.events = events, .data.ptr = w};
	if (epoll_ctl(ep, op, fd, &ev) < 0)
		die("epoll_ctl");
}

/* Closes the connection now; its memory waits until the end of the batch,
 * because later events of the same epoll_wait may still point at it. */
static void conn_close(struct conn *c, const char *why)
{
	printf("conn %d: %s\n", c->id, why);
	/* Drain what the client already sent: close() with unread data sends
	 * RST, and the client would see ECONNRESET instead of a clean EOF. */
	char sink[4096];
	for (int i = 0; i < 16 && recv(c->fd, sink, sizeof sink, 0) > 0; i++)
		;
	if (c->ctx_fd >= 0) /* -1 if conn_rearm failed */
		ep_ctl(EPOLL_CTL_DEL, c->ctx_fd, 0, NULL);
	close(c->fd); /* also leaves the epoll set: we never dup it */
	ctx_release(c->ctx); /* closes ctx_fd: hence the DEL just before */
	c->fd = -1;
	c->next_dead = dead;
	dead = c;
	open_conns--;
	if (accept_paused && listen_fd >= 0) { /* an fd is free again */
		ep_ctl(EPOLL_CTL_ADD, listen_fd, EPOLLIN, &listen_w);
		accept_paused = false;
	}
}

/* A fresh idle context: the connection just proved it is alive.  Contexts
 * are immutable, as in Go, so "extend the deadline" is "replace the context".
 * The old one goes first: nothing can happen in between on this one thread,
 * and its fd is free for the new one even when the process is out of fds. */
static int conn_rearm(struct conn *c, int64_t idle_ns)
{
	if (c->ctx) {
		ep_ctl(EPOLL_CTL_DEL, c->ctx_fd, 0, NULL);
		ctx_release(c->ctx); /* closes its fd */
	}
	c->ctx = ctx_with_timeout(root, idle_ns);
	c->ctx_fd = c->ctx ? ctx_fd(c->ctx) : -1;
	if (c->ctx_fd < 0) /* ENOMEM or EMFILE: the caller closes the connection */
		return -1;
	ep_ctl(EPOLL_CTL_ADD, c->ctx_fd, EPOLLIN, &c->ctx_w);
	return 0;
}

static void conn_accept(int64_t idle_ns)
{
	static int next_id = 1;
	for (;;) {
		struct sockaddr_in peer;
		socklen_t plen = sizeof peer;
		int fd = accept4(listen_fd, (struct sockaddr *)&peer, &plen,
				 SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return; /* drained the backlog */
			if (errno == ECONNABORTED)
				continue; /* the client gave up while queued */
			/* EMFILE and friends: the connection stays queued and the
			 * level-triggered listener would wake us in a busy loop, so
			 * it leaves the set until a connection closes. */
			perror("accept4");
			ep_ctl(EPOLL_CTL_DEL, listen_fd, 0, NULL);
			accept_paused = true;
			return;
		}
		struct conn *c = calloc(1, sizeof *c);
		if (!c) {
			close(fd);
			continue;
		}
		*c = (struct conn){.id = next_id++, .fd = fd,
				   .sock_w = {W_SOCK, c}, .ctx_w = {W_CTX, c}};
		if (conn_rearm(c, idle_ns) < 0) {
			perror("conn: no context");
			ctx_release(c->ctx);
			close(fd);
			free(c);
			continue;
		}
		ep_ctl(EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, &c->sock_w);
		open_conns++;
		printf("conn %d: accepted from %s:%d\n", c->id, inet_ntoa(peer.sin_addr),
		       ntohs(peer.sin_port));
	}
}

/* Sends what is pending; -1 on error.  While bytes remain the socket is
 * watched for EPOLLOUT only: we stop reading from a client that does not
 * read its echo (backpressure: one buffer per client, never more). */
static int conn_flush(struct conn *c)
{
	while (c->off < c->len) {
		ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN)
			return -1;
		if (n < 0)
			break; /* send buffer full */
		c->off += (size_t)n;
	}
	bool pending = c->off < c->len;
	if (pending != c->writing) {
		uint32_t want = pending ? EPOLLOUT : EPOLLIN | EPOLLRDHUP;
		ep_ctl(EPOLL_CTL_MOD, c->fd, want, &c->sock_w);
		c->writing = pending;
	}
	if (!pending)
		c->off = c->len = 0;
	return 0;
}

static void conn_event(struct conn *c, uint32_t events, int64_t idle_ns)
{
	if (ctx_err(c->ctx)) /* its context ended: its own event closes it */
		return;
	if (events & EPOLLERR) {
		int err = 0;
		socklen_t l = sizeof err;
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
		conn_close(c, err ? strerror(err) : "socket error");
		return;
	}
	if (c->writing) { /* we only asked for EPOLLOUT (HUP comes anyway) */
		if (conn_flush(c) < 0 || (events & EPOLLHUP))
			conn_close(c, "client gone while we were writing");
		return;
	}
	/* EPOLLIN, EPOLLRDHUP or EPOLLHUP: recv tells data, EOF or error. */
	ssize_t n = recv(c->fd, c->buf, sizeof c->buf, 0);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		conn_close(c, n == 0 ? "closed by client" : strerror(errno));
		return;
	}
	c->len = (size_t)n;
	if (conn_rearm(c, idle_ns) < 0)
		conn_close(c, "no context for the next idle period");
	else if (conn_flush(c) < 0)
		conn_close(c, strerror(errno));
}

/* How many fds this process has open, from /proc (-1 if unreadable). */
static int open_fd_count(void)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return -1;
	int n = 0;
	for (struct dirent *e; (e = readdir(d));)
		n += e->d_name[0] != '.';
	closedir(d);
	return n - 1; /* opendir's own fd */
}

int main(int argc, char **argv)
{
	int fds_at_start = open_fd_count(); /* stdin/out/err, and whatever else */
	setvbuf(stdout, NULL, _IOLBF, 0); /* a line reaches a pipe at once */

	long port = 0, idle_ms = 10000;
	for (int opt; (opt = getopt(argc, argv, "p:i:")) != -1;) {
		char *end = "";
		if (opt == 'p')
			port = strtol(optarg, &end, 10);
		else if (opt == 'i')
			idle_ms = strtol(optarg, &end, 10);
		if (opt == '?' || *end || port < 0 || port > 65535 || idle_ms < 1 ||
		    idle_ms > 86400000) {
			fprintf(stderr, "usage: %s [-p port] [-i idle_ms]\n", argv[0]);
			return 2;
		}
	}
	int64_t idle_ns = idle_ms * CTX_MSEC;

	/* Signals become fd events: block them first (before any thread exists,
	 * so every thread inherits the mask), then read them from a signalfd. */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	/* An ignored signal is discarded, never pending, so signalfd would not
	 * see it, and `server &` in a script starts with SIGINT ignored. */
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	if (sigprocmask(SIG_BLOCK, &sigs, NULL) < 0)
		die("sigprocmask");
	int sig_fd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sig_fd < 0)
		die("signalfd");

	listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				   .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof addr;
	int one = 1;
	if (listen_fd < 0 ||
	    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
	    bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
	    listen(listen_fd, 128) < 0 ||
	    getsockname(listen_fd, (struct sockaddr *)&addr, &alen) < 0)
		die("listen");

	root = ctx_with_cancel(ctx_background());
	int root_fd = root ? ctx_fd(root) : -1;
	if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0 || root_fd < 0)
		die("epoll_create1 or ctx_fd(root)");
	static struct watch sig_w = {W_SIGNAL, NULL}, root_w = {W_ROOT, NULL};
	ep_ctl(EPOLL_CTL_ADD, listen_fd, EPOLLIN, &listen_w);
	ep_ctl(EPOLL_CTL_ADD, sig_fd, EPOLLIN, &sig_w);
	ep_ctl(EPOLL_CTL_ADD, root_fd, EPOLLIN, &root_w);
	printf("listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));

	/* Run until the root is done (its event closes the listener) and the
	 * last connection has closed. */
	while (listen_fd >= 0 || open_conns > 0) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, -1); /* no timeout: deadlines are fds */
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			struct watch *w = evs[i].data.ptr;
			struct signalfd_siginfo si;
			switch (w->kind) {
			case W_LISTEN:
				if (listen_fd >= 0) /* not closed earlier in this batch */
					conn_accept(idle_ns);
				break;
			case W_SIGNAL:
				while (read(sig_fd, &si, sizeof si) == sizeof si) {
					printf("signal %s: cancelling the server\n",
					       si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
					ctx_cancel_cause(root, ESHUTDOWN); /* a 2nd: EALREADY */
				}
				break;
			case W_ROOT: /* stays readable: leave the set, stop accepting */
				printf("server: shutting down, %d connection(s) open\n", open_conns);
				ep_ctl(EPOLL_CTL_DEL, root_fd, 0, NULL);
				close(listen_fd); /* leaves the set; queued clients get RST */
				listen_fd = -1;
				break;
			case W_CTX:
				if (w->conn->fd < 0 || !ctx_err(w->conn->ctx))
					break; /* closed, or an event of the fd it replaced */
				/* The cause tells why: the root's ESHUTDOWN came down. */
				conn_close(w->conn,
					   ctx_cause(w->conn->ctx) == ESHUTDOWN ? "server shutting down"
					   : ctx_err(w->conn->ctx) == ETIMEDOUT ? "idle timeout (ETIMEDOUT)"
					   : "cancelled");
				break;
			case W_SOCK:
				if (w->conn->fd >= 0)
					conn_event(w->conn, evs[i].events, idle_ns);
				break;
			}
		}
		while (dead) { /* nothing in this batch can point at them now */
			struct conn *c = dead;
			dead = c->next_dead;
			free(c);
		}
	}

	close(ep);
	close(sig_fd);
	ctx_release(root); /* closes root_fd */
	int leaked = open_fd_count() - fds_at_start;
	printf("open fds at exit: %d\n", leaked);
	return leaked == 0 ? 0 : 1;
}
