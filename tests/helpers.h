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

#endif
