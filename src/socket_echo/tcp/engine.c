/* The native TCP data path: a C thread that runs the epoll path's ready loop (tcp/native.py
 * drives it from the event loop).
 *
 * Why C through the CPython API rather than Cython: the loop below makes no Python call at
 * all (epoll_wait, recv into one buffer, send, integer adds in a struct indexed by
 * descriptor), so what a binding generator would add is only build machinery; the
 * Python-facing part is a dozen small methods.
 *
 * Why a thread of its own: the loop blocks in epoll_wait with the GIL released, as a C server
 * does, instead of sitting as one descriptor inside the event loop's epoll (a nested epoll:
 * a wake-up of the loop, a Python callback and a second epoll_wait per batch; measured, that
 * was the server's whole excess over the C echo under churn). Python hears from it through an
 * eventfd, and only of what it must act on: a connection opened (when it logs each one), a
 * listed connection closed (and why), accepting paused by EMFILE (resumed here: after
 * retry_after, or as soon as one of its connections closes). Connections that open and
 * close unlisted are summed here and told at most every GONE_FLUSH_MS, or when Python asks
 * (the sweep, the drain, a scrape). Every Python-facing method takes the engine's mutex,
 * which the thread holds while it serves a batch and never while it waits; the thread never
 * takes the GIL, so no lock order can deadlock.
 *
 * Admission is here, for every connection: one slot taken from the process's one count
 * (se_count_t, shared with the Python paths), so the cap holds before the first byte is
 * echoed whether or not Python has heard of the connection yet. So is the idle/stall sweep
 * (se_sweep: limits.ConnectionTable.sweep's rule, lifecycle.activity's measure): Python never
 * lists this engine's connections to time them out, and the engine tells it nothing but
 * what changed.
 *
 * A connection whose reads fill the whole buffer (bulk) moves to splice(2) through a pipe of
 * its own, sized to one read: the kernel moves the pages socket -> pipe -> socket and this
 * process never copies them (benchmarks: CPU per GB from 1.2-1.5x the C read/write echo to
 * 0.76x). The pipe is the held echo then; the rules below hold the same.
 *
 * Per connection the rules are the pure paths' (tcp/epoll.py): bytes go back as they
 * arrive; an echo the kernel does not take in full is held (copied) and reading from that
 * peer stops (EPOLLOUT only) until it drains, so at most one read (<= the engine's read
 * size, itself <= --max-buffer) is ever held; EOF closes once nothing is held; close()
 * stops echoing, delivers what is held, sends FIN and waits for the peer's close; abort()
 * resets at once.
 *
 * Descriptors index the connection table; each epoll registration, each event told to Python
 * and each call from Python carries the descriptor and a generation (to Python, one number:
 * the handle), so nothing can reach a newer connection on a reused number.
 */
#define _GNU_SOURCE /* splice, pipe2 */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* -- the one count -------------------------------------------------------------------- */

/* A slot for one more connection, or why not: the cap first, then the descriptors (one per
 * connection plus ``extra``) against the budget. limits.OpenCount.take is the twin. */
int se_count_take(se_count_t *count, long max_connections, long fd_budget) {
    long n = atomic_load(&count->open);
    for (;;) {
        if (n >= max_connections) return SE_OVER_CAP;
        if (n + atomic_load(&count->extra) >= fd_budget) return SE_OVER_BUDGET;
        if (atomic_compare_exchange_weak(&count->open, &n, n + 1)) return SE_ADMITTED;
    }
}

void se_count_give(se_count_t *count) { atomic_fetch_sub(&count->open, 1); }

long se_count_open(se_count_t *count) { return atomic_load(&count->open); }

/* Two descriptors more for a pipe, if the budget has room for them beside every open
 * connection. */
static int count_take_pipe(se_count_t *count, long fd_budget) {
    long extra = atomic_load(&count->extra);
    for (;;) {
        if (atomic_load(&count->open) + extra + 2 > fd_budget) return 0;
        if (atomic_compare_exchange_weak(&count->extra, &extra, extra + 2)) return 1;
    }
}

static int grow(engine_t *self, int fd) {
    if ((size_t)fd < self->capacity) return 0;
    size_t cap = self->capacity ? self->capacity : 1024;
    while (cap <= (size_t)fd) cap *= 2;
    conn_t *c = realloc(self->conns, cap * sizeof(conn_t));
    if (!c) return -1;
    memset(c + self->capacity, 0, (cap - self->capacity) * sizeof(conn_t));
    self->conns = c;
    self->capacity = cap;
    return 0;
}

/* A connection's name to Python: its descriptor and its generation in one number. */
unsigned long long se_handle_of(int fd, uint32_t gen) {
    return ((unsigned long long)gen << 32) | (uint32_t)fd;
}

static conn_t *lookup(engine_t *self, unsigned long long handle) {
    size_t fd = (size_t)(handle & 0xffffffffu);
    if (fd >= self->capacity) return NULL;
    conn_t *c = &self->conns[fd];
    return c->state == FREE || c->gen != (uint32_t)(handle >> 32) ? NULL : c;
}

static int watch(engine_t *self, int fd, uint32_t events, int op) {
    struct epoll_event e;
    e.events = events;
    e.data.u64 = (uint64_t)(uint32_t)fd | ((uint64_t)self->conns[fd].gen << 32);
    return epoll_ctl(self->ep, op, fd, &e);
}

static void set_listeners(engine_t *self, uint32_t events);

static void resume_accepting(engine_t *self) {
    if (self->paused && self->accepting) set_listeners(self, EPOLLIN);
    self->paused = 0;
}

static size_t held(const conn_t *c) { return (c->pending ? c->len - c->off : 0) + c->piped; }

/* Forget a connection, give its slot back and close its descriptor; returns what was still
 * held. */
static size_t release(engine_t *self, int fd) {
    conn_t *c = &self->conns[fd];
    size_t unsent = held(c);
    if (c->spliced) {
        close(c->pipe_r);
        close(c->pipe_w);
        atomic_fetch_sub(&self->count->extra, 2);
        c->spliced = 0;
        c->piped = 0;
    }
    if (c->unlisted) {
        c->unlisted = 0;
        self->unlisted--;
    }
    se_count_give(self->count);
    close(fd); /* leaves the epoll set with it: the descriptor is never duplicated */
    if (self->paused) resume_accepting(self); /* a descriptor just came free */
    free(c->pending);
    c->pending = NULL;
    c->off = c->len = 0;
    c->state = FREE;
    return unsent;
}

double se_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Tell Python there is something to take (once until it takes it). */
static void notify(engine_t *self) {
    if (self->notified) return;
    self->notified = 1;
    uint64_t one = 1;
    ssize_t r = write(self->notify_fd, &one, sizeof one);
    (void)r; /* an eventfd write fails only on overflow, which leaves it readable anyway */
}

/* Something Python may hear late (a sum, a refusal count): told within GONE_FLUSH_MS. */
static void untold(engine_t *self) {
    if (self->untold_since == 0) self->untold_since = se_monotonic();
}

static event_t *queue_event(engine_t *self, int kind) {
    if (self->queued == self->queue_cap) {
        size_t cap = self->queue_cap ? self->queue_cap * 2 : 64;
        event_t *q = realloc(self->queue, cap * sizeof(event_t));
        if (!q) {
            self->failed = ENOMEM; /* Python's take() raises: the engine cannot go on */
            notify(self);
            return NULL;
        }
        self->queue = q;
        self->queue_cap = cap;
    }
    event_t *e = &self->queue[self->queued++];
    memset(e, 0, offsetof(event_t, peer));
    e->peer.ss_family = AF_UNSPEC;
    e->kind = (uint8_t)kind;
    notify(self);
    return e;
}

static void closed_event(engine_t *self, int fd, int reason, int err) {
    conn_t *c = &self->conns[fd];
    if (c->idle_closed) { /* the reason given first wins (lifecycle's give_reason) */
        reason = R_IDLE;
        err = 0;
    }
    uint64_t bytes_in = c->bytes_in;
    int unlisted = c->unlisted, tag = c->tag;
    uint32_t gen = c->gen;
    double opened_at = c->opened_at;
    size_t unsent = release(self, fd);
    if (unlisted && tag < MAX_LISTENERS) {
        closed_sums_t *g = &self->gone[tag];
        untold(self);
        double duration = se_monotonic() - opened_at;
        int b = 0;
        while (b < self->nbounds && duration > self->bounds[b]) b++; /* bisect_left */
        g->count++;
        g->closed[reason]++;
        g->bytes_in += bytes_in;
        g->bytes_out += bytes_in - unsent;
        g->buckets[b]++;
        g->duration_sum += duration;
        return;
    }
    event_t *e = queue_event(self, EV_CLOSED);
    if (!e) return;
    e->fd = fd;
    e->gen = gen;
    e->reason = (uint8_t)reason;
    e->err = err;
    e->bytes_in = bytes_in;
    e->unsent = unsent;
}

/* A slot for one more connection from the one count, or the refusal counted (told late). */
static int admits_one_more(engine_t *self) {
    int why = se_count_take(self->count, self->max_connections, self->fd_budget);
    if (why == SE_ADMITTED) return 1;
    if (why == SE_OVER_CAP) self->refused_cap++;
    else self->refused_budget++;
    untold(self);
    return 0;
}

static void lost(engine_t *self, int fd, int err) {
    /* the twin of lifecycle.lost_reason: a peer's reset is RESET, else ERROR */
    if (err == ECONNRESET || err == EPIPE) closed_event(self, fd, R_RESET, 0);
    else closed_event(self, fd, R_ERROR, err);
}


static void set_listeners(engine_t *self, uint32_t events) {
    for (int i = 0; i < self->nlisteners; i++) {
        struct epoll_event e;
        e.events = events;
        e.data.u64 = LISTENER_MARK | (uint64_t)i;
        epoll_ctl(self->ep, EPOLL_CTL_MOD, self->listeners[i], &e);
    }
}

/* What a read (recv, or a splice into the pipe) returned: 1 when bytes came, else 0 (nothing
 * now, or the connection ended and closed_event has told it). */
static int arrived(engine_t *self, int fd, ssize_t r) {
    if (r > 0) return 1;
    if (r == 0) closed_event(self, fd, R_PEER_CLOSED, 0);
    else if (errno != EAGAIN && errno != EINTR) lost(self, fd, errno);
    return 0;
}

/* What a write (send, or a splice out of the pipe) returned: the bytes the kernel took (0 when
 * the socket is full), or -1 when the connection was lost (told). */
static ssize_t taken(engine_t *self, int fd, ssize_t w) {
    if (w >= 0) return w;
    if (errno == EAGAIN || errno == EINTR) return 0;
    lost(self, fd, errno);
    return -1;
}

/* The bulk path: what is readable goes into the connection's pipe and from there back out,
 * the kernel moving pages, never copying them through this process. What the socket does not
 * take stays in the pipe (held: reading stops until it drains, as for `pending`). */
static void splice_echo(engine_t *self, int fd) {
    conn_t *c = &self->conns[fd];
    ssize_t r = splice(fd, NULL, c->pipe_w, NULL, self->bufsize, SPLICE_FLAGS);
    if (!arrived(self, fd, r)) return;
    if (c->state != OPEN) { /* closing: what arrives now is not echoed; drop it */
        char sink[4096];
        for (ssize_t left = r; left > 0;) {
            ssize_t n = read(c->pipe_r, sink, left < (ssize_t)sizeof sink ? (size_t)left : sizeof sink);
            if (n <= 0) break;
            left -= n;
        }
        return;
    }
    c->bytes_in += (uint64_t)r;
    ssize_t w = taken(self, fd, splice(c->pipe_r, NULL, fd, NULL, (size_t)r, SPLICE_FLAGS));
    if (w < 0) return;
    if (w < r) {
        c->piped = (size_t)(r - w);
        watch(self, fd, EPOLLOUT, EPOLL_CTL_MOD); /* stop reading until it drains */
    }
}

/* A connection whose reads fill the whole buffer is streaming: it moves to splice(2) if a
 * pipe can be had (two more descriptors; none left: it stays on recv/send). */
static void maybe_splice(engine_t *self, conn_t *c) {
    int p[2];
    if (!count_take_pipe(self->count, self->fd_budget)) return;
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
        atomic_fetch_sub(&self->count->extra, 2);
        return;
    }
    fcntl(p[1], F_SETPIPE_SZ, (int)self->bufsize); /* at most one read held, as with recv */
    c->pipe_r = p[0];
    c->pipe_w = p[1];
    c->piped = 0;
    c->spliced = 1;
}

/* Read what is there and send it back; a part the kernel does not take is held and reading
 * stops until it drains. */
static void echo(engine_t *self, int fd) {
    conn_t *c = &self->conns[fd];
    if (c->spliced) {
        splice_echo(self, fd);
        return;
    }
    ssize_t r = recv(fd, self->buf, self->bufsize, 0);
    if (!arrived(self, fd, r)) return;
    if (c->state != OPEN) return; /* closing: what arrives now is not echoed */
    c->bytes_in += (uint64_t)r;
    ssize_t w = taken(self, fd, send(fd, self->buf, (size_t)r, MSG_NOSIGNAL));
    if (w < 0) return;
    if (w < r) {
        c->len = (size_t)(r - w);
        c->off = 0;
        c->pending = malloc(c->len);
        if (!c->pending) { /* nowhere to hold the echo: this connection cannot go on */
            c->len = 0;
            lost(self, fd, ENOMEM);
            return;
        }
        memcpy(c->pending, self->buf + w, c->len);
        watch(self, fd, EPOLLOUT, EPOLL_CTL_MOD); /* stop reading until it drains */
    } else if ((size_t)r == self->bufsize && self->bufsize >= SPLICE_FROM) {
        maybe_splice(self, c);
    }
}

static void accept_batch(engine_t *self, int index) {
    int lfd = self->listeners[index], one = 1;
    for (int n = 0; n < ACCEPT_BATCH; n++) {
        struct sockaddr_storage sa;
        socklen_t len = sizeof sa;
        sa.ss_family = AF_UNSPEC;
        int fd = accept4(lfd, self->want_peers ? (struct sockaddr *)&sa : NULL,
                         self->want_peers ? &len : NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                self->paused = 1;
                self->paused_until = se_monotonic() + self->retry_after;
                set_listeners(self, 0);
                queue_event(self, EV_PAUSED);
            }
            return; /* EAGAIN, or an error on this listener: look again next time */
        }
        if (!admits_one_more(self) || grow(self, fd) < 0) { /* refused: reset at once, as abort() does */
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails on Unix: fine */
        conn_t *c = &self->conns[fd];
        memset(c, 0, sizeof *c);
        c->state = OPEN;
        c->gen = ++self->next_gen;
        c->tag = (uint16_t)self->tags[index];
        c->opened_at = c->active_since = se_monotonic();
        if (watch(self, fd, EPOLLIN, EPOLL_CTL_ADD) < 0) {
            c->state = FREE;
            se_count_give(self->count);
            close(fd);
            continue;
        }
        if (self->lazy) {
            c->unlisted = 1;
            self->unlisted++;
            continue;
        }
        event_t *e = queue_event(self, EV_OPENED);
        if (!e) return;
        e->fd = fd;
        e->gen = c->gen;
        e->tag = c->tag;
        e->opened_at = c->opened_at;
        if (self->want_peers) memcpy(&e->peer, &sa, len < sizeof sa ? len : sizeof sa);
    }
}

/* The rest of a held echo; on a complete drain, back to reading (or FIN when closing). */
static void flush(engine_t *self, int fd) {
    conn_t *c = &self->conns[fd];
    if (c->piped) {
        ssize_t w = taken(self, fd, splice(c->pipe_r, NULL, fd, NULL, c->piped, SPLICE_FLAGS));
        if (w < 0) return;
        c->piped -= (size_t)w;
        if (c->piped) return;
    } else {
        ssize_t w = taken(self, fd, send(fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL));
        if (w < 0) return;
        c->off += (size_t)w;
        if (c->off < c->len) return;
        free(c->pending);
        c->pending = NULL;
        c->off = c->len = 0;
    }
    c->drains++;
    if (c->state == CLOSING) {
        if (shutdown(fd, SHUT_WR) < 0) {
            lost(self, fd, errno);
            return;
        }
        c->state = FIN_SENT;
    }
    watch(self, fd, EPOLLIN, EPOLL_CTL_MOD);
}

/* -- the idle/stall sweep ---------------------------------------------------------------- */

/* The twin of lifecycle.activity: bytes in, plus bytes the peer took (in - held - what the
 * kernel still has unacknowledged, asked only while an echo is held: then the kernel's
 * buffer is full and a slow reader's progress shows only there), plus drains. */
static uint64_t activity(int fd, const conn_t *c) {
    uint64_t h = held(c);
    int unacked = 0;
    if (h && ioctl(fd, SIOCOUTQ, &unacked) < 0) unacked = 0;
    return 2 * c->bytes_in - h - (uint64_t)unacked + c->drains;
}

/* Stop echoing, deliver what is held, then FIN (and wait for the peer's close). */
static void begin_close(engine_t *self, int fd, conn_t *c) {
    (void)self;
    c->state = CLOSING;
    if (!c->pending && !c->piped && shutdown(fd, SHUT_WR) == 0)
        c->state = FIN_SENT; /* on failure the next read reports it */
}

/* Reset now: close() with SO_LINGER 0 sends RST. */
static size_t reset(engine_t *self, int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    return release(self, fd);
}

/* limits.ConnectionTable.sweep and lifecycle.Connection.idle_expired for this engine's
 * connections: one whose activity has not moved for idle_timeout is closed (idle), or reset
 * if its echo is held or it was closing already (stalled: the peer neither reads nor
 * closes); either way it gets another timeout before the next step. */
static void sweep(engine_t *self, double now) {
    for (size_t i = 0; i < self->capacity; i++) {
        conn_t *c = &self->conns[i];
        if (c->state == FREE) continue;
        int fd = (int)i;
        uint64_t seen = activity(fd, c);
        if (seen != c->seen) {
            c->seen = seen;
            c->active_since = now;
            continue;
        }
        if (now - c->active_since < self->idle_timeout) continue;
        c->active_since = now;
        if (held(c) || c->state != OPEN) {
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            closed_event(self, fd, R_STALLED, 0);
        } else {
            c->idle_closed = 1;
            begin_close(self, fd, c);
        }
    }
}

static void serve(engine_t *self, struct epoll_event *evs, int n) {
    for (int i = 0; i < n; i++) {
        uint64_t data = evs[i].data.u64;
        if (data & LISTENER_MARK) {
            int index = (int)(data & 0xffff);
            if (self->accepting && !self->paused && index < self->nlisteners)
                accept_batch(self, index);
            continue;
        }
        if (data & WAKE_MARK) continue; /* the stop flag is read under the mutex */
        int fd = (int)(uint32_t)data;
        conn_t *c = lookup(self, data);
        if (!c) continue; /* stale: closed, or the number reused */
        if (c->pending || c->piped) flush(self, fd);
        else echo(self, fd);
    }
}

/* The thread: epoll_wait with no lock held, then the batch under the mutex, as a C server
 * would (blocking, no time slices). Signals are for the main thread. */
static void *engine_thread(void *arg) {
    engine_t *self = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    struct epoll_event evs[MAX_EVENTS];
    int timeout = -1;
    for (;;) {
        int n = epoll_wait(self->ep, evs, MAX_EVENTS, timeout);
        int err = errno;
        pthread_mutex_lock(&self->mu);
        if (self->stopping) {
            pthread_mutex_unlock(&self->mu);
            break;
        }
        if (n < 0 && err != EINTR) {
            self->failed = err;
            notify(self);
            pthread_mutex_unlock(&self->mu);
            break;
        }
        if (n > 0) serve(self, evs, n);
        timeout = -1;
        if (self->sweep_every > 0 && self->idle_timeout > 0) {
            double now = se_monotonic();
            if (now >= self->next_sweep) {
                sweep(self, now);
                self->next_sweep = now + self->sweep_every;
            }
            timeout = (int)((self->next_sweep - now) * 1e3) + 1;
        }
        if (self->paused) {
            double now = se_monotonic();
            if (now >= self->paused_until) {
                resume_accepting(self);
            } else {
                int ms = (int)((self->paused_until - now) * 1e3) + 1;
                if (timeout < 0 || ms < timeout) timeout = ms;
            }
        }
        if (self->untold_since != 0) {
            double late = (se_monotonic() - self->untold_since) * 1e3;
            if (late >= GONE_FLUSH_MS) notify(self);
            else if (timeout < 0 || (int)(GONE_FLUSH_MS - late) + 1 < timeout)
                timeout = (int)(GONE_FLUSH_MS - late) + 1;
        }
        pthread_mutex_unlock(&self->mu);
    }
    return NULL;
}


/* Move what the thread queued into ``told`` (called with the mutex held; no Python). */
static int move_told(engine_t *self) {
    uint64_t count;
    ssize_t r = read(self->notify_fd, &count, sizeof count); /* EAGAIN: nothing was told */
    (void)r;
    self->notified = 0;
    reported_t *t = &self->told;
    if (self->queued) {
        if (t->queued == 0) { /* the usual case: swap the buffers, nothing copied */
            event_t *q = t->queue;
            size_t cap = t->cap;
            t->queue = self->queue;
            t->cap = self->queue_cap;
            t->queued = self->queued;
            self->queue = q;
            self->queue_cap = cap;
        } else { /* an earlier take failed to build: append */
            size_t need = t->queued + self->queued;
            if (need > t->cap) {
                event_t *q = realloc(t->queue, need * sizeof(event_t));
                if (!q) return ENOMEM; /* left in the engine's queue for the next take */
                t->queue = q;
                t->cap = need;
            }
            memcpy(t->queue + t->queued, self->queue, self->queued * sizeof(event_t));
            t->queued = need;
        }
        self->queued = 0;
    }
    for (int i = 0; i < MAX_LISTENERS; i++) {
        closed_sums_t *g = &self->gone[i], *to = &t->gone[i];
        if (!g->count) continue;
        to->count += g->count;
        for (int k = 0; k < R_COUNT; k++) to->closed[k] += g->closed[k];
        to->bytes_in += g->bytes_in;
        to->bytes_out += g->bytes_out;
        for (int b = 0; b <= MAX_BOUNDS; b++) to->buckets[b] += g->buckets[b];
        to->duration_sum += g->duration_sum;
    }
    memset(self->gone, 0, sizeof self->gone);
    t->refused_cap += self->refused_cap;
    t->refused_budget += self->refused_budget;
    self->refused_cap = self->refused_budget = 0;
    self->untold_since = 0;
    return self->failed;
}

/* -- the Python side's calls (each takes the mutex itself) ----------------------------- */

#define LOCKED(...)                      \
    do {                                 \
        pthread_mutex_lock(&self->mu);   \
        __VA_ARGS__;                     \
        pthread_mutex_unlock(&self->mu); \
    } while (0)

void se_preinit(engine_t *self) {
    memset(self, 0, sizeof *self);
    self->ep = self->wake_fd = self->notify_fd = -1;
    self->count = &self->own_count;
    self->fd_budget = self->max_connections = LONG_MAX;
    pthread_mutex_init(&self->mu, NULL);
}

int se_init(engine_t *self, size_t read_size, int want_peers) {
    if (self->ep >= 0) return EALREADY;
    self->buf = malloc(read_size);
    if (!self->buf) return ENOMEM;
    self->bufsize = read_size;
    self->ep = epoll_create1(EPOLL_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->ep < 0 || self->wake_fd < 0 || self->notify_fd < 0) return errno;
    struct epoll_event e;
    e.events = EPOLLIN;
    e.data.u64 = WAKE_MARK;
    if (epoll_ctl(self->ep, EPOLL_CTL_ADD, self->wake_fd, &e) < 0) return errno;
    self->want_peers = want_peers;
    self->lazy = !want_peers;
    self->accepting = 1;
    return 0;
}

int se_is_open(engine_t *self) { return self->ep >= 0; }

int se_start(engine_t *self) {
    if (self->running) return 0;
    int err = pthread_create(&self->thread, NULL, engine_thread, self);
    if (!err) self->running = 1;
    return err;
}

void se_stop(engine_t *self) {
    if (!self->running) return;
    LOCKED(self->stopping = 1);
    uint64_t one = 1;
    ssize_t r = write(self->wake_fd, &one, sizeof one);
    (void)r;
    pthread_join(self->thread, NULL);
    self->running = 0;
}

/* After se_stop: every connection closed (their slots given back), the listeners forgotten,
 * the epoll descriptor closed. */
void se_close_all(engine_t *self) {
    self->nlisteners = 0;
    self->paused = 0;
    for (size_t fd = 0; fd < self->capacity; fd++)
        if (self->conns[fd].state != FREE) release(self, (int)fd);
    if (self->ep >= 0) close(self->ep);
    self->ep = -1;
}

void se_destroy(engine_t *self) {
    se_stop(self);
    se_close_all(self);
    if (self->wake_fd >= 0) close(self->wake_fd);
    if (self->notify_fd >= 0) close(self->notify_fd);
    self->wake_fd = self->notify_fd = -1;
    free(self->conns);
    free(self->buf);
    free(self->queue);
    free(self->told.queue);
    self->conns = NULL;
    self->buf = NULL;
    self->queue = self->told.queue = NULL;
    pthread_mutex_destroy(&self->mu);
}

void se_set_table(engine_t *self, se_count_t *count, long fd_budget, long max_connections,
                  const double *bounds, int nbounds, double idle_timeout, double sweep_every,
                  double retry_after) {
    LOCKED({
        self->count = count;
        self->fd_budget = fd_budget;
        self->max_connections = max_connections;
        memcpy(self->bounds, bounds, (size_t)nbounds * sizeof *bounds);
        self->nbounds = nbounds;
        self->idle_timeout = idle_timeout;
        self->sweep_every = sweep_every;
        self->next_sweep = se_monotonic() + sweep_every;
        self->retry_after = retry_after;
    });
}

int se_add_listener(engine_t *self, int fd, int tag) {
    int failed = 0;
    if (tag < 0 || tag >= MAX_LISTENERS) return EINVAL;
    LOCKED({
        if (self->nlisteners >= MAX_LISTENERS) {
            failed = EINVAL;
        } else {
            struct epoll_event e;
            e.events = (self->paused || !self->accepting) ? 0 : EPOLLIN;
            e.data.u64 = LISTENER_MARK | (uint64_t)self->nlisteners;
            self->listeners[self->nlisteners] = fd;
            self->tags[self->nlisteners] = tag;
            if (epoll_ctl(self->ep, EPOLL_CTL_ADD, fd, &e) < 0) failed = errno;
            else self->nlisteners++;
        }
    });
    return failed;
}

void se_stop_accepting(engine_t *self) {
    LOCKED({
        for (int i = 0; i < self->nlisteners; i++)
            epoll_ctl(self->ep, EPOLL_CTL_DEL, self->listeners[i], NULL);
        self->nlisteners = 0;
        self->accepting = 0;
    });
}

int se_close(engine_t *self, unsigned long long handle) {
    int done = 0;
    LOCKED({
        conn_t *c = lookup(self, handle);
        if (c && c->state == OPEN) {
            begin_close(self, (int)(handle & 0xffffffffu), c);
            done = 1;
        }
    });
    return done;
}

int se_abort(engine_t *self, unsigned long long handle, uint64_t *bytes_in, size_t *unsent) {
    int found = 0;
    LOCKED({
        conn_t *c = lookup(self, handle);
        if (c) {
            *bytes_in = c->bytes_in;
            *unsent = reset(self, (int)(handle & 0xffffffffu));
            found = 1;
        }
    });
    return found;
}

int se_counters(engine_t *self, unsigned long long handle, se_counters_t *out) {
    int found = 0;
    memset(out, 0, sizeof *out);
    LOCKED({
        conn_t *c = lookup(self, handle);
        if (c) {
            out->bytes_in = c->bytes_in;
            out->held = held(c);
            out->activity = activity((int)(handle & 0xffffffffu), c);
            found = 1;
        }
    });
    return found;
}

void se_sweep(engine_t *self, double now) { LOCKED(sweep(self, now)); }

int se_take(engine_t *self) {
    int failed;
    LOCKED(failed = move_told(self));
    return failed;
}

int se_take_all(engine_t *self, listed_t **out, size_t *n) {
    int failed;
    listed_t *copied = NULL;
    *n = 0;
    LOCKED({
        failed = move_told(self);
        if (!failed && self->unlisted > 0) {
            copied = malloc((size_t)self->unlisted * sizeof *copied);
            if (!copied) failed = ENOMEM;
        }
        for (size_t fd = 0; copied && fd < self->capacity && self->unlisted > 0; fd++) {
            conn_t *c = &self->conns[fd];
            if (c->state == FREE || !c->unlisted) continue;
            copied[*n].handle = se_handle_of((int)fd, c->gen);
            copied[*n].tag = (int)c->tag;
            copied[*n].opened_at = c->opened_at;
            (*n)++;
            c->unlisted = 0;
            self->unlisted--;
        }
    });
    if (failed) {
        free(copied);
        copied = NULL;
        *n = 0;
    }
    *out = copied;
    return failed;
}

void se_relist(engine_t *self, const listed_t *listed, size_t n) {
    LOCKED({
        for (size_t i = 0; i < n; i++) {
            conn_t *c = lookup(self, listed[i].handle);
            if (c && !c->unlisted) {
                c->unlisted = 1;
                self->unlisted++;
            }
        }
    });
}

int se_unlisted_sums(engine_t *self, open_sums_t sums[MAX_LISTENERS]) {
    int failed;
    memset(sums, 0, MAX_LISTENERS * sizeof *sums);
    LOCKED({
        failed = move_told(self);
        ssize_t left = self->unlisted;
        for (size_t fd = 0; !failed && fd < self->capacity && left > 0; fd++) {
            conn_t *c = &self->conns[fd];
            if (c->state == FREE || !c->unlisted || c->tag >= MAX_LISTENERS) continue;
            left--;
            open_sums_t *s = &sums[c->tag];
            s->count++;
            s->bytes_in += c->bytes_in;
            s->bytes_out += c->bytes_in - held(c);
        }
    });
    return failed;
}
