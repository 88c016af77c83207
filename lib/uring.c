/*
 * io_uring: operations bound to contexts (include/ctx_uring.h).
 *
 * Records.  Each bound operation has an `op` record and each context (its
 * anchor: value contexts are transparent) that has operations on this ring
 * has a `binding` record, which holds a reference to the context and owns the
 * one IORING_OP_POLL_ADD on the context's fd.  Records live in chunked slabs
 * (stable addresses: a binding's link-timeout timespec is read by the kernel
 * at submit time) and are named on the ring by tags:
 *
 *     63..56 0xC7 | 55..52 type | 51..24 generation | 23..0 slot index
 *
 * A slot's generation moves on each time the slot is freed, so a cancel
 * queued for an operation that completes before the cancel reaches the kernel
 * names nothing that exists any more (-ENOENT), never the slot's next user.
 *
 * Cancellation.  When the poll on a context's fd completes, the context is
 * done: every operation on the binding's `todo` list gets an async cancel by
 * its tag and moves to the `sent` list.  Cancels that do not fit in the SQ
 * wait on the ring's cancel queue for ctx_uring_submit().  Operations forget
 * themselves when their last CQE is seen; a binding is freed when it has no
 * operation, its poll has completed, and it sits on no queue.
 *
 * Idle bindings.  A binding whose operations have all completed keeps its
 * poll for one more ctx_uring_submit() (an operation on the same context is
 * usually queued right after the previous one completes); after that the
 * poll is removed and the binding freed when the poll's CQE arrives, so a
 * context that the program merely unrefs is not kept alive by the ring.
 *
 * Everything here runs on the ring's thread; only the contexts are shared.
 */
#include "internal.h"

#include "ctx_uring.h"

#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

enum { T_OP = 1, T_TIMEOUT, T_POLL, T_CANCEL, T_POLLREM };

#define IDX_BITS 24
#define GEN_BITS 28
#define IDX_MAX ((1u << IDX_BITS) - 1)
#define GEN_MASK ((1u << GEN_BITS) - 1)
#define CHUNK_SHIFT 10
#define CHUNK (1u << CHUNK_SHIFT)

static uint64_t mktag(unsigned type, uint32_t gen, uint32_t idx)
{
	return (uint64_t)CTX_URING_TAG_BYTE << 56 | (uint64_t)type << 52 |
	       (uint64_t)(gen & GEN_MASK) << IDX_BITS | idx;
}
static unsigned tag_type(uint64_t t) { return (unsigned)(t >> 52) & 0xf; }
static uint32_t tag_gen(uint64_t t) { return (uint32_t)(t >> IDX_BITS) & GEN_MASK; }
static uint32_t tag_idx(uint64_t t) { return (uint32_t)t & IDX_MAX; }

/* List links are slot index + 1, so that 0 means none. */
#define NIL 0u

struct op {
	uint32_t gen;
	uint32_t link; /* free list */
	uint64_t user_data;
	uint32_t bind; /* binding + 1, NIL for a stand-in NOP */
	uint32_t prev, next;
	int synth;     /* err reported by a NOP standing in for the op */
	uint8_t live;
	uint8_t list;  /* 0: binding's todo list, 1: cancel sent */
};

enum { B_ARMED, B_FIRED, B_REMOVING };

struct binding {
	uint32_t gen;
	uint32_t link; /* free list */
	struct ctxi_cancel *anchor; /* referenced; NULL when the slot is free */
	uint32_t self;    /* own slot index */
	uint32_t hnext;   /* hash chain */
	uint32_t qnext;   /* cancel queue */
	uint32_t inext;   /* idle list */
	uint32_t head[2]; /* ops: [0] todo, [1] cancel sent */
	uint32_t nops;
	uint8_t state;
	bool poll_live, in_map, on_cq, on_idle, idle_seen, needs_poll, has_deadline;
	int fd;
	struct __kernel_timespec ts; /* read by the kernel at submit */
};

struct slab {
	void **chunks;
	uint32_t nchunks, used, free; /* free: head of the free list (+1) */
	size_t esize;
};

struct ctx_uring {
	struct io_uring *ring;
	struct slab ops, binds;
	uint32_t *buckets; /* anchor -> binding + 1 */
	uint32_t nbuckets, nmapped;
	uint32_t cq_head, cq_tail; /* bindings with cancels to send */
	uint32_t idle;             /* bindings without operations */
	size_t inflight;
	unsigned skip; /* IOSQE_CQE_SKIP_SUCCESS for cancels, if the kernel has it */
	int64_t mono_off; /* CLOCK_MONOTONIC offset of our time namespace, ns */
};

/* ------------------------------------------------------------------------ */
/* Slabs.  Every record starts with `uint32_t gen, link`. */

struct slot {
	uint32_t gen, link;
};

static void *slab_at(const struct slab *s, uint32_t i)
{
	return (char *)s->chunks[i >> CHUNK_SHIFT] + (size_t)(i & (CHUNK - 1)) * s->esize;
}

static void *slab_get(struct slab *s, uint32_t *idx)
{
	if (s->free) {
		uint32_t i = s->free - 1;
		struct slot *e = slab_at(s, i);
		s->free = e->link;
		*idx = i;
		return e;
	}
	if (s->used > IDX_MAX) {
		errno = ENOMEM;
		return NULL;
	}
	if ((s->used & (CHUNK - 1)) == 0) {
		uint32_t c = s->used >> CHUNK_SHIFT;
		if (c == s->nchunks) {
			uint32_t n = s->nchunks ? 2 * s->nchunks : 4;
			void **p = realloc(s->chunks, n * sizeof(*p));
			if (!p) {
				errno = ENOMEM;
				return NULL;
			}
			s->chunks = p;
			s->nchunks = n;
		}
		s->chunks[c] = ctxi_alloc(CHUNK * s->esize);
		if (!s->chunks[c])
			return NULL;
		memset(s->chunks[c], 0, CHUNK * s->esize);
	}
	*idx = s->used++;
	return slab_at(s, *idx);
}

static void slab_put(struct slab *s, uint32_t idx)
{
	struct slot *e = slab_at(s, idx);
	e->gen = (e->gen + 1) & GEN_MASK; /* stale tags no longer match */
	e->link = s->free;
	s->free = idx + 1;
}

static void slab_free(struct slab *s)
{
	for (uint32_t c = 0; c < (s->used + CHUNK - 1) >> CHUNK_SHIFT; c++)
		free(s->chunks[c]);
	free(s->chunks);
}

static struct op *op_at(ctx_uring_t *cu, uint32_t i) { return slab_at(&cu->ops, i); }
static struct binding *b_at(ctx_uring_t *cu, uint32_t i) { return slab_at(&cu->binds, i); }

/* ------------------------------------------------------------------------ */
/* The anchor -> binding map: chained hashing, doubled at load 1. */

static uint32_t hash_ptr(const void *p, uint32_t n)
{
	uint64_t x = (uint64_t)(uintptr_t)p * 0x9E3779B97F4A7C15ull;
	return (uint32_t)(x >> 32) & (n - 1);
}

static int map_grow(ctx_uring_t *cu)
{
	uint32_t n = cu->nbuckets ? 2 * cu->nbuckets : 64;
	uint32_t *nb = calloc(n, sizeof(*nb));
	if (!nb)
		return ENOMEM;
	for (uint32_t i = 0; i < cu->nbuckets; i++) {
		uint32_t e = cu->buckets[i];
		while (e) {
			struct binding *b = b_at(cu, e - 1);
			uint32_t next = b->hnext;
			uint32_t h = hash_ptr(b->anchor, n);
			b->hnext = nb[h];
			nb[h] = e;
			e = next;
		}
	}
	free(cu->buckets);
	cu->buckets = nb;
	cu->nbuckets = n;
	return 0;
}

static struct binding *map_get(ctx_uring_t *cu, struct ctxi_cancel *a)
{
	if (!cu->nbuckets)
		return NULL;
	for (uint32_t e = cu->buckets[hash_ptr(a, cu->nbuckets)]; e;) {
		struct binding *b = b_at(cu, e - 1);
		if (b->anchor == a)
			return b;
		e = b->hnext;
	}
	return NULL;
}

static void map_del(ctx_uring_t *cu, struct binding *b)
{
	if (!b->in_map)
		return;
	uint32_t me = b->self + 1;
	for (uint32_t *p = &cu->buckets[hash_ptr(b->anchor, cu->nbuckets)]; *p;
	     p = &b_at(cu, *p - 1)->hnext) {
		if (*p == me) {
			*p = b->hnext;
			break;
		}
	}
	b->in_map = false;
	cu->nmapped--;
}

/* ------------------------------------------------------------------------ */
/* Records */

static void maybe_free_binding(ctx_uring_t *cu, struct binding *b, uint32_t bi)
{
	if (b->nops || b->poll_live || b->on_cq || b->on_idle)
		return;
	map_del(cu, b);
	ctx_unref(&b->anchor->base);
	b->anchor = NULL;
	slab_put(&cu->binds, bi);
}

static void list_push(ctx_uring_t *cu, struct binding *b, struct op *o, uint32_t oi, int which)
{
	o->list = (uint8_t)which;
	o->prev = NIL;
	o->next = b->head[which];
	if (o->next)
		op_at(cu, o->next - 1)->prev = oi + 1;
	b->head[which] = oi + 1;
}

static void list_del(ctx_uring_t *cu, struct binding *b, struct op *o)
{
	if (o->prev)
		op_at(cu, o->prev - 1)->next = o->next;
	else
		b->head[o->list] = o->next;
	if (o->next)
		op_at(cu, o->next - 1)->prev = o->prev;
	o->prev = o->next = NIL;
}

static void cq_push(ctx_uring_t *cu, struct binding *b, uint32_t bi)
{
	if (b->on_cq)
		return;
	b->on_cq = true;
	b->qnext = NIL;
	if (cu->cq_tail)
		b_at(cu, cu->cq_tail - 1)->qnext = bi + 1;
	else
		cu->cq_head = bi + 1;
	cu->cq_tail = bi + 1;
}

static void idle_push(ctx_uring_t *cu, struct binding *b, uint32_t bi)
{
	if (b->on_idle)
		return;
	b->on_idle = true;
	b->idle_seen = false;
	b->inext = cu->idle;
	cu->idle = bi + 1;
}

/* The operation's last CQE has been seen. */
static void op_forget(ctx_uring_t *cu, struct op *o, uint32_t oi)
{
	uint32_t bi = o->bind;
	o->live = 0;
	cu->inflight--;
	if (bi) {
		struct binding *b = b_at(cu, bi - 1);
		list_del(cu, b, o);
		if (--b->nops == 0) {
			if (b->state == B_ARMED && b->poll_live)
				idle_push(cu, b, bi - 1);
			else
				maybe_free_binding(cu, b, bi - 1);
		}
	}
	slab_put(&cu->ops, oi);
}

/* ------------------------------------------------------------------------ */
/* SQEs of the library */

static struct io_uring_sqe *sqe_if_room(ctx_uring_t *cu)
{
	return io_uring_sq_space_left(cu->ring) ? io_uring_get_sqe(cu->ring) : NULL;
}

static void prep_poll(struct io_uring_sqe *s, struct binding *b, uint32_t bi)
{
	io_uring_prep_poll_add(s, b->fd, POLLIN);
	io_uring_sqe_set_data64(s, mktag(T_POLL, b->gen, bi));
	b->poll_live = true;
	b->needs_poll = false;
}

/* Sends as many queued cancels (and poll re-arms) as the SQ has room for.
 * Returns true if none is left waiting. */
static bool flush_cancels(ctx_uring_t *cu)
{
	while (cu->cq_head) {
		uint32_t bi = cu->cq_head - 1;
		struct binding *b = b_at(cu, bi);
		if (b->needs_poll && !b->nops)
			b->needs_poll = false; /* nothing left to guard */
		if (b->needs_poll) {
			struct io_uring_sqe *s = sqe_if_room(cu);
			if (!s)
				return false;
			prep_poll(s, b, bi);
		}
		while (b->state == B_FIRED && b->head[0]) {
			struct io_uring_sqe *s = sqe_if_room(cu);
			if (!s)
				return false;
			uint32_t oi = b->head[0] - 1;
			struct op *o = op_at(cu, oi);
			list_del(cu, b, o);
			list_push(cu, b, o, oi, 1);
			io_uring_prep_cancel64(s, mktag(T_OP, o->gen, oi), 0);
			io_uring_sqe_set_data64(s, mktag(T_CANCEL, o->gen, oi));
			s->flags |= (uint8_t)cu->skip;
		}
		cu->cq_head = b->qnext;
		if (!cu->cq_head)
			cu->cq_tail = NIL;
		b->on_cq = false;
		maybe_free_binding(cu, b, bi);
	}
	return true;
}

/* Removes the polls of bindings that have stayed without operations through
 * a whole submit cycle. */
static void sweep_idle(ctx_uring_t *cu)
{
	uint32_t e = cu->idle, keep = NIL;
	cu->idle = NIL;
	while (e) {
		struct binding *b = b_at(cu, e - 1);
		uint32_t bi = e - 1;
		e = b->inext;
		b->on_idle = false;
		if (b->nops || b->state != B_ARMED || !b->poll_live) {
			maybe_free_binding(cu, b, bi);
			continue;
		}
		if (!b->idle_seen || ctx_err(&b->anchor->base)) {
			/* Second chance; or the poll is about to fire anyway. */
			b->idle_seen = true;
			b->on_idle = true;
			b->inext = keep;
			keep = bi + 1;
			continue;
		}
		struct io_uring_sqe *s = sqe_if_room(cu);
		if (!s) {
			b->on_idle = true;
			b->inext = keep;
			keep = bi + 1;
			continue;
		}
		io_uring_prep_poll_remove(s, mktag(T_POLL, b->gen, bi));
		io_uring_sqe_set_data64(s, mktag(T_POLLREM, b->gen, bi));
		s->flags |= (uint8_t)cu->skip;
		b->state = B_REMOVING;
		map_del(cu, b); /* the next op on this context gets a new binding */
	}
	cu->idle = keep;
}

/* ------------------------------------------------------------------------ */
/* API */

/*
 * io_uring reads an absolute timeout on the host's CLOCK_MONOTONIC, while
 * ctx_deadline() is on this process's, which a time namespace offsets (a
 * container restored by CRIU, `unshare --time`): host = ours - offset.
 * /proc/self/timens_offsets shows the offsets of the namespace our children
 * get; it is ours unless this process unshared CLONE_NEWTIME itself, which
 * the namespace inodes tell (then our offsets cannot be read: assume 0).
 */
static int64_t timens_mono_offset(void)
{
	struct stat own, kids;
	if (stat("/proc/self/ns/time", &own) || stat("/proc/self/ns/time_for_children", &kids) ||
	    own.st_ino != kids.st_ino || own.st_dev != kids.st_dev)
		return 0; /* no time namespaces (Linux < 5.6), or not ours */
	FILE *f = fopen("/proc/self/timens_offsets", "re");
	if (!f)
		return 0;
	char name[32];
	long long sec;
	long nsec;
	int64_t off = 0;
	while (fscanf(f, "%31s %lld %ld", name, &sec, &nsec) == 3) {
		if (!strcmp(name, "monotonic") || !strcmp(name, "1")) {
			off = (int64_t)sec * CTX_SEC + nsec;
			break;
		}
	}
	fclose(f);
	return off;
}

ctx_uring_t *ctx_uring_new(struct io_uring *ring)
{
	/* An IOPOLL ring rejects POLL_ADD (-EINVAL): no op could be cancelled.
	 * The first op on a context with a deadline needs three SQEs. */
	if (!ring || (ring->flags & IORING_SETUP_IOPOLL) || ring->sq.ring_entries < 3) {
		errno = EINVAL;
		return NULL;
	}
	struct io_uring_probe *p = io_uring_get_probe_ring(ring);
	if (!p) {
		errno = EOPNOTSUPP;
		return NULL;
	}
	static const int need[] = {IORING_OP_NOP, IORING_OP_POLL_ADD, IORING_OP_POLL_REMOVE,
				   IORING_OP_ASYNC_CANCEL, IORING_OP_LINK_TIMEOUT};
	bool ok = true;
	for (size_t i = 0; i < sizeof(need) / sizeof(need[0]); i++)
		ok = ok && io_uring_opcode_supported(p, need[i]);
	io_uring_free_probe(p);
	if (!ok) {
		errno = EOPNOTSUPP;
		return NULL;
	}
	ctx_uring_t *cu = ctxi_alloc(sizeof(*cu));
	if (!cu)
		return NULL;
	memset(cu, 0, sizeof(*cu));
	cu->ring = ring;
	cu->ops.esize = sizeof(struct op);
	cu->binds.esize = sizeof(struct binding);
	/* Successful cancels need no CQE (Linux 5.17+). */
	cu->skip = (ring->features & IORING_FEAT_CQE_SKIP) ? IOSQE_CQE_SKIP_SUCCESS : 0;
	cu->mono_off = timens_mono_offset();
	return cu;
}

void ctx_uring_free(ctx_uring_t *cu)
{
	if (!cu)
		return;
	for (uint32_t i = 0; i < cu->binds.used; i++) {
		struct binding *b = b_at(cu, i);
		if (b->anchor)
			ctx_unref(&b->anchor->base);
	}
	slab_free(&cu->ops);
	slab_free(&cu->binds);
	free(cu->buckets);
	free(cu);
}

size_t ctx_uring_inflight(const ctx_uring_t *cu) { return cu ? cu->inflight : 0; }

/* Multishot requests must not head a link (the kernel rejects the pair). */
static bool is_multishot(const struct io_uring_sqe *s)
{
	switch (s->opcode) {
	case IORING_OP_POLL_ADD:
		return s->len & IORING_POLL_ADD_MULTI;
	case IORING_OP_ACCEPT:
		return s->ioprio & IORING_ACCEPT_MULTISHOT;
	case IORING_OP_RECV:
	case IORING_OP_RECVMSG:
		return s->ioprio & IORING_RECV_MULTISHOT;
	default:
		return false;
	}
}

static void copy_sqe(ctx_uring_t *cu, struct io_uring_sqe *dst, const struct io_uring_sqe *src)
{
	memcpy(dst, src, sizeof(*dst));
	if (cu->ring->flags & IORING_SETUP_SQE128)
		memset(dst + 1, 0, sizeof(*dst)); /* the big SQE's second half */
}

static struct binding *new_binding(ctx_uring_t *cu, struct ctxi_cancel *a, int fd, uint32_t *bi)
{
	if (cu->nmapped >= cu->nbuckets && map_grow(cu)) {
		errno = ENOMEM;
		return NULL;
	}
	struct binding *b = slab_get(&cu->binds, bi);
	if (!b)
		return NULL;
	uint32_t gen = b->gen;
	memset(b, 0, sizeof(*b));
	b->gen = gen;
	b->self = *bi;
	b->anchor = (struct ctxi_cancel *)ctx_ref(&a->base);
	b->state = B_ARMED;
	b->fd = fd;
	struct timespec d;
	if (ctx_deadline(&a->base, &d)) {
		/* On the host's clock (see timens_mono_offset()). */
		int64_t ns = (int64_t)d.tv_sec * CTX_SEC + d.tv_nsec, host;
		if (__builtin_sub_overflow(ns, cu->mono_off, &host))
			host = cu->mono_off > 0 ? 0 : INT64_MAX;
		if (host < 0)
			host = 0;
		b->has_deadline = true;
		b->ts.tv_sec = host / CTX_SEC;
		b->ts.tv_nsec = host % CTX_SEC;
	}
	uint32_t h = hash_ptr(a, cu->nbuckets);
	b->hnext = cu->buckets[h];
	cu->buckets[h] = *bi + 1;
	b->in_map = true;
	cu->nmapped++;
	return b;
}

int ctx_uring_queue(ctx_uring_t *cu, ctx_t *ctx, const struct io_uring_sqe *sqe)
{
	if (!cu || !ctx || !sqe)
		return EINVAL;
	/* IOSQE_IO_DRAIN: the kernel starts no later SQE before a drained one
	 * completes, so the cancel of a drained op (or of an earlier op the
	 * drained one waits for) would never start. */
	if (sqe->flags & (IOSQE_IO_LINK | IOSQE_IO_HARDLINK | IOSQE_CQE_SKIP_SUCCESS | IOSQE_IO_DRAIN))
		return EINVAL;
	flush_cancels(cu); /* cancels for done contexts go before new work */
	struct io_uring *ring = cu->ring;

	struct ctxi_cancel *a = ctxi_anchor(ctx);
	int err = a ? ctx_err(ctx) : 0;
	/* A context that can never be done has no binding: the op is only
	 * tagged, so that its CQE and ctx_uring_inflight() work alike. */
	struct binding *b = err || !a ? NULL : map_get(cu, a);
	bool link = a && !err && !is_multishot(sqe) &&
		    (b ? b->has_deadline : ctx_deadline(ctx, NULL));
	unsigned need = 1 + link + (a && !err && !b);
	if (io_uring_sq_space_left(ring) < need)
		return EBUSY;

	int fd = -1;
	if (a && !err && !b && (fd = ctx_fd(ctx)) < 0)
		return errno;
	uint32_t oi, bi = 0;
	struct op *o = slab_get(&cu->ops, &oi);
	if (!o)
		return errno;
	uint32_t gen = o->gen;
	memset(o, 0, sizeof(*o));
	o->gen = gen;
	o->user_data = sqe->user_data;
	o->live = 1;
	uint64_t tag = mktag(T_OP, gen, oi);

	if (err) {
		/* Done already: a NOP stands in for the op, so the caller sees
		 * its completion on the ring like any other. */
		o->synth = err;
		struct io_uring_sqe *s = io_uring_get_sqe(ring);
		io_uring_prep_nop(s);
		io_uring_sqe_set_data64(s, tag);
		cu->inflight++;
		return 0;
	}

	if (!a) {
		cu->inflight++;
		struct io_uring_sqe *s = io_uring_get_sqe(ring);
		copy_sqe(cu, s, sqe);
		io_uring_sqe_set_data64(s, tag);
		return 0;
	}
	if (!b) {
		b = new_binding(cu, a, fd, &bi);
		if (!b) {
			int e = errno;
			slab_put(&cu->ops, oi);
			return e;
		}
		prep_poll(io_uring_get_sqe(ring), b, bi);
	} else {
		bi = b->self;
		b->idle_seen = false; /* in use again: a full idle cycle anew */
	}
	o->bind = bi + 1;
	list_push(cu, b, o, oi, 0);
	b->nops++;
	cu->inflight++;

	struct io_uring_sqe *s = io_uring_get_sqe(ring);
	copy_sqe(cu, s, sqe);
	io_uring_sqe_set_data64(s, tag);
	if (link) {
		/* IOSQE_IO_LINK after the copy: the timeout guards this SQE only. */
		s->flags |= IOSQE_IO_LINK;
		struct io_uring_sqe *t = io_uring_get_sqe(ring);
		io_uring_prep_link_timeout(t, &b->ts, IORING_TIMEOUT_ABS);
		io_uring_sqe_set_data64(t, mktag(T_TIMEOUT, gen, oi));
	}
	return 0;
}

static struct op *op_lookup(ctx_uring_t *cu, uint64_t tag, uint32_t *oi)
{
	*oi = tag_idx(tag);
	if (*oi >= cu->ops.used)
		return NULL;
	struct op *o = op_at(cu, *oi);
	return o->live && o->gen == tag_gen(tag) ? o : NULL;
}

static struct binding *b_lookup(ctx_uring_t *cu, uint64_t tag, uint32_t *bi)
{
	*bi = tag_idx(tag);
	if (*bi >= cu->binds.used)
		return NULL;
	struct binding *b = b_at(cu, *bi);
	return b->anchor && b->gen == tag_gen(tag) ? b : NULL;
}

/* The poll on a context's fd completed. */
static void poll_done(ctx_uring_t *cu, struct binding *b, uint32_t bi, int res)
{
	b->poll_live = false;
	if (b->state == B_REMOVING) {
		/* Removed (-ECANCELED), or it fired meanwhile: no op either way. */
	} else if (res > 0) {
		/* The context is done: cancel what is still bound to it.  New
		 * ops on it get a stand-in NOP, so the binding leaves the map. */
		b->state = B_FIRED;
		map_del(cu, b);
		if (b->head[0]) {
			cq_push(cu, b, bi);
			flush_cancels(cu);
		}
	} else if (b->nops && (res == -ECANCELED || res == -ENOMEM || res == -EAGAIN ||
				res == -EINTR)) {
		/* The poll ended without the context being done (a cancel-any
		 * of the caller's, a transient failure): arm it again, or
		 * ctx_cancel() could not reach these ops.  Other errors are not
		 * retried, lest they loop: the link timeout still applies. */
		b->needs_poll = true;
		cq_push(cu, b, bi);
		flush_cancels(cu);
	} else {
		/* The poll ended and is not armed again (an idle binding's poll
		 * hit by a cancel-any of the caller's, or an error): the binding
		 * leaves the map, so that the next op on the context gets a new
		 * binding with a poll of its own, not one that ctx_cancel() can
		 * no longer reach. */
		map_del(cu, b);
	}
	maybe_free_binding(cu, b, bi);
}

/*
 * The results an op gets when it is ended before it finished: -ECANCELED
 * from the link timeout or our cancel (or someone else's cancel, while the
 * context happens to be done); -EINTR, and the kernel-internal
 * -ERESTARTSYS family (512-514) that leaks out of an io-wq worker
 * interrupted while blocked (seen with splice from an empty pipe).
 */
static bool ended_early(int res)
{
	return res == -ECANCELED || res == -EINTR || (res <= -512 && res >= -514);
}

bool ctx_uring_cqe(ctx_uring_t *cu, const struct io_uring_cqe *cqe, struct ctx_uring_result *out)
{
	if (!cu || !cqe || !out) {
		errno = EINVAL;
		return false;
	}
	uint64_t ud = cqe->user_data;
	if (!CTX_URING_IS_TAG(ud)) {
		*out = (struct ctx_uring_result){
			.user_data = ud, .res = cqe->res, .flags = cqe->flags};
		return true;
	}
	switch (tag_type(ud)) {
	case T_OP: {
		uint32_t oi;
		struct op *o = op_lookup(cu, ud, &oi);
		if (!o)
			return false; /* not ours any more: nothing to report */
		*out = (struct ctx_uring_result){.user_data = o->user_data,
						 .res = cqe->res,
						 .flags = cqe->flags,
						 .bound = true};
		if (o->synth) {
			out->res = -o->synth;
			out->ended_by = o->synth;
		} else if (o->bind && ended_early(cqe->res)) {
			struct binding *b = b_at(cu, o->bind - 1);
			int e = ctx_err(&b->anchor->base);
			if (e) {
				out->res = -e;
				out->ended_by = e;
			}
		}
		if (!(cqe->flags & IORING_CQE_F_MORE))
			op_forget(cu, o, oi);
		return true;
	}
	case T_POLL: {
		uint32_t bi;
		struct binding *b = b_lookup(cu, ud, &bi);
		if (b && b->poll_live)
			poll_done(cu, b, bi, cqe->res);
		return false;
	}
	default: /* link timeouts, cancels, poll removals: nothing to do */
		return false;
	}
}

/* With IORING_SETUP_SQPOLL, a submit only publishes the SQ tail: the
 * kernel's thread takes the entries in its own time, and until it has, their
 * slots are not free.  Waits (bounded, SQPOLL_SETTLE_NS) until it has taken
 * them all, so that, as on other rings, a submit gives the SQ its room back
 * (ctx_uring_queue() after an EBUSY, the next round of cancels).  True if the
 * SQ is empty now on an SQPOLL ring. */
#define SQPOLL_SETTLE_NS (100 * CTX_MSEC)

static bool sqpoll_settle(struct io_uring *ring)
{
	if (!(ring->flags & IORING_SETUP_SQPOLL))
		return false;
	if (!io_uring_sq_ready(ring))
		return true;
	int64_t end = ctxi_now() + SQPOLL_SETTLE_NS;
	while (io_uring_sq_ready(ring)) {
		if (ctxi_now() >= end)
			return false;
		sched_yield();
	}
	return true;
}

/*
 * An SQ thread that serves several rings (IORING_SETUP_ATTACH_WQ; a ring
 * cannot tell whether another one has attached to its thread) takes at most
 * IORING_SQPOLL_CAP_ENTRIES_VALUE (8) entries of a ring per pass, wherever a
 * link chain ends.  An op that is the last entry of a pass goes alone, and
 * its link timeout, alone in the next pass, fails with -EINVAL: the op runs
 * without its deadline.  So the tail is published only where no chain
 * continues, and never more than SQPOLL_PASS entries past the kernel's head:
 * whatever the thread finds in the SQ, it takes all of it in one pass.
 */
#define SQPOLL_PASS 8u

static bool sqe_links(const struct io_uring *ring, unsigned pos)
{
	unsigned shift = (ring->flags & IORING_SETUP_SQE128) ? 1 : 0;
	return ring->sq.sqes[(pos & ring->sq.ring_mask) << shift].flags &
	       (IOSQE_IO_LINK | IOSQE_IO_HARDLINK);
}

/* io_uring_submit_and_wait() on an SQPOLL ring, publishing the tail in the
 * steps above.  Returns the number of entries published, or -errno. */
static int sqpoll_submit(struct io_uring *ring, unsigned wait_nr)
{
	struct io_uring_sq *sq = &ring->sq;
	unsigned end = sq->sqe_tail, done = sq->sqe_head;
	unsigned seen = io_uring_smp_load_acquire(sq->khead);
	int64_t give_up = ctxi_now() + SQPOLL_SETTLE_NS;
	while (sq->sqe_head != end) {
		unsigned head = io_uring_smp_load_acquire(sq->khead), cut = sq->sqe_head;
		for (unsigned p = sq->sqe_head; p != end && p - head < SQPOLL_PASS; p++)
			if (!sqe_links(ring, p))
				cut = p + 1;
		if (cut == sq->sqe_head && head == cut) {
			/* A chain of the caller's longer than a pass: it
			 * cannot be kept whole, publish up to its end. */
			while (cut != end && sqe_links(ring, cut))
				cut++;
			cut += cut != end;
		}
		if (cut == sq->sqe_head) {
			/* The thread has not taken enough yet.  If it makes no
			 * progress for that long, publish all (as liburing
			 * would) rather than hold the caller's work back. */
			if (head != seen) {
				seen = head;
				give_up = ctxi_now() + SQPOLL_SETTLE_NS;
			}
			if (ctxi_now() < give_up) {
				sched_yield();
				continue;
			}
			cut = end;
		}
		sq->sqe_tail = cut; /* io_uring_submit() publishes up to sqe_tail */
		int r = io_uring_submit(ring);
		sq->sqe_tail = end;
		if (r < 0)
			return r;
	}
	if (wait_nr) {
		int r = io_uring_submit_and_wait(ring, wait_nr); /* nothing left to publish */
		if (r < 0)
			return r;
	}
	return (int)(end - done);
}

int ctx_uring_submit(ctx_uring_t *cu, unsigned wait_nr)
{
	if (!cu) {
		errno = EINVAL;
		return -1;
	}
	int total = 0;
	for (;;) {
		bool all = flush_cancels(cu);
		if (all)
			sweep_idle(cu);
		int r = (cu->ring->flags & IORING_SETUP_SQPOLL)
				? sqpoll_submit(cu->ring, all ? wait_nr : 0)
				: io_uring_submit_and_wait(cu->ring, all ? wait_nr : 0);
		if (r < 0) {
			errno = -r;
			return -1;
		}
		total += r;
		bool settled = sqpoll_settle(cu->ring);
		if (all)
			return total;
		if (r == 0 && !settled) {
			/* The SQ is full of entries the kernel did not take: let
			 * the caller reap CQEs and come back. */
			errno = EBUSY;
			return -1;
		}
	}
}
