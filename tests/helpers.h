/* Shared helpers for the Criterion suites: bounded waits on fds, fd
 * accounting, the monotonic clock.  Never sleep-and-hope: wait on an fd with
 * a bound, then assert. */
#ifndef CTX_TEST_HELPERS_H
#define CTX_TEST_HELPERS_H

#include <ctx.h>

#include <dirent.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

/* true if fd polls readable within timeout_ms. */
static inline bool readable_within(int fd, int timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	int r;
	do
		r = poll(&p, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	return r == 1 && (p.revents & POLLIN);
}

static inline bool readable_now(int fd) { return readable_within(fd, 0); }

static inline int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;
}

static inline struct timespec ts_after(int64_t ns)
{
	int64_t t = now_ns() + ns;
	struct timespec ts = {.tv_sec = t / CTX_SEC, .tv_nsec = t % CTX_SEC};
	return ts;
}

/* Number of open fds of this process (for leak checks). */
static inline int open_fd_count(void)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the DIR's own fd */
}

/* ---- threads: bounded joins, "is it really blocked?" ---- */

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* An fd on thread `tid`'s /proc stat file, for thread_blocked_within();
 * opened ahead, so that the check still works once the process is out of
 * fds.  -1 on failure. */
static inline int thread_stat_open(pid_t tid)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	return open(path, O_RDONLY | O_CLOEXEC);
}

/* The scheduler state ('R', 'S', ...) read from a thread_stat_open() fd, or
 * 0 if the thread is gone. */
static inline char thread_state(int statfd)
{
	char buf[512];
	ssize_t n = pread(statfd, buf, sizeof(buf) - 1, 0);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *p = strrchr(buf, ')'); /* the command name may hold spaces */
	return p && p[1] == ' ' ? p[2] : 0;
}

/* true once the thread is seen asleep in the kernel ('S') on two checks a
 * millisecond apart, within timeout_ms: it is blocked, not passing by. */
static inline bool thread_blocked_within(int statfd, int timeout_ms)
{
	int64_t end = now_ns() + (int64_t)timeout_ms * CTX_MSEC;
	int seen = 0;
	while (now_ns() < end) {
		seen = thread_state(statfd) == 'S' ? seen + 1 : 0;
		if (seen == 2)
			return true;
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	return false;
}

/* pthread_join() with a bound: true if the thread ended and was joined. */
static inline bool joined_within(pthread_t t, int timeout_ms)
{
	struct timespec at;
	clock_gettime(CLOCK_REALTIME, &at); /* the clock pthread_timedjoin_np uses */
	int64_t ns = at.tv_nsec + (int64_t)(timeout_ms % 1000) * CTX_MSEC;
	at.tv_sec += timeout_ms / 1000 + ns / CTX_SEC;
	at.tv_nsec = ns % CTX_SEC;
	return pthread_timedjoin_np(t, NULL, &at) == 0;
}

/* The status of child `pid` once it exits, or -1 (and the child killed)
 * after timeout_ms. */
static inline int waitpid_within(pid_t pid, int timeout_ms)
{
	int status = -1;
	for (int i = 0; i < timeout_ms; i++) {
		if (waitpid(pid, &status, WNOHANG) == pid)
			return status;
		struct timespec ms = {.tv_nsec = CTX_MSEC};
		nanosleep(&ms, NULL);
	}
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return -1;
}

/*
 * For the tests that fork() a process already running library threads (the
 * watch thread, the after thread) and whose child then starts threads of its
 * own (its watch or after thread, from the library's fork handlers or on
 * demand).  The sanitizers' runtimes do not support that, so those tests
 * run in the plain build only:
 *   - TSan does not support threads started after a multi-threaded fork.
 *   - gcc 12's ASan does not hold its allocator lock across fork(): a thread
 *     the child starts can block forever on a lock another parent thread held
 *     at the fork (seen 5 runs in 30).  glibc's malloc is fork-safe.
 */
#if defined(__SANITIZE_THREAD__)
#define SKIP_FORK_WITH_THREADS() \
	cr_skip_test("TSan does not support threads after a multi-threaded fork")
#elif defined(__SANITIZE_ADDRESS__)
#define SKIP_FORK_WITH_THREADS() cr_skip_test("ASan's allocator is not fork-safe with threads")
#else
#define SKIP_FORK_WITH_THREADS() ((void)0)
#endif

#endif
