/*
 * demo — a tour of ctx: Go's context package for C, where every context is a
 * file descriptor that polls readable exactly when the context is done.
 *
 *   1. A request tree: server -> request (value, timeout) -> handler.
 *   2. A worker thread blocked in poll() on its context's fd wakes the moment
 *      the main thread cancels the server, far up the tree.
 *   3. A single-threaded epoll loop: a 50 ms deadline makes its context's fd
 *      readable through a kernel timer, with no thread and no library call.
 *   4. What every context reports at the end: err and cause, inherited down.
 *
 * Build and run with `make demo`.  It exits non-zero if ctx misbehaves.
 */
#include <ctx.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock ctx deadlines use */
	return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;
}

static int64_t start_ns; /* set once, before any thread starts */

/* One timeline line, prefixed with the milliseconds since start.  The lock
 * keeps the worker's lines whole when both threads print. */
static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	flockfile(stdout);
	printf("[%6.1f ms] ", (double)(now_ns() - start_ns) / CTX_MSEC);
	vprintf(fmt, ap);
	putchar('\n');
	funlockfile(stdout);
	va_end(ap);
}

/* A broken library must show: say what went wrong and exit non-zero. */
static void expect(bool ok, const char *what)
{
	if (ok)
		return;
	fflush(stdout);
	fprintf(stderr, "demo: FAILED: %s\n", what);
	exit(1);
}

/* The errno values this demo meets, by name; strerror() gives the text. */
static const char *errname(int e)
{
	return e == 0 ? "0" : e == ECANCELED ? "ECANCELED" : e == ETIMEDOUT ? "ETIMEDOUT"
	     : e == ESHUTDOWN ? "ESHUTDOWN" : e == ETIME ? "ETIME" : "?";
}

/* Is the context's fd readable right now?  (poll with a zero timeout) */
static bool fd_ready(ctx_t *c)
{
	struct pollfd p = {.fd = ctx_fd(c), .events = POLLIN};
	expect(p.fd >= 0, "ctx_fd failed");
	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* Threads in this process, from /proc; -1 if it can't be read. */
static int thread_count(void)
{
	int n = -1;
	char line[128];
	FILE *f = fopen("/proc/self/status", "re");
	while (f && fgets(line, sizeof line, f) && sscanf(line, "Threads: %d", &n) != 1)
		;
	if (f)
		fclose(f);
	return n;
}

/* Keys are compared by address: a static object of ours can't collide. */
static const char request_id_key;

/* ---- 2. The worker: waits for client data or for its context to end ----- */

struct worker {
	ctx_t *ctx;                 /* the worker's own reference */
	int client_fd;              /* the pipe it would otherwise read */
	_Atomic int64_t cancel_ns;  /* when main called ctx_cancel_cause */
	const char *failure;        /* NULL, or what went wrong */
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct pollfd pfd[2] = {{.fd = w->client_fd, .events = POLLIN},
				{.fd = ctx_fd(w->ctx), .events = POLLIN}};
	if (pfd[1].fd < 0) {
		w->failure = "worker: ctx_fd failed";
		goto out;
	}
	say("worker: blocked in poll() on {client pipe fd %d, handler ctx fd %d}",
	    pfd[0].fd, pfd[1].fd);
	int n = poll(pfd, 2, 1000); /* 1 s: only a broken library gets there */
	double wake_us = (double)(now_ns() - w->cancel_ns) / CTX_USEC;
	if (n != 1 || !(pfd[1].revents & POLLIN) || pfd[0].revents) {
		w->failure = "worker: poll did not return with exactly the ctx fd readable";
	} else {
		int err = ctx_err(w->ctx), cause = ctx_cause(w->ctx);
		say("worker: woke %.1f us after the cancel: the ctx fd is readable, "
		    "the client pipe is not", wake_us);
		say("worker: ctx_err   = %s (%s)", errname(err), strerror(err));
		say("worker: ctx_cause = %s (%s)", errname(cause), strerror(cause));
		say("worker: request id still readable: %s",
		    (const char *)ctx_value(w->ctx, &request_id_key));
		if (err != ECANCELED || cause != ESHUTDOWN)
			w->failure = "worker: expected ECANCELED with cause ESHUTDOWN";
	}
out:
	ctx_unref(w->ctx); /* the worker is done with its reference */
	return NULL;
}

int main(void)
{
	start_ns = now_ns();
	setvbuf(stdout, NULL, _IOLBF, 0);

	/* ---- 1. The request tree ------------------------------------------- */
	say("== 1. a request tree");
	CTX_AUTO ctx_t *server = ctx_with_cancel(ctx_background());
	char *id = strdup("req-7f3a");
	expect(server && id, "out of memory");
	/* The request context owns the id: free() runs when it is freed. */
	CTX_AUTO ctx_t *request = ctx_with_value(server, &request_id_key, id, free);
	CTX_AUTO ctx_t *timeout = ctx_with_timeout(request, 2 * CTX_SEC);
	CTX_AUTO ctx_t *handler = ctx_with_cancel(timeout);
	/* Audit logging must outlive the request, but keeps its values. */
	CTX_AUTO ctx_t *audit = ctx_without_cancel(handler);
	expect(request && timeout && handler && audit, "a constructor failed");

	struct timespec dl;
	expect(ctx_deadline(handler, &dl), "handler should inherit the 2 s deadline");
	double left = (double)((int64_t)dl.tv_sec * CTX_SEC + dl.tv_nsec - now_ns()) / CTX_MSEC;
	say("server   ctx_with_cancel(ctx_background())");
	say("`- request   ctx_with_value(request_id_key = \"%s\")", id);
	say("   `- timeout   ctx_with_timeout(2 s)");
	say("      `- handler   ctx_with_cancel()      deadline in %.1f ms (inherited)", left);
	say("         `- audit   ctx_without_cancel()   deadline: %s",
	    ctx_deadline(audit, NULL) ? "yes (wrong!)" : "none");
	const char *seen = ctx_value(handler, &request_id_key);
	say("ctx_value(handler, &request_id_key) = \"%s\" (found two levels up)", seen);
	expect(seen == id, "ctx_value did not find the request id from the grandchild");
	expect(!ctx_deadline(audit, NULL), "ctx_without_cancel must have no deadline");

	/* ---- 2. Cancel the root; a blocked worker wakes --------------------- */
	say("== 2. a worker blocked in poll(), woken by cancelling the server");
	int client[2];
	expect(pipe(client) == 0, "pipe failed");
	struct worker w = {.ctx = ctx_ref(handler), .client_fd = client[0]};
	pthread_t tid;
	expect(pthread_create(&tid, NULL, worker_main, &w) == 0, "pthread_create failed");
	nanosleep(&(struct timespec){.tv_nsec = 20 * CTX_MSEC}, NULL); /* let it block */

	say("main: ctx_cancel_cause(server, ESHUTDOWN): the server is shutting down");
	w.cancel_ns = now_ns();
	int rc = ctx_cancel_cause(server, ESHUTDOWN);
	double took_us = (double)(now_ns() - w.cancel_ns) / CTX_USEC;
	expect(rc == 0, "ctx_cancel_cause(server) should return 0");
	/* The cascade wrote the handler's fd before ctx_cancel_cause returned. */
	expect(fd_ready(handler), "handler fd not readable when ctx_cancel_cause returned");
	say("main: ctx_cancel_cause returned 0 after %.1f us; the handler's fd, three levels "
	    "down, was already readable", took_us);
	expect(pthread_join(tid, NULL) == 0, "pthread_join failed");
	expect(!w.failure, w.failure ? w.failure : "");
	expect(ctx_cancel(server) == EALREADY, "a second cancel should return EALREADY");
	say("main: a second ctx_cancel(server) returned EALREADY: the first cause wins");

	/* ---- 3. A deadline in an epoll loop --------------------------------- */
	say("== 3. an epoll loop: a 50 ms deadline fires through the fd");
	/* The audit flush still runs after the request died, with its own budget. */
	CTX_AUTO ctx_t *flush = ctx_with_timeout_cause(audit, 50 * CTX_MSEC, ETIME);
	expect(flush && ctx_err(flush) == 0, "the flush context should start not done");
	expect(ctx_deadline(flush, &dl), "the flush context should have a deadline");
	int64_t deadline_ns = (int64_t)dl.tv_sec * CTX_SEC + dl.tv_nsec;
	int flush_fd = ctx_fd(flush);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	expect(flush_fd >= 0 && ep >= 0, "ctx_fd or epoll_create1 failed");
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = client[0]};
	expect(epoll_ctl(ep, EPOLL_CTL_ADD, client[0], &ev) == 0, "epoll_ctl failed");
	ev.data.fd = flush_fd;
	expect(epoll_ctl(ep, EPOLL_CTL_ADD, flush_fd, &ev) == 0, "epoll_ctl failed");
	say("loop: epoll set = {client pipe fd %d, flush ctx fd %d}; deadline at %.1f ms",
	    client[0], flush_fd, (double)(deadline_ns - start_ns) / CTX_MSEC);
	expect(write(client[1], "ping", 4) == 4, "write failed");
	int threads_before = thread_count(); /* 1, or more under a sanitizer */

	/* From here until the fd fires: only epoll_wait and read, no ctx_* call,
	 * and the worker has exited: no thread of ours or of ctx is running. */
	for (bool done = false; !done;) {
		struct epoll_event got[2];
		int n = epoll_wait(ep, got, 2, 1000); /* 1 s: only if ctx is broken */
		expect(n > 0, "epoll_wait: the deadline never made the ctx fd readable");
		for (int i = 0; i < n; i++) {
			if (got[i].data.fd == client[0]) {
				char buf[8] = {0};
				expect(read(client[0], buf, sizeof buf - 1) > 0, "read failed");
				say("loop: client pipe readable: read \"%s\"; waiting again", buf);
				continue;
			}
			int64_t late = now_ns() - deadline_ns;
			expect(late >= 0, "the ctx fd became readable before the deadline");
			say("loop: flush ctx fd readable, %.1f us after the deadline", (double)late / CTX_USEC);
			int threads = thread_count();
			say("loop: the kernel's timerfd did it: no ctx_* call since ctx_fd(), "
			    "threads in this process: %d", threads);
			expect(threads == threads_before, "the library started a thread");
			done = true;
		}
	}
	int err = ctx_err(flush), cause = ctx_cause(flush);
	say("loop: ctx_err   = %s (%s)", errname(err), strerror(err));
	say("loop: ctx_cause = %s (%s)", errname(cause), strerror(cause));
	expect(err == ETIMEDOUT && cause == ETIME, "expected ETIMEDOUT with cause ETIME");
	close(ep);
	close(client[0]);
	close(client[1]);

	/* ---- 4. Summary ---------------------------------------------------- */
	say("== 4. every context at the end");
	const struct {
		const char *name;
		ctx_t *c;
		int err, cause;
		const char *why;
	} rows[] = {
		{"server", server, ECANCELED, ESHUTDOWN, "cancelled by main in part 2"},
		{"request", request, ECANCELED, ESHUTDOWN, "inherited from server"},
		{"timeout", timeout, ECANCELED, ESHUTDOWN, "inherited: the cancel beat its 2 s"},
		{"handler", handler, ECANCELED, ESHUTDOWN, "inherited from server"},
		{"audit", audit, 0, 0, "not done: ctx_without_cancel shields it"},
		{"flush", flush, ETIMEDOUT, ETIME, "its own 50 ms deadline"},
	};
	say("%-8s %-6s %-10s %-10s %-11s %s", "context", "fd", "ctx_err", "ctx_cause",
	    "request id", "why");
	for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
		int e = ctx_err(rows[i].c), c = ctx_cause(rows[i].c);
		bool ready = fd_ready(rows[i].c);
		const char *v = ctx_value(rows[i].c, &request_id_key);
		say("%-8s %-6s %-10s %-10s %-11s %s", rows[i].name, ready ? "ready" : "-",
		    errname(e), errname(c), v ? v : "(none)", rows[i].why);
		expect(e == rows[i].err && c == rows[i].cause, "unexpected err or cause");
		expect(ready == (e != 0), "fd readiness disagrees with ctx_err");
		expect((v == id) == (rows[i].c != server), "unexpected request id lookup");
	}
	say("done: every CTX_AUTO context is released as main returns");
	return 0;
}
