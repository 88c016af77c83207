/* After-functions: ctx_after_func, ctx_after_stop, ctx_after_stop_wait. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "internal.h"

/* A probe counts runs and signals an eventfd that the test waits on. */
struct probe {
	atomic_int runs;
	int efd;
	pthread_t thread;
	int64_t at;
	int err_seen;
	ctx_t *ctx;           /* optional: read ctx_err inside fn */
	ctx_after_t *handle;  /* optional: stop from inside fn */
	int stop_inside;      /* result of ctx_after_stop inside fn, +1 */
};

static void probe_init(struct probe *p)
{
	*p = (struct probe){.efd = eventfd(0, EFD_CLOEXEC)};
	cr_assert_geq(p->efd, 0);
}

static void probe_fini(struct probe *p) { close(p->efd); }

static void probe_fn(void *arg)
{
	struct probe *p = arg;
	p->thread = pthread_self();
	p->at = now_ns();
	if (p->ctx)
		p->err_seen = ctx_err(p->ctx);
	if (p->handle)
		p->stop_inside = ctx_after_stop(p->handle) + 1;
	atomic_fetch_add(&p->runs, 1);
	uint64_t one = 1;
	cr_assert_eq(write(p->efd, &one, sizeof(one)), (ssize_t)sizeof(one));
}

/* Waits, bounded, for the probe's fn to have run.  It read()s the eventfd
 * rather than only polling it: the write→read pair is what orders fn's
 * stores before the test's loads (and what ThreadSanitizer recognises). */
static bool probe_ran(struct probe *p, int timeout_ms)
{
	uint64_t n;
	return readable_within(p->efd, timeout_ms) && read(p->efd, &n, sizeof(n)) == sizeof(n);
}

static int thread_count(void)
{
	DIR *d = opendir("/proc/self/task");
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

Test(after, runs_once_after_cancel)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, &h), 0);
	cr_assert_eq(ctx_cancel(c), 0);
	cr_assert(probe_ran(&p, 5000));
	cr_assert_eq(ctx_cancel(c), EALREADY);
	cr_assert_not(ctx_after_stop_wait(h)); /* it ran: false, and it has returned */
	cr_assert_eq(atomic_load(&p.runs), 1);
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, runs_soon_when_already_done)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_cancel(c);
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	cr_assert(probe_ran(&p, 5000));
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, runs_on_a_library_thread_not_the_cancellers)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	p.ctx = c;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	ctx_cancel_cause(c, EPIPE);
	cr_assert(probe_ran(&p, 5000));
	cr_assert_not(pthread_equal(p.thread, pthread_self()));
	cr_assert_eq(p.err_seen, ECANCELED);
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, runs_when_an_ancestor_is_cancelled)
{
	struct probe p;
	probe_init(&p);
	ctx_t *root = ctx_with_cancel(ctx_background());
	ctx_t *v = ctx_with_value(root, &p, &p, NULL);
	ctx_t *c = ctx_with_cancel(v);
	cr_assert_eq(ctx_after_func(v, probe_fn, &p, NULL), 0);
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	ctx_cancel(root);
	/* Both run: consume the eventfd count until it adds up to 2. */
	uint64_t n = 0, got;
	while (n < 2 && readable_within(p.efd, 5000) && read(p.efd, &got, sizeof(got)) == sizeof(got))
		n += got;
	cr_assert_eq(n, 2);
	cr_assert_eq(atomic_load(&p.runs), 2);
	ctx_unref(c);
	ctx_unref(v);
	ctx_unref(root);
	probe_fini(&p);
}

Test(after, fires_at_a_deadline_nobody_watches)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_timeout(ctx_background(), 30 * CTX_MSEC);
	struct timespec d;
	cr_assert(ctx_deadline(c, &d));
	int64_t deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
	p.ctx = c;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	/* Nobody calls the library from here on: only the probe's eventfd. */
	cr_assert(probe_ran(&p, 5000));
	cr_assert_geq(p.at, deadline);
	cr_assert_eq(p.err_seen, ETIMEDOUT);
	ctx_unref(c);
	probe_fini(&p);
}

/* A chain of cancels, each pushed while the previous after-function still
 * runs, keeps the after thread's queue non-empty at every turn (and makes it
 * spin between turns, lib/after.c); neither may keep it from a deadline. */
static atomic_bool chain_stop;
static atomic_long chain_pushed, chain_ran;

static void chain_fn(void *arg)
{
	(void)arg;
	long k = atomic_fetch_add(&chain_ran, 1) + 1;
	int64_t end = now_ns() + 100 * CTX_MSEC;
	while (atomic_load(&chain_pushed) <= k && !atomic_load(&chain_stop) && now_ns() < end)
		sched_yield();
}

static void *chain_pusher(void *arg)
{
	(void)arg;
	int64_t end = now_ns() + 3 * CTX_SEC;
	while (!atomic_load(&chain_stop) && now_ns() < end) {
		ctx_t *c = ctx_with_cancel(ctx_background());
		if (!c || ctx_after_func(c, chain_fn, NULL, NULL))
			abort();
		ctx_cancel(c); /* on the queue before the count says so */
		long k = atomic_fetch_add(&chain_pushed, 1) + 1;
		ctx_unref(c);
		while (atomic_load(&chain_ran) < k && !atomic_load(&chain_stop) && now_ns() < end)
			sched_yield();
	}
	return NULL;
}

Test(after, a_deadline_fires_on_time_during_a_chain_of_cancels)
{
	struct probe p;
	probe_init(&p);
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, chain_pusher, NULL), 0);
	int64_t w = now_ns() + 2 * CTX_SEC;
	while (atomic_load(&chain_ran) < 100 && now_ns() < w)
		sched_yield();
	cr_assert_geq(atomic_load(&chain_ran), 100, "the chain is not running");
	ctx_t *c = ctx_with_timeout(ctx_background(), 30 * CTX_MSEC);
	struct timespec d;
	cr_assert(ctx_deadline(c, &d));
	int64_t deadline = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	bool ran = probe_ran(&p, 1000);
	long n = atomic_load(&chain_ran);
	atomic_store(&chain_stop, true);
	cr_assert(joined_within(t, 5000));
	if (!ran) /* only once the chain stopped: fails below */
		ran = probe_ran(&p, 1000);
	cr_assert(ran, "the deadline's after-function never ran");
	cr_assert_lt(p.at - deadline, 500 * CTX_MSEC, "fired %" PRId64 " ms late (%ld chain fns ran)",
		     (p.at - deadline) / CTX_MSEC, n);
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, deadlines_fire_in_order_of_their_deadlines)
{
	enum { N = 40 };
	struct probe p[N];
	ctx_t *c[N];
	int64_t deadline[N];
	for (int i = 0; i < N; i++) {
		probe_init(&p[i]);
		/* Out of order: 5..45 ms, shuffled by a stride. */
		int64_t ms = 5 + (i * 17) % N;
		c[i] = ctx_with_timeout(ctx_background(), ms * CTX_MSEC);
		struct timespec d;
		ctx_deadline(c[i], &d);
		deadline[i] = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec;
		cr_assert_eq(ctx_after_func(c[i], probe_fn, &p[i], NULL), 0);
	}
	for (int i = 0; i < N; i++) {
		cr_assert(probe_ran(&p[i], 5000), "registration %d never ran", i);
		cr_assert_geq(p[i].at, deadline[i]);
	}
	for (int i = 0; i < N; i++)
		for (int j = 0; j < N; j++)
			if (deadline[i] < deadline[j])
				cr_assert_leq(p[i].at, p[j].at);
	for (int i = 0; i < N; i++) {
		ctx_unref(c[i]);
		probe_fini(&p[i]);
	}
}

Test(after, stopped_before_running_returns_true_and_never_runs)
{
	struct probe p, sentinel;
	probe_init(&p);
	probe_init(&sentinel);
	/* A deadline, so that the stop takes the registration out of the
	 * heap; far enough that a slow (sanitized, loaded) run cannot pass it
	 * before the stop, which would then let fn run. */
	ctx_t *c = ctx_with_timeout(ctx_background(), 60 * CTX_SEC);
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, &h), 0);
	cr_assert(ctx_after_stop(h));
	ctx_cancel(c);
	/* The library thread runs functions in order: once a function
	 * registered after the cancel has run, the stopped one would have. */
	cr_assert_eq(ctx_after_func(c, probe_fn, &sentinel, NULL), 0);
	cr_assert(probe_ran(&sentinel, 5000));
	cr_assert_eq(atomic_load(&p.runs), 0);
	ctx_unref(c);
	probe_fini(&p);
	probe_fini(&sentinel);
}

Test(after, stopped_after_running_returns_false)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, &h), 0);
	ctx_cancel(c);
	cr_assert(probe_ran(&p, 5000));
	cr_assert_not(ctx_after_stop(h));
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, stop_from_inside_the_function_does_not_deadlock)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, &p.handle), 0);
	ctx_cancel(c);
	cr_assert(probe_ran(&p, 5000));
	cr_assert_eq(p.stop_inside, 1); /* false + 1: it had started */
	ctx_unref(c);
	probe_fini(&p);
}

static void stop_wait_inside(void *arg)
{
	struct probe *p = arg;
	p->stop_inside = ctx_after_stop_wait(p->handle) + 1;
	uint64_t one = 1;
	cr_assert_eq(write(p->efd, &one, sizeof(one)), (ssize_t)sizeof(one));
}

Test(after, stop_wait_from_inside_the_function_does_not_wait)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_after_func(c, stop_wait_inside, &p, &p.handle), 0);
	ctx_cancel(c);
	cr_assert(probe_ran(&p, 5000));
	cr_assert_eq(p.stop_inside, 1);
	ctx_unref(c);
	probe_fini(&p);
}

struct slow {
	int started;  /* eventfd: fn has started */
	int release;  /* eventfd: fn may return */
	atomic_int returned;
};

static void slow_fn(void *arg)
{
	struct slow *s = arg;
	uint64_t one = 1;
	cr_assert_eq(write(s->started, &one, sizeof(one)), (ssize_t)sizeof(one));
	cr_assert(readable_within(s->release, 10000));
	atomic_store(&s->returned, 1);
}

static void *release_later(void *arg)
{
	struct slow *s = arg;
	/* Give stop_wait a moment to block; correctness does not depend on it. */
	struct timespec ts = {0, 20 * 1000 * 1000};
	nanosleep(&ts, NULL);
	uint64_t one = 1;
	cr_assert_eq(write(s->release, &one, sizeof(one)), (ssize_t)sizeof(one));
	return NULL;
}

Test(after, stop_wait_returns_only_after_a_running_function_returned)
{
	struct slow s = {.started = eventfd(0, EFD_CLOEXEC), .release = eventfd(0, EFD_CLOEXEC)};
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(c, slow_fn, &s, &h), 0);
	ctx_cancel(c);
	cr_assert(readable_within(s.started, 5000));
	pthread_t t;
	pthread_create(&t, NULL, release_later, &s);
	cr_assert_not(ctx_after_stop_wait(h));
	cr_assert_eq(atomic_load(&s.returned), 1);
	pthread_join(t, NULL);
	ctx_unref(c);
	close(s.started);
	close(s.release);
}

Test(after, stop_after_err_reported_the_deadline_returns_false_and_fn_runs)
{
	/* Keep the library thread busy in another fn, so that it cannot have
	 * taken the registration when its deadline passes. */
	struct slow s = {.started = eventfd(0, EFD_CLOEXEC), .release = eventfd(0, EFD_CLOEXEC)};
	ctx_t *busy = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_after_func(busy, slow_fn, &s, NULL), 0);
	ctx_cancel(busy);
	cr_assert(readable_within(s.started, 5000));

	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_timeout(ctx_background(), 10 * CTX_MSEC);
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, &h), 0);
	cr_assert(readable_within(ctx_fd(c), 5000));
	cr_assert_eq(ctx_err(c), ETIMEDOUT);
	/* Go: once Err() reports the context done, stop returns false and
	 * f runs. */
	cr_assert_not(ctx_after_stop(h), "stop prevented fn after ctx_err said done");
	uint64_t one = 1;
	cr_assert_eq(write(s.release, &one, sizeof(one)), (ssize_t)sizeof(one));
	cr_assert(probe_ran(&p, 5000), "fn never ran");
	cr_assert_eq(atomic_load(&p.runs), 1);
	ctx_unref(c);
	ctx_unref(busy);
	probe_fini(&p);
	close(s.started);
	close(s.release);
}

Test(after, fire_and_forget_runs_and_frees_itself)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_timeout(ctx_background(), 10 * CTX_MSEC);
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	ctx_unref(c); /* the registration holds the context */
	cr_assert(probe_ran(&p, 5000));
	probe_fini(&p);
}

Test(after, the_registration_keeps_the_context_alive)
{
	struct probe p;
	probe_init(&p);
	ctx_t *root = ctx_with_cancel(ctx_background());
	ctx_t *c = ctx_with_cancel(root);
	p.ctx = c;
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	ctx_unref(c); /* only the registration holds c now */
	ctx_cancel_cause(root, EPIPE);
	cr_assert(probe_ran(&p, 5000));
	cr_assert_eq(p.err_seen, ECANCELED);
	ctx_unref(root);
	probe_fini(&p);
}

Test(after, never_done_context_never_runs_and_stop_returns_true)
{
	struct probe p;
	probe_init(&p);
	ctx_t *w = ctx_without_cancel(ctx_background());
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(ctx_background(), probe_fn, &p, NULL), 0);
	cr_assert_eq(ctx_after_func(w, probe_fn, &p, &h), 0);
	cr_assert_not(probe_ran(&p, 50));
	cr_assert(ctx_after_stop(h));
	ctx_unref(w);
	probe_fini(&p);
}

Test(after, bad_input_is_einval)
{
	ctx_after_t *h = (ctx_after_t *)&h;
	cr_assert_eq(ctx_after_func(NULL, probe_fn, NULL, &h), EINVAL);
	cr_assert_null(h);
	cr_assert_eq(ctx_after_func(ctx_background(), NULL, NULL, NULL), EINVAL);
	errno = 0;
	cr_assert_not(ctx_after_stop(NULL));
	cr_assert_eq(errno, EINVAL);
}

static void call_library(void *arg)
{
	struct probe *p = arg;
	/* No library lock is held here: all of these would deadlock if one were. */
	ctx_t *c = ctx_with_cancel(p->ctx);
	cr_assert_eq(ctx_err(c), ECANCELED);
	ctx_t *other = ctx_with_cancel(ctx_background());
	ctx_after_t *h;
	cr_assert_eq(ctx_after_func(other, probe_fn, p, &h), 0);
	cr_assert(ctx_after_stop(h));
	ctx_release(other);
	ctx_release(c);
	probe_fn(p);
}

Test(after, the_function_may_call_the_library)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	p.ctx = c;
	cr_assert_eq(ctx_after_func(c, call_library, &p, NULL), 0);
	ctx_cancel(c);
	cr_assert(probe_ran(&p, 5000));
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, no_library_thread_until_the_first_registration)
{
	int before = thread_count();
	ctx_t *c = ctx_with_timeout(ctx_background(), CTX_SEC);
	ctx_t *d = ctx_with_cancel(c);
	cr_assert_geq(ctx_fd(d), 0);
	ctx_cancel(d);
	cr_assert(readable_now(ctx_fd(d)));
	cr_assert_eq(thread_count(), before);
	struct probe p;
	probe_init(&p);
	cr_assert_eq(ctx_after_func(d, probe_fn, &p, NULL), 0);
	cr_assert(probe_ran(&p, 5000));
#ifdef __SANITIZE_THREAD__
	/* TSan starts a background thread of its own at the first
	 * pthread_create. */
	cr_assert_eq(thread_count(), before + 2);
#else
	cr_assert_eq(thread_count(), before + 1);
#endif
	ctx_release(d);
	ctx_release(c);
	probe_fini(&p);
}

/* Runs one after-function, so that the library thread exists before a fork. */
static void start_the_after_thread(void)
{
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	ctx_cancel(c);
	cr_assert(probe_ran(&p, 5000));
	ctx_unref(c);
	probe_fini(&p);
}

Test(after, a_forked_child_gets_a_working_thread)
{
	SKIP_FORK_WITH_THREADS();
	start_the_after_thread();
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		struct probe q;
		q.efd = eventfd(0, EFD_CLOEXEC);
		atomic_init(&q.runs, 0);
		q.ctx = NULL;
		q.handle = NULL;
		ctx_t *k = ctx_with_timeout(ctx_background(), 10 * CTX_MSEC);
		if (ctx_after_func(k, probe_fn, &q, NULL) != 0)
			_exit(2);
		_exit(readable_within(q.efd, 5000) ? 0 : 1);
	}
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
}

/* A fork while the thread runs one fn of a batch: the registrations it had
 * taken with it but not started are the child's to run too (as those still
 * queued are), and ctx_after_stop_wait() on one of them returns there; so
 * does ctx_after_stop_wait() on the one the parent's thread was running. */
static atomic_int fork_a_started, fork_b_ran, fork_c_ran;
static void fork_slow_fn(void *arg)
{
	(void)arg;
	atomic_store(&fork_a_started, 1);
	struct timespec ts = {0, 300 * 1000 * 1000};
	nanosleep(&ts, NULL);
}
static void fork_b_fn(void *arg) { (void)arg; atomic_store(&fork_b_ran, 1); }
static void fork_c_fn(void *arg) { (void)arg; atomic_store(&fork_c_ran, 1); }

Test(after, a_fork_during_a_batch_loses_none_of_it_in_the_child)
{
	SKIP_FORK_WITH_THREADS();
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_after_t *ha, *hb;
	cr_assert_eq(ctx_after_func(c, fork_slow_fn, NULL, &ha), 0);
	cr_assert_eq(ctx_after_func(c, fork_b_fn, NULL, &hb), 0);
	ctx_cancel(c); /* one batch: the slow fn, then b */
	while (!atomic_load(&fork_a_started))
		sched_yield();
	cr_assert_eq(atomic_load(&fork_b_ran), 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		alarm(5); /* a lost b: stop_wait would never return */
		if (ctx_after_func(c, fork_c_fn, NULL, NULL) != 0) /* starts a thread */
			_exit(2);
		for (int i = 0; i < 500 && !atomic_load(&fork_c_ran); i++)
			usleep(10000);
		if (!atomic_load(&fork_c_ran))
			_exit(3);
		if (ctx_after_stop_wait(hb))
			_exit(4);
		if (!atomic_load(&fork_b_ran))
			_exit(1);
		/* The parent's thread was inside the slow fn: nothing here
		 * will ever run the rest of it, so there is nothing to wait
		 * for. */
		_exit(ctx_after_stop_wait(ha) ? 5 : 0);
	}
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
	cr_assert(!ctx_after_stop_wait(ha));
	cr_assert(!ctx_after_stop_wait(hb));
	cr_assert_eq(atomic_load(&fork_b_ran), 1);
	ctx_unref(c);
}

/* A registration inherited across fork() fires at its deadline in the child
 * too, though the child registers nothing after the fork. */
static atomic_int inherited_ran;
static void inherited_fn(void *arg) { (void)arg; atomic_store(&inherited_ran, 1); }

Test(after, a_forked_child_fires_an_inherited_deadline)
{
	SKIP_FORK_WITH_THREADS();
	start_the_after_thread();
	ctx_t *c = ctx_with_timeout(ctx_background(), 100 * CTX_MSEC);
	cr_assert_eq(ctx_after_func(c, inherited_fn, NULL, NULL), 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		for (int i = 0; i < 300 && !atomic_load(&inherited_ran); i++)
			usleep(10000);
		_exit(atomic_load(&inherited_ran) ? 0 : 1);
	}
	int status = waitpid_within(pid, 10000);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
	ctx_unref(c);
}

/* Threads register and stop while another cancels the shared parent: every
 * registration either was stopped (true, never ran) or ran (false). */
struct race {
	ctx_t *parent;
	atomic_int stopped, ran_total;
	atomic_int go;
};

static void count_fn(void *arg)
{
	atomic_fetch_add(&((struct race *)arg)->ran_total, 1);
}

static void *racer(void *arg)
{
	struct race *r = arg;
	while (!atomic_load(&r->go))
		;
	for (int i = 0; i < 300; i++) {
		ctx_t *c = (i & 1) ? ctx_with_cancel(r->parent)
				   : ctx_with_timeout(r->parent, (i % 7) * CTX_MSEC);
		cr_assert_not_null(c);
		ctx_after_t *h;
		cr_assert_eq(ctx_after_func(c, count_fn, r, &h), 0);
		if (i % 3 == 0)
			ctx_cancel(c);
		if (ctx_after_stop_wait(h))
			atomic_fetch_add(&r->stopped, 1);
		ctx_release(c);
	}
	return NULL;
}

Test(after, stop_and_cancel_race_to_a_consistent_outcome)
{
	enum { T = 3 };
	struct race r = {.parent = ctx_with_cancel(ctx_background())};
	pthread_t t[T];
	for (int i = 0; i < T; i++)
		pthread_create(&t[i], NULL, racer, &r);
	atomic_store(&r.go, 1);
	struct timespec ts = {0, 2 * 1000 * 1000};
	nanosleep(&ts, NULL);
	ctx_cancel(r.parent);
	for (int i = 0; i < T; i++)
		pthread_join(t[i], NULL);
	/* stop_wait returned false only after fn returned: every registration
	 * is accounted for exactly once. */
	cr_assert_eq(atomic_load(&r.stopped) + atomic_load(&r.ran_total), T * 300);
	ctx_unref(r.parent);
}

/* A fire-and-forget registration on a context with a deadline, whose context
 * is cancelled, and whose fn runs and finishes, in the window right after
 * ctx_after_func() has linked it (the internal test hook): the call must not
 * touch the registration afterwards (the ASan build catches a use after
 * free) and fn runs exactly once. */
static struct probe *hook_probe;

static void cancel_and_wait_for_fn(ctx_t *ctx)
{
	ctx_cancel(ctx);
	cr_assert(probe_ran(hook_probe, 5000));
}

Test(after, fire_and_forget_survives_a_cancel_right_after_it_is_linked)
{
	struct probe p;
	probe_init(&p);
	hook_probe = &p;
	ctxi_after_linked_hook = cancel_and_wait_for_fn;
	ctx_t *c = ctx_with_timeout(ctx_background(), CTX_SEC);
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	ctxi_after_linked_hook = NULL;
	cr_assert_eq(atomic_load(&p.runs), 1);
	/* Nothing was left in the deadline heap: a later registration on a
	 * short deadline still fires on time, and the first never again. */
	struct probe q;
	probe_init(&q);
	ctx_t *d = ctx_with_timeout(ctx_background(), 10 * CTX_MSEC);
	cr_assert_eq(ctx_after_func(d, probe_fn, &q, NULL), 0);
	cr_assert(probe_ran(&q, 5000));
	cr_assert_eq(atomic_load(&p.runs), 1);
	ctx_unref(d);
	ctx_unref(c);
	probe_fini(&q);
	probe_fini(&p);
}

/* Many of the same, raced for real by a cancel from another thread. */
struct ff_race {
	pthread_barrier_t bar;
	ctx_t *c;
	atomic_int ran;
};

static void ff_fn(void *arg) { atomic_fetch_add(&((struct ff_race *)arg)->ran, 1); }

static void *ff_cancel(void *arg)
{
	struct ff_race *r = arg;
	pthread_barrier_wait(&r->bar);
	ctx_cancel(r->c);
	return NULL;
}

Test(after, fire_and_forget_on_a_deadline_context_survives_a_racing_cancel)
{
	enum { ROUNDS = 2000 };
	struct ff_race r = {.ran = 0};
	pthread_barrier_init(&r.bar, NULL, 2);
	for (int i = 0; i < ROUNDS; i++) {
		r.c = ctx_with_timeout(ctx_background(), CTX_SEC);
		pthread_t t;
		cr_assert_eq(pthread_create(&t, NULL, ff_cancel, &r), 0);
		pthread_barrier_wait(&r.bar);
		cr_assert_eq(ctx_after_func(r.c, ff_fn, &r, NULL), 0);
		pthread_join(t, NULL);
		ctx_unref(r.c);
	}
	pthread_barrier_destroy(&r.bar);
	/* Every registration runs once: its context was cancelled. */
	struct probe p;
	probe_init(&p);
	ctx_t *c = ctx_with_cancel(ctx_background());
	ctx_cancel(c);
	cr_assert_eq(ctx_after_func(c, probe_fn, &p, NULL), 0);
	cr_assert(probe_ran(&p, 10000)); /* runs after all queued before it */
	cr_assert_eq(atomic_load(&r.ran), ROUNDS);
	ctx_unref(c);
	probe_fini(&p);
}
