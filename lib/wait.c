/*
 * The fd-less wait: ctx_wait() and ctx_sleep() must work when the process has
 * no fd to spare, so they fall back to a futex on a process-wide sequence
 * number that every successful ctx_cancel() bumps.  Deadlines need no bump:
 * the waiter's futex timeout ends at the context's effective deadline.
 *
 * Why it cannot miss a wake-up: a waiter announces itself (nofd_waiters),
 * reads the sequence, then checks the context.  A canceller marks the
 * context (and its descendants), then reads nofd_waiters, and only if
 * someone waits bumps the sequence and wakes.  All of these are seq_cst: if
 * the waiter's check misses the mark, its announcement precedes the
 * canceller's read (which sees it) and its sequence read precedes the bump
 * (so its futex_wait either sees the change or is woken).
 */
#include "internal.h"

#include <limits.h>

static _Atomic uint32_t nofd_seq;
static _Atomic uint32_t nofd_waiters;

void ctxi_wake_nofd_waiters(void)
{
	if (!atomic_load_explicit(&nofd_waiters, memory_order_seq_cst))
		return;
	atomic_fetch_add_explicit(&nofd_seq, 1, memory_order_seq_cst);
	ctxi_futex(&nofd_seq, FUTEX_WAKE, INT_MAX, NULL);
}

/* The waiter's look at the state (ctxi_state's load is seq_cst, pairing with
 * the cancel's CAS). */
static int err_now(struct ctxi_cancel *anchor)
{
	return anchor ? ctxi_state_err(ctxi_state_full(anchor)) : 0;
}

int ctxi_wait_nofd(ctx_t *ctx, int64_t until)
{
	struct ctxi_cancel *anchor = ctxi_anchor(ctx);
	if (anchor && anchor->base.kind == CTXI_TIMED) {
		int64_t d = ((struct ctxi_timed *)anchor)->deadline;
		if (d < until)
			until = d;
	}
	int err = 0;
	atomic_fetch_add_explicit(&nofd_waiters, 1, memory_order_seq_cst);
	for (;;) {
		uint32_t seq = atomic_load_explicit(&nofd_seq, memory_order_seq_cst);
		if ((err = err_now(anchor)))
			break;
		struct timespec rel, *timeout = NULL;
		if (until != CTXI_NEVER) {
			int64_t left = until - ctxi_now();
			if (left <= 0) {
				/* At the context's own deadline ctxi_state() now
				 * latches ETIMEDOUT. */
				err = err_now(anchor);
				break;
			}
			rel = ctxi_ts(left);
			timeout = &rel;
		}
		ctxi_futex(&nofd_seq, FUTEX_WAIT, seq, timeout);
	}
	atomic_fetch_sub_explicit(&nofd_waiters, 1, memory_order_seq_cst);
	/* err_now() counts a cancel still writing fds as done; ctx_err()
	 * waits for it, so that this wait ends no earlier than a poll would. */
	return err ? ctx_err(ctx) : 0;
}
