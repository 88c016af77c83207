/*
 * Between processes: a parent hands a request's context to a worker process.
 *
 *   - ctx_send_ctx / ctx_recv_ctx: the worker gets a context with the same
 *     deadline, cancelled when the parent cancels its own;
 *   - ctx_with_fd on a pidfd: the parent's context ends when the worker exits;
 *   - ctx_with_signals: Ctrl-C (SIGINT) or SIGTERM ends both processes' work.
 *
 * Run: build/examples/xproc   (about a tenth of a second)
 */
#include <ctx.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

static int64_t ms_since(int64_t t0)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ((int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec - t0) / CTX_MSEC;
}

static int worker(int sock, const sigset_t *sigs, int64_t t0)
{
	CTX_AUTO ctx_t *root = ctx_with_signals(ctx_background(), sigs, 0);
	if (!root)
		return 1;
	CTX_AUTO ctx_t *req = ctx_recv_ctx(sock, root);
	if (!req) {
		perror("worker: ctx_recv_ctx");
		return 1;
	}
	struct timespec d;
	printf("worker: got the request (deadline: %s)\n",
	       ctx_deadline(req, &d) ? "the parent's" : "none");
	fflush(stdout);
	/* "Work" for up to 10 s, unless the request ends first. */
	int err = ctx_sleep(req, 10 * CTX_SEC);
	printf("worker: request ended after %lld ms: %s (cause: %s)\n", (long long)ms_since(t0),
	       strerror(err), strerror(ctx_cause(req)));
	fflush(stdout); /* the worker leaves through _exit() */
	return err == ECANCELED ? 0 : 1;
}

int main(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	int64_t t0 = (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;

	/* Block the signals before any thread exists, so every thread (and the
	 * worker) inherits the mask: signalfd sees only pending signals. */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	sigprocmask(SIG_BLOCK, &sigs, NULL);

	int sv[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		return perror("socketpair"), 1;
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		return perror("fork"), 1;
	if (pid == 0) {
		close(sv[0]);
		_exit(worker(sv[1], &sigs, t0));
	}
	close(sv[1]);

	CTX_AUTO ctx_t *root = ctx_with_signals(ctx_background(), &sigs, 0);
	CTX_AUTO ctx_t *req = ctx_with_timeout(root, 2 * CTX_SEC);
	if (!root || !req || ctx_send_ctx(sv[0], req) < 0)
		return perror("parent"), 1;
	printf("parent: sent a request with a 2 s deadline; cancelling it in 100 ms\n");
	fflush(stdout);
	ctx_sleep(root, 100 * CTX_MSEC);
	ctx_cancel_cause(req, ESHUTDOWN);

	/* Wait for the worker to exit through a pidfd, with a bound. */
	int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pfd >= 0) {
		CTX_AUTO ctx_t *bounded = ctx_with_timeout(root, 5 * CTX_SEC);
		CTX_AUTO ctx_t *exited = ctx_with_fd(bounded, pfd, ECHILD);
		close(pfd);
		if (exited && ctx_wait(exited) && ctx_cause(exited) == ECHILD)
			printf("parent: the pidfd says the worker exited\n");
	}
	int status;
	waitpid(pid, &status, 0);
	close(sv[0]);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
