/*
 * blocking_read — a worker thread blocked in ctx_read() on a pipe that never
 * gets any data, ended two ways:
 *
 *   run 1: the main thread cancels the worker's context after 100 ms;
 *   run 2: the context's 100 ms deadline (ctx_with_timeout) passes, with no
 *          other thread calling the library.
 *
 * Prints what happened with elapsed milliseconds; exits non-zero if ctx
 * misbehaves.  Build: cc blocking_read.c $(pkg-config --cflags --libs ctx)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_timedjoin_np */
#endif
#include <ctx.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock ctx deadlines use */
	return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;
}

static double ms_since(int64_t t0) { return (double)(now_ns() - t0) / CTX_MSEC; }

static const char *errname(int e)
{
	return e == ECANCELED ? "ECANCELED" : e == ETIMEDOUT ? "ETIMEDOUT" : strerror(e);
}

struct worker {
	ctx_t *ctx;
	int fd;
	int64_t t0;
	ssize_t n;
	int err;
	double ms; /* when ctx_read returned */
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	char buf[64];
	printf("  worker: ctx_read() on an empty pipe...\n");
	w->n = ctx_read(w->ctx, w->fd, buf, sizeof(buf)); /* nobody ever writes */
	w->err = errno;
	w->ms = ms_since(w->t0);
	return NULL;
}

/* Runs a worker on `ctx` (made at t0); with `cancel`, the main thread
 * cancels it after 100 ms.  Returns true if ctx_read ended as it must. */
static bool run(ctx_t *ctx, int64_t t0, bool cancel, int want)
{
	int p[2];
	if (!ctx || pipe(p) != 0) {
		perror("setup");
		return false;
	}
	struct worker w = {.ctx = ctx, .fd = p[0], .t0 = t0};
	pthread_t t;
	if (pthread_create(&t, NULL, worker_main, &w) != 0) {
		fprintf(stderr, "pthread_create failed\n");
		return false;
	}
	double cancel_ms = 0;
	if (cancel) {
		ctx_sleep(ctx_background(), 100 * CTX_MSEC); /* let the worker block */
		cancel_ms = ms_since(t0);
		printf("  main:   ctx_cancel() at %.1f ms\n", cancel_ms);
		ctx_cancel(ctx);
	}
	/* A bounded join: a library that leaves the worker blocked fails here. */
	struct timespec at;
	clock_gettime(CLOCK_REALTIME, &at);
	at.tv_sec += 2;
	if (pthread_timedjoin_np(t, NULL, &at) != 0) {
		printf("  FAILED: the worker is still blocked after 2 s\n");
		exit(1); /* ends the stuck thread, which still uses `w` */
	}
	close(p[0]);
	close(p[1]);
	printf("  worker: ctx_read returned %zd, errno %s, at %.1f ms", w.n, errname(w.err), w.ms);
	if (cancel)
		printf(" (%.3f ms after the cancel)", w.ms - cancel_ms);
	printf("\n");
	/* Not before 100 ms (it did block), well within 2 s (it did wake). */
	bool ok = w.n == -1 && w.err == want && w.ms >= 100 && w.ms < 2000;
	if (!ok)
		printf("  FAILED: expected -1, errno %s, at 100 ms or a little later\n",
		       errname(want));
	return ok;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	bool ok = true;

	printf("run 1: cancelled by the main thread\n");
	int64_t t0 = now_ns();
	ctx_t *ctx = ctx_with_cancel(ctx_background());
	ok &= run(ctx, t0, true, ECANCELED);
	ctx_release(ctx);

	printf("run 2: ended by a 100 ms deadline\n");
	t0 = now_ns();
	ctx = ctx_with_timeout(ctx_background(), 100 * CTX_MSEC);
	ok &= run(ctx, t0, false, ETIMEDOUT);
	ctx_release(ctx);

	printf(ok ? "ok\n" : "FAILED\n");
	return ok ? 0 : 1;
}
