/*
 * ctx — Go's context package for C, where every context is a file descriptor.
 *
 * A context is a node in a tree rooted at ctx_background() or ctx_todo().
 * It is *done* when, first of: it is cancelled, its effective deadline passes,
 * or its parent becomes done (except below ctx_without_cancel()).  Once done it
 * stays done, and its err and cause never change again.
 *
 * ctx_fd() gives a file descriptor that polls readable (POLLIN / EPOLLIN)
 * exactly when the context is done, so a context can sit in a poll set, an
 * epoll set or an io_uring next to the fds a program already waits on.
 *
 * Conventions
 *   - Constructors return a new reference, or NULL with errno set.
 *   - Functions that wrap a system call mirror it: -1 with errno set.
 *   - Every other int-returning function returns 0 or a positive errno value,
 *     as pthreads do.
 *   - Durations are int64_t nanoseconds (see CTX_SEC and friends); deadlines
 *     are absolute struct timespec values on CLOCK_MONOTONIC.
 *   - Every function may be called on any context from any thread at once, as
 *     long as the caller holds a reference to that context.
 *   - Functions are not async-signal-safe (cancelling takes locks): to cancel
 *     on a signal, use ctx_with_signals(), or read a signalfd in a loop or
 *     thread (examples/epoll_server.c).
 *   - NULL where a context or key is required gives EINVAL, never a crash.
 */
#ifndef CTX_H
#define CTX_H

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An opaque, reference-counted context. */
typedef struct ctx ctx_t;

/* Durations, in nanoseconds: ctx_with_timeout(parent, 250 * CTX_MSEC). */
#define CTX_NSEC ((int64_t)1)
#define CTX_USEC ((int64_t)1000)
#define CTX_MSEC ((int64_t)1000000)
#define CTX_SEC ((int64_t)1000000000)

/* ------------------------------------------------------------------------ */
/* Roots                                                                     */

/* The root of every request tree: never done, no deadline, no values.
 * A static object: ctx_ref() and ctx_unref() on it do nothing. */
ctx_t *ctx_background(void);

/* Like ctx_background(), for code that has not decided which context to
 * use yet; it is a distinct object so that such places can be found. */
ctx_t *ctx_todo(void);

/* ------------------------------------------------------------------------ */
/* Derived contexts.  Each returns a new reference that holds a reference to
 * its parent, or NULL with errno EINVAL (parent NULL, bad argument) or ENOMEM.
 * None of them opens a file descriptor. */

/* A child that is done when ctx_cancel() is called on it or when its parent
 * is done.  A child of a parent that is already done is born done, with the
 * parent's err and cause. */
ctx_t *ctx_with_cancel(ctx_t *parent);

/* A cancellable child that is also done, with err ETIMEDOUT, at the absolute
 * CLOCK_MONOTONIC instant `deadline`.  If the parent's effective deadline is
 * earlier or equal, the parent's applies, with its cause.  A deadline already
 * past gives a child that is born done.  tv_nsec outside [0, 1e9) is EINVAL. */
ctx_t *ctx_with_deadline(ctx_t *parent, struct timespec deadline);

/* As ctx_with_deadline(); when the deadline (this one, not an ancestor's)
 * makes the child done, its cause is `cause` (0 means ETIMEDOUT). */
ctx_t *ctx_with_deadline_cause(ctx_t *parent, struct timespec deadline, int cause);

/* ctx_with_deadline(parent, now + timeout_ns).  A timeout <= 0 gives a child
 * that is born done; the sum saturates, and INT64_MAX means no deadline. */
ctx_t *ctx_with_timeout(ctx_t *parent, int64_t timeout_ns);

/* As ctx_with_timeout(), with ctx_with_deadline_cause()'s `cause`. */
ctx_t *ctx_with_timeout_cause(ctx_t *parent, int64_t timeout_ns, int cause);

/* A child that binds `key` to `value`.  Keys are compared by pointer identity
 * (use the address of a static object of yours) and must not be NULL.
 * `destroy(value)`, if not NULL, runs once, when this context is freed.  If
 * the call fails, destroy is not called: the value still belongs to the
 * caller.  The child is done exactly when its parent is; it is not
 * cancellable itself. */
ctx_t *ctx_with_value(ctx_t *parent, const void *key, void *value, void (*destroy)(void *));

/* A child that keeps the parent's values but is never done and has no
 * deadline, whatever happens to the parent: for work that must outlive the
 * request that started it.  It is not cancellable itself; derive a
 * ctx_with_cancel() from it for that. */
ctx_t *ctx_without_cancel(ctx_t *parent);

/* ------------------------------------------------------------------------ */
/* Cancellation */

/* ctx_cancel_cause(ctx, ECANCELED). */
int ctx_cancel(ctx_t *ctx);

/* Makes `ctx` and all its descendants done, with err ECANCELED and cause
 * `cause` (0 means ECANCELED).  Before it returns, `ctx` and every
 * descendant are done and the fd of each that has one is readable, even
 * when another thread is cancelling the same subtree (this call then waits
 * for, or helps, the other).  Returns 0 if this call made `ctx` done,
 * EALREADY if it was already done (nothing changes: the first cause wins),
 * EINVAL if `ctx` is NULL or not cancellable (background, todo, value and
 * without-cancel contexts).  While a cancel walks a subtree, ctx_err() on
 * a node of it waits for the walk to leave that node, as Go's Err() waits
 * for the context's mutex.  Contexts made by ctx_with_cancel(),
 * ctx_with_deadline() and ctx_with_timeout() (and their _cause forms) are
 * cancellable. */
int ctx_cancel_cause(ctx_t *ctx, int cause);

/* ------------------------------------------------------------------------ */
/* State */

/* 0 while `ctx` is not done; ECANCELED if it was done by cancellation;
 * ETIMEDOUT if by a deadline.  A context done because an ancestor was done
 * reports the ancestor's err.  Exact at the deadline: no thread has to run
 * for a passed deadline to show.  EINVAL for NULL. */
int ctx_err(ctx_t *ctx);

/* 0 while not done; otherwise the cause it was done with (the first one
 * wins), which defaults to its err.  EINVAL for NULL. */
int ctx_cause(ctx_t *ctx);

/* If `ctx` has an effective deadline (the earliest of its own and its
 * ancestors', up to a ctx_without_cancel()), stores it in *out (when out is
 * not NULL) and returns true.  Otherwise returns false (and sets errno to
 * EINVAL when ctx is NULL). */
bool ctx_deadline(ctx_t *ctx, struct timespec *out);

/* The value bound to `key` by the nearest ctx_with_value() on the path from
 * `ctx` to its root, or NULL (errno EINVAL when ctx or key is NULL).  The
 * pointer is valid while the caller holds its reference to `ctx`. */
void *ctx_value(ctx_t *ctx, const void *key);

/* ------------------------------------------------------------------------ */
/* The file descriptor */

/* A file descriptor that polls readable exactly when `ctx` is done, and then
 * stays readable: it is never readable while ctx_err() reports 0, and once
 * ctx_err() reports done it is readable (a reader that finds a deadline
 * passed fires the timer itself rather than wait for the timer interrupt;
 * on kernels without TFD_IOC_SET_TICKS that first reader waits for the
 * interrupt instead, microseconds).  Rules:
 *   - The context owns it: never read, write or close it.  It is valid until
 *     the last reference to `ctx` is dropped; dup() it to keep it longer.
 *   - It is close-on-exec and non-blocking; repeated calls return the same fd.
 *   - A passed deadline makes it readable through a kernel timer (timerfd):
 *     no thread and no call into the library is needed.
 *   - Contexts that can never be done (background, todo, without-cancel with
 *     no deadline) all share one process-wide fd that never becomes readable.
 *   - Value contexts return their parent's fd.
 * The fd is created by the first call, not by the constructor.  On failure it
 * returns -1 with errno EMFILE, ENFILE or ENOMEM (or EINVAL for NULL); the
 * failure is not remembered, and the context stays usable without an fd. */
int ctx_fd(ctx_t *ctx);

/* ------------------------------------------------------------------------ */
/* References */

/* Takes another reference to `ctx` and returns it (NULL with EINVAL for
 * NULL).  A no-op on the roots. */
ctx_t *ctx_ref(ctx_t *ctx);

/* Drops a reference; NULL is ignored.  The last one detaches the context from
 * its parent, closes its fd, runs its value's destroy function and drops its
 * reference to the parent.  Dropping the last reference does not cancel the
 * context's children: they hold references of their own. */
void ctx_unref(ctx_t *ctx);

/* ctx_cancel() (if `ctx` is cancellable) then ctx_unref(): the C spelling of
 * Go's `defer cancel()`.  NULL is ignored. */
void ctx_release(ctx_t *ctx);

/* Releases a context when the variable goes out of scope:
 *     CTX_AUTO ctx_t *req = ctx_with_timeout(parent, 2 * CTX_SEC);
 * runs ctx_release(req) at the end of the block. */
#define CTX_AUTO __attribute__((cleanup(ctx_autorelease_)))

/* Implementation detail of CTX_AUTO. */
static inline void ctx_autorelease_(ctx_t **pctx)
{
	ctx_release(*pctx);
}

/* ------------------------------------------------------------------------ */
/* After-functions */

/* A registration made by ctx_after_func(); see ctx_after_stop(). */
typedef struct ctx_after ctx_after_t;

/* Arranges for fn(arg) to run once, on a thread owned by the library, after
 * `ctx` is done (soon, if it already is) — including at a deadline that
 * nobody is watching.  fn never runs inside the caller of ctx_cancel() and
 * never under a library lock, so it may call any ctx function.  The
 * registration holds its own reference to `ctx` until fn has run or the
 * registration is stopped.  The library thread starts on the first
 * registration on a context that can be done, so a program that never
 * registers one (nor makes a ctx_with_fd(), ctx_with_signals() or
 * ctx_recv_ctx() context, which register one) has no library thread; after
 * fork() the child starts its own on demand.
 * With `stop` NULL the registration is fire-and-forget; otherwise *stop
 * receives a handle that must be passed exactly once to ctx_after_stop() or
 * ctx_after_stop_wait().  On a context that can never be done it returns 0
 * and fn never runs (the handle still needs stopping).
 * Returns 0, EINVAL (ctx or fn NULL), ENOMEM, or EAGAIN (no thread). */
int ctx_after_func(ctx_t *ctx, void (*fn)(void *), void *arg, ctx_after_t **stop);

/* Stops a registration and frees the handle.  Returns true if this call
 * prevented fn from running; false if it could not (fn is queued to run, is
 * running, or has finished).  Once ctx_err() has reported the context done
 * (a cancel, or a deadline passed), fn is queued: false, and fn runs, as in
 * Go.  It does not wait for a running fn: see
 * ctx_after_stop_wait().  May be called from inside fn itself.  NULL
 * returns false with errno EINVAL. */
bool ctx_after_stop(ctx_after_t *stop);

/* As ctx_after_stop(), but if fn is queued or running on the library
 * thread, waits until it has returned, so that the caller may free what fn
 * uses.  Called from inside any after-function it does not wait (all of
 * them run on the one library thread, so the wait would never end): there,
 * a false result means fn may still be about to run.  NULL returns false
 * with errno EINVAL. */
bool ctx_after_stop_wait(ctx_after_t *stop);

/* ------------------------------------------------------------------------ */
/* Waiting and cancellable I/O
 *
 * Each call below waits on the context's fd next to the caller's, so a
 * context that becomes done ends the wait at once.  A context that is
 * already done fails at once without touching the caller's fd.  The I/O
 * calls work on blocking and non-blocking fds alike.  When the caller's fd
 * and the context become ready together, the fd wins: data is never lost.
 *
 * Partial transfers: a call returns as soon as some data moved, so a short
 * count is normal; the bytes it reports were transferred even if the
 * context became done meanwhile.  Data moved by an earlier call is never
 * taken back by a later failure.
 *
 * Blocking fds: the library tries the call without blocking first
 * (MSG_DONTWAIT for sockets, RWF_NOWAIT for read/write on pipes, sockets
 * and eventfds), and otherwise waits for readiness in poll, next to the
 * context's fd, before making the call (ctx_accept() always polls first).
 * Two cases can still block in the kernel where the context cannot reach
 * them: (1) a blocking fd shared with other threads, when another thread
 * consumes the readiness between the poll and the call (accept, or read on
 * a pty or named FIFO); (2) a write on
 * a blocking pty or named FIFO larger than the free space (no RWF_NOWAIT
 * there).  Use non-blocking fds in those cases.  Regular files and block
 * devices get the plain call: they block only on the disk.
 *
 * If the process is out of fds, ctx_wait() and ctx_sleep() still work (they
 * fall back to a futex).  The other calls create the context's fd only when
 * they have to wait: one that can proceed at once succeeds; one that must
 * wait fails with the ctx_fd() errno (EMFILE, ENFILE, ENOMEM), unless its
 * context can never be done (it then waits on the caller's fds alone).
 * Exception: a ctx_connect() that has to wait has started its connect, so
 * rather than fail half done it waits without the context's fd, looking at
 * the context every 10 ms (and waking at its deadline).
 *
 * A context fd shared with another process (inherited across fork()) can be
 * made readable there while this process's context is not done; these calls
 * then stop polling it and still end at their timeout, at the context's
 * deadline and at a cancel made in this process (ctx_wait and ctx_sleep on a
 * futex, the others in 10 ms slices).
 *
 * EINTR is retried, so a signal no longer interrupts these calls: cancel a
 * context from the signal's handler thread (or a signalfd loop) instead.
 */

/* Blocks until `ctx` is done; returns its err (ECANCELED or ETIMEDOUT), or
 * EINVAL for NULL.  On a context that can never be done it blocks forever. */
int ctx_wait(ctx_t *ctx);

/* Sleeps for `ns` nanoseconds unless `ctx` is done first.  Returns 0 when
 * the time has elapsed, the context's err if it became done first, EINVAL
 * for NULL.  ns <= 0 returns at once (the err if already done, else 0). */
int ctx_sleep(ctx_t *ctx, int64_t ns);

/* poll(2) that also ends when `ctx` is done.  Returns the number of ready
 * entries, 0 when timeout_ms (-1: none) elapses first, or -1 with errno
 * ECANCELED / ETIMEDOUT (the context's err) when the context is done before
 * any entry is ready, or poll's own errno.  The context is checked first:
 * if it is already done, the fds are not polled. */
int ctx_poll(ctx_t *ctx, struct pollfd *fds, nfds_t nfds, int timeout_ms);

/* read(2), write(2), recv(2) and send(2) that block until they can proceed
 * or `ctx` is done (-1, errno ECANCELED / ETIMEDOUT). */
ssize_t ctx_read(ctx_t *ctx, int fd, void *buf, size_t len);
ssize_t ctx_write(ctx_t *ctx, int fd, const void *buf, size_t len);
ssize_t ctx_recv(ctx_t *ctx, int fd, void *buf, size_t len, int flags);
ssize_t ctx_send(ctx_t *ctx, int fd, const void *buf, size_t len, int flags);

/* accept4(2) (flags: SOCK_NONBLOCK, SOCK_CLOEXEC) that blocks until a
 * connection arrives or `ctx` is done.  Other flags fail at once with
 * EINVAL, before any wait. */
int ctx_accept(ctx_t *ctx, int fd, struct sockaddr *addr, socklen_t *addrlen, int flags);

/* connect(2) that ends when the connection completes, fails, or `ctx` is
 * done (its deadline included).  On a blocking socket the library sets
 * O_NONBLOCK for the duration of the call and then restores the flags; the
 * flag lives on the open file, so dup()ed copies see it meanwhile.  An
 * AF_UNIX listener with a full backlog is retried until it has room or the
 * context is done.  After a cancelled connect the socket is in an
 * unspecified state: close it.  The connect is tried before the context's
 * fd is created, so one that completes at once (an AF_UNIX listener with
 * room) needs no fd; out of fds, one that must wait still waits (see "out of
 * fds" above) and ends when the context is done, at most ~10 ms late for a
 * cancel. */
int ctx_connect(ctx_t *ctx, int fd, const struct sockaddr *addr, socklen_t addrlen);

/* ------------------------------------------------------------------------ */
/* Between processes
 *
 * A context fd crosses process boundaries like any fd (fork, SCM_RIGHTS).
 * The functions below turn other fds into contexts and carry a context to
 * another process.  They share one library thread, the "watch thread",
 * started by the first call that needs it; it blocks every signal and sits
 * in epoll_wait on the watched fds.  When a watched fd polls readable it
 * cancels the context; the wake costs one cross-thread hop (tens of
 * microseconds, see README).  A forked child that inherits live watches
 * gets its own watch thread at fork() (in the child's fork handler), which
 * re-arms them there; posix_spawn() runs no fork handlers.
 *
 * Lifetime: a watch holds a reference to its context until the context is
 * done, whatever makes it done (the fd, ctx_cancel(), a parent, a deadline);
 * then the watch thread closes the library's copy of the fd and drops that
 * reference.  So release these contexts with ctx_release() (cancel, then
 * unref), as every cancellable context: a plain ctx_unref() of a context
 * whose fd never becomes readable keeps it, its fd and its parent alive.
 */

/* A cancellable child of `parent` (as ctx_with_cancel()) that is also
 * cancelled, with cause `cause` (0 means ECANCELED), when `fd` polls
 * readable: POLLIN, POLLHUP or POLLERR.  Typical fds: a pidfd (done when
 * the process exits), the read end of a pipe (done when a byte arrives or
 * every writer has closed it, e.g. a parent process that died), an fd
 * received from another process.  The library works on its own
 * close-on-exec duplicate of `fd` (F_DUPFD_CLOEXEC), so the caller keeps
 * its fd and may close it at any time; the library never reads, writes or
 * changes it (readiness a reader consumes before the watch thread looks may
 * go unseen: make sure it stays readable, as pidfds and closed pipes do).
 * Returns a new reference, or NULL with errno: EINVAL (parent NULL), EBADF
 * (fd not open), EPERM (fd cannot be polled: a regular file, a directory),
 * EMFILE / ENFILE, ENOMEM, ENOSPC (epoll's max_user_watches reached),
 * EAGAIN (a library thread could not start). */
ctx_t *ctx_with_fd(ctx_t *parent, int fd, int cause);

/* Go's signal.NotifyContext: a cancellable child of `parent` that is
 * cancelled, with cause `cause` (0 means EINTR), when one of the signals in
 * `set` is pending for the process (it watches a signalfd).  The library
 * then consumes that one signal (one read of the signalfd), so a later
 * ctx_with_signals() on the same signal is not born done; a signal that
 * arrives after the context is done for another reason stays pending.
 * Rules, all from the kernel:
 *   - Block the signals in every thread first: pthread_sigmask() in the
 *     main thread before any thread starts (threads inherit the mask).  A
 *     signal some thread does not block is delivered to that thread (its
 *     handler or default action: SIGINT kills) and never becomes pending.
 *   - Only process-directed signals are seen: kill(2), a terminal's Ctrl-C,
 *     sigqueue(2).  A thread-directed one (pthread_kill, tgkill, a fault)
 *     pends on its target thread, which signalfd cannot see from the watch
 *     thread.
 *   - The signals stay blocked when the context is done: the library cannot
 *     restore other threads' masks.
 *   - SIGKILL and SIGSTOP cannot be waited for (signalfd ignores them).
 * Returns a new reference, or NULL with errno: EINVAL (parent or set NULL,
 * or an empty set), and the errors of ctx_with_fd(). */
ctx_t *ctx_with_signals(ctx_t *parent, const sigset_t *set, int cause);

/* Sends `ctx` over the AF_UNIX socket `sock` (stream, seqpacket or
 * datagram) as one small message: its fd (SCM_RIGHTS), its effective
 * deadline and its deadline's cause, and its err and cause if it is already
 * done.  A context that can never be done is sent without an fd; sending a
 * live context creates its fd (ctx_fd()) if it had none.  The sender keeps
 * its reference.  The receiver's context (ctx_recv_ctx()) is done when this
 * one is, for as long as this context's fd exists: the peer holds its own
 * copy of the fd, so even the sender's exit leaves the peer's context live
 * (release `ctx` with ctx_release() to end the peer's, or send a context
 * that your exit cancels).  Mirrors sendmsg(2) with MSG_NOSIGNAL: 0, or -1
 * with errno: EINVAL (ctx NULL), EBADF / ENOTSOCK, EAFNOSUPPORT (not an
 * AF_UNIX socket: other families drop the fd silently), EAGAIN on a full
 * non-blocking socket, EPIPE, EMSGSIZE (a stream socket took only part of
 * the message: the peer's ctx_recv_ctx() then fails with EBADMSG),
 * ctx_fd()'s EMFILE / ENFILE / ENOMEM, and sendmsg(2)'s other errors. */
int ctx_send_ctx(int sock, ctx_t *ctx);

/* Receives one message sent by ctx_send_ctx() from `sock` and returns a new
 * child of `parent` that is done when the sender's context is:
 *   - a sender already done: the child is born done with the sender's err
 *     and cause (unless `parent` is done already: then, as always, the
 *     parent's apply);
 *   - a live sender: the child has the sender's effective deadline (and its
 *     cause), so it is done with ETIMEDOUT at the same instant as the
 *     sender, with no message; it is also watched (as ctx_with_fd()) on the
 *     received fd and cancelled with err and cause ECANCELED when the
 *     sender's context is done for another reason (its cause does not
 *     travel after the send).  The watch owns the received fd;
 *   - a sender that can never be done: a plain cancellable child.
 * Deadlines are CLOCK_MONOTONIC instants, which all processes of one boot
 * share, but not across time namespaces (a container with its own
 * monotonic offset) or machines.  Blocks as recvmsg(2) does on a blocking
 * socket (use ctx_poll() first to bound the wait); every fd it receives is
 * close-on-exec, and any it does not keep is closed.  Returns NULL with
 * errno: EINVAL (parent NULL), EBADF / ENOTSOCK, EAGAIN (non-blocking socket,
 * nothing to read), ECONNRESET (end of stream, or an empty message),
 * EBADMSG (not a ctx_send_ctx() message: wrong size, magic or version,
 * inconsistent fields, a missing or extra fd, truncated control data),
 * EMFILE also when no fd was free for the received one (the message
 * is then consumed and lost), and the errors of ctx_with_fd().  EINTR is
 * retried.  A pidfd that SO_PASSPIDFD brings with the message is closed. */
ctx_t *ctx_recv_ctx(int sock, ctx_t *parent);

#ifdef __cplusplus
}
#endif

#endif /* CTX_H */
