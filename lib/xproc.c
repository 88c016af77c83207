/*
 * Between processes: contexts done when an fd polls readable (ctx_with_fd,
 * ctx_with_signals) and contexts sent over AF_UNIX sockets (ctx_send_ctx,
 * ctx_recv_ctx).
 *
 * The watch thread.  One library thread sits in epoll_wait on every watched
 * fd (EPOLLONESHOT: one report each) and on `evfd`, its control eventfd.
 * A report cancels the watch's context.  A watch is also registered as an
 * after-function on its context, so whatever makes the context done (the
 * fd, a cancel, a parent, a deadline), the after thread hands the watch
 * back here ("retire"): the watch thread removes it from the epoll set,
 * closes the fd, drops the context reference and frees the record.
 *
 * Only the watch thread dereferences a registered watch after epoll_wait
 * returns it, and only the watch thread frees one, and only after it has
 * handled every event of the epoll_wait batch it came in, and of the batches
 * collected after a full one (retired watches are processed after those
 * events, and EPOLL_CTL_DEL takes a watch off the ready list): an event can
 * never reach a freed record.
 *
 * Lock: `lk` guards the thread's start, epfd/evfd, the retire queue and the
 * list of live watches (for fork).  It is never held with any other library
 * lock, nor while calling a ctx_* function.
 *
 * fork: the child shares the parent's epoll instance (an open file), so it
 * must never touch it: it closes its copies of epfd and evfd and, if it has
 * live watches, starts its own thread with a new epoll set and re-arms them
 * there (a signalfd must be armed from the process whose signals it reads).
 */
#include "internal.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>

struct watch {
	ctx_t *ctx; /* a reference, dropped when the watch is retired */
	int fd;     /* owned */
	int cause;
	bool consume;          /* a signalfd: read one signal when it fires */
	_Atomic bool fired;    /* its report has been handled (for fork) */
	struct watch *qnext;   /* retire queue, under lk */
	struct watch *cnext;   /* the watch thread's signals to consume */
	struct watch *prev, *next; /* `live`, under lk */
};

static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;
static int epfd = -1, evfd = -1; /* under lk to change */
static bool started;             /* under lk */
static struct watch *retired;    /* retire queue, under lk */
static struct watch *live;       /* every registered watch, under lk */
static _Atomic int nlive;        /* ctxi_watch_count() */

int ctxi_watch_count(void) { return atomic_load(&nlive); }

static void live_add(struct watch *w)
{
	w->prev = NULL;
	w->next = live;
	if (live)
		live->prev = w;
	live = w;
}

static void live_remove(struct watch *w)
{
	if (w->prev)
		w->prev->next = w->next;
	else
		live = w->next;
	if (w->next)
		w->next->prev = w->prev;
}

static void wake(void)
{
	uint64_t one = 1;
	ssize_t r = write(evfd, &one, sizeof(one)); /* never blocks: EFD_NONBLOCK */
	(void)r;
}

/* Frees watches taken off the retire queue (and off `live`). */
static void free_list(struct watch *list, int ep)
{
	while (list) {
		struct watch *w = list;
		list = w->qnext;
		/* ENOENT if it was never armed in this epoll set (a fork). */
		epoll_ctl(ep, EPOLL_CTL_DEL, w->fd, NULL);
		close(w->fd);
		ctx_unref(w->ctx);
		free(w);
		atomic_fetch_sub(&nlive, 1);
	}
}

static void *loop(void *unused)
{
	(void)unused;
	struct epoll_event ev[64];
	struct watch *consume = NULL; /* signal watches that ended their context */
	bool control = false, more = false;
	for (;;) {
		int ep = epfd; /* set before the thread started; fixed for it */
		/* After a full batch, first collect what else is ready (timeout
		 * 0): the signal is consumed only once every watch ready for it
		 * has reported, and the kernel re-polls a signalfd before it
		 * reports it, so a watch left for a later batch would find the
		 * signal gone.  Watches are freed only after that, too. */
		int n = epoll_wait(ep, ev, 64, more ? 0 : -1);
		if (n < 0)
			continue; /* EINTR cannot happen (all signals blocked) */
		for (int i = 0; i < n; i++) {
			struct watch *w = ev[i].data.ptr;
			if (!w) {
				control = true;
				continue;
			}
			/* A context already done for another reason (its watch not
			 * yet handed back) leaves the signal pending, as the
			 * header promises. */
			if (ctx_cancel_cause(w->ctx, w->cause) == 0 && w->consume) {
				w->cnext = consume;
				consume = w;
			}
			atomic_store_explicit(&w->fired, true, memory_order_relaxed);
		}
		more = n == 64;
		if (more)
			continue;
		/* Two contexts on one signal both end; the signal is read once
		 * per context that it ended (EAGAIN once taken). */
		for (struct watch *w = consume; w; w = w->cnext) {
			struct signalfd_siginfo si;
			ssize_t r = read(w->fd, &si, sizeof(si));
			(void)r;
		}
		consume = NULL;
		if (!control)
			continue;
		control = false;
		uint64_t cnt;
		ssize_t r = read(evfd, &cnt, sizeof(cnt));
		(void)r;
		pthread_mutex_lock(&lk);
		struct watch *list = retired;
		retired = NULL;
		for (struct watch *w = list; w; w = w->qnext)
			live_remove(w);
		pthread_mutex_unlock(&lk);
		free_list(list, ep);
	}
	return NULL;
}

/* Adds a watch to the epoll set `ep`; 0 or an errno (EPERM: not pollable). */
static int arm(struct watch *w, int ep)
{
	struct epoll_event e = {.events = EPOLLIN | EPOLLONESHOT, .data.ptr = w};
	return epoll_ctl(ep, EPOLL_CTL_ADD, w->fd, &e) < 0 ? errno : 0;
}

/* Under lk.  Creates the epoll set, the control eventfd and the thread; the
 * watches already in `live` (a forked child's) are armed in the new set.
 * The thread blocks every signal: they belong to the program, and a signalfd
 * must see them pending, not delivered to us. */
static int start_thread(void)
{
	if (started)
		return 0;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		return errno;
	int ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (ev < 0) {
		int e = errno;
		close(ep);
		return e;
	}
	struct epoll_event ce = {.events = EPOLLIN, .data.ptr = NULL};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, ev, &ce) < 0) {
		int e = errno;
		close(ev);
		close(ep);
		return e;
	}
	for (struct watch *w = live; w; w = w->next)
		if (!atomic_load_explicit(&w->fired, memory_order_relaxed))
			arm(w, ep); /* a failure leaves that one unarmed */
	epfd = ep;
	evfd = ev;
	pthread_t t;
	if (ctxi_spawn(&t, loop)) {
		close(ev);
		close(ep);
		epfd = evfd = -1;
		return EAGAIN;
	}
	started = true;
	if (retired)
		wake();
	return 0;
}

static void atfork_prepare(void) { pthread_mutex_lock(&lk); }
static void atfork_parent(void) { pthread_mutex_unlock(&lk); }

/* Only the forking thread exists here.  Never touch the inherited epoll set:
 * the parent's thread still uses it. */
static void atfork_child(void)
{
	pthread_mutex_init(&lk, NULL);
	if (!started)
		return;
	close(epfd);
	close(evfd);
	epfd = evfd = -1;
	started = false;
	if (live || retired)
		start_thread(); /* if it fails, the next watch retries */
}

static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init_once(void)
{
	/* after.c's child handler first: ours starts a watch thread, which may
	 * fire after-functions before a later handler could run. */
	ctxi_after_atfork_init();
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Queues a watch for the watch thread to free. */
static void retire(struct watch *w)
{
	pthread_mutex_lock(&lk);
	w->qnext = retired;
	retired = w;
	if (started)
		wake();
	pthread_mutex_unlock(&lk);
}

/* The after-function: runs on the after thread once the context is done. */
static void retire_fn(void *arg) { retire(arg); }

/*
 * Makes the cancellable context `c` cancelled with `cause` when `fd` polls
 * readable.  Takes `fd` (closed on failure too).  Returns 0 or an errno.
 */
static int watch(ctx_t *c, int fd, int cause, bool consume)
{
	pthread_once(&once, init_once);
	struct watch *w = ctxi_alloc(sizeof(*w));
	if (!w) {
		close(fd);
		return ENOMEM;
	}
	*w = (struct watch){.ctx = ctx_ref(c), .fd = fd, .cause = cause, .consume = consume};
	pthread_mutex_lock(&lk);
	int err = start_thread();
	if (!err)
		err = arm(w, epfd);
	if (!err) {
		live_add(w);
		atomic_fetch_add(&nlive, 1);
	}
	pthread_mutex_unlock(&lk);
	if (err) { /* nobody else has seen it */
		close(fd);
		ctx_unref(c);
		free(w);
		return err;
	}
	/* Armed: from here only the watch thread frees it.  If the fd is ready
	 * already, that thread may cancel `c` before the registration below,
	 * which then fires at once. */
	err = ctx_after_func(c, retire_fn, w, NULL);
	if (err) {
		/* No after-function will hand it back: end the context (the
		 * caller fails and releases it anyway) and retire it now. */
		ctx_cancel(c);
		retire(w);
	}
	return err;
}

ctx_t *ctx_with_fd(ctx_t *parent, int fd, int cause)
{
	if (!parent) {
		errno = EINVAL;
		return NULL;
	}
	if (fd < 0) {
		errno = EBADF;
		return NULL;
	}
	int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (dup < 0)
		return NULL;
	ctx_t *c = ctx_with_cancel(parent);
	if (!c) {
		int e = errno;
		close(dup);
		errno = e;
		return NULL;
	}
	int err = watch(c, dup, cause ? cause : ECANCELED, false);
	if (err) {
		ctx_release(c);
		errno = err;
		return NULL;
	}
	return c;
}

ctx_t *ctx_with_signals(ctx_t *parent, const sigset_t *set, int cause)
{
	if (!parent || !set || sigisemptyset(set)) {
		errno = EINVAL;
		return NULL;
	}
	int sfd = signalfd(-1, set, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		return NULL;
	ctx_t *c = ctx_with_cancel(parent);
	if (!c) {
		int e = errno;
		close(sfd);
		errno = e;
		return NULL;
	}
	int err = watch(c, sfd, cause ? cause : EINTR, true);
	if (err) {
		ctx_release(c);
		errno = err;
		return NULL;
	}
	return c;
}

/* ------------------------------------------------------------------------ */
/* Sending a context */

/* The message: host byte order and layout, as it never leaves the machine. */
#define WIRE_MAGIC 0x43545831u /* "CTX1" */
#define WIRE_VERSION 1u

enum {
	WIRE_NEVER = 1,    /* can never be done: no fd */
	WIRE_DONE = 2,     /* done: err and cause valid, no fd */
	WIRE_DEADLINE = 4, /* deadline and dcause valid */
};

struct wire {
	uint32_t magic;
	uint16_t version;
	uint16_t flags;
	int64_t deadline; /* CLOCK_MONOTONIC ns */
	int32_t dcause;   /* the cause the deadline reports */
	int32_t err;
	int32_t cause;
	int32_t zero; /* padding, sent as 0 */
};

int ctx_send_ctx(int sock, ctx_t *ctx)
{
	if (!ctx) {
		errno = EINVAL;
		return -1;
	}
	if (sock < 0) {
		errno = EBADF;
		return -1;
	}
	/* Other families accept SCM_RIGHTS and drop it without a word (the
	 * send would succeed and the peer get a live context without its fd). */
	int dom;
	socklen_t dlen = sizeof(dom);
	if (getsockopt(sock, SOL_SOCKET, SO_DOMAIN, &dom, &dlen) < 0)
		return -1; /* EBADF, ENOTSOCK */
	if (dom != AF_UNIX) {
		errno = EAFNOSUPPORT;
		return -1;
	}
	struct wire m = {.magic = WIRE_MAGIC, .version = WIRE_VERSION};
	struct ctxi_cancel *a = ctxi_anchor(ctx);
	int fd = -1;
	if (!a) {
		m.flags = WIRE_NEVER;
	} else {
		if (a->base.kind == CTXI_TIMED) {
			const struct ctxi_timed *t = (const struct ctxi_timed *)a;
			m.flags |= WIRE_DEADLINE;
			m.deadline = t->deadline;
			m.dcause = t->dcause;
		}
		if (!ctx_err(ctx)) {
			fd = ctx_fd(ctx);
			if (fd < 0)
				return -1;
		}
		/* Looked at after the fd exists: done by now means the fd
		 * is readable, and the peer is better told err and cause. */
		int err = ctx_err(ctx);
		if (err) {
			m.flags |= WIRE_DONE;
			m.err = err;
			m.cause = ctx_cause(ctx);
			fd = -1;
		}
	}
	struct iovec iov = {.iov_base = &m, .iov_len = sizeof(m)};
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cb;
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
	if (fd >= 0) {
		memset(&cb, 0, sizeof(cb));
		msg.msg_control = cb.buf;
		msg.msg_controllen = sizeof(cb.buf);
		struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
		h->cmsg_level = SOL_SOCKET;
		h->cmsg_type = SCM_RIGHTS;
		h->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(h), &fd, sizeof(int));
	}
	ssize_t n;
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -1;
	if ((size_t)n != sizeof(m)) { /* a stream cut it: the peer sees EBADMSG */
		errno = EMSGSIZE;
		return -1;
	}
	return 0;
}

/* Room for more fds than a valid message has, so that extra ones are seen
 * (and closed) rather than dropped by the kernel unnoticed. */
#define RECV_MAX_FDS 8

/* Linux 6.5+: with SO_PASSPIDFD on the receiving socket, every message
 * brings an SCM_PIDFD, a pidfd of the sender installed in this process. */
#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

/* The control buffer: the fds, after what the receiving socket may be set
 * to get as well (SO_PASSCRED: SCM_CREDENTIALS; SO_PASSSEC: SCM_SECURITY, a
 * security label; SO_PASSPIDFD: SCM_PIDFD), so that those never crowd the
 * fds out (MSG_CTRUNC). */
#define RECV_CONTROL                                                                      \
	(CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(512) + CMSG_SPACE(sizeof(int)) + \
	 CMSG_SPACE(RECV_MAX_FDS * sizeof(int)))

static bool valid(const struct wire *m, ssize_t n, int nfds)
{
	if (n != (ssize_t)sizeof(*m) || m->magic != WIRE_MAGIC || m->version != WIRE_VERSION ||
	    m->zero != 0 || (m->flags & ~(WIRE_NEVER | WIRE_DONE | WIRE_DEADLINE)))
		return false;
	if (m->flags & WIRE_DEADLINE && m->deadline < 0)
		return false;
	if (m->flags & WIRE_NEVER)
		return m->flags == WIRE_NEVER && nfds == 0;
	if (m->flags & WIRE_DONE)
		return nfds == 0 && (m->err == ECANCELED || m->err == ETIMEDOUT) && m->cause != 0;
	return nfds == 1 && m->err == 0 && m->cause == 0;
}

ctx_t *ctx_recv_ctx(int sock, ctx_t *parent)
{
	if (!parent) {
		errno = EINVAL;
		return NULL;
	}
	if (sock < 0) {
		errno = EBADF;
		return NULL;
	}
	/* A longer message on a seqpacket or datagram socket sets MSG_TRUNC; on
	 * a stream the rest stays unread (and fails the next receive). */
	struct wire m = {0};
	struct iovec iov = {.iov_base = &m, .iov_len = sizeof(m)};
	union {
		char buf[RECV_CONTROL];
		struct cmsghdr align;
	} cb;
	struct msghdr msg = {.msg_iov = &iov,
			     .msg_iovlen = 1,
			     .msg_control = cb.buf,
			     .msg_controllen = sizeof(cb.buf)};
	ssize_t n;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return NULL;

	int fds[RECV_MAX_FDS * 2], nfds = 0;
	bool bad = (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0;
	for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h)) {
		if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_PIDFD &&
		    h->cmsg_len >= CMSG_LEN(sizeof(int))) {
			int pfd; /* received, never kept */
			memcpy(&pfd, CMSG_DATA(h), sizeof(int));
			if (pfd >= 0)
				close(pfd);
			continue;
		}
		if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
			continue; /* e.g. SCM_CREDENTIALS under SO_PASSCRED */
		size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
			if (nfds < (int)(sizeof(fds) / sizeof(fds[0])))
				fds[nfds++] = fd;
			else
				close(fd);
		}
	}
	if (n == 0 && nfds == 0 && !bad) {
		errno = ECONNRESET;
		return NULL;
	}
	if (bad || !valid(&m, n, nfds)) {
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		/* A live context's message whose one fd the kernel could not
		 * install although the buffer had room for it: this process is
		 * out of fds (the message is lost). */
		bool nofd = (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) == MSG_CTRUNC && nfds == 0 &&
			    sizeof(cb.buf) - msg.msg_controllen >= CMSG_SPACE(sizeof(int)) &&
			    valid(&m, n, 1);
		errno = nofd ? EMFILE : EBADMSG;
		return NULL;
	}

	ctx_t *c;
	if (m.flags & WIRE_NEVER)
		return ctx_with_cancel(parent);
	if (m.flags & WIRE_DONE) {
		if (m.err == ETIMEDOUT) {
			/* Its deadline if it has one (and it has passed here, as
			 * it should on one clock); else any instant past. */
			int64_t d = m.flags & WIRE_DEADLINE && m.deadline <= ctxi_now() ? m.deadline : 0;
			return ctx_with_deadline_cause(parent, ctxi_ts(d), m.cause);
		}
		c = ctx_with_cancel(parent);
		if (c)
			ctx_cancel_cause(c, m.cause);
		return c;
	}
	c = m.flags & WIRE_DEADLINE
		    ? ctx_with_deadline_cause(parent, ctxi_ts(m.deadline), m.dcause)
		    : ctx_with_cancel(parent);
	if (!c) {
		int e = errno;
		close(fds[0]);
		errno = e;
		return NULL;
	}
	int err = watch(c, fds[0], ECANCELED, false);
	if (err) {
		ctx_release(c);
		errno = err;
		return NULL;
	}
	return c;
}
