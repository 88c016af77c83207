# ctx — see README.md.
#
#   make            libctx.so.0, libctx.a and the examples, in build/
#   make demo       build, then run examples/demo
#   make check      the test suites: plain, ASan+UBSan, TSan (separate builds)
#   make install    PREFIX=/usr/local DESTDIR= ; make uninstall
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
LDLIBS  := -lpthread

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

$(B)/tests/%: tests/%.c tests/helpers.h $(B)/libctx.a $(HEADERS) | $(B)/tests
	$(CC) $(ALL_CFLAGS) -Wno-pedantic -Ilib $< -o $@ $(B)/libctx.a \
		$$(pkg-config --cflags --libs criterion) $(LDLIBS)

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
	$(MAKE) --no-print-directory $(B)/examples/demo
	$(B)/examples/demo

ASAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
TSAN := -fsanitize=thread

check: deps
	$(MAKE) --no-print-directory check-run
	$(MAKE) --no-print-directory check-abi check-install
	$(MAKE) --no-print-directory check-run B=build/asan OPT=-O1 SAN="$(ASAN)"
	$(MAKE) --no-print-directory check-run B=build/tsan OPT=-O1 SAN="$(TSAN)"
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
	$(MAKE) --no-print-directory -s uninstall DESTDIR=$$d PREFIX=/opt/ctx; \
	left=$$(find $$d/opt -type f); [ -z "$$left" ] || { echo "check-install: left behind: $$left"; exit 1; }; \
	echo "check-install: install, pkg-config build, run, uninstall ok"

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
