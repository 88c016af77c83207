/*
 * The context tree: constructors, cancellation and its cascade, state,
 * values, reference counting.
 */
#include "internal.h"

#include <sched.h>

_Atomic int ctxi_fail_allocs, ctxi_skip_allocs;

static struct ctx background = {.kind = CTXI_ROOT};
static struct ctx todo = {.kind = CTXI_ROOT};

ctx_t *ctx_background(void) { return &background; }
ctx_t *ctx_todo(void) { return &todo; }

ctx_t *ctx_ref(ctx_t *c)
{
	if (!c) {
		errno = EINVAL;
		return NULL;
	}
	if (c->kind != CTXI_ROOT)
		atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
	return c;
}

/* Stores into a list link that may be a node's `children` head, which
 * quiet_leaf() reads without the lock: relaxed atomic, so that read is not a
 * data race.  Every other access happens under the anchor's lock. */
static inline void set_link(struct ctxi_cancel **slot, struct ctxi_cancel *v)
{
	__atomic_store_n(slot, v, __ATOMIC_RELAXED);
}

void ctxi_link(struct ctxi_cancel *anchor, struct ctxi_cancel *c)
{
	c->next = anchor->children;
	if (c->next)
		c->next->pprev = &c->next;
	c->pprev = &anchor->children;
	set_link(&anchor->children, c);
	atomic_store_explicit(&c->base.linked, 1, memory_order_relaxed);
}

/* Under the anchor's lock: out of the list, if it is still there. */
static void detach_locked(struct ctxi_cancel *c)
{
	if (c->pprev) {
		set_link(c->pprev, c->next);
		if (c->next)
			c->next->pprev = c->pprev;
		c->pprev = NULL;
		c->next = NULL;
	}
	atomic_store_explicit(&c->base.linked, 0, memory_order_relaxed);
}

/* Removes `c` from its anchor's children list, if it is still there. */
void ctxi_unlink(struct ctxi_cancel *c)
{
	if (!atomic_load_explicit(&c->base.linked, memory_order_acquire))
		return; /* a cascade detached it and is done with it */
	struct ctxi_cancel *anchor = ctxi_anchor(c->base.parent);
	ctxi_lock(&anchor->lock);
	detach_locked(c);
	ctxi_unlock(&anchor->lock);
}

/*
 * Lazy registration.  A cancellable child with no deadline starts as a lazy
 * leaf: it holds a reference to its parent but is not in its anchor's
 * children list, so creating, cancelling and freeing it take no lock.  No
 * cascade sets its state; a reader that finds its own state 0 looks at its
 * anchor's (ctxi_derive), which is authoritative because a lazy node's
 * anchor is always registered or done: ctxi_register(anchor) runs before
 * any child is made under it.
 *
 * A lazy node is registered (linked under its anchor's lock, reg = 1) the
 * first time it needs a cascade to reach it: before it gets an fd, a child,
 * or an after-function.  So lazy nodes are leaves, without fds, and a cancel
 * walks only the registered part of the tree.  Nodes with a deadline are
 * registered at birth: deriving their err would have to know whether the
 * anchor's cancel came before their own deadline.
 *
 * Whoever first sees a lazy node done through its anchor latches the
 * anchor's state into it by CAS, so err and cause are fixed by one CAS, as
 * on registered nodes: its own cancel, a reader, or ctxi_register() wins.
 */
uint64_t ctxi_derive(struct ctxi_cancel *c)
{
	struct ctxi_cancel *a = ctxi_anchor(c->base.parent);
	uint64_t sa = ctxi_state(a);
	if (!sa)
		return 0;
	if (sa & CTXI_PENDING) {
		/* a's cancel is still walking its subtree: it is not done yet
		 * for readers, and neither is c.  Its walk may also be about
		 * to claim c, if c was registered since our look at reg. */
		return 0;
	}
	uint64_t cur = 0;
	if (atomic_compare_exchange_strong_explicit(&c->state, &cur, sa, memory_order_seq_cst,
						    memory_order_acquire))
		return sa;
	return cur;
}

static uint64_t wait_published(struct ctxi_cancel *c);

/* Takes a's lock and returns its state, never PENDING: a cancel that has
 * marked a but not yet written its fd (it may not have its lock yet) is
 * waited out first, so that nothing made done from a's state is seen done
 * before a's fd is readable. */
uint64_t ctxi_lock_settled(struct ctxi_cancel *a)
{
	for (;;) {
		ctxi_lock(&a->lock);
		uint64_t s = ctxi_state(a);
		if (!(s & CTXI_PENDING))
			return s;
		ctxi_unlock(&a->lock);
		wait_published(a);
	}
}

void ctxi_register(struct ctxi_cancel *c)
{
	if (atomic_load_explicit(&c->base.reg, memory_order_acquire) ||
	    atomic_load_explicit(&c->state, memory_order_acquire))
		return;
	struct ctxi_cancel *a = ctxi_anchor(c->base.parent);
	uint64_t sa = ctxi_lock_settled(a);
	if (!atomic_load_explicit(&c->base.reg, memory_order_relaxed)) {
		uint64_t cur = 0;
		if (sa) {
			/* Done: no cascade will come, c inherits a's state
			 * (c has no fd yet to be PENDING for). */
			atomic_compare_exchange_strong_explicit(&c->state, &cur, sa,
								memory_order_seq_cst,
								memory_order_relaxed);
		} else if (!atomic_load_explicit(&c->state, memory_order_seq_cst)) {
			ctxi_link(a, c);
			atomic_store_explicit(&c->base.reg, CTXI_REG_LINKED, memory_order_release);
			/* c's own cancel may have marked it since our look and
			 * found it unlinked (its ctxi_unlink reads `linked`
			 * after its CAS): then take it out again here, so a
			 * cancelled child holds no place in a's list. */
			atomic_store_explicit(&c->base.linked, 1, memory_order_seq_cst);
			if (atomic_load_explicit(&c->state, memory_order_seq_cst))
				detach_locked(c);
		}
	}
	ctxi_unlock(&a->lock);
}

static void free_chain(ctx_t *c)
{
	while (c) {
		ctx_t *parent = c->parent;
		switch (c->kind) {
		case CTXI_VALUE: {
			struct ctxi_value *v = (struct ctxi_value *)c;
			if (v->destroy)
				v->destroy(v->value);
			break;
		}
		case CTXI_CANCEL:
		case CTXI_TIMED:
			ctxi_unlink((struct ctxi_cancel *)c);
			ctxi_fd_close((struct ctxi_cancel *)c);
			break;
		}
		free(c);
		/* Dropping the parent reference here, in a loop, rather than by
		 * calling ctx_unref() keeps the stack flat for long chains. */
		if (parent->kind == CTXI_ROOT ||
		    atomic_fetch_sub_explicit(&parent->refs, 1, memory_order_acq_rel) != 1)
			return;
		c = parent;
	}
}

void ctx_unref(ctx_t *c)
{
	if (!c || c->kind == CTXI_ROOT)
		return;
	/* The last reference cannot be shared any more (only a holder takes
	 * another; a cancel walk takes none): free without the atomic
	 * decrement.  Acquire: the other holders' releases happen before. */
	if (atomic_load_explicit(&c->refs, memory_order_acquire) == 1) {
		free_chain(c);
		return;
	}
	if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
		free_chain(c);
}

/* ------------------------------------------------------------------------ */
/* Cancellation */

/*
 * Leaves.  If `c`, which is done (marked by the caller, or by another thread
 * whose mark the caller has read), has no children, no fd and nobody inside
 * its lock (a quiet leaf), there is nothing to visit, and no lock or
 * reference to take.  Whoever adds a child or creates the fd does it under
 * c's lock after reading c's state.  If that locker took the lock before our
 * read of the lock word, we see it held, or see it released and (acquire)
 * its changes; if after, the seq_cst order (our state CAS, our lock-word
 * load, its lock CAS, its state load) makes it see c done, so it adds
 * nothing and creates an fd that is born readable.
 */
#define NOT_LEAF INT32_MIN

/* c's fd word (-1: no fd) if c has no children and nobody inside its lock,
 * else NOT_LEAF. */
static int leaf_fd(struct ctxi_cancel *c)
{
	if (atomic_load_explicit(&c->lock, memory_order_seq_cst) != 0 ||
	    __atomic_load_n(&c->children, __ATOMIC_RELAXED))
		return NOT_LEAF;
	return atomic_load_explicit(&c->fd, memory_order_acquire);
}

static bool quiet_leaf(struct ctxi_cancel *c) { return leaf_fd(c) == -1; }

/*
 * A leaf (as for quiet_leaf()) whose fd is an eventfd can be written and
 * published by a cascade that claimed it without its lock or a reference,
 * by the same argument (an fd created later is born readable).  The fd
 * cannot be closed meanwhile: the leaf is in its anchor's list, whose lock
 * the cascade holds and whose free path waits for it.  A timerfd takes the
 * locked path: its fallback firing relies on the node lock.
 */
static bool is_eventfd(int fd_word) { return fd_word >= 0 && !(fd_word & 1); }
/* Ends a node's PENDING phase once its fd has been written (or it has none):
 * ctx_err() readers waiting on the bit see the final state.  Idempotent: a
 * helping walk and the node's own canceller may both do it. */
static void publish(struct ctxi_cancel *c)
{
	uint64_t s = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (s & CTXI_PENDING)
		atomic_store_explicit(&c->state, ctxi_final(s), memory_order_release);
}

/*
 * The cancel cascade: a depth-first walk that holds the lock of every node on
 * the path from the cancelled node down to the one it is visiting, as Go
 * holds each cancelCtx's mutex while it cancels that node's children.  Each
 * child is marked with its parent's state (err and cause are inherited).
 *
 * A node is marked PENDING when the walk reaches it; its fd is written, and
 * then its state published (the bit cleared), in batches (struct batch),
 * never before the walk has left it, its whole subtree done: ctx_err()
 * on a node being walked waits for its lock, as Go's Err() waits for the
 * mutex.  So no reader sees a node done while a descendant is not, and a
 * cancel is seen to happen when its walk ends, which keeps "first of" exact:
 * a descendant whose own deadline passes during the walk was done first.
 *
 * A walk that meets a child already done (cancelled by another thread, whose
 * walk may not have started or may be under way, or done by its deadline)
 * walks that child's subtree too, unless it is a quiet leaf: it takes the
 * child's lock, so it waits for a walk already inside that subtree, and finds
 * there only what is left: fds to write, deadline timerfds to fire (the
 * children's ctxi_state() does that), states to publish.  So when
 * ctx_cancel() returns, every descendant is done and its fd readable,
 * whichever thread did the work.
 *
 * Locks are only ever taken parent before child, and a walk never takes a
 * lock above its starting node, so walks cannot deadlock.  No other path
 * holds two node locks.  The walk needs no recursion and no allocation: a
 * node's `next` is free once it is detached from its anchor's list, so it
 * links the walk's stack.
 *
 * The walk takes no references.  A child stays alive while the walk uses it
 * because its free path (ctxi_unlink) waits for its parent's lock as long as
 * its `linked` flag is set, and the walk clears that flag as its last touch
 * of the child, before it lets the parent's lock go: at the flush after
 * the child is finished (struct batch), or at once for a leaf it did not
 * claim.  A child's free path may thus
 * wait until the walk has finished that child's parent.  A child whose count
 * is already zero is being freed and has no children (every child holds a
 * reference to its parent): it is only detached and published.
 */
/*
 * The walk's deferred work.  Eventfd writes are collected and made in one
 * tight loop, and the nodes they belong to are published only after that
 * loop, in the order the walk finished them (children before parents): an fd
 * is always written before its node is published.  A node the walk has left
 * keeps its lock and its `linked` flag until then, so everything the walk
 * finished is still held (a leaf by its parent's lock, which is on the walk's
 * path or later in the list); the flush publishes, unlocks and lets go.
 * Interleaving each write with the walk's own memory traffic made the writes
 * ~25% slower than the same writes back to back.
 */
#define BATCH 64

struct batch {
	int nfd, nnode;
	int fd[BATCH];
	struct ctxi_cancel *node[BATCH];
	bool locked[BATCH]; /* a node the walk descended into: unlock it */
};

static void batch_flush(struct batch *b)
{
	for (int i = 0; i < b->nfd; i++)
		ctxi_eventfd_write(b->fd[i]);
	b->nfd = 0;
	for (int i = 0; i < b->nnode; i++) {
		struct ctxi_cancel *x = b->node[i];
		publish(x);
		if (b->locked[i])
			ctxi_unlock(&x->lock);
		/* Last touch of x: from here on its free path need not wait
		 * for its parent's lock (still held: on the walk's path, or
		 * later in this list). */
		atomic_store_explicit(&x->base.linked, 0, memory_order_release);
	}
	b->nnode = 0;
}

/* c is done: its fd, if any, is made readable now (a timerfd) or at the next
 * flush (an eventfd). */
static void batch_signal(struct batch *b, struct ctxi_cancel *c)
{
	int v = atomic_load_explicit(&c->fd, memory_order_acquire);
	if (v < 0)
		return;
	if (v & 1) {
		ctxi_fd_signal(c);
		return;
	}
	if (b->nfd == BATCH)
		batch_flush(b);
	b->fd[b->nfd++] = v >> 1;
}

/* c's subtree is finished and its fd signalled: publish it at the flush. */
static void batch_finish(struct batch *b, struct ctxi_cancel *c, bool locked)
{
	if (b->nnode == BATCH)
		batch_flush(b);
	b->node[b->nnode] = c;
	b->locked[b->nnode++] = locked;
}

static void cascade(struct ctxi_cancel *root)
{
	struct ctxi_cancel *top = root, *fire = NULL;
	struct batch b;
	b.nfd = b.nnode = 0;
	/* The caller holds root's lock, and root is done.  Its fd goes first,
	 * unbatched: a program whose epoll set holds it and its descendants'
	 * fds sees the cancelled node's event first. */
	ctxi_fd_signal(root);
	/* root->next still links root in its anchor's list: the stack link of
	 * a visited node is only read below the root.  (do-while: root is not
	 * NULL, and GCC's -Wstringop-overflow would otherwise follow the path
	 * where it is.) */
	do {
		struct ctxi_cancel *n = top;
		struct ctxi_cancel *ch = n->children;
		if (!ch) { /* subtree finished: pop */
			top = n == root ? NULL : n->next;
			if (n != root) {
				n->next = NULL;
				batch_finish(&b, n, true);
			}
			continue;
		}
		set_link(&n->children, ch->next);
		if (ch->next)
			ch->next->pprev = &n->children;
		ch->pprev = NULL;
		ch->next = NULL;
		/* ctxi_state() first: a child whose own deadline has passed
		 * unobserved was done by that deadline, not by this cancel (and
		 * its timerfd is fired). */
		uint64_t cur = ctxi_state(ch);
		bool after = ch->base.kind == CTXI_AFTER;
		if (!cur) {
			uint64_t st = ctxi_final(atomic_load_explicit(&n->state, memory_order_relaxed));
			if (atomic_compare_exchange_strong_explicit(
				    &ch->state, &cur, after ? st : st | CTXI_PENDING,
				    memory_order_seq_cst, memory_order_acquire)) {
				if (after) {
					ch->next = fire;
					fire = ch;
				}
				cur = 0; /* claimed by this walk */
			}
		}
		if (!after) {
			int lf = leaf_fd(ch);
			if (!cur && is_eventfd(lf)) {
				/* Claimed here: its write and publication go
				 * to the batch, and so does its last touch. */
				batch_signal(&b, ch);
				batch_finish(&b, ch, false);
				continue;
			} else if (lf == -1) { /* a quiet leaf */
				if (!cur)
					publish(ch); /* claimed here, nothing to write */
			} else if (!atomic_load_explicit(&ch->base.refs, memory_order_relaxed)) {
				/* Being freed with a decrement (one freed by
				 * ctx_unref's last-reference path keeps its
				 * count at 1 and is walked as any other, which
				 * is safe for the same reason): nobody can be
				 * waiting on it. */
				publish(ch);
			} else {
				/* Walked with no reference: ch stays `linked`
				 * until the flush after it is finished, so its
				 * free path waits for n's lock, which is held
				 * until then. */
				/* Before waiting for a lock another thread
				 * holds, flush: the nodes in the batch are
				 * done and must not stay PENDING meanwhile. */
				uint32_t unlocked = 0;
				if (!atomic_compare_exchange_strong_explicit(
					    &ch->lock, &unlocked, 1, memory_order_seq_cst,
					    memory_order_relaxed)) {
					batch_flush(&b);
					ctxi_lock(&ch->lock);
				}
				batch_signal(&b, ch);
				ch->next = n; /* the stack: back to the parent */
				top = ch;
				continue;
			}
		}
		/* Last touch of a child we hold no reference to: from here on
		 * its free path need not wait for n's lock. */
		atomic_store_explicit(&ch->base.linked, 0, memory_order_release);
	} while (top);
	batch_flush(&b);
	publish(root);
	ctxi_unlock(&root->lock);
	if (fire)
		ctxi_after_fire(fire);
}

static bool deadline_passed(struct ctxi_cancel *n)
{
	return n->base.kind == CTXI_TIMED && ctxi_now() >= ((struct ctxi_timed *)n)->deadline;
}

void (*ctxi_cancel_checked_hook)(struct ctxi_cancel *c);

int ctx_cancel_cause(ctx_t *c, int cause)
{
	if (!c || !ctxi_cancellable(c))
		return EINVAL;
	struct ctxi_cancel *n = (struct ctxi_cancel *)c;
	/* Latches a passed deadline, or a lazy node's inherited state, first. */
	uint64_t cur = ctxi_state_full(n);
	if (__builtin_expect(ctxi_cancel_checked_hook != NULL, 0) && !cur)
		ctxi_cancel_checked_hook(n);
	uint64_t st = ctxi_mkstate(ECANCELED, cause ? cause : ECANCELED);
	/* seq_cst: quiet_leaf() and lib/wait.c's fd-less waiters pair with it. */
	bool mine = !cur && atomic_compare_exchange_strong_explicit(
				    &n->state, &cur, st | CTXI_PENDING, memory_order_seq_cst,
				    memory_order_acquire);
	if (!mine) {
		/* As in Go, a second cancel returns only once the first is
		 * done: the first publishes n when its walk of n's subtree
		 * ends.  A node done by its deadline was never walked: walk it
		 * now, so that its descendants' timerfds are fired too.  So is
		 * one past its deadline that took an ancestor's cancel from a
		 * walk still on its way (ctxi_state_timed). */
		if (cur & CTXI_PENDING) {
			wait_published(n);
		} else if ((ctxi_state_err(cur) == ETIMEDOUT || deadline_passed(n)) &&
			   !quiet_leaf(n)) {
			ctxi_lock(&n->lock);
			cascade(n);
		}
		return EALREADY;
	}
	if (quiet_leaf(n)) {
		publish(n);
	} else {
		ctxi_lock(&n->lock);
		cascade(n); /* publishes and unlocks n */
	}
	ctxi_unlink(n); /* a cancelled child holds no memory in its parent */
	ctxi_wake_nofd_waiters();
	return 0;
}

int ctx_cancel(ctx_t *c) { return ctx_cancel_cause(c, ECANCELED); }

void ctx_release(ctx_t *c)
{
	if (!c)
		return;
	if (ctxi_cancellable(c))
		ctx_cancel(c);
	ctx_unref(c);
}

/* ------------------------------------------------------------------------ */
/* Constructors */

static bool valid_parent(ctx_t *parent)
{
	if (parent)
		return true;
	errno = EINVAL;
	return false;
}

/* A cancellable child of `parent` with its own deadline `own` (CTXI_NEVER
 * for none) and the cause that deadline reports. */
static ctx_t *new_cancel(ctx_t *parent, int64_t own, int own_cause)
{
	if (!valid_parent(parent))
		return NULL;
	struct ctxi_cancel *anchor = ctxi_anchor(parent);
	int64_t deadline = CTXI_NEVER;
	int dcause = 0;
	if (anchor && anchor->base.kind == CTXI_TIMED) {
		const struct ctxi_timed *t = (const struct ctxi_timed *)anchor;
		deadline = t->deadline;
		dcause = t->dcause;
	}
	if (own < deadline) { /* an equal parent deadline keeps the parent's cause */
		deadline = own;
		dcause = own_cause ? own_cause : ETIMEDOUT;
	}
	bool timed = deadline != CTXI_NEVER;
	struct ctxi_cancel *n = ctxi_alloc(timed ? sizeof(struct ctxi_timed) : sizeof(*n));
	if (!n)
		return NULL;
	n->base = (struct ctx){.kind = timed ? CTXI_TIMED : CTXI_CANCEL, .parent = ctx_ref(parent)};
	atomic_init(&n->base.refs, 1);
	atomic_init(&n->base.linked, 0);
	atomic_init(&n->state, 0);
	atomic_init(&n->fd, -1);
	atomic_init(&n->lock, 0);
	n->children = n->next = NULL;
	n->pprev = NULL;
	if (timed) {
		struct ctxi_timed *t = (struct ctxi_timed *)n;
		t->deadline = deadline;
		t->dcause = dcause;
	}
	if (!anchor) {
		atomic_init(&n->base.reg, CTXI_REG_TOP); /* nothing above can cancel it */
		return &n->base;
	}
	/* A lazy node's anchor is registered or done (see ctxi_derive). */
	ctxi_register(anchor);
	if (!timed) {
		atomic_init(&n->base.reg, CTXI_REG_LAZY); /* a lazy leaf: no lock, no link */
		return &n->base;
	}
	/* A child of a done parent is born done with the parent's err and
	 * cause.  A deadline that has already passed needs no special case:
	 * ctxi_state() latches ETIMEDOUT at the first look, and as in Go a done
	 * parent wins over it. */
	atomic_init(&n->base.reg, CTXI_REG_LAZY);
	ctxi_register(n);
	return &n->base;
}

ctx_t *ctx_with_cancel(ctx_t *parent) { return new_cancel(parent, CTXI_NEVER, 0); }

/* Nanoseconds since the epoch of CLOCK_MONOTONIC, saturating at CTXI_NEVER. */
static int64_t ts_to_ns(struct timespec ts)
{
	if (ts.tv_sec < 0)
		return 0; /* long past */
	if (ts.tv_sec > (CTXI_NEVER - ts.tv_nsec) / CTX_SEC)
		return CTXI_NEVER; /* does not fit */
	return (int64_t)ts.tv_sec * CTX_SEC + ts.tv_nsec;
}

ctx_t *ctx_with_deadline_cause(ctx_t *parent, struct timespec deadline, int cause)
{
	if (!valid_parent(parent))
		return NULL;
	if (deadline.tv_nsec < 0 || deadline.tv_nsec >= CTX_SEC) {
		errno = EINVAL;
		return NULL;
	}
	return new_cancel(parent, ts_to_ns(deadline), cause);
}

ctx_t *ctx_with_deadline(ctx_t *parent, struct timespec deadline)
{
	return ctx_with_deadline_cause(parent, deadline, 0);
}

ctx_t *ctx_with_timeout_cause(ctx_t *parent, int64_t timeout_ns, int cause)
{
	if (!valid_parent(parent))
		return NULL;
	int64_t deadline;
	if (timeout_ns == INT64_MAX)
		deadline = CTXI_NEVER;
	else if (timeout_ns <= 0)
		deadline = 0; /* born done */
	else if (__builtin_add_overflow(ctxi_now(), timeout_ns, &deadline))
		deadline = CTXI_NEVER;
	return new_cancel(parent, deadline, cause);
}

ctx_t *ctx_with_timeout(ctx_t *parent, int64_t timeout_ns)
{
	return ctx_with_timeout_cause(parent, timeout_ns, 0);
}

ctx_t *ctx_with_value(ctx_t *parent, const void *key, void *value, void (*destroy)(void *))
{
	if (!valid_parent(parent))
		return NULL;
	if (!key) {
		errno = EINVAL;
		return NULL;
	}
	struct ctxi_value *v = ctxi_alloc(sizeof(*v));
	if (!v)
		return NULL;
	v->base = (struct ctx){.kind = CTXI_VALUE, .parent = ctx_ref(parent)};
	atomic_init(&v->base.refs, 1);
	v->key = key;
	v->value = value;
	v->destroy = destroy;
	return &v->base;
}

ctx_t *ctx_without_cancel(ctx_t *parent)
{
	if (!valid_parent(parent))
		return NULL;
	ctx_t *w = ctxi_alloc(sizeof(*w));
	if (!w)
		return NULL;
	*w = (struct ctx){.kind = CTXI_WITHOUT, .parent = ctx_ref(parent)};
	atomic_init(&w->refs, 1);
	return w;
}

/* ------------------------------------------------------------------------ */
/* State */

/* The nearest anchor above `c` whose effective deadline is c's own (c
 * inherited it, or had an equal one: the parent's applies), or NULL. */
static struct ctxi_cancel *same_deadline_anchor(struct ctxi_cancel *c, int64_t deadline)
{
	struct ctxi_cancel *a = ctxi_anchor(c->base.parent);
	if (!a || a->base.kind != CTXI_TIMED || ((struct ctxi_timed *)a)->deadline != deadline)
		return NULL;
	return a;
}

/*
 * A timed node found with state 0: latch ETIMEDOUT if its deadline has
 * passed.  The fd is fired first, so that it is readable before err says
 * done (the timer interrupt would come tens of microseconds later).
 *
 * A deadline that is an ancestor's (inherited, or equal) makes c done only
 * through that ancestor, as in Go, where such a child has no timer of its
 * own: if an ancestor on the way up to the deadline's owner is done already
 * (a cancel claimed it before the deadline and its walk has not reached c
 * yet, PENDING), c takes that ancestor's err and cause, not ETIMEDOUT.
 * Nothing waits here (callers may hold node locks): c is latched with the
 * final state the walk would give it; its timerfd is fired first as for a
 * deadline, and the walk, still to come, finds c done and signals below it.
 * The ancestors passed on the way (state 0, same passed deadline) are
 * latched too, so a chain read bottom-up is walked once, not once a node.
 *
 * The chain is latched top-down, and a node found done meanwhile passes its
 * state down instead: a cancel that looked at an ancestor just before the
 * deadline may claim it between this look and the latch, and its err must
 * then be the descendants' too.  The walk up keeps the highest LATCH_RING
 * nodes; a longer chain is latched LATCH_RING nodes at a time, from the top.
 */
#define LATCH_RING 32

void (*ctxi_latch_hook)(struct ctxi_cancel *c);

uint64_t ctxi_state_timed(struct ctxi_cancel *c)
{
	const struct ctxi_timed *t = (const struct ctxi_timed *)c;
	if (ctxi_now() < t->deadline)
		return 0;
	for (;;) {
		struct ctxi_cancel *ring[LATCH_RING];
		uint64_t want = ctxi_mkstate(ETIMEDOUT, t->dcause);
		size_t n = 0; /* chain nodes with state 0, c first */
		ring[n++] = c;
		for (struct ctxi_cancel *a = c; (a = same_deadline_anchor(a, t->deadline));) {
			uint64_t sa = atomic_load_explicit(&a->state, memory_order_acquire);
			if (sa) {
				want = ctxi_final(sa);
				break;
			}
			ring[n++ % LATCH_RING] = a;
		}
		if (ctxi_latch_hook)
			ctxi_latch_hook(c);
		size_t low = n > LATCH_RING ? n - LATCH_RING : 0;
		uint64_t s = 0;
		for (size_t i = n; i-- > low;) {
			struct ctxi_cancel *x = ring[i % LATCH_RING];
			ctxi_fd_expire(x);
			uint64_t cur = 0;
			if (atomic_compare_exchange_strong_explicit(&x->state, &cur, want,
								    memory_order_acq_rel,
								    memory_order_acquire)) {
				s = want;
			} else {
				s = cur;
				want = ctxi_final(cur);
			}
		}
		if (!low)
			return s; /* c's, latched last */
	}
}

/* Waits out a cancel's PENDING phase.  The canceller holds the node's lock
 * while it walks the node's subtree, and publishes the node before it lets
 * go, so waiting for the lock is mostly waiting for the bit; the canceller
 * may also not have taken the lock yet, or never take it (a quiet leaf, or
 * an eventfd leaf waiting in the walk's batch, which the walk flushes before
 * it waits for any lock). */
static __attribute__((noinline)) uint64_t wait_published(struct ctxi_cancel *c)
{
	for (;;) {
		ctxi_lock(&c->lock);
		ctxi_unlock(&c->lock);
		uint64_t s = atomic_load_explicit(&c->state, memory_order_acquire);
		if (!(s & CTXI_PENDING))
			return s;
		sched_yield();
	}
}

/* The state as ctx_err() and ctx_cause() report it: never PENDING. */
static inline uint64_t state_of(ctx_t *c)
{
	struct ctxi_cancel *anchor = ctxi_anchor(c);
	if (!anchor)
		return 0;
	uint64_t s = ctxi_state_full(anchor);
	if (__builtin_expect(s & CTXI_PENDING, 0))
		s = wait_published(anchor);
	return s;
}

static __attribute__((noinline)) int err_slow(ctx_t *c)
{
	if (!c)
		return EINVAL;
	return ctxi_state_err(state_of(c));
}

int ctx_err(ctx_t *c)
{
	/* The common case, a live registered cancel node, in a leaf function
	 * (no frame): its own state is 0 and cascades keep it. */
	if (__builtin_expect(c && c->kind == CTXI_CANCEL, 1) &&
	    !atomic_load_explicit(&((struct ctxi_cancel *)c)->state, memory_order_seq_cst) &&
	    atomic_load_explicit(&c->reg, memory_order_acquire))
		return 0;
	return err_slow(c);
}

int ctx_cause(ctx_t *c)
{
	if (!c)
		return EINVAL;
	return ctxi_state_cause(state_of(c));
}

bool ctx_deadline(ctx_t *c, struct timespec *out)
{
	if (!c) {
		errno = EINVAL;
		return false;
	}
	struct ctxi_cancel *anchor = ctxi_anchor(c);
	if (!anchor || anchor->base.kind != CTXI_TIMED)
		return false;
	if (out)
		*out = ctxi_ts(((struct ctxi_timed *)anchor)->deadline);
	return true;
}

void *ctx_value(ctx_t *c, const void *key)
{
	if (!c || !key) {
		errno = EINVAL;
		return NULL;
	}
	for (; c; c = c->parent)
		if (c->kind == CTXI_VALUE && ((struct ctxi_value *)c)->key == key)
			return ((struct ctxi_value *)c)->value;
	return NULL;
}
