/* The runner behind tests/shim/criterion/criterion.h (TSan builds only; see
 * that header and Criterion issue #274).
 *
 * Like Criterion, every test runs in a fresh fork()ed process: .init, the
 * test, .fini.  The parent never starts a thread, so forking stays safe under
 * TSan; it only forks, waits and reports.  A child tells the parent how far it
 * got (setup, main, teardown, end, skip) and how many assertions failed through
 * a MAP_SHARED page, so a crash or an exit() in any phase is told apart from a
 * clean end, and a sanitizer report (TSan exits 66 with halt_on_error=1) fails
 * the test whichever phase it comes in.
 *
 * Options: --jobs N / -jN, --filter PATTERN (fnmatch on "suite/name"),
 * --short-filename / -S, --timeout SECONDS, --list / -l, --verbose[=N];
 * others are ignored.  Tests without a timeout get a safety bound of
 * CR_SHIM_SAFETY_TIMEOUT seconds (Criterion has none).
 *
 * Deliberately stricter than Criterion: a failed assertion, a crash or a
 * non-zero exit during .fini, or after the test ended (e.g. a sanitizer's
 * report at exit), fails the test; Criterion only warns. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <criterion/criterion.h>

#include <errno.h>
#include <fnmatch.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CR_SHIM_SAFETY_TIMEOUT 120.0

enum phase { PH_SETUP = 1, PH_MAIN, PH_TEARDOWN, PH_END, PH_SKIP };

static const char *const phase_name[] = {
	[PH_SETUP] = "setup", [PH_MAIN] = "main", [PH_TEARDOWN] = "teardown",
	[PH_END] = "end",     [PH_SKIP] = "skip",
};

/* Written by the test process (any of its threads, or a process it forked),
 * read by the runner once the test process is gone. */
struct slot {
	int phase;
	int failed;
	char skip_msg[1024];
};

struct entry {
	const struct cr_shim_test *t;
	const struct cr_shim_suite *s;
	bool disabled;
	double timeout; /* seconds, > 0 */
	bool safety;    /* timeout is the runner's safety bound */
	pid_t pid;
	double start;
	bool timed_out;
};

static const struct cr_shim_test **tests;
static size_t ntests, tests_cap;
static const struct cr_shim_suite **suites;
static size_t nsuites, suites_cap;

static bool opt_short, opt_list;
static int opt_verbose;
static long opt_jobs;
static double opt_timeout;
static const char *opt_filter;

/* The test process's view. */
static struct slot *cur_slot;
static const struct cr_shim_test *cur_test;
static const struct cr_shim_suite *cur_suite;
static pid_t test_pid;

static void *grow(void *p, size_t *cap, size_t n, size_t size)
{
	if (n < *cap)
		return p;
	*cap = *cap ? *cap * 2 : 64;
	p = realloc(p, *cap * size);
	if (!p) {
		perror("criterion shim: realloc");
		exit(2);
	}
	return p;
}

void cr_shim_register_test_(const struct cr_shim_test *t)
{
	tests = grow(tests, &tests_cap, ntests, sizeof(*tests));
	tests[ntests++] = t;
}

void cr_shim_register_suite_(const struct cr_shim_suite *s)
{
	suites = grow(suites, &suites_cap, nsuites, sizeof(*suites));
	suites[nsuites++] = s;
}

/* ---- Output ------------------------------------------------------------ */

/* One write() per report so that concurrent tests do not interleave lines. */
struct buf {
	char *p;
	size_t len;
	FILE *f;
};

static void buf_open(struct buf *b) { b->f = open_memstream(&b->p, &b->len); }

static void buf_flush(struct buf *b)
{
	if (!b->f)
		return;
	fclose(b->f);
	if (b->p) {
		fflush(stderr);
		for (size_t off = 0; off < b->len;) {
			ssize_t n = write(STDERR_FILENO, b->p + off, b->len - off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			off += (size_t)n;
		}
	}
	free(b->p);
}

static const char *shown_file(const char *file)
{
	const char *slash = opt_short ? strrchr(file, '/') : NULL;
	return slash ? slash + 1 : file;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	struct buf b;
	va_list ap;
	buf_open(&b);
	if (!b.f)
		return;
	va_start(ap, fmt);
	vfprintf(b.f, fmt, ap);
	va_end(ap);
	buf_flush(&b);
}

/* ---- Assertions (test process) ----------------------------------------- */

char *cr_shim_fmt_(const char *fmt, ...)
{
	char *s = NULL;
	va_list ap;
	va_start(ap, fmt);
	if (vasprintf(&s, fmt, ap) < 0)
		s = NULL;
	va_end(ap);
	return s;
}

const char *cr_shim_nonnull_(const char *s) { return s ? s : "(null)"; }

static void report_failure(const char *file, unsigned line, char *defmsg, const char *xfmt,
			   va_list ap)
{
	char *user = NULL;
	if (vasprintf(&user, xfmt, ap) < 0)
		user = NULL;
	const char *msg = user && user[1] ? user + 1 : defmsg ? defmsg : "(out of memory)";

	struct buf b;
	buf_open(&b);
	if (b.f) {
		fprintf(b.f, "[----] %s:%u: Assertion Failed\n[----]   \n", shown_file(file), line);
		for (const char *l = msg;;) {
			const char *nl = strchr(l, '\n');
			int n = nl ? (int)(nl - l) : (int)strlen(l);
			fprintf(b.f, "[----]   %.*s\n", n, l);
			if (!nl)
				break;
			l = nl + 1;
		}
		fprintf(b.f, "[----]   \n");
		buf_flush(&b);
	}
	free(user);
	free(defmsg);
	if (cur_slot)
		__atomic_fetch_add(&cur_slot->failed, 1, __ATOMIC_SEQ_CST);
}

void cr_shim_fail_continue_(const char *file, unsigned line, char *defmsg, const char *xfmt, ...)
{
	va_list ap;
	va_start(ap, xfmt);
	report_failure(file, line, defmsg, xfmt, ap);
	va_end(ap);
}

static void teardown_and_exit(void) __attribute__((noreturn));
static void park(void) __attribute__((noreturn));
static _Thread_local bool in_teardown;

/* A failed cr_assert_*: the failure is recorded; now end the test. */
void cr_shim_fail_abort_(const char *file, unsigned line, char *defmsg, const char *xfmt, ...)
{
	va_list ap;
	va_start(ap, xfmt);
	report_failure(file, line, defmsg, xfmt, ap);
	va_end(ap);

	fflush(NULL);
	if (!cur_slot || getpid() != test_pid)
		_exit(1); /* a process the test forked: its parent sees the status */
	switch (__atomic_load_n(&cur_slot->phase, __ATOMIC_SEQ_CST)) {
	case PH_MAIN:
		/* As Criterion, from whichever thread failed: .fini, then exit. */
		teardown_and_exit();
	case PH_TEARDOWN:
		if (!in_teardown)
			park(); /* another thread is running .fini and will exit */
		exit(1);        /* failed in .fini: stop it there */
	default:
		exit(1); /* failed in .init (Criterion aborts) */
	}
}

void cr_shim_skip_(const char *fmt, ...)
{
	if (cur_slot && getpid() == test_pid) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(cur_slot->skip_msg, sizeof(cur_slot->skip_msg), fmt, ap);
		va_end(ap);
		__atomic_store_n(&cur_slot->phase, PH_SKIP, __ATOMIC_SEQ_CST);
	}
	exit(0); /* as Criterion: no .fini */
}

void cr_log(enum criterion_severity severity, const char *msg, ...)
{
	static const char *const tag[] = {"[----]", "[WARN]", "[ERR ]"};
	if (severity == CR_LOG_INFO && !opt_verbose)
		return;
	char *s = NULL;
	va_list ap;
	va_start(ap, msg);
	if (vasprintf(&s, msg, ap) < 0)
		s = NULL;
	va_end(ap);
	say("%s %s\n", tag[(unsigned)severity < 3 ? severity : 2], s ? s : msg);
	free(s);
}

/* ---- Test process ------------------------------------------------------ */

static void set_phase(int ph) { __atomic_store_n(&cur_slot->phase, ph, __ATOMIC_SEQ_CST); }

static void park(void)
{
	for (;;)
		pause();
}

/* Runs .fini once, on the first thread to get here (the test's, at its end,
 * or one whose cr_assert failed), then exits; any later one parks until the
 * exit.  A process the test forked and that returned from the test function
 * runs .fini too, as under Criterion, but leaves the test's record alone. */
static void teardown_and_exit(void)
{
	bool own = getpid() == test_pid;
	int expected = PH_MAIN;
	if (own && !__atomic_compare_exchange_n(&cur_slot->phase, &expected, PH_TEARDOWN, false,
						__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		park();
	in_teardown = true;
	if (cur_test->data->fini)
		cur_test->data->fini();
	if (cur_suite && cur_suite->data->fini)
		cur_suite->data->fini();
	if (own)
		set_phase(PH_END);
	fflush(NULL);
	exit(0);
}

static void run_child(struct entry *e, struct slot *slot, const sigset_t *mask)
{
	sigprocmask(SIG_SETMASK, mask, NULL);
	cur_slot = slot;
	cur_test = e->t;
	cur_suite = e->s;
	test_pid = getpid();

	set_phase(PH_SETUP);
	if (cur_suite && cur_suite->data->init)
		cur_suite->data->init();
	if (cur_test->data->init)
		cur_test->data->init();
	set_phase(PH_MAIN);
	cur_test->fn();
	teardown_and_exit();
}

/* ---- Runner ------------------------------------------------------------ */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int by_name(const void *a, const void *b)
{
	const struct cr_shim_test *x = *(const struct cr_shim_test *const *)a;
	const struct cr_shim_test *y = *(const struct cr_shim_test *const *)b;
	int c = strcmp(x->suite, y->suite);
	return c ? c : strcmp(x->name, y->name);
}

static const struct cr_shim_suite *find_suite(const char *name)
{
	for (size_t i = 0; i < nsuites; i++)
		if (!strcmp(suites[i]->name, name))
			return suites[i];
	return NULL;
}

static bool matches(const struct cr_shim_test *t)
{
	if (!opt_filter)
		return true;
	char id[512];
	snprintf(id, sizeof(id), "%s/%s", t->suite, t->name);
	return fnmatch(opt_filter, id, FNM_EXTMATCH) == 0;
}

static double num_arg(const char *s, const char *what)
{
	char *end;
	errno = 0;
	double v = strtod(s ? s : "", &end);
	if (!s || end == s || *end || errno || v < 0) {
		fprintf(stderr, "criterion shim: bad %s: %s\n", what, s ? s : "(missing)");
		exit(2);
	}
	return v;
}

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--jobs") || !strcmp(a, "-j"))
			opt_jobs = (long)num_arg(i + 1 < argc ? argv[++i] : NULL, "--jobs");
		else if (!strncmp(a, "--jobs=", 7))
			opt_jobs = (long)num_arg(a + 7, "--jobs");
		else if (!strncmp(a, "-j", 2) && a[2])
			opt_jobs = (long)num_arg(a + 2, "--jobs");
		else if (!strcmp(a, "--filter"))
			opt_filter = i + 1 < argc ? argv[++i] : NULL;
		else if (!strncmp(a, "--filter=", 9))
			opt_filter = a + 9;
		else if (!strcmp(a, "--timeout"))
			opt_timeout = num_arg(i + 1 < argc ? argv[++i] : NULL, "--timeout");
		else if (!strncmp(a, "--timeout=", 10))
			opt_timeout = num_arg(a + 10, "--timeout");
		else if (!strcmp(a, "--short-filename") || !strcmp(a, "-S"))
			opt_short = true;
		else if (!strcmp(a, "--list") || !strcmp(a, "-l"))
			opt_list = true;
		else if (!strcmp(a, "--verbose"))
			opt_verbose = 1;
		else if (!strncmp(a, "--verbose=", 10))
			opt_verbose = (int)num_arg(a + 10, "--verbose");
		/* anything else: ignored */
	}
}

static void list(struct entry *es, size_t n)
{
	for (size_t i = 0; i < n;) {
		size_t j = i;
		while (j < n && !strcmp(es[j].t->suite, es[i].t->suite))
			j++;
		printf("%s: %zu test%s\n", es[i].t->suite, j - i, j - i == 1 ? "" : "s");
		for (size_t k = i; k < j; k++)
			printf("%s %s%s\n", k + 1 == j ? "└──" : "├──", es[k].t->name,
			       es[k].disabled ? " (skipped)" : "");
		i = j;
	}
}

struct stats {
	size_t tested, passing, failing, crashing, skipped;
};

static void finish(struct entry *e, struct slot *s, int status, struct stats *st)
{
	const struct cr_shim_test *t = e->t;
	const struct criterion_test_extra_data *d = t->data;
	double secs = now() - e->start;
	int ph = s->phase;
	const char *pn = ph >= PH_SETUP && ph <= PH_SKIP ? phase_name[ph] : "startup";
	bool sig = WIFSIGNALED(status);
	int code = sig ? WTERMSIG(status) : WEXITSTATUS(status);
	bool failed = s->failed > 0, crashed = false;
	struct buf b;

	buf_open(&b);
	if (!b.f)
		return;
	if (e->timed_out) {
		failed = true;
		fprintf(b.f, "[FAIL] %s::%s: Timed out. (%.2fs%s)\n", t->suite, t->name, secs,
			e->safety ? ", the shim's safety bound" : "");
	} else if (ph == PH_SKIP) {
		if (!failed && !sig && code == 0) {
			st->skipped++; /* as Criterion: not counted as tested */
			fprintf(b.f, "[SKIP] %s::%s: %s\n", t->suite, t->name,
				s->skip_msg[0] ? s->skip_msg : "Test was skipped");
			buf_flush(&b);
			return;
		}
		failed = true; /* Criterion: a skip after a failed expect fails */
		if (sig || code != 0)
			fprintf(b.f, "[----] Warning! The test `%s::%s` %s %d after skipping.\n",
				t->suite, t->name, sig ? "was killed by signal" : "exited with status",
				code);
		fprintf(b.f, "[FAIL] %s::%s: (%.2fs)\n", t->suite, t->name, secs);
	} else if (ph == PH_MAIN && sig && d->signal == 0) {
		failed = crashed = true;
		fprintf(b.f, "[----] %s:%u: Unexpected signal caught below this line! (%s)\n",
			shown_file(t->file), t->line, strsignal(code));
		fprintf(b.f, "[FAIL] %s::%s: CRASH!\n", t->suite, t->name);
	} else if (ph == PH_MAIN || ph == PH_END) {
		/* Ended by itself: returned, exit()ed or was killed by a signal it
		 * declared.  Criterion's rule: no failed assertion, and the signal and
		 * exit status the test declared (none and 0 by default). */
		int got_sig = sig ? code : 0, got_code = sig ? 0 : code;
		if (got_sig != d->signal || got_code != d->exit_code)
			failed = true;
		if (ph == PH_END && (sig || code != 0)) {
			failed = true; /* after .fini: at-exit sanitizer report, say */
			fprintf(b.f, "[----] Warning! The test `%s::%s` %s %d after it ended.\n",
				t->suite, t->name, sig ? "was killed by signal" : "exited with status",
				code);
		} else if (ph == PH_MAIN && !sig && code != d->exit_code && s->failed == 0) {
			fprintf(b.f, "[----] Warning! The test `%s::%s` exited during its main phase"
				     " with status %d%s.\n", t->suite, t->name, code,
				code == 66 ? " (TSan's exit status: a report or a deadly signal)" : "");
		}
		if (failed)
			fprintf(b.f, "[FAIL] %s::%s: (%.2fs)\n", t->suite, t->name, secs);
	} else {
		/* Died in .init or .fini (or before the test began): a crash, as
		 * Criterion counts it in .init, except a failed assert in .fini. */
		failed = true;
		crashed = sig || ph != PH_TEARDOWN || s->failed == 0;
		fprintf(b.f, "[----] Warning! The test `%s::%s` %s during its %s (%s %d).\n",
			t->suite, t->name, sig ? "crashed" : "exited", pn,
			sig ? "signal" : "status", code);
		if (crashed)
			fprintf(b.f, "[FAIL] %s::%s: CRASH!\n", t->suite, t->name);
		else
			fprintf(b.f, "[FAIL] %s::%s: (%.2fs)\n", t->suite, t->name, secs);
	}

	st->tested++;
	if (failed) {
		st->failing++;
		st->crashing += crashed;
	} else {
		st->passing++;
		if (opt_verbose)
			fprintf(b.f, "[PASS] %s::%s: (%.2fs)\n", t->suite, t->name, secs);
	}
	buf_flush(&b);
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	if (opt_jobs <= 0)
		opt_jobs = sysconf(_SC_NPROCESSORS_ONLN) > 0 ? sysconf(_SC_NPROCESSORS_ONLN) : 1;

	qsort(tests, ntests, sizeof(*tests), by_name); /* Criterion's order */
	struct entry *es = calloc(ntests ? ntests : 1, sizeof(*es));
	size_t n = 0;
	for (size_t i = 0; i < ntests; i++) {
		const struct cr_shim_test *t = tests[i];
		if (!matches(t) && !opt_list)
			continue;
		const struct cr_shim_suite *s = find_suite(t->suite);
		struct entry *e = &es[n++];
		e->t = t;
		e->s = s;
		e->disabled = t->data->disabled || (s && s->data->disabled);
		e->timeout = t->data->timeout > 0                  ? t->data->timeout
			     : s && s->data->timeout > 0           ? s->data->timeout
			     : opt_timeout > 0                     ? opt_timeout
								   : CR_SHIM_SAFETY_TIMEOUT;
		e->safety = !(t->data->timeout > 0 || (s && s->data->timeout > 0) || opt_timeout > 0);
	}
	if (opt_list) {
		list(es, n);
		return 0;
	}

	struct slot *slots = mmap(NULL, (n ? n : 1) * sizeof(*slots), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (slots == MAP_FAILED) {
		perror("criterion shim: mmap");
		return 2;
	}

	/* SIGCHLD stays blocked in the runner and is waited for with a timeout;
	 * each test process gets the original mask back. */
	sigset_t chld, orig;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &orig);

	struct stats st = {0};
	size_t next = 0, running = 0;
	for (;;) {
		while (running < (size_t)opt_jobs && next < n) {
			struct entry *e = &es[next++];
			if (e->disabled) {
				say("[SKIP] %s::%s: Test is disabled\n", e->t->suite, e->t->name);
				continue;
			}
			if (opt_verbose)
				say("[RUN ] %s::%s\n", e->t->suite, e->t->name);
			struct slot *s = &slots[e - es];
			memset(s, 0, sizeof(*s));
			fflush(NULL);
			e->start = now();
			e->pid = fork();
			if (e->pid < 0) {
				perror("criterion shim: fork");
				return 2;
			}
			if (e->pid == 0)
				run_child(e, s, &orig);
			running++;
		}
		if (!running)
			break;

		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid < 0 && errno != EINTR) {
			perror("criterion shim: waitpid");
			return 2;
		}
		if (pid > 0) {
			for (size_t i = 0; i < next; i++)
				if (es[i].pid == pid) {
					es[i].pid = 0;
					finish(&es[i], &slots[i], status, &st);
					running--;
					break;
				}
			continue;
		}

		/* Nothing ended yet: enforce timeouts, then sleep until the next
		 * SIGCHLD or deadline. */
		double t = now(), wake = t + 1.0;
		for (size_t i = 0; i < next; i++) {
			struct entry *e = &es[i];
			if (e->pid <= 0 || e->timed_out)
				continue;
			double deadline = e->start + e->timeout;
			if (deadline <= t) {
				e->timed_out = true;
				kill(e->pid, SIGKILL);
			} else if (deadline < wake) {
				wake = deadline;
			}
		}
		double d = wake - t;
		struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
		sigtimedwait(&chld, NULL, &ts);
	}

	say("[====] Synthesis: Tested: %zu | Passing: %zu | Failing: %zu | Crashing: %zu \n",
	    st.tested, st.passing, st.failing, st.crashing);
	return st.failing ? 1 : 0;
}
