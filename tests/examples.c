/* The example programs, run as a user would run them: examples/epoll_server
 * is started with fork+exec, its stdout on a pipe, and real clients talk to
 * it over loopback.  The binary is the one built next to this test binary
 * (build/tests/examples -> build/examples/epoll_server; the same under
 * build/asan and build/tsan), so each variant tests its own server. */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"

/* The server under test; one per test (each test runs in its own process). */
static struct {
	pid_t pid;
	int out;          /* read end of the pipe on its stdout */
	int port;
	size_t len;
	char log[32768];  /* everything it printed so far, NUL-terminated */
} srv = {.pid = -1, .out = -1};

/* The .fini of every test, failed ones included: no server outlives it. */
static void kill_server(void)
{
	if (srv.pid > 0) {
		kill(srv.pid, SIGKILL);
		waitpid(srv.pid, NULL, 0);
		srv.pid = -1;
	}
	if (srv.out >= 0)
		close(srv.out);
	srv.out = -1;
}

TestSuite(epoll_server, .fini = kill_server, .timeout = 60);

/* Appends what the server printed within timeout_ms (one read).  Returns
 * false at EOF or timeout. */
static bool srv_read(int timeout_ms)
{
	/* Not readable_within(): a pipe at EOF polls POLLHUP without POLLIN. */
	struct pollfd p = {.fd = srv.out, .events = POLLIN};
	if (srv.out < 0 || poll(&p, 1, timeout_ms) != 1)
		return false;
	cr_assert_lt(srv.len, sizeof srv.log - 1, "the server printed more than expected");
	ssize_t n = read(srv.out, srv.log + srv.len, sizeof srv.log - 1 - srv.len);
	cr_assert_geq(n, 0, "read from the server's stdout: %s", strerror(errno));
	srv.len += (size_t)n;
	srv.log[srv.len] = '\0';
	if (n == 0) {
		close(srv.out);
		srv.out = -1;
	}
	return n > 0;
}

/* Reads until the server's output contains `needle`; false after timeout_ms. */
static bool srv_wait_for(const char *needle, int timeout_ms)
{
	int64_t end = now_ns() + timeout_ms * CTX_MSEC;
	while (!strstr(srv.log, needle)) {
		int left = (int)((end - now_ns()) / CTX_MSEC);
		if (left <= 0 || !srv_read(left))
			return strstr(srv.log, needle) != NULL;
	}
	return true;
}

/* Reads until EOF on the server's stdout (it has exited); false after timeout_ms. */
static bool srv_read_to_eof(int timeout_ms)
{
	int64_t end = now_ns() + timeout_ms * CTX_MSEC;
	while (srv.out >= 0) {
		int left = (int)((end - now_ns()) / CTX_MSEC);
		if (left <= 0)
			return false;
		srv_read(left);
	}
	return true;
}

/* Path of the example binary built next to this test binary. */
static void example_path(char *out, size_t size, const char *name)
{
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	cr_assert_gt(n, 0);
	self[n] = '\0';
	snprintf(out, size, "%s/../examples/%s", dirname(self), name);
	cr_assert_eq(access(out, X_OK), 0, "%s: %s (run `make` first)", out, strerror(errno));
}

/* Starts epoll_server with `args` (NULL-terminated) and waits, bounded, for
 * its first line, "listening on 127.0.0.1:<port>". */
static void start_server(const char *const *args)
{
	char path[PATH_MAX + 32];
	example_path(path, sizeof path, "epoll_server");
	const char *argv[8] = {path};
	for (int i = 0; args && args[i]; i++)
		argv[i + 1] = args[i];
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	pid_t parent = getpid();
	srv.pid = fork();
	cr_assert_geq(srv.pid, 0);
	if (srv.pid == 0) { /* only async-signal-safe calls until exec */
		dup2(p[1], STDOUT_FILENO); /* dup2 clears close-on-exec on fd 1 */
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* even if this test crashes */
		if (getppid() != parent)
			_exit(127);
		execv(path, (char *const *)argv);
		_exit(127);
	}
	close(p[1]);
	srv.out = p[0];
	/* Generous: a sanitizer build starts slower. */
	cr_assert(srv_wait_for("\n", 10000), "no first line from the server: \"%s\"", srv.log);
	cr_assert_eq(sscanf(srv.log, "listening on 127.0.0.1:%d\n", &srv.port), 1,
		     "unexpected first line: \"%s\"", srv.log);
	cr_assert(srv.port > 0 && srv.port < 65536);
}

static int client_connect(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)srv.port),
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "connect: %s", strerror(errno));
	return fd;
}

static void send_all(int fd, const char *msg)
{
	size_t len = strlen(msg);
	cr_assert_eq(send(fd, msg, len, MSG_NOSIGNAL), (ssize_t)len, "send: %s", strerror(errno));
}

/* Receives exactly strlen(expect) bytes, each wait bounded, and compares. */
static void recv_expect(int fd, const char *expect)
{
	size_t len = strlen(expect), got = 0;
	char buf[256];
	cr_assert_lt(len, sizeof buf);
	while (got < len) {
		cr_assert(readable_within(fd, 3000), "no echo within 3 s (got %zu of %zu bytes)\n%s",
			  got, len, srv.log);
		ssize_t n = recv(fd, buf + got, len - got, 0);
		cr_assert_gt(n, 0, "recv: %zd (%s) after %zu of %zu bytes", n, n ? strerror(errno) : "EOF",
			     got, len);
		got += (size_t)n;
	}
	buf[got] = '\0';
	cr_assert_str_eq(buf, expect);
}

static void round_trip(int fd, const char *msg)
{
	send_all(fd, msg);
	recv_expect(fd, msg);
}

/* True if the server closes `fd` (recv returns 0, a clean EOF) within timeout_ms. */
static bool eof_within(int fd, int timeout_ms)
{
	char c;
	return readable_within(fd, timeout_ms) && recv(fd, &c, 1, MSG_DONTWAIT) == 0;
}

static bool readable_or_writable(int fd, short events, int timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = events};
	return poll(&p, 1, timeout_ms) == 1;
}

/* Waits, bounded, for the server to exit; returns its wait status. */
static int server_exit_status(int timeout_ms)
{
	int status, pidfd = (int)syscall(SYS_pidfd_open, srv.pid, 0);
	if (pidfd >= 0) { /* readable when the process has exited */
		bool exited = readable_within(pidfd, timeout_ms);
		close(pidfd);
		cr_assert(exited, "the server did not exit within %d ms\n%s", timeout_ms, srv.log);
	}
	/* Without pidfd: EOF on its stdout, checked by the caller, already
	 * means it is exiting. */
	cr_assert_eq(waitpid(srv.pid, &status, 0), srv.pid);
	srv.pid = -1;
	return status;
}

/* Sends `sig` with `n` clients connected (conn first_id, first_id + 1, ...):
 * each must see EOF, the server must exit 0 within a bound and report no
 * leaked fd as its last line. */
static void expect_clean_shutdown(int sig, int *clients, int n, int first_id)
{
	cr_assert_eq(kill(srv.pid, sig), 0);
	for (int i = 0; i < n; i++) {
		cr_assert(eof_within(clients[i], 3000), "client %d: no EOF within 3 s\n%s", i, srv.log);
		close(clients[i]);
	}
	cr_assert(srv_read_to_eof(5000), "the server's stdout stayed open 5 s after the signal\n%s",
		  srv.log);
	int status = server_exit_status(5000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "the server did not exit 0 (status 0x%x)\n%s", status, srv.log);
	char want[64];
	snprintf(want, sizeof want, "signal %s: cancelling the server\n",
		 sig == SIGINT ? "SIGINT" : "SIGTERM");
	cr_assert(strstr(srv.log, want), "no \"%s\" in\n%s", want, srv.log);
	for (int i = first_id; i < first_id + n; i++) {
		snprintf(want, sizeof want, "conn %d: server shutting down\n", i);
		cr_assert(strstr(srv.log, want), "no \"%s\" in\n%s", want, srv.log);
	}
	const char *last = "open fds at exit: 0\n";
	size_t ll = strlen(last);
	cr_assert(srv.len >= ll && strcmp(srv.log + srv.len - ll, last) == 0,
		  "last line is not \"open fds at exit: 0\":\n%s", srv.log);
}

Test(epoll_server, echoes_for_two_concurrent_clients)
{
	start_server(NULL);
	int c[2] = {client_connect(), client_connect()};
	char msg[2][128];
	for (int round = 0; round < 5; round++) {
		/* Both requests are in flight before either reply is read. */
		for (int i = 0; i < 2; i++) {
			snprintf(msg[i], sizeof msg[i], "client %d, round %d: %.*s", i, round,
				 round * 7 + i, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ");
			send_all(c[i], msg[i]);
		}
		for (int i = 1; i >= 0; i--)
			recv_expect(c[i], msg[i]);
	}
	cr_assert(srv_wait_for("conn 1: accepted from 127.0.0.1:", 1000));
	cr_assert(srv_wait_for("conn 2: accepted from 127.0.0.1:", 1000));
	/* A client that leaves is noticed and closed by the server. */
	close(c[1]);
	cr_assert(srv_wait_for("conn 2: closed by client\n", 3000), "%s", srv.log);
	round_trip(c[0], "still here");
	expect_clean_shutdown(SIGTERM, c, 1, 1);
}

/* The byte at offset i of the large stream. */
static unsigned char pattern(size_t i) { return (unsigned char)(i * 7 % 251); }

/* Sends the next chunk of the pattern; EAGAIN is not an error. */
static void send_some(int fd, size_t *sent, size_t total)
{
	static unsigned char out[16384];
	size_t len = total - *sent < sizeof out ? total - *sent : sizeof out;
	for (size_t i = 0; i < len; i++)
		out[i] = pattern(*sent + i);
	ssize_t n = send(fd, out, len, MSG_NOSIGNAL | MSG_DONTWAIT);
	cr_assert(n > 0 || errno == EAGAIN, "send: %s", strerror(errno));
	*sent += n > 0 ? (size_t)n : 0;
}

/* A client with small socket buffers writes without reading: the server's
 * echo comes up short, so it must keep the rest pending and stop reading
 * (bounded memory), and the whole pipeline stalls.  Then the client reads:
 * the server resumes on EPOLLOUT, and every byte comes back in order. */
Test(epoll_server, echoes_a_large_stream_under_backpressure)
{
	start_server(NULL);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0);
	int small = 16384; /* set before connect, so the window starts small */
	cr_assert_eq(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
	cr_assert_eq(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)srv.port),
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "connect: %s", strerror(errno));
	enum { TOTAL = 16 << 20 };
	size_t sent = 0, got = 0;

	/* Phase 1: write only, until 300 ms pass with no progress. */
	while (sent < TOTAL) {
		size_t before = sent;
		send_some(fd, &sent, TOTAL);
		if (sent == before && !readable_or_writable(fd, POLLOUT, 300))
			break;
	}
	cr_assert_lt(sent, TOTAL, "16 MiB went in without the client reading: the server "
		     "buffers without bound instead of pushing back");

	/* Phase 2: read everything back (and send the rest), each wait bounded. */
	static unsigned char in[65536];
	while (got < TOTAL) {
		struct pollfd p = {.fd = fd, .events = POLLIN | (sent < TOTAL ? POLLOUT : 0)};
		cr_assert_eq(poll(&p, 1, 5000), 1, "stalled at %zu sent, %zu echoed\n%s", sent, got,
			     srv.log);
		if ((p.revents & POLLOUT) && sent < TOTAL)
			send_some(fd, &sent, TOTAL);
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(fd, in, sizeof in, MSG_DONTWAIT);
			if (n < 0 && errno == EAGAIN)
				continue;
			cr_assert_gt(n, 0, "recv after %zu bytes: %s", got, n ? strerror(errno) : "EOF");
			for (ssize_t i = 0; i < n; i++)
				if (in[i] != pattern(got + (size_t)i))
					cr_assert_fail("byte %zu differs", got + (size_t)i);
			got += (size_t)n;
		}
	}
	expect_clean_shutdown(SIGTERM, &fd, 1, 1);
}

/* With -i 200, a silent client is dropped at its idle timeout while a client
 * that talks every 50 ms keeps being served: each byte received gives its
 * connection a fresh context with a fresh deadline. */
Test(epoll_server, drops_an_idle_client_at_its_timeout)
{
	start_server((const char *[]){"-i", "200", NULL});
	int64_t t0 = now_ns();
	int idle = client_connect();   /* conn 1 */
	int active = client_connect(); /* conn 2 */
	int64_t eof_at = 0;
	int rounds = 0;
	/* Here elapsed time is the point: the active client talks every 50 ms
	 * (the wait on the idle client's EOF paces it) until 500 ms have passed. */
	while (now_ns() - t0 < 500 * CTX_MSEC) {
		if (!eof_at && readable_within(idle, 50)) {
			char c;
			cr_assert_eq(recv(idle, &c, 1, 0), 0, "the idle client got data, not EOF");
			eof_at = now_ns();
		} else if (eof_at) {
			poll(NULL, 0, 50);
		}
		round_trip(active, "ping");
		rounds++;
	}
	/* The idle client's EOF, if it has not come yet, within the 3 s bound. */
	if (!eof_at) {
		int left = (int)((3 * CTX_SEC - (now_ns() - t0)) / CTX_MSEC);
		cr_assert(left > 0 && eof_within(idle, left), "no EOF within 3 s\n%s", srv.log);
		eof_at = now_ns();
	}
	double eof_ms = (double)(eof_at - t0) / CTX_MSEC;
	cr_assert_geq(eof_ms, 200.0, "dropped after %.1f ms, before its 200 ms timeout", eof_ms);
	cr_assert_leq(eof_ms, 3000.0);
	cr_assert_geq(rounds, 5);
	/* 500 ms in, well past 2 idle periods: the active client is still served. */
	round_trip(active, "still served after 500 ms");
	cr_assert(srv_wait_for("conn 1: idle timeout (ETIMEDOUT)\n", 1000), "%s", srv.log);
	cr_assert_null(strstr(srv.log, "conn 2: idle"), "the active client timed out\n%s", srv.log);
	close(idle);
	expect_clean_shutdown(SIGTERM, &active, 1, 2);
}

static void shutdown_with_clients(int sig)
{
	start_server(NULL);
	int c[3];
	for (int i = 0; i < 3; i++) {
		c[i] = client_connect();
		round_trip(c[i], "hello");
	}
	cr_assert(srv_wait_for("conn 3: accepted", 1000));
	expect_clean_shutdown(sig, c, 3, 1);
	cr_assert(strstr(srv.log, "server: shutting down, 3 connection(s) open\n"), "%s", srv.log);
}

Test(epoll_server, sigterm_closes_every_client_and_exits_cleanly)
{
	shutdown_with_clients(SIGTERM);
}

Test(epoll_server, sigint_closes_every_client_and_exits_cleanly)
{
	shutdown_with_clients(SIGINT);
}

Test(epoll_server, sigterm_with_no_client_exits_cleanly)
{
	start_server(NULL);
	expect_clean_shutdown(SIGTERM, NULL, 0, 1);
}

Test(epoll_server, rejects_bad_arguments)
{
	const char *bad[][3] = {{"-p", "70000", NULL}, {"-i", "0", NULL}, {"-i", "12x", NULL},
				{"-x", NULL}};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		char path[PATH_MAX + 32];
		example_path(path, sizeof path, "epoll_server");
		const char *argv[] = {path, bad[i][0], bad[i][1], bad[i][2]};
		pid_t pid = fork();
		cr_assert_geq(pid, 0);
		if (pid == 0) {
			int null = open("/dev/null", O_WRONLY);
			dup2(null, STDOUT_FILENO);
			dup2(null, STDERR_FILENO);
			execv(path, (char *const *)argv);
			_exit(127);
		}
		srv.pid = pid; /* so that a failure below still reaps it */
		int status = server_exit_status(5000);
		cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 2, "%s %s: status 0x%x", bad[i][0],
			  bad[i][1] ? bad[i][1] : "", status);
	}
}
