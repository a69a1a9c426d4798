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
 * listed connection closed (and why), accepting paused by EMFILE. Connections that open and
 * close unlisted are summed here and told at most every GONE_FLUSH_MS, or when Python asks
 * (the sweep, the drain, a scrape). Every Python-facing method takes the engine's mutex,
 * which the thread holds while it serves a batch and never while it waits; the thread never
 * takes the GIL, so no lock order can deadlock.
 *
 * Admission is here, for every connection: against the connection table's other entries
 * (Python tells their number, set_others) plus this engine's open connections, so the cap
 * holds before the first byte is echoed whether or not Python has heard of the connection yet.
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
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

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
unsigned long long handle_of(int fd, uint32_t gen) {
    return ((unsigned long long)gen << 32) | (uint32_t)fd;
}

conn_t *lookup(engine_t *self, unsigned long long handle) {
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

/* Forget a connection and close its descriptor; returns what was still held. */
size_t release(engine_t *self, int fd) {
    conn_t *c = &self->conns[fd];
    size_t unsent = (c->pending ? c->len - c->off : 0) + c->piped;
    if (c->spliced) {
        close(c->pipe_r);
        close(c->pipe_w);
        self->pipes--;
        c->spliced = 0;
        c->piped = 0;
    }
    if (c->unlisted) {
        c->unlisted = 0;
        self->unlisted--;
    }
    self->open_here--;
    close(fd); /* leaves the epoll set with it: the descriptor is never duplicated */
    free(c->pending);
    c->pending = NULL;
    c->off = c->len = 0;
    c->state = FREE;
    return unsent;
}

static double monotonic(void) {
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
    if (self->untold_since == 0) self->untold_since = monotonic();
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
    uint64_t bytes_in = c->bytes_in;
    int unlisted = c->unlisted, tag = c->tag;
    uint32_t gen = c->gen;
    double opened_at = c->opened_at;
    size_t unsent = release(self, fd);
    if (unlisted && tag < MAX_LISTENERS) {
        closed_sums_t *g = &self->gone[tag];
        untold(self);
        double duration = monotonic() - opened_at;
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

/* Is there room for one more connection? (the table's rule: limits.ConnectionTable.admit,
 * with this engine's pipes counted: each spliced connection holds two descriptors more, so
 * streaming ones could otherwise run the process out of descriptors under the budget) */
static int admits_one_more(engine_t *self) {
    ssize_t open = self->others + self->open_here;
    if (open < self->max_connections && open + 2 * self->pipes < self->fd_budget) return 1;
    if (open >= self->max_connections) self->refused_cap++;
    else self->refused_budget++;
    untold(self);
    return 0;
}

static void lost(engine_t *self, int fd, int err) {
    /* the twin of lifecycle.lost_reason: a peer's reset is RESET, else ERROR */
    if (err == ECONNRESET || err == EPIPE) closed_event(self, fd, R_RESET, 0);
    else closed_event(self, fd, R_ERROR, err);
}


void set_listeners(engine_t *self, uint32_t events) {
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
    if (self->others + self->open_here + 2 * (self->pipes + 1) > self->fd_budget) return;
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) return;
    self->pipes++;
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
        c->opened_at = monotonic();
        if (watch(self, fd, EPOLLIN, EPOLL_CTL_ADD) < 0) {
            c->state = FREE;
            close(fd);
            continue;
        }
        self->open_here++;
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
void *engine_thread(void *arg) {
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
        if (self->untold_since != 0) {
            double late = (monotonic() - self->untold_since) * 1e3;
            if (late >= GONE_FLUSH_MS) notify(self);
            else timeout = (int)(GONE_FLUSH_MS - late) + 1;
        }
        pthread_mutex_unlock(&self->mu);
    }
    return NULL;
}


/* Move what the thread queued into ``told`` (called with the mutex held; no Python). */
int move_told(engine_t *self) {
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
        for (int k = 0; k < 3; k++) to->closed[k] += g->closed[k];
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

