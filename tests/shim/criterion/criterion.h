/* A small stand-in for <criterion/criterion.h> (Criterion 2.4), used only by
 * the ThreadSanitizer build of the test suites.
 *
 * Why: Criterion's boxfort maps its "inheritable arena" at random addresses
 * probed with mincore(); under TSan every candidate falls in TSan's reserved
 * shadow ranges, so each TSan-built Criterion binary aborts with "Could not
 * initialize inheritable arena" (Criterion issue #274).  The Makefile builds
 * the same tests/X.c against this header and tests/shim/runner.c instead
 * (TEST_SHIM=1, the default for -fsanitize=thread).
 *
 * What: Test(), TestSuite() with Criterion's options (.init .fini .signal
 * .exit_code .disabled .description .timeout .data; any other designator is a
 * compile error), the classic cr_assert_* / cr_expect_* families,
 * cr_skip_test() and cr_log*().  Semantics follow Criterion 2.4: each operand
 * is evaluated exactly once, only on failure are the message arguments
 * evaluated, an optional printf-style message replaces the default one, a
 * failed cr_assert_* ends the test (its .fini still runs), a failed cr_expect_*
 * records the failure and continues.  Each test runs in its own fork()ed
 * process (see runner.c).
 *
 * Criterion features that are not here fail loudly: the identifiers at the
 * end are poisoned, and any other <criterion/...> header pulls in the real
 * one, which then hits those poisoned names or fails to link (no
 * libcriterion).  Not provided: cr_fatal and the rest of the "new" API of
 * <criterion/new/assert.h>, wide-string and *_cmp array assertions,
 * parameterized tests, theories, redirections. */
#ifndef CTX_CRITERION_SHIM_H
#define CTX_CRITERION_SHIM_H

/* Like the installed Criterion headers, be a system header: warnings in user
 * code expanded through these macros match the real build. */
#pragma GCC system_header

/* The system headers the real <criterion/criterion.h> makes visible. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

/* ---- Tests and suites ------------------------------------------------- */

/* The public options of Criterion's struct criterion_test_extra_data. */
struct criterion_test_extra_data {
	int sentinel_;
	void (*init)(void);
	void (*fini)(void);
	int signal;
	int exit_code;
	bool disabled;
	const char *description;
	double timeout;
	void *data;
};

struct cr_shim_test {
	const char *suite, *name, *file;
	unsigned line;
	void (*fn)(void);
	const struct criterion_test_extra_data *data;
};

struct cr_shim_suite {
	const char *name;
	const struct criterion_test_extra_data *data;
};

void cr_shim_register_test_(const struct cr_shim_test *t);
void cr_shim_register_suite_(const struct cr_shim_suite *s);

#define CR_SHIM_ID_(Suite, Name, Suffix) cr_shim_##Suite##_##Name##_##Suffix

#define Test(...) CR_SHIM_TEST_(__VA_ARGS__, .sentinel_ = 0)
#define CR_SHIM_TEST_(Suite, Name, ...)                                              \
	static void CR_SHIM_ID_(Suite, Name, impl)(void);                            \
	static const struct criterion_test_extra_data CR_SHIM_ID_(Suite, Name, extra) = \
		{__VA_ARGS__};                                                       \
	static const struct cr_shim_test CR_SHIM_ID_(Suite, Name, meta) = {          \
		#Suite, #Name, __FILE__, __LINE__, CR_SHIM_ID_(Suite, Name, impl),   \
		&CR_SHIM_ID_(Suite, Name, extra)};                                   \
	__attribute__((constructor)) static void CR_SHIM_ID_(Suite, Name, reg)(void) \
	{                                                                            \
		cr_shim_register_test_(&CR_SHIM_ID_(Suite, Name, meta));             \
	}                                                                            \
	static void CR_SHIM_ID_(Suite, Name, impl)(void)

#define TestSuite(...) CR_SHIM_SUITE_(__VA_ARGS__, .sentinel_ = 0)
#define CR_SHIM_SUITE_(Name, ...)                                                  \
	static const struct criterion_test_extra_data cr_shim_suite_##Name##_extra = \
		{__VA_ARGS__};                                                     \
	static const struct cr_shim_suite cr_shim_suite_##Name##_meta = {          \
		#Name, &cr_shim_suite_##Name##_extra};                             \
	__attribute__((constructor)) static void cr_shim_suite_##Name##_reg(void)  \
	{                                                                          \
		cr_shim_register_suite_(&cr_shim_suite_##Name##_meta);             \
	}                                                                          \
	struct cr_shim_swallow_semicolon_

/* ---- Runtime (tests/shim/runner.c) ------------------------------------ */

/* The default message, formatted; only called on failure. */
char *cr_shim_fmt_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Report a failure: defmsg (freed here) unless the user message, given as
 * "x" followed by the user's format, formats to something non-empty. */
void cr_shim_fail_continue_(const char *file, unsigned line, char *defmsg,
			    const char *xfmt, ...)
	__attribute__((format(printf, 4, 5)));
void cr_shim_fail_abort_(const char *file, unsigned line, char *defmsg,
			 const char *xfmt, ...)
	__attribute__((noreturn, format(printf, 4, 5)));
void cr_shim_skip_(const char *fmt, ...) __attribute__((noreturn));
const char *cr_shim_nonnull_(const char *s);

enum criterion_severity {
	CR_LOG_INFO,
	CR_LOG_WARNING,
	CR_LOG_ERROR,
};
void cr_log(enum criterion_severity severity, const char *msg, ...)
	__attribute__((format(printf, 2, 3)));
#define cr_log_info(...) cr_log(CR_LOG_INFO, __VA_ARGS__)
#define cr_log_warn(...) cr_log(CR_LOG_WARNING, __VA_ARGS__)
#define cr_log_error(...) cr_log(CR_LOG_ERROR, __VA_ARGS__)

/* ---- Argument plumbing ------------------------------------------------- */

#define CR_SHIM_STR_(...) #__VA_ARGS__
#define CR_SHIM_STR(...) CR_SHIM_STR_(__VA_ARGS__) /* after macro expansion, as Criterion */
#define CR_SHIM_CAT_(a, b) a##b
#define CR_SHIM_CAT(a, b) CR_SHIM_CAT_(a, b)

#define CR_SHIM_ARG0_(a, ...) a
#define CR_SHIM_ARG0(...) CR_SHIM_ARG0_(__VA_ARGS__, ~)
#define CR_SHIM_DROP1_(a, ...) __VA_ARGS__
#define CR_SHIM_DROP2_(a, b, ...) __VA_ARGS__
#define CR_SHIM_ARG1(...) CR_SHIM_ARG0(CR_SHIM_DROP1_(__VA_ARGS__))
#define CR_SHIM_ARG2(...) CR_SHIM_ARG0(CR_SHIM_DROP2_(__VA_ARGS__))

/* 1 if given one argument, M if more (up to 64). */
#define CR_SHIM_KIND_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, \
		      _17, _18, _19, _20, _21, _22, _23, _24, _25, _26, _27, _28, _29, _30,  \
		      _31, _32, _33, _34, _35, _36, _37, _38, _39, _40, _41, _42, _43, _44,  \
		      _45, _46, _47, _48, _49, _50, _51, _52, _53, _54, _55, _56, _57, _58,  \
		      _59, _60, _61, _62, _63, _64, K, ...) K
#define CR_SHIM_KIND(...)                                                                   \
	CR_SHIM_KIND_(__VA_ARGS__, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, \
		      M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M,  \
		      M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, M, 1, ~)

/* The user's message after the first argument: "x" then the optional format
 * and its arguments (the "x" keeps an empty format from being zero-length). */
#define CR_SHIM_MSG_1(op) "x"
#define CR_SHIM_MSG_M(op, ...) "x" __VA_ARGS__
#define CR_SHIM_MSG(...) CR_SHIM_CAT(CR_SHIM_MSG_, CR_SHIM_KIND(__VA_ARGS__))(__VA_ARGS__)
#define CR_SHIM_MSG_AFTER1(...) CR_SHIM_MSG(__VA_ARGS__)
#define CR_SHIM_MSG_AFTER2(...) CR_SHIM_MSG(CR_SHIM_DROP1_(__VA_ARGS__))
#define CR_SHIM_MSG_AFTER3(...) CR_SHIM_MSG(CR_SHIM_DROP2_(__VA_ARGS__))

#define CR_SHIM_ABORT_ cr_shim_fail_abort_
#define CR_SHIM_CONTINUE_ cr_shim_fail_continue_

/* Pass is evaluated once; DefMsg and the message arguments only on failure. */
#define CR_SHIM_CHECK_(Fail, Pass, DefMsg, ...)                              \
	do {                                                                 \
		if (!(Pass))                                                 \
			Fail(__FILE__, __LINE__, DefMsg, __VA_ARGS__);       \
	} while (0)

/* ---- Assertions -------------------------------------------------------- */

#define CR_SHIM_FAIL_(Fail, ...)                                                         \
	CR_SHIM_CHECK_(Fail, 0, cr_shim_fmt_("The conditions for this assertion were not met."), \
		       "x" __VA_ARGS__)
#define cr_assert_fail(...) CR_SHIM_FAIL_(CR_SHIM_ABORT_, __VA_ARGS__)
#define cr_expect_fail(...) CR_SHIM_FAIL_(CR_SHIM_CONTINUE_, __VA_ARGS__)

#define cr_skip_test(...) cr_shim_skip_("" __VA_ARGS__)

#define CR_SHIM_EXPR_(Fail, Pass, Str, ...)                                        \
	CR_SHIM_CHECK_(Fail, Pass, cr_shim_fmt_("The expression %s is false.", Str), \
		       CR_SHIM_MSG_AFTER1(__VA_ARGS__))
#define cr_assert(...)                                                       \
	CR_SHIM_EXPR_(CR_SHIM_ABORT_, CR_SHIM_ARG0(__VA_ARGS__),             \
		      CR_SHIM_STR(CR_SHIM_ARG0(__VA_ARGS__)), __VA_ARGS__)
#define cr_expect(...)                                                       \
	CR_SHIM_EXPR_(CR_SHIM_CONTINUE_, CR_SHIM_ARG0(__VA_ARGS__),          \
		      CR_SHIM_STR(CR_SHIM_ARG0(__VA_ARGS__)), __VA_ARGS__)
#define cr_assert_not(...)                                                   \
	CR_SHIM_EXPR_(CR_SHIM_ABORT_, !(CR_SHIM_ARG0(__VA_ARGS__)),          \
		      CR_SHIM_STR(!(CR_SHIM_ARG0(__VA_ARGS__))), __VA_ARGS__)
#define cr_expect_not(...)                                                   \
	CR_SHIM_EXPR_(CR_SHIM_CONTINUE_, !(CR_SHIM_ARG0(__VA_ARGS__)),       \
		      CR_SHIM_STR(!(CR_SHIM_ARG0(__VA_ARGS__))), __VA_ARGS__)

/* (Actual) Op (Expected), compared exactly as written, each side once. */
#define CR_SHIM_OP_(Fail, Op, A, E, ...)                                      \
	CR_SHIM_CHECK_(Fail, (A) Op (E),                                      \
		       cr_shim_fmt_("The expression %s is false.", CR_SHIM_STR((A) Op (E))), \
		       CR_SHIM_MSG_AFTER2(__VA_ARGS__))
#define CR_SHIM_OPV_(Fail, Op, ...) \
	CR_SHIM_OP_(Fail, Op, CR_SHIM_ARG0(__VA_ARGS__), CR_SHIM_ARG1(__VA_ARGS__), __VA_ARGS__)
#define cr_assert_eq(...) CR_SHIM_OPV_(CR_SHIM_ABORT_, ==, __VA_ARGS__)
#define cr_expect_eq(...) CR_SHIM_OPV_(CR_SHIM_CONTINUE_, ==, __VA_ARGS__)
#define cr_assert_neq(...) CR_SHIM_OPV_(CR_SHIM_ABORT_, !=, __VA_ARGS__)
#define cr_expect_neq(...) CR_SHIM_OPV_(CR_SHIM_CONTINUE_, !=, __VA_ARGS__)
#define cr_assert_lt(...) CR_SHIM_OPV_(CR_SHIM_ABORT_, <, __VA_ARGS__)
#define cr_expect_lt(...) CR_SHIM_OPV_(CR_SHIM_CONTINUE_, <, __VA_ARGS__)
#define cr_assert_leq(...) CR_SHIM_OPV_(CR_SHIM_ABORT_, <=, __VA_ARGS__)
#define cr_expect_leq(...) CR_SHIM_OPV_(CR_SHIM_CONTINUE_, <=, __VA_ARGS__)
#define cr_assert_gt(...) CR_SHIM_OPV_(CR_SHIM_ABORT_, >, __VA_ARGS__)
#define cr_expect_gt(...) CR_SHIM_OPV_(CR_SHIM_CONTINUE_, >, __VA_ARGS__)
#define cr_assert_geq(...) CR_SHIM_OPV_(CR_SHIM_ABORT_, >=, __VA_ARGS__)
#define cr_expect_geq(...) CR_SHIM_OPV_(CR_SHIM_CONTINUE_, >=, __VA_ARGS__)

#define CR_SHIM_NULL_(Fail, Op, Fmt, V, ...)                                  \
	CR_SHIM_CHECK_(Fail, (V) Op NULL, cr_shim_fmt_(Fmt, CR_SHIM_STR(V)),  \
		       CR_SHIM_MSG_AFTER1(__VA_ARGS__))
#define cr_assert_null(...) \
	CR_SHIM_NULL_(CR_SHIM_ABORT_, ==, "%s is not null.", CR_SHIM_ARG0(__VA_ARGS__), __VA_ARGS__)
#define cr_expect_null(...) \
	CR_SHIM_NULL_(CR_SHIM_CONTINUE_, ==, "%s is not null.", CR_SHIM_ARG0(__VA_ARGS__), __VA_ARGS__)
#define cr_assert_not_null(...) \
	CR_SHIM_NULL_(CR_SHIM_ABORT_, !=, "%s is null.", CR_SHIM_ARG0(__VA_ARGS__), __VA_ARGS__)
#define cr_expect_not_null(...) \
	CR_SHIM_NULL_(CR_SHIM_CONTINUE_, !=, "%s is null.", CR_SHIM_ARG0(__VA_ARGS__), __VA_ARGS__)

/* Criterion's float comparisons name each operand twice; here the operands
 * are evaluated once into temporaries, the message shows Criterion's text. */
#define CR_SHIM_FLOAT_(Fail, Cmp, A, E, Eps, ...)                                  \
	do {                                                                       \
		__auto_type cr_shim_a__ = (A);                                     \
		__auto_type cr_shim_e__ = (E);                                     \
		__auto_type cr_shim_eps__ = (Eps);                                 \
		CR_SHIM_CHECK_(Fail, Cmp(cr_shim_a__, cr_shim_e__, cr_shim_eps__), \
			       cr_shim_fmt_("The expression %s is false.",         \
					    CR_SHIM_STR(Cmp(A, E, Eps))),          \
			       CR_SHIM_MSG_AFTER3(__VA_ARGS__));                   \
	} while (0)
#define CR_SHIM_FLOAT_EQ(A, E, Eps) (E) - (A) <= (Eps) && (A) - (E) <= (Eps)
#define CR_SHIM_FLOAT_NEQ(A, E, Eps) (E) - (A) > (Eps) || (A) - (E) > (Eps)
#define CR_SHIM_FLOATV_(Fail, Cmp, ...)                                                  \
	CR_SHIM_FLOAT_(Fail, Cmp, CR_SHIM_ARG0(__VA_ARGS__), CR_SHIM_ARG1(__VA_ARGS__), \
		       CR_SHIM_ARG2(__VA_ARGS__), __VA_ARGS__)
#define cr_assert_float_eq(...) CR_SHIM_FLOATV_(CR_SHIM_ABORT_, CR_SHIM_FLOAT_EQ, __VA_ARGS__)
#define cr_expect_float_eq(...) CR_SHIM_FLOATV_(CR_SHIM_CONTINUE_, CR_SHIM_FLOAT_EQ, __VA_ARGS__)
#define cr_assert_float_neq(...) CR_SHIM_FLOATV_(CR_SHIM_ABORT_, CR_SHIM_FLOAT_NEQ, __VA_ARGS__)
#define cr_expect_float_neq(...) CR_SHIM_FLOATV_(CR_SHIM_CONTINUE_, CR_SHIM_FLOAT_NEQ, __VA_ARGS__)

/* Strings: NULL never compares equal (nor unequal) to anything. */
#define CR_SHIM_STROP_(Fail, Op, A, E, ...)                                                \
	do {                                                                               \
		const char *cr_shim_a__ = (A);                                             \
		const char *cr_shim_e__ = (E);                                             \
		CR_SHIM_CHECK_(Fail,                                                       \
			       cr_shim_a__ != NULL && cr_shim_e__ != NULL                  \
				       && strcmp(cr_shim_a__, cr_shim_e__) Op 0,           \
			       cr_shim_fmt_("The expression (as strings) %s is false: "    \
					    "actual=`%s` expected=`%s`.",                  \
					    CR_SHIM_STR((A) Op (E)),                       \
					    cr_shim_nonnull_(cr_shim_a__),                 \
					    cr_shim_nonnull_(cr_shim_e__)),                \
			       CR_SHIM_MSG_AFTER2(__VA_ARGS__));                           \
	} while (0)
#define CR_SHIM_STROPV_(Fail, Op, ...) \
	CR_SHIM_STROP_(Fail, Op, CR_SHIM_ARG0(__VA_ARGS__), CR_SHIM_ARG1(__VA_ARGS__), __VA_ARGS__)
#define cr_assert_str_eq(...) CR_SHIM_STROPV_(CR_SHIM_ABORT_, ==, __VA_ARGS__)
#define cr_expect_str_eq(...) CR_SHIM_STROPV_(CR_SHIM_CONTINUE_, ==, __VA_ARGS__)
#define cr_assert_str_neq(...) CR_SHIM_STROPV_(CR_SHIM_ABORT_, !=, __VA_ARGS__)
#define cr_expect_str_neq(...) CR_SHIM_STROPV_(CR_SHIM_CONTINUE_, !=, __VA_ARGS__)
#define cr_assert_str_lt(...) CR_SHIM_STROPV_(CR_SHIM_ABORT_, <, __VA_ARGS__)
#define cr_expect_str_lt(...) CR_SHIM_STROPV_(CR_SHIM_CONTINUE_, <, __VA_ARGS__)
#define cr_assert_str_leq(...) CR_SHIM_STROPV_(CR_SHIM_ABORT_, <=, __VA_ARGS__)
#define cr_expect_str_leq(...) CR_SHIM_STROPV_(CR_SHIM_CONTINUE_, <=, __VA_ARGS__)
#define cr_assert_str_gt(...) CR_SHIM_STROPV_(CR_SHIM_ABORT_, >, __VA_ARGS__)
#define cr_expect_str_gt(...) CR_SHIM_STROPV_(CR_SHIM_CONTINUE_, >, __VA_ARGS__)
#define cr_assert_str_geq(...) CR_SHIM_STROPV_(CR_SHIM_ABORT_, >=, __VA_ARGS__)
#define cr_expect_str_geq(...) CR_SHIM_STROPV_(CR_SHIM_CONTINUE_, >=, __VA_ARGS__)

#define CR_SHIM_STREMPTY_(Fail, Op, Fmt, V, ...)                                        \
	do {                                                                            \
		const char *cr_shim_v__ = (V);                                          \
		CR_SHIM_CHECK_(Fail, cr_shim_v__ != NULL && cr_shim_v__[0] Op '\0',     \
			       cr_shim_v__ == NULL                                      \
				       ? cr_shim_fmt_("%s is null.", CR_SHIM_STR(V))    \
				       : cr_shim_fmt_(Fmt, CR_SHIM_STR(V), cr_shim_v__), \
			       CR_SHIM_MSG_AFTER1(__VA_ARGS__));                        \
	} while (0)
#define cr_assert_str_empty(...)                                                          \
	CR_SHIM_STREMPTY_(CR_SHIM_ABORT_, ==, "%s (`%s`) is not empty.", CR_SHIM_ARG0(__VA_ARGS__), \
			  __VA_ARGS__)
#define cr_expect_str_empty(...)                                                             \
	CR_SHIM_STREMPTY_(CR_SHIM_CONTINUE_, ==, "%s (`%s`) is not empty.", CR_SHIM_ARG0(__VA_ARGS__), \
			  __VA_ARGS__)
#define cr_assert_str_not_empty(...)                                                    \
	CR_SHIM_STREMPTY_(CR_SHIM_ABORT_, !=, "%s is empty.%.0s", CR_SHIM_ARG0(__VA_ARGS__), \
			  __VA_ARGS__)
#define cr_expect_str_not_empty(...)                                                       \
	CR_SHIM_STREMPTY_(CR_SHIM_CONTINUE_, !=, "%s is empty.%.0s", CR_SHIM_ARG0(__VA_ARGS__), \
			  __VA_ARGS__)

/* Arrays: memcmp over Size bytes, as Criterion. */
#define CR_SHIM_ARR_(Fail, Op, A, E, Size, ...)                                          \
	CR_SHIM_CHECK_(Fail, memcmp((A), (E), (Size)) Op 0,                              \
		       cr_shim_fmt_("The expression %s is false.",                       \
				    CR_SHIM_STR((A)[0..Size] Op (E)[0..Size])),          \
		       CR_SHIM_MSG_AFTER3(__VA_ARGS__))
#define CR_SHIM_ARRV_(Fail, Op, ...)                                                    \
	CR_SHIM_ARR_(Fail, Op, CR_SHIM_ARG0(__VA_ARGS__), CR_SHIM_ARG1(__VA_ARGS__),    \
		     CR_SHIM_ARG2(__VA_ARGS__), __VA_ARGS__)
#define cr_assert_arr_eq(...) CR_SHIM_ARRV_(CR_SHIM_ABORT_, ==, __VA_ARGS__)
#define cr_expect_arr_eq(...) CR_SHIM_ARRV_(CR_SHIM_CONTINUE_, ==, __VA_ARGS__)
#define cr_assert_arr_neq(...) CR_SHIM_ARRV_(CR_SHIM_ABORT_, !=, __VA_ARGS__)
#define cr_expect_arr_neq(...) CR_SHIM_ARRV_(CR_SHIM_CONTINUE_, !=, __VA_ARGS__)

/* ---- Not provided: a use is a compile error, never a silent no-op ------ */

#pragma GCC poison cr_assert_wcs_eq cr_expect_wcs_eq cr_assert_wcs_neq cr_expect_wcs_neq
#pragma GCC poison cr_assert_wcs_lt cr_expect_wcs_lt cr_assert_wcs_leq cr_expect_wcs_leq
#pragma GCC poison cr_assert_wcs_gt cr_expect_wcs_gt cr_assert_wcs_geq cr_expect_wcs_geq
#pragma GCC poison cr_assert_wcs_empty cr_expect_wcs_empty
#pragma GCC poison cr_assert_wcs_not_empty cr_expect_wcs_not_empty
#pragma GCC poison cr_assert_arr_eq_cmp cr_expect_arr_eq_cmp cr_assert_arr_neq_cmp
#pragma GCC poison cr_expect_arr_neq_cmp cr_assert_arr_lt_cmp cr_expect_arr_lt_cmp
#pragma GCC poison cr_assert_arr_leq_cmp cr_expect_arr_leq_cmp cr_assert_arr_gt_cmp
#pragma GCC poison cr_expect_arr_gt_cmp cr_assert_arr_geq_cmp cr_expect_arr_geq_cmp
#pragma GCC poison criterion_options criterion_abort_test criterion_skip_test
#pragma GCC poison criterion_continue_test criterion_test_die

#endif
