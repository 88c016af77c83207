/*
 * The fd mechanics: lazy creation, signalling on cancel, the shared
 * never-readable fd.
 *
 * A context with no effective deadline gets an eventfd; one with a deadline
 * gets a timerfd armed (absolute, CLOCK_MONOTONIC) at that deadline, so the
 * kernel makes it readable with no thread of ours.  A context that is already
 * done when its fd is created gets an eventfd created readable (initial
 * count 1): no timer, no extra write.
 *
 * Once a context is done its fd is never touched again except to make it more
 * readable: re-arming or reading a timerfd would clear its readiness for
 * every watcher.  The one exception is the fallback for kernels without
 * TFD_IOC_SET_TICKS (fire_timerfd), which re-arms a timer that has not fired.
 */
#include "internal.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>

#ifndef TFD_IOC_SET_TICKS
#define TFD_IOC_SET_TICKS _IOW('T', 0, uint64_t)
#endif

/* TFD_IOC_SET_TICKS needs CONFIG_CHECKPOINT_RESTORE; 0 once it failed. */
static _Atomic int ticks_work = 1;

/* Makes the timerfd readable at once; false where the kernel cannot. */
static bool set_ticks(int fd)
{
	if (!atomic_load_explicit(&ticks_work, memory_order_relaxed))
		return false;
	uint64_t one = 1;
	if (ioctl(fd, TFD_IOC_SET_TICKS, &one) == 0)
		return true;
	/* ENOTTY/EINVAL without CONFIG_CHECKPOINT_RESTORE; a seccomp filter
	 * may say EPERM or ENOSYS.  Any failure is permanent. */
	atomic_store_explicit(&ticks_work, 0, memory_order_relaxed);
	return false;
}

static void fire_timerfd(int fd)
{
	if (set_ticks(fd))
		return;
	/* Fallback: re-arm to an instant in the past ({0,0} would disarm).
	 * Re-arming an expired timer clears its readiness for a moment, so
	 * leave it alone if the deadline already fired it.  If the deadline
	 * fires between the poll and the settime, readiness blinks off until
	 * the timer interrupt a moment later: the price of such kernels.  The
	 * caller holds the node's lock: wait (bounded) for that interrupt, so
	 * the fd is readable before the lock goes and before ctx_cancel()
	 * returns, and a second signaller finds it readable. */
	struct pollfd p = {.fd = fd, .events = POLLIN};
	if (poll(&p, 1, 0) == 1)
		return;
	struct itimerspec past = {.it_value = {.tv_sec = 0, .tv_nsec = 1}};
	if (timerfd_settime(fd, TFD_TIMER_ABSTIME, &past, NULL) == 0)
		poll(&p, 1, 100);
}

void ctxi_fd_signal(struct ctxi_cancel *c)
{
	int v = atomic_load_explicit(&c->fd, memory_order_relaxed);
	if (v < 0)
		return;
	if (v & 1) {
		fire_timerfd(v >> 1);
	} else {
		ctxi_eventfd_write(v >> 1);
	}
}

void ctxi_eventfd_write(int fd)
{
	uint64_t one = 1;
	ssize_t r = write(fd, &one, sizeof(one));
	(void)r; /* an eventfd counter cannot overflow from these writes */
}

/* Called by the first readers past a deadline, before they mark the node
 * done.  The kernel timer would fire the fd anyway, but up to tens of
 * microseconds later (the interrupt), and err must not lead the fd.
 * Without TFD_IOC_SET_TICKS the re-arming fallback could blink readiness
 * off; instead wait for that interrupt (bounded: the timer is armed at this
 * very deadline, which has passed, so it is due).  The fd cannot be closed
 * meanwhile: the caller holds a reference, or (the cascade) the lock that
 * the node's free path waits for. */
void ctxi_fd_expire(struct ctxi_cancel *c)
{
	int v = atomic_load_explicit(&c->fd, memory_order_acquire);
	if (v >= 0 && (v & 1) && !set_ticks(v >> 1)) {
		struct pollfd p = {.fd = v >> 1, .events = POLLIN};
		poll(&p, 1, 100);
	}
}

void ctxi_fd_close(struct ctxi_cancel *c)
{
	int v = atomic_load_explicit(&c->fd, memory_order_relaxed);
	if (v >= 0)
		close(v >> 1);
}

/* One eventfd, never written and never closed, for every context that can
 * never be done. */
static int never_fd(void)
{
	static _Atomic int never = -1;
	int fd = atomic_load_explicit(&never, memory_order_acquire);
	if (fd >= 0)
		return fd;
	int mine = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (mine < 0)
		return -1;
	if (atomic_compare_exchange_strong_explicit(&never, &fd, mine, memory_order_acq_rel,
						    memory_order_acquire))
		return mine;
	close(mine); /* another thread won */
	return fd;
}

/* Creates c's fd under c's lock.  The state is read under the lock, so a
 * concurrent cancel either is seen here (the fd is born readable), or sees
 * the lock held or the fd published (quiet_leaf() in lib/tree.c) and takes
 * the lock to write it. */
static int create_fd(struct ctxi_cancel *c)
{
	int fd, timer = 0;
	if (ctxi_state(c)) {
		fd = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);
	} else if (c->base.kind == CTXI_TIMED) {
		fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
		if (fd >= 0) {
			struct itimerspec at = {
				.it_value = ctxi_ts(((struct ctxi_timed *)c)->deadline)};
			if (timerfd_settime(fd, TFD_TIMER_ABSTIME, &at, NULL) < 0) {
				int e = errno;
				close(fd);
				errno = e;
				return -1;
			}
			timer = 1;
		}
	} else {
		fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	}
	if (fd >= 0)
		atomic_store_explicit(&c->fd, fd << 1 | timer, memory_order_release);
	/* A reader that passed the deadline while the timer was being made
	 * found no fd to fire (ctxi_fd_expire), and may report ETIMEDOUT
	 * already: fire it now rather than at the timer interrupt. */
	if (timer && ctxi_now() >= ((struct ctxi_timed *)c)->deadline)
		ctxi_fd_expire(c);
	return fd;
}

int ctx_fd(ctx_t *ctx)
{
	if (!ctx) {
		errno = EINVAL;
		return -1;
	}
	struct ctxi_cancel *c = ctxi_anchor(ctx);
	if (!c)
		return never_fd();
	int v = atomic_load_explicit(&c->fd, memory_order_acquire);
	if (v >= 0)
		return v >> 1;
	ctxi_register(c); /* from now on cancels write the fd (lib/tree.c) */
	ctxi_lock(&c->lock);
	v = atomic_load_explicit(&c->fd, memory_order_relaxed);
	int fd = v >= 0 ? v >> 1 : create_fd(c);
	int e = errno;
	ctxi_unlock(&c->lock);
	errno = e;
	return fd;
}
