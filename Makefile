# ctx — see README.md.
#
#   make            libctx.so.0, libctx.a and the examples, in build/
#   make demo       build, then run examples/demo, blocking_read and xproc
#   make check      the test suites: plain, ASan+UBSan, TSan (separate builds)
#   make install    PREFIX=/usr/local DESTDIR= ; make uninstall
#   make bench      ctx against Go, GLib and the raw system calls (QUICK=1: short;
#                   ONLY=short,tree,wake,after,mem: those sections, table only)
#
# `demo` and `check` first run `deps`, which asks pkg-config for the Debian
# packages the project needs and installs the missing ones when run as root.

VERSION    := 0.1.0
SOVERSION  := 0
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PCDIR      ?= $(LIBDIR)/pkgconfig

CC   ?= cc
B    ?= build
OPT  ?= -O2
SAN  ?=
WERROR ?=

WARN    := -Wall -Wextra -Wpedantic $(if $(WERROR),-Werror)
CFLAGS  ?=
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE -g $(OPT) $(WARN) -fPIC -Iinclude $(SAN) $(CFLAGS)
LDLIBS  := -luring -lpthread

# pkg-config name : Debian package.  Criterion runs the tests; liburing backs
# include/ctx_uring.h.
DEPS := criterion:libcriterion-dev liburing:liburing-dev

LIB_SRCS  := $(wildcard lib/*.c)
LIB_OBJS  := $(LIB_SRCS:lib/%.c=$(B)/lib/%.o)
HEADERS   := $(wildcard include/*.h)
TEST_SRCS := $(wildcard tests/*.c)
TESTS     := $(TEST_SRCS:tests/%.c=$(B)/tests/%)
EXAMPLES  := $(patsubst examples/%.c,$(B)/examples/%,$(wildcard examples/*.c))

SONAME := libctx.so.$(SOVERSION)

.PHONY: all deps demo check check-build check-run check-abi check-install \
	install uninstall clean
.DELETE_ON_ERROR:

all: $(B)/$(SONAME) $(B)/libctx.a $(EXAMPLES)

$(B)/lib/%.o: lib/%.c lib/internal.h $(HEADERS) | $(B)/lib
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(B)/$(SONAME): $(LIB_OBJS) lib/ctx.map
	$(CC) $(ALL_CFLAGS) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=lib/ctx.map \
		-Wl,-z,defs -o $@ $(LIB_OBJS) $(LDLIBS)
	ln -sf $(SONAME) $(B)/libctx.so

$(B)/libctx.a: $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $(LIB_OBJS)

# Examples and tests link the static library: they run from the build tree,
# and the tests reach the library's internal fault-injection hook.
$(B)/examples/%: examples/%.c $(B)/libctx.a $(HEADERS) | $(B)/examples
	$(CC) $(ALL_CFLAGS) $< -o $@ $(B)/libctx.a $(LDLIBS)

# TSan cannot run Criterion: boxfort probes random addresses for its
# "inheritable arena", all inside TSan's shadow ranges, so every test binary
# aborts at start (Criterion issue #274).  TEST_SHIM=1 (the default when SAN
# has -fsanitize=thread) builds the same tests against tests/shim/ instead: a
# Criterion work-alike, one fork per test.  The .fw-* mark relinks the tests
# of a build dir when the choice flips.
TEST_SHIM ?= $(if $(findstring -fsanitize=thread,$(SAN)),1)
SHIM_SRCS := tests/shim/runner.c tests/shim/criterion/criterion.h
TEST_FW = $(if $(TEST_SHIM),-Itests/shim tests/shim/runner.c,$$(pkg-config --cflags --libs criterion))
TEST_FW_MARK := $(B)/tests/.fw-$(if $(TEST_SHIM),shim,criterion)

$(B)/tests/%: tests/%.c tests/helpers.h $(B)/libctx.a $(HEADERS) $(TEST_FW_MARK) \
		$(if $(TEST_SHIM),$(SHIM_SRCS)) | $(B)/tests
	$(CC) $(ALL_CFLAGS) -Wno-pedantic -Ilib $< -o $@ $(B)/libctx.a \
		$(TEST_FW) $(LDLIBS)
$(TEST_FW_MARK): | $(B)/tests
	rm -f $(B)/tests/.fw-* && touch $@
$(B)/tests/examples: $(EXAMPLES) # it runs them
$(B)/tests/uring: $(EXAMPLES) # runs examples/uring_echo

$(B)/lib $(B)/examples $(B)/tests:
	mkdir -p $@

# ---------------------------------------------------------------------------
# Packages

deps:
	@missing=""; \
	command -v pkg-config >/dev/null 2>&1 || missing="pkg-config"; \
	for d in $(DEPS); do \
		pc=$${d%%:*}; deb=$${d#*:}; \
		pkg-config --exists $$pc 2>/dev/null || missing="$$missing $$deb"; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "deps: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends $$missing || \
		{ apt-get update && apt-get install -y --no-install-recommends $$missing; }; \
	else \
		echo "deps: missing Debian packages; run:"; \
		echo "    sudo apt-get install -y$$missing"; \
		exit 1; \
	fi

# ---------------------------------------------------------------------------
# Demo and tests

demo: deps
	$(MAKE) --no-print-directory $(B)/examples/demo $(B)/examples/blocking_read $(B)/examples/xproc
	$(B)/examples/demo
	@echo; echo "== examples/blocking_read: a thread blocked in ctx_read, cancelled, then timed out"
	$(B)/examples/blocking_read
	@echo; echo "== examples/xproc: a context sent to a worker process, which the parent cancels"
	$(B)/examples/xproc

ASAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
TSAN := -fsanitize=thread

# The suites build with -Werror: a warning is a failure here, not in users' builds.
check: deps
	$(MAKE) --no-print-directory check-run WERROR=1
	$(MAKE) --no-print-directory check-abi check-install
	$(B)/examples/demo > /dev/null && $(B)/examples/blocking_read > /dev/null && \
		$(B)/examples/xproc > /dev/null && \
		echo "check: examples demo, blocking_read and xproc ran clean"
	$(MAKE) --no-print-directory check-run WERROR=1 B=build/asan OPT=-O1 SAN="$(ASAN)"
	$(MAKE) --no-print-directory check-run WERROR=1 B=build/tsan OPT=-O1 SAN="$(TSAN)" TEST_SHIM=1
	@echo "check: all suites passed (plain, asan+ubsan, tsan)"

check-build: all $(TESTS)

# Each suite runs in its own process per test (Criterion's default), so a
# test may lower its fd limit or inject faults without touching the others.
check-run: check-build
	@set -e; for t in $(TESTS); do \
		echo "== $$t"; \
		ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
		$$t --jobs 2 --short-filename; \
	done

# The shared library exports ctx_* and nothing else.
check-abi: $(B)/$(SONAME)
	@bad=$$(nm -D --defined-only $(B)/$(SONAME) | awk '$$2 ~ /[TDBR]/ {print $$3}' | grep -v '^ctx_' || true); \
	if [ -n "$$bad" ]; then echo "check-abi: exported non-ctx_ symbols: $$bad"; exit 1; fi; \
	readelf -d $(B)/$(SONAME) | grep -q 'SONAME.*\[$(SONAME)\]' || { echo "check-abi: no soname"; exit 1; }; \
	echo "check-abi: only ctx_* exported, soname $(SONAME)"

# Installs into a scratch DESTDIR, builds an outside program with pkg-config
# against it, runs it, and uninstalls.
check-install: all
	@set -e; d=$$(mktemp -d); trap 'rm -rf $$d' EXIT; \
	$(MAKE) --no-print-directory -s install DESTDIR=$$d PREFIX=/opt/ctx; \
	printf '#include <ctx.h>\nint main(void){ctx_t *c=ctx_with_cancel(ctx_background());int ok=ctx_cancel(c)==0&&ctx_err(c)==ECANCELED;ctx_release(c);return !ok;}\n' > $$d/prog.c; \
	PKG_CONFIG_SYSROOT_DIR=$$d PKG_CONFIG_PATH=$$d/opt/ctx/lib/pkgconfig \
		$(CC) $$d/prog.c $$(PKG_CONFIG_SYSROOT_DIR=$$d PKG_CONFIG_PATH=$$d/opt/ctx/lib/pkgconfig pkg-config --cflags --libs ctx) -o $$d/prog; \
	LD_LIBRARY_PATH=$$d/opt/ctx/lib $$d/prog; \
	printf '#include <ctx_uring.h>\nint main(void){struct io_uring r;if(io_uring_queue_init(8,&r,0))return 0;ctx_uring_t *cu=ctx_uring_new(&r);int ok=cu!=NULL;io_uring_queue_exit(&r);ctx_uring_free(cu);return !ok;}\n' > $$d/uprog.c; \
	$(CC) $$d/uprog.c $$(PKG_CONFIG_SYSROOT_DIR=$$d PKG_CONFIG_PATH=$$d/opt/ctx/lib/pkgconfig pkg-config --cflags --libs ctx) -o $$d/uprog; \
	LD_LIBRARY_PATH=$$d/opt/ctx/lib $$d/uprog; \
	$(MAKE) --no-print-directory -s uninstall DESTDIR=$$d PREFIX=/opt/ctx; \
	left=$$(find $$d/opt -type f); [ -z "$$left" ] || { echo "check-install: left behind: $$left"; exit 1; }; \
	echo "check-install: install, pkg-config builds (ctx.h, ctx_uring.h), run, uninstall ok"

# ---------------------------------------------------------------------------
# Install

install: all
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PCDIR)
	install -m 644 $(HEADERS) $(DESTDIR)$(INCLUDEDIR)/
	install -m 755 $(B)/$(SONAME) $(DESTDIR)$(LIBDIR)/
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libctx.so
	install -m 644 $(B)/libctx.a $(DESTDIR)$(LIBDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    ctx.pc.in > $(DESTDIR)$(PCDIR)/ctx.pc

uninstall:
	rm -f $(addprefix $(DESTDIR)$(INCLUDEDIR)/,$(notdir $(HEADERS)))
	rm -f $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/libctx.so \
	      $(DESTDIR)$(LIBDIR)/libctx.a $(DESTDIR)$(PCDIR)/ctx.pc

clean:
	rm -rf build

# ---------------------------------------------------------------------------
# Benchmarks (never part of `check`): bench/bench.c drives ctx, the raw system
# calls, GLib's GCancellable and Go (bench/go, run as a server) round by round,
# prints the table and writes bench/results.json; gnuplot draws the PNGs.
# ctx is built again in build/bench with -O2 and no sanitizers.  The peers are
# installed when run as root, else skipped with a note.  QUICK=1: ~20 ms rounds.

BENCH_B     := build/bench
BENCH_DEPS  := pkg:gio-2.0:libglib2.0-dev cmd:go:golang-go cmd:gnuplot:gnuplot-nox
BENCH_GOENV := GOCACHE=$(CURDIR)/$(BENCH_B)/gocache GOPATH=$(CURDIR)/$(BENCH_B)/gopath \
	GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GO111MODULE=on GOTELEMETRY=off
QUICK ?=
ONLY ?=

.PHONY: bench bench-deps

bench-deps:
	@missing=""; \
	for d in $(BENCH_DEPS); do \
		how=$${d%%:*}; rest=$${d#*:}; name=$${rest%%:*}; deb=$${rest#*:}; \
		if [ $$how = pkg ]; then pkg-config --exists $$name 2>/dev/null || missing="$$missing $$deb"; \
		else command -v $$name >/dev/null 2>&1 || missing="$$missing $$deb"; fi; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "bench-deps: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends $$missing || \
		{ apt-get update && apt-get install -y --no-install-recommends $$missing; } || \
		echo "bench-deps: install failed; missing peers will be skipped"; \
	else \
		echo "bench-deps: not root; peers from$$missing will be skipped"; \
	fi

bench: deps bench-deps
	@$(MAKE) --no-print-directory B=$(BENCH_B) OPT=-O2 SAN= CFLAGS= $(BENCH_B)/libctx.a
	@glib=""; if pkg-config --exists gio-2.0 2>/dev/null; then \
		glib="-DHAVE_GLIB $$(pkg-config --cflags --libs gio-2.0)"; \
	else echo "bench: GLib peer skipped (no gio-2.0: apt-get install libglib2.0-dev)"; fi; \
	echo "$(CC) -O2 bench/bench.c -o $(BENCH_B)/bench"; \
	$(CC) -std=c11 -D_GNU_SOURCE -g -O2 $(WARN) -Iinclude bench/bench.c -o $(BENCH_B)/bench \
		$(BENCH_B)/libctx.a $$glib $(LDLIBS) -lm
	@rm -f $(BENCH_B)/ctxbench-go; if command -v go >/dev/null 2>&1; then \
		echo "go build bench/go -> $(BENCH_B)/ctxbench-go"; \
		cd bench/go && env $(BENCH_GOENV) go build -o $(CURDIR)/$(BENCH_B)/ctxbench-go . || \
		echo "bench: Go peer skipped (go build failed)"; \
	else echo "bench: Go peer skipped (no go: apt-get install golang-go)"; fi
	QUICK=$(QUICK) ONLY=$(ONLY) $(BENCH_B)/bench --json bench/results.json --data $(BENCH_B) \
		--go $(BENCH_B)/ctxbench-go
	@if [ -n "$(ONLY)" ]; then :; elif command -v gnuplot >/dev/null 2>&1; then \
		gnuplot -e "datadir='$(BENCH_B)'; outdir='bench'" bench/plot.gp && \
		echo "bench: wrote bench/tree_cancel.png bench/wake_latency.png"; \
	else echo "bench: plots skipped (no gnuplot: apt-get install gnuplot-nox)"; fi
