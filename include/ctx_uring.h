/*
 * ctx_uring — bind io_uring operations to contexts (liburing).
 *
 * A ctx_uring_t sits next to a ring the program owns and keeps two promises
 * for every operation queued through ctx_uring_queue():
 *
 *   - Deadline: if the context has an effective deadline, the operation is
 *     linked to an IORING_OP_LINK_TIMEOUT carrying that deadline (absolute,
 *     CLOCK_MONOTONIC), so the kernel ends it at the deadline with no timer,
 *     thread or system call of ours.
 *   - Cancellation: the library keeps one IORING_OP_POLL_ADD per context per
 *     ring on the context's fd (ctx_fd()).  When the context is done — by
 *     ctx_cancel() in any thread, by an ancestor, or by its deadline (the fd
 *     is a timerfd) — that poll completes on the ring, and ctx_uring_cqe()
 *     turns its CQE into an async cancel of every operation still bound to
 *     the context.  This path also ends operations blocked in an io-wq
 *     worker, which a link timeout cannot reach.
 *
 * user_data.  The library replaces the user_data of each bound operation by
 * a tag of its own (a slot index and a generation), and gives the caller's
 * value back in ctx_uring_cqe().  A cancel therefore names exactly one
 * operation: once an operation has completed, its slot's generation moves
 * on, and a cancel still in flight for it finds nothing (-ENOENT), even if a
 * new operation with the same user_data of the caller is running.
 *
 * Tags have 0xC7 in their top byte (CTX_URING_TAG_BYTE).  Unbound
 * operations that the program submits on the same ring itself must not use
 * user_data values with that top byte; pointers and small integers never do.
 *
 * The loop of a program:
 *
 *     struct io_uring_sqe sqe = {0};
 *     io_uring_prep_recv(&sqe, fd, buf, sizeof buf, 0);
 *     io_uring_sqe_set_data64(&sqe, my_tag);
 *     ctx_uring_queue(cu, req, &sqe);       // 0, EBUSY (SQ full), ...
 *     for (;;) {
 *         ctx_uring_submit(cu, 1);          // also sends pending cancels
 *         ... io_uring_wait_cqe / io_uring_peek_cqe ...
 *         struct ctx_uring_result r;
 *         if (ctx_uring_cqe(cu, cqe, &r))   // false: the library's own CQE
 *             handle(r.user_data, r.res);   // -ECANCELED / -ETIMEDOUT
 *         io_uring_cqe_seen(&ring, cqe);    //   when the context ended it
 *     }
 *
 * Threads.  A ctx_uring_t belongs to the thread that drives its ring: every
 * ctx_uring_* call on it (and every submit of the ring) must come from that
 * thread, or be serialised by the caller.  The contexts themselves may be
 * cancelled from any thread at any time; that is the point.
 *
 * Rings set up with IORING_SETUP_DEFER_TASKRUN run timeouts and cancels only
 * when the owning thread enters the ring (waiting for a CQE does that).
 */
#ifndef CTX_URING_H
#define CTX_URING_H

#include <ctx.h>
#include <liburing.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The top byte of every user_data the library puts on the ring. */
#define CTX_URING_TAG_BYTE 0xC7u

/* True if `user_data` (from a CQE) is one of the library's tags. */
#define CTX_URING_IS_TAG(user_data) (((uint64_t)(user_data) >> 56) == CTX_URING_TAG_BYTE)

/* The binding of one ring to contexts.  Opaque. */
typedef struct ctx_uring ctx_uring_t;

/* What ctx_uring_cqe() reports for a completion that belongs to the caller. */
struct ctx_uring_result {
	uint64_t user_data; /* the caller's own value, as set on the SQE */
	int32_t res;        /* cqe->res; -ECANCELED or -ETIMEDOUT when the
			       bound context ended the operation */
	uint32_t flags;     /* cqe->flags (IORING_CQE_F_MORE, buffer ids...) */
	int ended_by;       /* ECANCELED or ETIMEDOUT (ctx_err() of the bound
			       context) if the context ended the operation,
			       else 0.  Tells a context's -ETIMEDOUT apart from
			       an operation's own (a TCP connect timeout). */
	bool bound;         /* queued with ctx_uring_queue() */
};

/* Creates a binding for `ring`, which the caller has set up and keeps
 * owning.  Checks that the kernel has the operations the library needs
 * (POLL_ADD, POLL_REMOVE, ASYNC_CANCEL, LINK_TIMEOUT, NOP).
 * Returns NULL with errno EINVAL (ring NULL, set up with IORING_SETUP_IOPOLL,
 * which cannot poll a context's fd, or with fewer than 3 SQ entries), ENOMEM,
 * or EOPNOTSUPP (the kernel lacks an operation, or cannot be probed: Linux
 * < 5.6).  Deadlines are converted to the host's clock if the process runs
 * in a time namespace (io_uring ignores its offsets). */
ctx_uring_t *ctx_uring_new(struct io_uring *ring);

/* Frees the binding and drops the context references it holds.  It does
 * not touch the ring: call it after io_uring_queue_exit(), or once no
 * bound operation and no poll of the library is in flight any more.
 * ctx_uring_inflight() counts operations only: a context whose last
 * operation has completed keeps the library's poll on its fd (and the fd
 * open in the kernel) until two later ctx_uring_submit() calls have asked
 * the kernel to remove it and its CQE has been passed to ctx_uring_cqe(),
 * or until the ring exits: io_uring_queue_exit() first is the simple
 * order.  CQEs with the library's tags that arrive after this call must not
 * be passed to any ctx_uring_* function.  NULL is ignored. */
void ctx_uring_free(ctx_uring_t *cu);

/*
 * Queues a copy of `sqe`, which the caller has prepared (zero-initialise it,
 * then io_uring_prep_*() and io_uring_sqe_set_data64()), bound to `ctx`:
 *   - If `ctx` is already done, the operation is not started: a NOP is
 *     queued instead, whose CQE ctx_uring_cqe() reports with res
 *     -ctx_err(ctx) (-ECANCELED or -ETIMEDOUT) and the caller's user_data.
 *   - If `ctx` has an effective deadline, a link timeout at that deadline
 *     follows the operation (not for multishot poll, recv and accept, which
 *     must not head a link: the context's timerfd ends those through the
 *     cancel path at the same instant).
 *   - The first operation bound to a context on this ring also queues the
 *     poll on the context's fd.
 *   - A context that can never be done (background, todo, without-cancel)
 *     adds no SQE: the operation is queued alone (its CQE is reported like
 *     any bound operation's).
 * Nothing is submitted: call ctx_uring_submit() (or io_uring_submit(), but
 * not on an IORING_SETUP_SQPOLL ring: see ctx_uring_submit()).
 * All the SQEs this needs (up to three) are checked for room first; nothing
 * is queued unless all of them fit.  The SQE must not be part of a link
 * chain of the caller's (the previous SQE must not carry IOSQE_IO_LINK).
 * The context is referenced until the operation's last CQE has been seen.
 * Returns 0; EINVAL (an argument NULL, or sqe->flags has IOSQE_IO_LINK,
 * IOSQE_IO_HARDLINK or IOSQE_CQE_SKIP_SUCCESS, which would hide the
 * completion the library tracks, or IOSQE_IO_DRAIN, which would hold back
 * the library's cancels: no SQE on the ring may carry it); EBUSY when the
 * submission queue lacks room (submit, reap, and try again); ENOMEM; or
 * ctx_fd()'s errno (EMFILE, ENFILE) when the context's fd cannot be
 * created.
 */
int ctx_uring_queue(ctx_uring_t *cu, ctx_t *ctx, const struct io_uring_sqe *sqe);

/* Tells one CQE apart.  Returns true if the CQE belongs to the caller —
 * an operation queued with ctx_uring_queue() (its result mapped as
 * described in struct ctx_uring_result) or one the caller submitted
 * without the library (reported unchanged) — and fills *out.  Returns
 * false if the CQE is the library's own (a poll, link timeout or cancel):
 * the caller only marks it seen.  Call it exactly once per CQE, before
 * io_uring_cqe_seen().  A poll CQE may queue cancels (as many as fit: the
 * rest wait for ctx_uring_submit()); they are not submitted here.  An
 * operation whose CQE carries IORING_CQE_F_MORE stays bound until its last
 * CQE.  Returns false with errno EINVAL if an argument is NULL. */
bool ctx_uring_cqe(ctx_uring_t *cu, const struct io_uring_cqe *cqe, struct ctx_uring_result *out);

/* Fills free SQ slots with the library's pending work (cancels for done
 * contexts that did not fit before, removal of polls on contexts that no
 * longer have operations), then io_uring_submit_and_wait(ring, wait_nr),
 * repeating until no pending cancel is left.  Use it instead of
 * io_uring_submit(): with thousands of operations on a context, the
 * cancels need several rounds through a small SQ.  Returns the number of
 * SQEs submitted, or -1 with errno: io_uring_enter's, EINVAL for NULL, or
 * EBUSY when the kernel takes no SQE while cancels still wait for room
 * (reap CQEs, then call it again).  On an IORING_SETUP_SQPOLL ring it also
 * waits (up to 100 ms) until the kernel's thread has taken the entries, so
 * that their slots are free when it returns, as on other rings; and it
 * publishes the SQ tail in steps of at most 8 entries past the kernel's head,
 * each ending where no link chain continues, waiting (the same bound) for
 * the thread between steps.  An SQ thread shared by several rings
 * (IORING_SETUP_ATTACH_WQ) takes at most 8 entries of a ring per pass,
 * splitting a chain that straddles them: an op went alone and its link
 * timeout failed (-EINVAL), so the kernel never ended it at its deadline.
 * io_uring_submit() publishes all at once: on SQPOLL rings, submit with this
 * function only. */
int ctx_uring_submit(ctx_uring_t *cu, unsigned wait_nr);

/* The number of operations queued with ctx_uring_queue() whose last CQE
 * has not yet been passed to ctx_uring_cqe().  0 for NULL. */
size_t ctx_uring_inflight(const ctx_uring_t *cu);

#ifdef __cplusplus
}
#endif

#endif /* CTX_URING_H */
