/*
 * bench — ctx measured side by side with the raw system calls (the floor),
 * GLib's GCancellable and Go's context, in one run.  Run it with `make bench`
 * (QUICK=1 for ~20 ms rounds); see issue 5 for the targets.
 *
 * Method.  Each figure is the time of one operation.  The iteration count of
 * each series is grown until one round takes ~100 ms (QUICK: ~20 ms); then
 * one warm-up round, then 5 rounds, of which the median is reported with the
 * min-max.  The series of one row (ctx, Go, GLib, the floor) run round by
 * round in turn, so that a noisy machine slows them alike and the ratios
 * hold.  Go runs in its own process (bench/go, GOMAXPROCS=2) as a server
 * that this program drives one round at a time.  Latencies are p50 and p99
 * of single wake-ups, ctx and the raw system call alternating sample by
 * sample; their min-max is over 5 batches.  Memory figures come from RSS
 * deltas (/proc/self/statm) in a fresh child process (this program,
 * re-executed with --mem), so that earlier rounds leave no free memory to
 * hide the growth.
 *
 *   bench [--json FILE] [--data DIR] [--go PATH]
 *   bench --mem KIND COUNT     (internal)
 */
#include <ctx.h>

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef HAVE_GLIB
#include <gio/gio.h>
#endif

#ifndef TFD_IOC_SET_TICKS
#define TFD_IOC_SET_TICKS _IOW('T', 0, uint64_t)
#endif

#define NROUNDS 5

static double target_ns = 100e6;
static bool quick;
static volatile uint64_t sink; /* keeps results alive */

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void sleep_us(long us)
{
	struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = us % 1000000 * 1000};
	nanosleep(&ts, NULL);
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* ------------------------------------------------------------------------ */
/* Figures and the method */

struct fig {
	bool have;
	double med, min, max; /* ns, or bytes for memory rows */
	long iters;           /* per round */
	double per[NROUNDS];  /* each round's figure, in round order */
	int nper;
};

/* A series: run(arg, n) does n iterations and returns the elapsed ns it
 * timed (a series may leave set-up and tear-down out of the timing). */
typedef double (*run_fn)(void *arg, long n);

struct series {
	const char *label;
	run_fn run;
	void *arg;
	long n;
	double per[NROUNDS];
	struct fig *out;
};

static long calibrate(struct series *s)
{
	long n = 1;
	for (;;) {
		double t = s->run(s->arg, n);
		if (t >= target_ns || n >= (1L << 34))
			return n;
		double grow = t > 0 ? target_ns * 1.2 / t : 10;
		if (grow < 2)
			grow = 2;
		if (grow > 10)
			grow = 10;
		n = (long)((double)n * grow);
	}
}

static void fig_from(struct fig *f, double *v, int k, long iters)
{
	f->nper = k <= NROUNDS ? k : 0;
	memcpy(f->per, v, sizeof(double) * (size_t)f->nper);
	qsort(v, (size_t)k, sizeof(*v), cmp_double);
	f->have = true;
	f->med = k % 2 ? v[k / 2] : (v[k / 2 - 1] + v[k / 2]) / 2;
	f->min = v[0];
	f->max = v[k - 1];
	f->iters = iters;
}

/* Calibrates each series, warms each up once, then runs NROUNDS rounds with
 * the series interleaved round by round.  NULL-run series are skipped. */
static void measure(struct series *s, int k)
{
	for (int i = 0; i < k; i++)
		if (s[i].run) {
			s[i].n = calibrate(&s[i]);
			s[i].run(s[i].arg, s[i].n); /* warm-up */
		}
	for (int r = 0; r < NROUNDS; r++)
		for (int i = 0; i < k; i++)
			if (s[i].run)
				s[i].per[r] = s[i].run(s[i].arg, s[i].n) / (double)s[i].n;
	for (int i = 0; i < k; i++)
		if (s[i].run && s[i].out)
			fig_from(s[i].out, s[i].per, NROUNDS, s[i].n);
}

/* ------------------------------------------------------------------------ */
/* Rows of the table */

struct check {
	const char *vs;  /* "Go", "GLib", "floor", "B" ... */
	double ratio;    /* ctx / reference (or the absolute figure) */
	double ratio_of_medians;
	double limit;
	bool absolute;   /* ratio is a figure in the row's unit, limit too */
	bool have;
};

enum unit { NS, BYTES };

struct row {
	const char *key;  /* JSON key */
	const char *name; /* shown */
	enum unit unit;
	struct fig ctx, go, glib, floor;
	const char *floor_name;
	const char *target;
	struct check chk[2];
	const char *note;
};

#define MAXROWS 40
static struct row rows[MAXROWS];
static int nrows;

static struct row *new_row(const char *key, const char *name, const char *target)
{
	struct row *r = &rows[nrows++];
	memset(r, 0, sizeof(*r));
	r->key = key;
	r->name = name;
	r->target = target;
	return r;
}

static void add_check(struct row *r, const char *vs, double num, const struct fig *den,
		      double extra, double limit)
{
	struct check *c = r->chk[0].vs ? &r->chk[1] : &r->chk[0];
	c->vs = vs;
	c->limit = limit;
	if (!den) { /* absolute */
		c->absolute = true;
		c->ratio = num;
		c->have = true;
	} else if (den->have) {
		/* Rounds are interleaved, so round r of ctx and of the reference
		 * ran under the same load: the median of the per-round ratios is
		 * the figure least disturbed by a noisy machine. */
		c->ratio = c->ratio_of_medians = num / (den->med + extra);
		const struct fig *mine = &r->ctx;
		if (extra == 0 && mine->have && mine->nper == NROUNDS && den->nper == NROUNDS &&
		    num == mine->med) {
			double q[NROUNDS];
			for (int i = 0; i < NROUNDS; i++)
				q[i] = mine->per[i] / den->per[i];
			qsort(q, NROUNDS, sizeof(double), cmp_double);
			c->ratio = q[NROUNDS / 2];
		}
		c->have = true;
	}
}

static const char *fmt_val(char *b, size_t n, double v, enum unit u)
{
	if (u == BYTES) {
		if (v >= 1 << 20)
			snprintf(b, n, "%.2f MB", v / (1 << 20));
		else if (v >= 10000)
			snprintf(b, n, "%.0f kB", v / 1024);
		else
			snprintf(b, n, "%.0f B", v);
	} else if (v >= 1e6) {
		snprintf(b, n, "%.2f ms", v / 1e6);
	} else if (v >= 1e4) {
		snprintf(b, n, "%.1f us", v / 1e3);
	} else if (v >= 1e3) {
		snprintf(b, n, "%.2f us", v / 1e3);
	} else if (v >= 10) {
		snprintf(b, n, "%.0f ns", v);
	} else {
		snprintf(b, n, "%.1f ns", v);
	}
	return b;
}

static const char *fmt_fig(char *b, size_t n, const struct fig *f, enum unit u)
{
	if (!f->have) {
		snprintf(b, n, "-");
		return b;
	}
	char m[24], lo[24], hi[24];
	fmt_val(m, sizeof(m), f->med, u);
	if (f->min == f->max) {
		snprintf(b, n, "%s", m);
		return b;
	}
	fmt_val(lo, sizeof(lo), f->min, u);
	fmt_val(hi, sizeof(hi), f->max, u);
	snprintf(b, n, "%s (%s-%s)", m, lo, hi);
	return b;
}

static void print_table(void)
{
	char a[96], b[96], c[96], d[96];
	printf("\n%-46s %-28s %-28s %-28s %-28s %-40s %s\n", "operation", "ctx median (min-max)",
	       "Go", "GLib", "floor", "ratio (median of per-round) vs target", "met");
	for (int i = 0; i < nrows; i++) {
		struct row *r = &rows[i];
		char rt[160] = "", met[32] = "";
		bool any = false, all = true;
		for (int k = 0; k < 2; k++) {
			struct check *ck = &r->chk[k];
			if (!ck->vs)
				continue;
			char one[80];
			if (!ck->have) {
				snprintf(one, sizeof(one), "%s n/a", ck->vs);
			} else if (ck->absolute) {
				char v1[32], v2[32];
				snprintf(one, sizeof(one), "%s <= %s", fmt_val(v1, 32, ck->ratio, r->unit),
					 fmt_val(v2, 32, ck->limit, r->unit));
				any = true;
				all &= ck->ratio <= ck->limit;
			} else {
				snprintf(one, sizeof(one), "%.2fx %s (<= %.2f)", ck->ratio, ck->vs,
					 ck->limit);
				any = true;
				all &= ck->ratio <= ck->limit;
			}
			if (rt[0])
				strcat(rt, "; ");
			strncat(rt, one, sizeof(rt) - strlen(rt) - 1);
		}
		if (!rt[0] && r->floor.have && r->ctx.have)
			snprintf(rt, sizeof(rt), "%.2fx floor (info)", r->ctx.med / r->floor.med);
		snprintf(met, sizeof(met), "%s", any ? (all ? "yes" : "NO") : "");
		printf("%-46s %-28s %-28s %-28s %-28s %-40s %s\n", r->name,
		       fmt_fig(a, 96, &r->ctx, r->unit), fmt_fig(b, 96, &r->go, r->unit),
		       fmt_fig(c, 96, &r->glib, r->unit), fmt_fig(d, 96, &r->floor, r->unit), rt,
		       met);
	}
	printf("\nfloors: ");
	for (int i = 0; i < nrows; i++)
		if (rows[i].floor_name)
			printf("\n  %-44s %s", rows[i].name, rows[i].floor_name);
	printf("\n");
	for (int i = 0; i < nrows; i++)
		if (rows[i].note)
			printf("note: %s: %s\n", rows[i].name, rows[i].note);
}

/* ------------------------------------------------------------------------ */
/* Go: bench/go run as a server, one round per request */

static FILE *go_in, *go_out;
static pid_t go_pid;
static char go_version[64] = "";

static void go_start(const char *path)
{
	if (!path || access(path, X_OK) != 0) {
		printf("note: Go peer skipped (no %s; install golang-go)\n",
		       path ? path : "ctxbench-go");
		return;
	}
	int to[2], from[2];
	if (pipe2(to, O_CLOEXEC) || pipe2(from, O_CLOEXEC))
		die("pipe");
	go_pid = fork();
	if (go_pid < 0)
		die("fork");
	if (go_pid == 0) {
		dup2(to[0], 0);
		dup2(from[1], 1);
		setenv("GOMAXPROCS", "2", 1);
		execl(path, path, (char *)NULL);
		_exit(127);
	}
	close(to[0]);
	close(from[1]);
	go_in = fdopen(to[1], "w");
	go_out = fdopen(from[0], "r");
	char line[128];
	int procs = 0;
	if (!fgets(line, sizeof(line), go_out) ||
	    sscanf(line, "ready %63s %d", go_version, &procs) != 2) {
		printf("note: Go peer skipped (%s did not start)\n", path);
		go_in = go_out = NULL;
		return;
	}
	printf("Go peer: %s, GOMAXPROCS=%d\n", go_version, procs);
}

static double go_cmd(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(go_in, fmt, ap);
	va_end(ap);
	fflush(go_in);
	char line[128];
	if (!fgets(line, sizeof(line), go_out)) {
		fprintf(stderr, "bench: the Go peer died\n");
		exit(1);
	}
	return strtod(line, NULL);
}

static double go_run(void *op, long n) { return go_cmd("run %s %ld\n", (const char *)op, n); }

static void go_stop(void)
{
	if (!go_in)
		return;
	fprintf(go_in, "quit\n");
	fclose(go_in);
	fclose(go_out);
	waitpid(go_pid, NULL, 0);
}

/* The Go series of a row, or a skipped one. */
static struct series go_series(const char *op, struct fig *out)
{
	return (struct series){"go", go_in ? go_run : NULL, (void *)op, 0, {0}, out};
}

/* ------------------------------------------------------------------------ */
/* ctx and the floor: short operations */

static void *(*volatile malloc_p)(size_t) = malloc;

static double floor_malloc(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		void *p = malloc_p(64);
		sink += (uintptr_t)p;
		free(p);
	}
	return now_ns() - t;
}

static double ctx_cancel_bg(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_cancel(ctx_background());
		ctx_cancel(c);
		ctx_unref(c);
	}
	return now_ns() - t;
}

static double ctx_child(void *arg, long n)
{
	(void)arg;
	ctx_t *p = ctx_with_cancel(ctx_background());
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_cancel(p);
		ctx_cancel(c);
		ctx_unref(c);
	}
	t = now_ns() - t;
	ctx_release(p);
	return t;
}

static double ctx_timeout_1h(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
		ctx_cancel(c);
		ctx_unref(c);
	}
	return now_ns() - t;
}

static double ctx_fd_cycle(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_cancel(ctx_background());
		struct pollfd p = {.fd = ctx_fd(c), .events = POLLIN};
		ctx_cancel(c);
		sink += (uint64_t)poll(&p, 1, 0);
		ctx_unref(c);
	}
	return now_ns() - t;
}

static double floor_eventfd(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		uint64_t one = 1;
		sink += (uint64_t)write(fd, &one, sizeof(one));
		struct pollfd p = {.fd = fd, .events = POLLIN};
		sink += (uint64_t)poll(&p, 1, 0);
		close(fd);
	}
	return now_ns() - t;
}

static double ctx_deadline_fd(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
		sink += (uint64_t)ctx_fd(c);
		ctx_cancel(c);
		ctx_unref(c);
	}
	return now_ns() - t;
}

static int spare_efd = -1; /* written by the timerfd floor */

static double floor_timerfd_write(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		struct itimerspec at = {.it_value = {.tv_sec = now.tv_sec + 3600, .tv_nsec = now.tv_nsec}};
		timerfd_settime(fd, TFD_TIMER_ABSTIME, &at, NULL);
		close(fd);
		uint64_t one = 1;
		sink += (uint64_t)write(spare_efd, &one, sizeof(one));
	}
	return now_ns() - t;
}

/* Informational: what ctx's cancel of a timerfd costs at the floor. */
static double floor_timerfd_ticks(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		struct itimerspec at = {.it_value = {.tv_sec = now.tv_sec + 3600, .tv_nsec = now.tv_nsec}};
		timerfd_settime(fd, TFD_TIMER_ABSTIME, &at, NULL);
		uint64_t one = 1;
		sink += (uint64_t)ioctl(fd, TFD_IOC_SET_TICKS, &one);
		close(fd);
	}
	return now_ns() - t;
}

static double ctx_expired_fd(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_timeout(ctx_background(), 0);
		struct pollfd p = {.fd = ctx_fd(c), .events = POLLIN};
		sink += (uint64_t)poll(&p, 1, -1);
		ctx_unref(c);
	}
	return now_ns() - t;
}

static double floor_timerfd_past(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
		struct itimerspec past = {.it_value = {.tv_sec = 0, .tv_nsec = 1}};
		timerfd_settime(fd, TFD_TIMER_ABSTIME, &past, NULL);
		struct pollfd p = {.fd = fd, .events = POLLIN};
		sink += (uint64_t)poll(&p, 1, -1);
		close(fd);
	}
	return now_ns() - t;
}

static double ctx_err_loop(void *arg, long n)
{
	ctx_t *c = arg;
	uint64_t s = 0;
	double t = now_ns();
	for (long i = 0; i < n; i++)
		s += (uint64_t)ctx_err(c);
	t = now_ns() - t;
	sink += s;
	return t;
}

static const int value_keys[33];

struct vchain {
	ctx_t *leaf;
	int depth;
};

static double ctx_value_loop(void *arg, long n)
{
	struct vchain *v = arg;
	uint64_t s = 0;
	double t = now_ns();
	for (long i = 0; i < n; i++)
		s += (uintptr_t)ctx_value(v->leaf, &value_keys[0]);
	t = now_ns() - t;
	sink += s;
	return t;
}

/* A chain of `depth` value contexts; the key looked up is bound at the top,
 * so a lookup walks all of them (Go's Value is timed the same way). */
static ctx_t *value_chain(int depth)
{
	ctx_t *c = ctx_with_value(ctx_background(), &value_keys[0], (void *)&value_keys[0], NULL);
	for (int i = 1; i < depth; i++) {
		ctx_t *next = ctx_with_value(c, &value_keys[i], (void *)&value_keys[i], NULL);
		ctx_unref(c); /* the child holds it */
		c = next;
	}
	return c;
}

/* ------------------------------------------------------------------------ */
/* Trees: node i's parent is node (i-1)/10; node 0 is the root, cancelled. */

struct tree_arg {
	long size;    /* descendants */
	long fds;     /* ctx_fd() on every (size/fds)th node; 0: none */
};

static double ctx_tree(void *arg, long n)
{
	struct tree_arg *ta = arg;
	ctx_t **nodes = malloc(sizeof(*nodes) * (size_t)(ta->size + 1));
	double total = 0;
	for (long it = 0; it < n; it++) {
		nodes[0] = ctx_with_cancel(ctx_background());
		for (long i = 1; i <= ta->size; i++)
			nodes[i] = ctx_with_cancel(nodes[(i - 1) / 10]);
		if (ta->fds) {
			long step = ta->size / ta->fds;
			for (long i = 1; i <= ta->size; i += step)
				if (ctx_fd(nodes[i]) < 0)
					die("ctx_fd in tree");
		}
		double t = now_ns();
		ctx_cancel(nodes[0]);
		total += now_ns() - t;
		for (long i = ta->size; i >= 0; i--)
			ctx_unref(nodes[i]);
	}
	free(nodes);
	return total;
}

/* The floor of the fd tree: one eventfd write to each of `fds` eventfds. */
static double floor_efd_writes(void *arg, long n)
{
	struct tree_arg *ta = arg;
	int *fds = malloc(sizeof(int) * (size_t)ta->fds);
	double total = 0;
	for (long it = 0; it < n; it++) {
		for (long i = 0; i < ta->fds; i++)
			if ((fds[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
				die("eventfd");
		uint64_t one = 1;
		double t = now_ns();
		for (long i = 0; i < ta->fds; i++)
			sink += (uint64_t)write(fds[i], &one, sizeof(one));
		total += now_ns() - t;
		for (long i = 0; i < ta->fds; i++)
			close(fds[i]);
	}
	free(fds);
	return total;
}

/* ------------------------------------------------------------------------ */
/* GLib */

#ifdef HAVE_GLIB
static double glib_new_cancel(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		GCancellable *c = g_cancellable_new();
		g_cancellable_cancel(c);
		g_object_unref(c);
	}
	return now_ns() - t;
}

static void glib_cancel_cb(GCancellable *parent, gpointer child)
{
	(void)parent;
	g_cancellable_cancel(child);
}

/* GLib has no parent-child link: the idiom is a handler on the parent that
 * cancels the child, disconnected when the child is done. */
static double glib_child(void *arg, long n)
{
	(void)arg;
	GCancellable *p = g_cancellable_new();
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		GCancellable *c = g_cancellable_new();
		gulong id = g_cancellable_connect(p, G_CALLBACK(glib_cancel_cb), c, NULL);
		g_cancellable_cancel(c);
		g_cancellable_disconnect(p, id);
		g_object_unref(c);
	}
	t = now_ns() - t;
	g_object_unref(p);
	return t;
}

static double glib_fd_cycle(void *arg, long n)
{
	(void)arg;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		GCancellable *c = g_cancellable_new();
		struct pollfd p = {.fd = g_cancellable_get_fd(c), .events = POLLIN};
		g_cancellable_cancel(c);
		sink += (uint64_t)poll(&p, 1, 0);
		g_cancellable_release_fd(c);
		g_object_unref(c);
	}
	return now_ns() - t;
}

/* The clock read an exact ctx_err on a deadline context cannot avoid (the
 * vDSO clock_gettime it uses), the bare TSC read under it, and the cheapest
 * clock the kernel keeps current, too coarse to decide a deadline. */
static double clock_loop(clockid_t id, long n)
{
	struct timespec ts;
	uint64_t s = 0;
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		clock_gettime(id, &ts);
		s += (uint64_t)ts.tv_nsec;
	}
	t = now_ns() - t;
	sink += s;
	return t;
}

static double floor_clock(void *arg, long n)
{
	(void)arg;
	return clock_loop(CLOCK_MONOTONIC, n);
}

static double floor_coarse(void *arg, long n)
{
	(void)arg;
	return clock_loop(CLOCK_MONOTONIC_COARSE, n);
}

#if defined(__x86_64__)
#include <x86intrin.h>
static double floor_rdtsc(void *arg, long n)
{
	(void)arg;
	uint64_t s = 0;
	double t = now_ns();
	for (long i = 0; i < n; i++)
		s += __rdtsc();
	t = now_ns() - t;
	sink += s;
	return t;
}
#else
#define floor_rdtsc ((run_fn)0)
#endif

static double glib_is_cancelled(void *arg, long n)
{
	GCancellable *c = arg;
	uint64_t s = 0;
	double t = now_ns();
	for (long i = 0; i < n; i++)
		s += (uint64_t)g_cancellable_is_cancelled(c);
	t = now_ns() - t;
	sink += s;
	return t;
}

/* A GLib "tree": every node but the root is a GCancellable cancelled by a
 * g_cancellable_connect() handler on its parent, so cancelling the root
 * cascades through the handlers (recursively, one signal emission per node). */
static double glib_tree(void *arg, long n)
{
	struct tree_arg *ta = arg;
	GCancellable **nodes = malloc(sizeof(*nodes) * (size_t)(ta->size + 1));
	double total = 0;
	for (long it = 0; it < n; it++) {
		nodes[0] = g_cancellable_new();
		for (long i = 1; i <= ta->size; i++) {
			nodes[i] = g_cancellable_new();
			g_cancellable_connect(nodes[(i - 1) / 10], G_CALLBACK(glib_cancel_cb), nodes[i],
					      NULL);
		}
		double t = now_ns();
		g_cancellable_cancel(nodes[0]);
		total += now_ns() - t;
		for (long i = ta->size; i >= 0; i--)
			g_object_unref(nodes[i]);
	}
	free(nodes);
	return total;
}
#endif

#ifdef HAVE_GLIB
#define GLIB_RUN(f) (f)
#else
#define GLIB_RUN(f) ((run_fn)0)
#endif

/* ------------------------------------------------------------------------ */
/* Wake latency: a waiter thread blocks in poll() or epoll_wait() on one fd;
 * the main thread, once the waiter has had 200 us to block, takes the time
 * and fires (ctx_cancel, or an eventfd write); the waiter takes the time when
 * its wait returns. */

enum { W_POLL, W_EPOLL };

static struct waiter {
	pthread_t th;
	int mode;
	int epfd;
	int cmd;  /* eventfd: a new fd to wait on is in `fd` */
	int done; /* eventfd: the wait returned, woke_at is set */
	_Atomic int fd;
	_Atomic int ready;
	double woke_at;
} W;

static void *waiter_main(void *unused)
{
	(void)unused;
	for (;;) {
		uint64_t v;
		if (read(W.cmd, &v, sizeof(v)) != sizeof(v))
			continue;
		int fd = atomic_load(&W.fd);
		if (fd < 0)
			return NULL;
		if (W.mode == W_EPOLL) {
			struct epoll_event ev = {.events = EPOLLIN};
			if (epoll_ctl(W.epfd, EPOLL_CTL_ADD, fd, &ev))
				die("epoll_ctl");
			atomic_store(&W.ready, 1);
			struct epoll_event out;
			while (epoll_wait(W.epfd, &out, 1, -1) != 1)
				;
			W.woke_at = now_ns();
			epoll_ctl(W.epfd, EPOLL_CTL_DEL, fd, NULL);
		} else {
			struct pollfd p = {.fd = fd, .events = POLLIN};
			atomic_store(&W.ready, 1);
			while (poll(&p, 1, -1) != 1)
				;
			W.woke_at = now_ns();
		}
		uint64_t one = 1;
		if (write(W.done, &one, sizeof(one)) != sizeof(one))
			die("write");
	}
}

static void waiter_start(void)
{
	W.cmd = eventfd(0, EFD_CLOEXEC);
	W.done = eventfd(0, EFD_CLOEXEC);
	W.epfd = epoll_create1(EPOLL_CLOEXEC);
	if (W.cmd < 0 || W.done < 0 || W.epfd < 0)
		die("waiter fds");
	if (pthread_create(&W.th, NULL, waiter_main, NULL))
		die("pthread_create");
}

static void waiter_stop(void)
{
	atomic_store(&W.fd, -1);
	uint64_t one = 1;
	if (write(W.cmd, &one, sizeof(one)) != sizeof(one))
		die("write");
	pthread_join(W.th, NULL);
}

/* Hands `fd` to the waiter, lets it block, and returns the time it took from
 * the start of fire() to the waiter's return. */
static double wake_once(int fd, void (*fire)(void *), void *arg, double *fire_cost)
{
	atomic_store(&W.fd, fd);
	atomic_store(&W.ready, 0);
	uint64_t one = 1;
	if (write(W.cmd, &one, sizeof(one)) != sizeof(one))
		die("write");
	while (!atomic_load(&W.ready))
		sched_yield();
	sleep_us(200);
	double t0 = now_ns();
	fire(arg);
	if (fire_cost)
		*fire_cost = now_ns() - t0;
	uint64_t v;
	if (read(W.done, &v, sizeof(v)) != sizeof(v))
		die("read");
	return W.woke_at - t0;
}

static void fire_cancel(void *c) { ctx_cancel(c); }

static void fire_write(void *fdp)
{
	uint64_t one = 1;
	if (write(*(int *)fdp, &one, sizeof(one)) != sizeof(one))
		die("write");
}

static double sample_ctx_wake(void)
{
	ctx_t *c = ctx_with_cancel(ctx_background());
	double l = wake_once(ctx_fd(c), fire_cancel, c, NULL);
	ctx_unref(c);
	return l;
}

static double sample_raw_wake(void)
{
	int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	double l = wake_once(fd, fire_write, &fd, NULL);
	close(fd);
	return l;
}

/* p50 and p99 of the samples: the whole set, and the min-max over NROUNDS
 * batches (sample i belongs to batch i % NROUNDS). */
static void percentiles(double *s, int n, struct fig *p50, struct fig *p99)
{
	double b50[NROUNDS], b99[NROUNDS];
	int per = n / NROUNDS;
	double *tmp = malloc(sizeof(double) * (size_t)per);
	for (int b = 0; b < NROUNDS; b++) {
		for (int i = 0; i < per; i++)
			tmp[i] = s[i * NROUNDS + b];
		qsort(tmp, (size_t)per, sizeof(double), cmp_double);
		b50[b] = tmp[per / 2];
		b99[b] = tmp[(int)(per * 0.99)];
	}
	free(tmp);
	fig_from(p50, b50, NROUNDS, per);
	fig_from(p99, b99, NROUNDS, per);
	double *all = malloc(sizeof(double) * (size_t)n);
	memcpy(all, s, sizeof(double) * (size_t)n);
	qsort(all, (size_t)n, sizeof(double), cmp_double);
	p50->med = all[n / 2]; /* the whole set's percentile, not the batches' median */
	p99->med = all[(int)(n * 0.99)];
	free(all);
}

static double *wake_samples[4]; /* ctx poll, raw poll, ctx epoll, raw epoll, sorted */
static int wake_n;

static void bench_wake(void)
{
	int n = quick ? 1000 : 20000; /* a p99 of 2,000 rested on 20 samples */
	wake_n = n;
	static const char *names[2][3] = {
		{"wake_poll", "wake: cancel -> poll() returns, p50", "wake: cancel -> poll() returns, p99"},
		{"wake_epoll", "wake: cancel -> epoll_wait() returns, p50",
		 "wake: cancel -> epoll_wait() returns, p99"}};
	for (int mode = W_POLL; mode <= W_EPOLL; mode++) {
		W.mode = mode;
		double *c = malloc(sizeof(double) * (size_t)n), *r = malloc(sizeof(double) * (size_t)n);
		for (int i = 0; i < 20; i++) { /* warm-up */
			sample_ctx_wake();
			sample_raw_wake();
		}
		for (int i = 0; i < n; i++) {
			c[i] = sample_ctx_wake();
			r[i] = sample_raw_wake();
		}
		struct row *r50 = new_row(mode ? "wake_epoll_p50" : "wake_poll_p50", names[mode][1],
					  "<= 1.1x raw eventfd write waking the same waiter");
		struct row *r99 = new_row(mode ? "wake_epoll_p99" : "wake_poll_p99", names[mode][2],
					  "<= 1.1x raw eventfd write waking the same waiter");
		percentiles(c, n, &r50->ctx, &r99->ctx);
		percentiles(r, n, &r50->floor, &r99->floor);
		r50->floor_name = r99->floor_name = "eventfd write waking the same waiter";
		add_check(r50, "floor", r50->ctx.med, &r50->floor, 0, 1.1);
		add_check(r99, "floor", r99->ctx.med, &r99->floor, 0, 1.1);
		qsort(c, (size_t)n, sizeof(double), cmp_double);
		qsort(r, (size_t)n, sizeof(double), cmp_double);
		wake_samples[mode * 2] = c;
		wake_samples[mode * 2 + 1] = r;
	}
}

/* ------------------------------------------------------------------------ */
/* After-functions */

static _Atomic long after_count;

static void after_fn(void *arg)
{
	(void)arg;
	atomic_fetch_add_explicit(&after_count, 1, memory_order_relaxed);
}

/* The caller's side: create, register, cancel, unref.  The functions run on
 * the library's thread meanwhile; draining the rest is not timed. */
static double ctx_after_caller(void *arg, long n)
{
	(void)arg;
	long start = atomic_load(&after_count);
	double t = now_ns();
	for (long i = 0; i < n; i++) {
		ctx_t *c = ctx_with_cancel(ctx_background());
		if (ctx_after_func(c, after_fn, NULL, NULL))
			die("ctx_after_func");
		ctx_cancel(c);
		ctx_unref(c);
	}
	t = now_ns() - t;
	while (atomic_load(&after_count) - start < n)
		sleep_us(100);
	return t;
}

static double after_started_at;
static int after_done = -1; /* eventfd: the function has run */

/* Stamps the start and hands the result back as the raw waiter does
 * (waiter_main): the measuring thread blocks in read() meanwhile, in both
 * series alike, rather than waking up to look (which, on a shared vCPU,
 * delayed the library thread in the tail). */
static void after_stamp(void *arg)
{
	(void)arg;
	after_started_at = now_ns();
	uint64_t one = 1;
	if (write(after_done, &one, sizeof(one)) != sizeof(one))
		die("write");
}

static double sample_after_start(void)
{
	if (after_done < 0 && (after_done = eventfd(0, EFD_CLOEXEC)) < 0)
		die("eventfd");
	ctx_t *c = ctx_with_cancel(ctx_background());
	if (ctx_after_func(c, after_stamp, NULL, NULL))
		die("ctx_after_func");
	sleep_us(200); /* let the library thread block */
	double t0 = now_ns();
	ctx_cancel(c);
	uint64_t v;
	if (read(after_done, &v, sizeof(v)) != sizeof(v))
		die("read");
	ctx_unref(c);
	return after_started_at - t0;
}

static void bench_after(void)
{
	struct row *r = new_row("after_func_caller", "ctx_after_func register+cancel (caller)",
				"<= Go's goroutine-waits-on-Done idiom");
	struct series s[] = {
		{"ctx", ctx_after_caller, NULL, 0, {0}, &r->ctx},
		go_series("idiom", &r->go),
	};
	measure(s, 2);
	add_check(r, "Go", r->ctx.med, &r->go, 0, 1.0);
	r->note = "Go: WithCancel + go func(){ <-ctx.Done(); f() }() + cancel; ctx: with_cancel "
		  "+ ctx_after_func + cancel + unref; functions drained untimed";

	W.mode = W_POLL;
	int n = quick ? 300 : 5000; /* a p99 of 1,000 rested on 10 */
	double *c = malloc(sizeof(double) * (size_t)n), *w = malloc(sizeof(double) * (size_t)n);
	for (int i = 0; i < 10; i++) {
		sample_after_start();
		sample_raw_wake();
	}
	for (int i = 0; i < n; i++) {
		c[i] = sample_after_start();
		w[i] = sample_raw_wake();
	}
	struct row *r50 = new_row("after_start_p50", "ctx_after_func: cancel -> fn starts, p50",
				  "<= 1.1x raw cross-thread wake");
	struct row *r99 = new_row("after_start_p99", "ctx_after_func: cancel -> fn starts, p99",
				  "<= 1.1x raw cross-thread wake");
	percentiles(c, n, &r50->ctx, &r99->ctx);
	percentiles(w, n, &r50->floor, &r99->floor);
	r50->floor_name = r99->floor_name = "eventfd write -> poll() returns in another thread";
	add_check(r50, "floor", r50->ctx.med, &r50->floor, 0, 1.1);
	add_check(r99, "floor", r99->ctx.med, &r99->floor, 0, 1.1);
	free(c);
	free(w);
}

/* ------------------------------------------------------------------------ */
/* Memory, in a fresh process: bench --mem KIND COUNT prints bytes */

static double rss_bytes(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	long size = 0, res = 0;
	if (!f || fscanf(f, "%ld %ld", &size, &res) != 2)
		die("statm");
	fclose(f);
	return (double)res * (double)sysconf(_SC_PAGESIZE);
}

static int mem_main(const char *kind, long count)
{
	static int key;
	ctx_t **keep = malloc(sizeof(*keep) * (size_t)count);
	/* Touched now, so it is not in the delta (not 0: malloc+memset(0)
	 * would become an untouched calloc). */
	memset(keep, 0xff, sizeof(*keep) * (size_t)count);
	double before, after;
	if (!strcmp(kind, "churn") || !strcmp(kind, "churn_unref")) {
		/* 1,000,000 short-lived children of one live parent */
		ctx_t *p = ctx_with_cancel(ctx_background());
		bool cancel = !strcmp(kind, "churn");
		for (int i = 0; i < 1000; i++) { /* warm the allocator */
			ctx_t *c = ctx_with_cancel(p);
			if (cancel)
				ctx_cancel(c);
			ctx_unref(c);
		}
		before = rss_bytes();
		for (long i = 0; i < count; i++) {
			ctx_t *c = ctx_with_cancel(p);
			if (cancel)
				ctx_cancel(c);
			ctx_unref(c);
		}
		after = rss_bytes();
		printf("%.0f\n", after - before); /* total growth, bytes */
		return 0;
	}
#ifdef HAVE_GLIB
	if (!strcmp(kind, "glib")) {
		g_object_unref(g_cancellable_new()); /* type registration */
		before = rss_bytes();
		for (long i = 0; i < count; i++)
			keep[i] = (ctx_t *)g_cancellable_new();
		after = rss_bytes();
		printf("%.1f\n", (after - before) / (double)count);
		return 0;
	}
#endif
	before = rss_bytes();
	for (long i = 0; i < count; i++) {
		if (!strcmp(kind, "cancel"))
			keep[i] = ctx_with_cancel(ctx_background());
		else if (!strcmp(kind, "value"))
			keep[i] = ctx_with_value(ctx_background(), &key, &key, NULL);
		else if (!strcmp(kind, "deadline"))
			keep[i] = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
		else
			return 2;
		if (!keep[i])
			die("ctx");
	}
	after = rss_bytes();
	/* Whole bytes: malloc's granularity is 16 B, and a fraction of a byte
	 * per context is heap-top padding (a few pages over 1M objects). */
	printf("%.0f\n", round((after - before) / (double)count));
	return 0;
}

static double mem_child(const char *kind, long count)
{
	char self[4096];
	ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (len < 0)
		die("readlink");
	self[len] = 0;
	char cmd[4200];
	snprintf(cmd, sizeof(cmd), "'%s' --mem %s %ld", self, kind, count);
	FILE *p = popen(cmd, "r");
	double v = NAN;
	if (!p || fscanf(p, "%lf", &v) != 1)
		v = NAN;
	if (p)
		pclose(p);
	return v;
}

static void set_fig(struct fig *f, double v)
{
	if (isnan(v))
		return;
	f->have = true;
	f->med = f->min = f->max = v;
	f->iters = 1;
}

static void bench_mem(void)
{
	const long N = 1000000;
	static const struct {
		const char *kind, *key, *name, *target;
		double limit;
	} m[] = {
		{"cancel", "bytes_cancel", "bytes per live cancel context (1M)", "<= 64 B (Go: 80)", 64},
		{"value", "bytes_value", "bytes per live value context (1M)", "<= 48 B (Go: 40)", 48},
		{"deadline", "bytes_deadline", "bytes per live deadline context (1M)",
		 "<= 80 B (Go: 208)", 80},
	};
	for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
		struct row *r = new_row(m[i].key, m[i].name, m[i].target);
		r->unit = BYTES;
		set_fig(&r->ctx, mem_child(m[i].kind, N));
		if (go_in)
			set_fig(&r->go, go_cmd("mem %s %ld\n", m[i].kind, N));
#ifdef HAVE_GLIB
		if (i == 0)
			set_fig(&r->glib, mem_child("glib", N));
#endif
		if (r->ctx.have)
			add_check(r, "B", r->ctx.med, NULL, 0, m[i].limit);
		if (i == 0)
			r->note = "Go: runtime.MemStats heap growth per context, cancel func kept; "
				  "GLib: RSS growth per GCancellable";
	}
	struct row *r = new_row("churn_rss", "RSS growth, 1M short-lived children of one parent",
				"grows <= 1 MB");
	r->unit = BYTES;
	set_fig(&r->ctx, mem_child("churn", N));
	if (r->ctx.have)
		add_check(r, "B", r->ctx.med, NULL, 0, 1 << 20);
	r->note = "child = ctx_with_cancel(parent); ctx_cancel(child); ctx_unref(child)";
	struct row *u = new_row("churn_rss_unref", "RSS growth, same without cancel (unref only)",
				"grows <= 1 MB");
	u->unit = BYTES;
	set_fig(&u->ctx, mem_child("churn_unref", N));
	if (u->ctx.have)
		add_check(u, "B", u->ctx.med, NULL, 0, 1 << 20);
}

/* ------------------------------------------------------------------------ */
/* The rows */

static void bench_short(void)
{
	struct row *r;

	r = new_row("cancel", "with_cancel(bg)+cancel+unref, no fd",
		    "<= 1/3 Go WithCancel+cancel; <= 1/5 GLib new+cancel+unref");
	{
		struct series s[] = {
			{"ctx", ctx_cancel_bg, NULL, 0, {0}, &r->ctx},
			go_series("cancel", &r->go),
			{"glib", GLIB_RUN(glib_new_cancel), NULL, 0, {0}, &r->glib},
			{"floor", floor_malloc, NULL, 0, {0}, &r->floor},
		};
		measure(s, 4);
	}
	r->floor_name = "malloc(64)+free";
	add_check(r, "Go", r->ctx.med, &r->go, 0, 1.0 / 3);
	add_check(r, "GLib", r->ctx.med, &r->glib, 0, 1.0 / 5);

	r = new_row("child", "child of live parent: create+cancel+unref", "<= 1/3 Go");
	{
		struct series s[] = {
			{"ctx", ctx_child, NULL, 0, {0}, &r->ctx},
			go_series("child", &r->go),
			{"glib", GLIB_RUN(glib_child), NULL, 0, {0}, &r->glib},
		};
		measure(s, 3);
	}
	add_check(r, "Go", r->ctx.med, &r->go, 0, 1.0 / 3);
	r->note = "GLib child: new + g_cancellable_connect(parent) + cancel + disconnect + unref";

	r = new_row("timeout", "with_timeout(1h)+cancel+unref, no fd", "<= 1/5 Go WithTimeout+cancel");
	{
		struct series s[] = {
			{"ctx", ctx_timeout_1h, NULL, 0, {0}, &r->ctx},
			go_series("timeout", &r->go),
		};
		measure(s, 2);
	}
	add_check(r, "Go", r->ctx.med, &r->go, 0, 1.0 / 5);

	r = new_row("fd_cycle", "create+ctx_fd+cancel+poll+unref", "<= 1.10x raw eventfd floor");
	{
		struct series s[] = {
			{"ctx", ctx_fd_cycle, NULL, 0, {0}, &r->ctx},
			{"glib", GLIB_RUN(glib_fd_cycle), NULL, 0, {0}, &r->glib},
			{"floor", floor_eventfd, NULL, 0, {0}, &r->floor},
		};
		measure(s, 3);
	}
	r->floor_name = "eventfd+write+poll+close";
	add_check(r, "floor", r->ctx.med, &r->floor, 0, 1.10);
	r->note = "GLib: new + get_fd + cancel + poll + release_fd + unref";

	r = new_row("deadline_fd", "deadline ctx+ctx_fd+cancel+unref",
		    "<= 1.15x timerfd_create+settime+close + eventfd write");
	struct row *ri = new_row("deadline_fd_ticks_floor",
				 "  (info) raw timerfd_create+settime+SET_TICKS+close", NULL);
	{
		struct series s[] = {
			{"ctx", ctx_deadline_fd, NULL, 0, {0}, &r->ctx},
			{"floor", floor_timerfd_write, NULL, 0, {0}, &r->floor},
			{"floor2", floor_timerfd_ticks, NULL, 0, {0}, &ri->floor},
		};
		measure(s, 3);
	}
	r->floor_name = "timerfd_create+settime(+1h)+close + eventfd write";
	ri->floor_name = "what ctx does: timerfd_create+settime+ioctl(SET_TICKS)+close";
	add_check(r, "floor", r->ctx.med, &r->floor, 0, 1.15);

	r = new_row("expired_fd", "with_timeout(0)+ctx_fd+poll+unref",
		    "<= 1/2 raw timerfd armed in the past+poll+close");
	{
		struct series s[] = {
			{"ctx", ctx_expired_fd, NULL, 0, {0}, &r->ctx},
			{"floor", floor_timerfd_past, NULL, 0, {0}, &r->floor},
		};
		measure(s, 2);
	}
	r->floor_name = "timerfd_create+settime({0,1} abs)+poll+close";
	add_check(r, "floor", r->ctx.med, &r->floor, 0, 0.5);

	/* ctx_err */
	ctx_t *live = ctx_with_cancel(ctx_background());
	ctx_t *dl = ctx_with_timeout(ctx_background(), 3600 * CTX_SEC);
	struct row *re = new_row("err_cancel", "ctx_err, live cancel ctx", "<= GLib is_cancelled");
	struct row *rd = new_row("err_deadline", "ctx_err, live deadline ctx",
				 "<= 2x GLib is_cancelled");
	struct row *rk = new_row("err_coarse", "  (info) clock_gettime(MONOTONIC_COARSE)", NULL);
	struct row *rc = new_row("err_clock", "  (info) clock_gettime(MONOTONIC), vDSO", NULL);
	struct row *rt = new_row("err_rdtsc", "  (info) rdtsc, the bare time-stamp counter", NULL);
#ifdef HAVE_GLIB
	GCancellable *gc = g_cancellable_new();
#else
	void *gc = NULL;
#endif
	{
		struct series s[] = {
			{"ctx", ctx_err_loop, live, 0, {0}, &re->ctx},
			{"ctxdl", ctx_err_loop, dl, 0, {0}, &rd->ctx},
			go_series("err", &re->go),
			{"glib", GLIB_RUN(glib_is_cancelled), gc, 0, {0}, &re->glib},
			{"coarse", floor_coarse, NULL, 0, {0}, &rk->floor},
			{"clock", floor_clock, NULL, 0, {0}, &rc->floor},
			{"rdtsc", floor_rdtsc, NULL, 0, {0}, &rt->floor},
		};
		measure(s, 7);
	}
	rd->glib = re->glib;
	add_check(re, "GLib", re->ctx.med, &re->glib, 0, 1.0);
	add_check(rd, "GLib", rd->ctx.med, &rd->glib, 0, 2.0);
	re->note = "Go: ctx.Err() on a live WithCancel (shown for reference)";
	rk->floor_name = "tick-grained, trails by an unbounded lag: cannot decide a deadline";
	rc->floor_name = "one exact clock read, what ctx_err on a deadline context needs";
	rt->floor_name = "the cheapest exact time source on x86 (no vDSO conversion)";
	rd->note = "exact at the deadline with no thread (SPEC) needs a clock read per call: "
		   "see the (info) rows";
#ifdef HAVE_GLIB
	g_object_unref(gc);
#endif
	ctx_release(live);
	ctx_release(dl);

	/* ctx_value */
	static const int depths[] = {1, 8, 32};
	static const char *vkeys[] = {"value1", "value8", "value32"};
	static const char *vnames[] = {"ctx_value, depth 1", "ctx_value, depth 8",
				       "ctx_value, depth 32"};
	for (int i = 0; i < 3; i++) {
		r = new_row(vkeys[i], vnames[i], i ? "<= 1/2 Go Value" : "(Go shown for reference)");
		struct vchain v = {value_chain(depths[i]), depths[i]};
		struct series s[] = {
			{"ctx", ctx_value_loop, &v, 0, {0}, &r->ctx},
			go_series(vkeys[i], &r->go),
		};
		measure(s, 2);
		if (i)
			add_check(r, "Go", r->ctx.med, &r->go, 0, 0.5);
		ctx_unref(v.leaf);
	}
}

/* Tree cancel: rows for 100,000 (no fds, 10,000 fds) and the sweep for the
 * plot. */
static struct {
	long size;
	struct fig ctx, go, glib;
} sweep[4] = {{.size = 1000}, {.size = 10000}, {.size = 100000}, {.size = 1000000}};

static void bench_tree(void)
{
	static char gops[4][32];
	struct tree_arg ta[4];
	int nsizes = 4;
	for (int i = 0; i < nsizes; i++) {
		ta[i] = (struct tree_arg){sweep[i].size, 0};
		snprintf(gops[i], sizeof(gops[i]), "tree%ld", sweep[i].size);
		/* GLib's 1M-node tree takes seconds to build: not in QUICK. */
		bool glib1m = !(quick && sweep[i].size >= 1000000);
		struct series s[] = {
			{"ctx", ctx_tree, &ta[i], 0, {0}, &sweep[i].ctx},
			go_series(gops[i], &sweep[i].go),
			{"glib", glib1m ? GLIB_RUN(glib_tree) : (run_fn)0, &ta[i], 0, {0}, &sweep[i].glib},
		};
		measure(s, 3);
		fprintf(stderr, "  tree %ld done\n", sweep[i].size);
	}
	struct row *r = new_row("tree_100k", "cancel tree of 100,000 (fan-out 10), no fds",
				"<= 1/3 Go");
	r->ctx = sweep[2].ctx;
	r->go = sweep[2].go;
	r->glib = sweep[2].glib;
	add_check(r, "Go", r->ctx.med, &r->go, 0, 1.0 / 3);
	r->note = quick ? "GLib tree: each node cancelled by a g_cancellable_connect handler on its "
			  "parent; QUICK skips GLib at 1M nodes (seconds to build)"
			: "GLib tree: each node cancelled by a g_cancellable_connect handler on its "
			  "parent";

	struct row *rf = new_row("tree_100k_10k_fds", "the same tree with 10,000 fds",
				 "<= 1.2x (10,000 eventfd writes + no-fd figure)");
	struct tree_arg tf = {100000, 10000};
	struct fig nofd;
	struct series s[] = {
		{"ctx", ctx_tree, &tf, 0, {0}, &rf->ctx},
		{"floor", floor_efd_writes, &tf, 0, {0}, &rf->floor},
		{"ctx-nofd", ctx_tree, &ta[2], 0, {0}, &nofd},
	};
	measure(s, 3);
	rf->floor_name = "10,000 eventfd writes (10,000 eventfds)";
	add_check(rf, "(floor+nofd)", rf->ctx.med, &rf->floor, nofd.med, 1.2);
	static char note[128];
	snprintf(note, sizeof(note), "no-fd figure measured alongside: %.2f ms", nofd.med / 1e6);
	rf->note = note;
}

/* ------------------------------------------------------------------------ */
/* Output */

static void json_fig(FILE *f, const char *name, const struct fig *x, bool comma)
{
	if (x->have)
		fprintf(f, "\"%s\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f, \"iters\": %ld}%s",
			name, x->med, x->min, x->max, x->iters, comma ? ", " : "");
	else
		fprintf(f, "\"%s\": null%s", name, comma ? ", " : "");
}

static void json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; s && *s; s++) {
		if (*s == '"' || *s == '\\')
			fputc('\\', f);
		if ((unsigned char)*s >= 0x20)
			fputc(*s, f);
	}
	fputc('"', f);
}

static void cpu_model(char *out, size_t n)
{
	snprintf(out, n, "unknown");
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[512];
	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, "model name", 10)) {
			char *c = strchr(line, ':');
			if (c) {
				c += 2;
				c[strcspn(c, "\n")] = 0;
				snprintf(out, n, "%s", c);
			}
			break;
		}
	if (f)
		fclose(f);
}

static void loadavg(char *out, size_t n)
{
	FILE *f = fopen("/proc/loadavg", "r");
	out[0] = 0;
	if (f && fgets(out, (int)n, f))
		out[strcspn(out, "\n")] = 0;
	if (f)
		fclose(f);
}

static char load_start[128], date_str[64];

static void write_json(const char *path, double secs)
{
	FILE *f = fopen(path, "w");
	if (!f)
		die(path);
	struct utsname u;
	uname(&u);
	char cpu[256], load_end[128];
	cpu_model(cpu, sizeof(cpu));
	loadavg(load_end, sizeof(load_end));
	fprintf(f, "{\n  \"machine\": {\"uname\": ");
	char un[512];
	snprintf(un, sizeof(un), "%s %s %s %s %s", u.sysname, u.nodename, u.release, u.version,
		 u.machine);
	json_str(f, un);
	fprintf(f, ", \"kernel\": ");
	json_str(f, u.release);
	fprintf(f, ", \"cpu\": ");
	json_str(f, cpu);
	fprintf(f, ", \"cpus\": %ld, \"date\": ", sysconf(_SC_NPROCESSORS_ONLN));
	json_str(f, date_str);
	fprintf(f, ", \"compiler\": ");
	json_str(f, "gcc " __VERSION__);
	fprintf(f, ", \"go\": ");
	json_str(f, go_version[0] ? go_version : NULL);
#ifdef HAVE_GLIB
	char gv[32];
	snprintf(gv, sizeof(gv), "%u.%u.%u", glib_major_version, glib_minor_version,
		 glib_micro_version);
	fprintf(f, ", \"glib\": ");
	json_str(f, gv);
#else
	fprintf(f, ", \"glib\": null");
#endif
	fprintf(f, ", \"loadavg_start\": ");
	json_str(f, load_start);
	fprintf(f, ", \"loadavg_end\": ");
	json_str(f, load_end);
	fprintf(f, "},\n  \"method\": {\"quick\": %s, \"round_ms\": %.0f, \"rounds\": %d, "
		   "\"warmup_rounds\": 1, \"wake_samples\": %d, \"seconds\": %.1f},\n",
		quick ? "true" : "false", target_ns / 1e6, NROUNDS, wake_n, secs);
	fprintf(f, "  \"rows\": [\n");
	for (int i = 0; i < nrows; i++) {
		struct row *r = &rows[i];
		fprintf(f, "    {\"key\": \"%s\", \"operation\": ", r->key);
		json_str(f, r->name);
		fprintf(f, ", \"unit\": \"%s\", ", r->unit == BYTES ? "bytes" : "ns");
		json_fig(f, "ctx", &r->ctx, true);
		json_fig(f, "go", &r->go, true);
		json_fig(f, "glib", &r->glib, true);
		json_fig(f, "floor", &r->floor, true);
		fprintf(f, "\"floor_is\": ");
		json_str(f, r->floor_name);
		fprintf(f, ", \"target\": ");
		json_str(f, r->target);
		fprintf(f, ", \"checks\": [");
		bool first = true;
		for (int k = 0; k < 2; k++) {
			struct check *c = &r->chk[k];
			if (!c->vs)
				continue;
			fprintf(f, "%s{\"vs\": \"%s\", ", first ? "" : ", ", c->vs);
			if (c->have)
				fprintf(f, "\"%s\": %.4f, \"ratio_of_medians\": %.4f, \"limit\": %.4f, \"met\": %s}",
					c->absolute ? "value" : "ratio", c->ratio, c->ratio_of_medians, c->limit,
					c->ratio <= c->limit ? "true" : "false");
			else
				fprintf(f, "\"ratio\": null, \"limit\": %.4f, \"met\": null}", c->limit);
			first = false;
		}
		fprintf(f, "], \"note\": ");
		json_str(f, r->note);
		fprintf(f, "}%s\n", i + 1 < nrows ? "," : "");
	}
	fprintf(f, "  ],\n  \"tree_sweep\": [\n");
	for (int i = 0; i < 4; i++) {
		fprintf(f, "    {\"size\": %ld, ", sweep[i].size);
		json_fig(f, "ctx", &sweep[i].ctx, true);
		json_fig(f, "go", &sweep[i].go, true);
		json_fig(f, "glib", &sweep[i].glib, false);
		fprintf(f, "}%s\n", i < 3 ? "," : "");
	}
	fprintf(f, "  ]\n}\n");
	fclose(f);
}

static void write_data(const char *dir)
{
	char p[4096];
	snprintf(p, sizeof(p), "%s/tree_cancel.dat", dir);
	FILE *f = fopen(p, "w");
	if (!f)
		die(p);
	fprintf(f, "# size  ctx(med min max)  go(med min max)  glib(med min max), ms; NaN: not run\n");
	for (int i = 0; i < 4; i++) {
		fprintf(f, "%ld", sweep[i].size);
		const struct fig *fs[] = {&sweep[i].ctx, &sweep[i].go, &sweep[i].glib};
		for (int k = 0; k < 3; k++)
			if (fs[k]->have)
				fprintf(f, " %.6f %.6f %.6f", fs[k]->med / 1e6, fs[k]->min / 1e6,
					fs[k]->max / 1e6);
			else
				fprintf(f, " NaN NaN NaN");
		fprintf(f, "\n");
	}
	fclose(f);
	snprintf(p, sizeof(p), "%s/wake_latency.dat", dir);
	f = fopen(p, "w");
	if (!f)
		die(p);
	fprintf(f, "# fraction  ctx_poll raw_poll ctx_epoll raw_epoll (us, sorted samples)\n");
	for (int i = 0; i < wake_n; i++)
		fprintf(f, "%.5f %.3f %.3f %.3f %.3f\n", (i + 0.5) / wake_n, wake_samples[0][i] / 1e3,
			wake_samples[1][i] / 1e3, wake_samples[2][i] / 1e3, wake_samples[3][i] / 1e3);
	fclose(f);
}

/* ONLY=short,tree,wake,after,mem runs those sections alone (for work on
 * one row); unset, everything runs. */
static const char *only;

static bool want(const char *section)
{
	return !only || strstr(only, section);
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "--mem"))
		return mem_main(argv[2], atol(argv[3]));
	const char *json = "bench/results.json", *data = NULL, *go = NULL;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--json"))
			json = argv[i + 1];
		else if (!strcmp(argv[i], "--data"))
			data = argv[i + 1];
		else if (!strcmp(argv[i], "--go"))
			go = argv[i + 1];
	}
	only = getenv("ONLY");
	if (only && !*only)
		only = NULL;
	const char *q = getenv("QUICK");
	quick = q && *q && strcmp(q, "0");
	if (quick)
		target_ns = 20e6;
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);

	time_t now = time(NULL);
	strftime(date_str, sizeof(date_str), "%Y-%m-%dT%H:%M:%S%z", localtime(&now));
	loadavg(load_start, sizeof(load_start));
	char cpu[256];
	cpu_model(cpu, sizeof(cpu));
	struct utsname u;
	uname(&u);
	printf("ctx bench: %s, %s %s, %ld cpus, %s, loadavg %s\n", date_str, u.sysname, u.release,
	       sysconf(_SC_NPROCESSORS_ONLN), cpu, load_start);
	printf("method: rounds of ~%.0f ms, 1 warm-up, median of %d (min-max); series of a row "
	       "interleaved round by round\n",
	       target_ns / 1e6, NROUNDS);
#ifndef HAVE_GLIB
	printf("note: GLib peer skipped (built without gio-2.0; install libglib2.0-dev)\n");
#endif
	go_start(go);
	spare_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	double t0 = now_ns();

	if (want("short")) {
		fprintf(stderr, "bench: short operations\n");
		bench_short();
	}
	if (want("tree")) {
		fprintf(stderr, "bench: trees\n");
		bench_tree();
	}
	waiter_start();
	if (want("wake")) {
		fprintf(stderr, "bench: wake latency\n");
		bench_wake();
	}
	if (want("after")) {
		fprintf(stderr, "bench: after-functions\n");
		bench_after();
	}
	waiter_stop();
	if (want("mem")) {
		fprintf(stderr, "bench: memory\n");
		bench_mem();
	}
	go_stop();

	double secs = (now_ns() - t0) / 1e9;
	print_table();
	if (only) { /* a partial run keeps the full run's JSON and plots */
		printf("\n%d rows in %.0f s (ONLY=%s: %s and the plot data not written)\n", nrows,
		       secs, only, json);
		return 0;
	}
	write_json(json, secs);
	if (data)
		write_data(data);
	printf("\n%d rows in %.0f s; figures in %s\n", nrows, secs, json);
	return 0;
}
