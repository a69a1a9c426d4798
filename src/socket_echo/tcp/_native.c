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
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define GONE_FLUSH_MS 10 /* unlisted closes and refusals are told to Python at most this late */
#define SPLICE_FROM 16384 /* a read size below this never switches to splice (small buffers) */
#define SPLICE_FLAGS (SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
#define ACCEPT_BATCH 128
#define MAX_LISTENERS 64
#define LISTENER_MARK (UINT64_C(1) << 63)
#define WAKE_MARK (UINT64_C(1) << 62)

enum { FREE = 0, OPEN = 1, CLOSING = 2, FIN_SENT = 3 };
enum { EV_OPENED = 1, EV_CLOSED = 2, EV_PAUSED = 3, EV_GONE = 4, EV_REFUSED = 5 };
enum { R_PEER_CLOSED = 0, R_RESET = 1, R_ERROR = 2 };

typedef struct {
    uint8_t state;
    uint8_t unlisted; /* Python has no object for it (and hears of its close only as a sum) */
    uint16_t tag;
    uint32_t gen;
    double opened_at; /* CLOCK_MONOTONIC seconds, as the event loop's time() */
    uint8_t spliced;  /* bulk: bytes go socket -> pipe -> socket, never through user space */
    int pipe_r, pipe_w;
    size_t piped;     /* echo bytes in the pipe, not yet sent: held, as `pending` is */
    uint64_t bytes_in;
    uint64_t drains;
    char *pending;
    size_t off, len;
} conn_t;

/* What Python is told, queued by the thread (no Python object can be made without the GIL). */
typedef struct {
    uint8_t kind, reason;
    uint16_t tag;
    int fd, err;
    uint32_t gen;
    double opened_at;
    uint64_t bytes_in;
    size_t unsent;
    struct sockaddr_storage peer; /* EV_OPENED with want_peers */
} event_t;

#define MAX_BOUNDS 16
typedef struct {
    Py_ssize_t count, closed[3]; /* by R_* reason */
    unsigned long long bytes_in, bytes_out;
    Py_ssize_t buckets[MAX_BOUNDS + 1];
    double duration_sum;
} gone_t;

/* What was told, moved out of the engine under its mutex and made into Python objects after
 * unlocking it (libuv's uv__work_done moves its queue the same way): the thread never waits
 * while Python builds lists, raises or collects garbage. Only the GIL holder touches it; what
 * could not be built (a MemoryError) stays here for the next take. */
typedef struct {
    event_t *queue;
    size_t queued, cap;
    gone_t gone[MAX_LISTENERS];
    Py_ssize_t refused_cap, refused_budget;
} told_t;

/* A connection listed by take_all, copied out under the mutex. */
typedef struct {
    unsigned long long handle;
    int tag;
    double opened_at;
} listed_t;

typedef struct {
    PyObject_HEAD
    int ep;
    int wake_fd;   /* in ep: wakes the thread to stop */
    int notify_fd; /* the event loop watches it: something to tell Python */
    pthread_t thread;
    int running, stopping, notified, failed;
    pthread_mutex_t mu;
    char *buf;
    size_t bufsize;
    conn_t *conns;
    size_t capacity;
    event_t *queue;
    size_t queued, queue_cap;
    int listeners[MAX_LISTENERS];
    int tags[MAX_LISTENERS];
    /* Admission: the table's entries that are not this engine's (set_others) plus this
     * engine's open connections, against the table's limits. */
    Py_ssize_t others, open_here, unlisted;
    Py_ssize_t fd_budget, max_connections; /* the table's two limits */
    Py_ssize_t pipes;                      /* spliced connections: two descriptors more each */
    Py_ssize_t refused_cap, refused_budget;
    int lazy; /* no per-connection log lines: no EV_OPENED, connections start unlisted */
    /* Connections that closed unlisted, summed per listener tag until Python takes them
     * (limits.ConnectionTable.count_gone). Durations in the buckets Python gave
     * (limits.DURATION_BUCKETS). */
    gone_t gone[MAX_LISTENERS];
    double untold_since; /* when the oldest untold sum or refusal began; 0: none */
    double bounds[MAX_BOUNDS];
    int nbounds;
    int nlisteners;
    int accepting;
    int paused;
    int want_peers;
    uint32_t next_gen;
    told_t told; /* Python's side: no lock */
} Engine;

static int grow(Engine *self, int fd) {
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
static unsigned long long handle_of(int fd, uint32_t gen) {
    return ((unsigned long long)gen << 32) | (uint32_t)fd;
}

static conn_t *lookup(Engine *self, unsigned long long handle) {
    size_t fd = (size_t)(handle & 0xffffffffu);
    if (fd >= self->capacity) return NULL;
    conn_t *c = &self->conns[fd];
    return c->state == FREE || c->gen != (uint32_t)(handle >> 32) ? NULL : c;
}

static int watch(Engine *self, int fd, uint32_t events, int op) {
    struct epoll_event e;
    e.events = events;
    e.data.u64 = (uint64_t)(uint32_t)fd | ((uint64_t)self->conns[fd].gen << 32);
    return epoll_ctl(self->ep, op, fd, &e);
}

/* Forget a connection and close its descriptor; returns what was still held. */
static size_t release(Engine *self, int fd) {
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
static void notify(Engine *self) {
    if (self->notified) return;
    self->notified = 1;
    uint64_t one = 1;
    ssize_t r = write(self->notify_fd, &one, sizeof one);
    (void)r; /* an eventfd write fails only on overflow, which leaves it readable anyway */
}

/* Something Python may hear late (a sum, a refusal count): told within GONE_FLUSH_MS. */
static void untold(Engine *self) {
    if (self->untold_since == 0) self->untold_since = monotonic();
}

static event_t *queue_event(Engine *self, int kind) {
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

static void closed_event(Engine *self, int fd, int reason, int err) {
    conn_t *c = &self->conns[fd];
    uint64_t bytes_in = c->bytes_in;
    int unlisted = c->unlisted, tag = c->tag;
    uint32_t gen = c->gen;
    double opened_at = c->opened_at;
    size_t unsent = release(self, fd);
    if (unlisted && tag < MAX_LISTENERS) {
        gone_t *g = &self->gone[tag];
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
static int room(Engine *self) {
    Py_ssize_t open = self->others + self->open_here;
    if (open < self->max_connections && open + 2 * self->pipes < self->fd_budget) return 1;
    if (open >= self->max_connections) self->refused_cap++;
    else self->refused_budget++;
    untold(self);
    return 0;
}

static void lost(Engine *self, int fd, int err) {
    /* the twin of tcp/lifecycle.lost_reason: a peer's reset is RESET, else ERROR */
    if (err == ECONNRESET || err == EPIPE) closed_event(self, fd, R_RESET, 0);
    else closed_event(self, fd, R_ERROR, err);
}

static PyObject *peer_of(struct sockaddr_storage *sa) {
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port),
                             (unsigned)ntohl(a->sin6_flowinfo), (unsigned)a->sin6_scope_id);
    }
    Py_RETURN_NONE; /* a Unix-socket peer has no address */
}

static void set_listeners(Engine *self, uint32_t events) {
    for (int i = 0; i < self->nlisteners; i++) {
        struct epoll_event e;
        e.events = events;
        e.data.u64 = LISTENER_MARK | (uint64_t)i;
        epoll_ctl(self->ep, EPOLL_CTL_MOD, self->listeners[i], &e);
    }
}

/* What a read (recv, or a splice into the pipe) returned: 1 when bytes came, else 0 (nothing
 * now, or the connection ended and closed_event has told it). */
static int arrived(Engine *self, int fd, ssize_t r) {
    if (r > 0) return 1;
    if (r == 0) closed_event(self, fd, R_PEER_CLOSED, 0);
    else if (errno != EAGAIN && errno != EINTR) lost(self, fd, errno);
    return 0;
}

/* What a write (send, or a splice out of the pipe) returned: the bytes the kernel took (0 when
 * the socket is full), or -1 when the connection was lost (told). */
static ssize_t taken(Engine *self, int fd, ssize_t w) {
    if (w >= 0) return w;
    if (errno == EAGAIN || errno == EINTR) return 0;
    lost(self, fd, errno);
    return -1;
}

/* The bulk path: what is readable goes into the connection's pipe and from there back out,
 * the kernel moving pages, never copying them through this process. What the socket does not
 * take stays in the pipe (held: reading stops until it drains, as for `pending`). */
static void splice_echo(Engine *self, int fd) {
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
static void maybe_splice(Engine *self, conn_t *c) {
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
static void echo(Engine *self, int fd) {
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

static void accept_batch(Engine *self, int index) {
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
        if (!room(self) || grow(self, fd) < 0) { /* refused: reset at once, as abort() does */
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
static void flush(Engine *self, int fd) {
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

static void serve(Engine *self, struct epoll_event *evs, int n) {
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
    Engine *self = arg;
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

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"read_size", "want_peers", NULL};
    Py_ssize_t read_size = 65536;
    int want_peers = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|np", kwlist, &read_size, &want_peers))
        return -1;
    if (read_size < 1) {
        PyErr_SetString(PyExc_ValueError, "read_size must be at least 1");
        return -1;
    }
    if (self->ep >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    self->buf = malloc((size_t)read_size);
    if (!self->buf) {
        PyErr_NoMemory();
        return -1;
    }
    self->bufsize = (size_t)read_size;
    self->ep = epoll_create1(EPOLL_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->ep < 0 || self->wake_fd < 0 || self->notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event e;
    e.events = EPOLLIN;
    e.data.u64 = WAKE_MARK;
    if (epoll_ctl(self->ep, EPOLL_CTL_ADD, self->wake_fd, &e) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->want_peers = want_peers;
    self->lazy = !want_peers;
    self->accepting = 1;
    self->fd_budget = self->max_connections = PY_SSIZE_T_MAX;
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->ep = self->wake_fd = self->notify_fd = -1;
    pthread_mutex_init(&self->mu, NULL);
    return (PyObject *)self;
}

/* Stop the thread and wait for it (it never takes the GIL: joining with it held is safe,
 * but other Python threads may run meanwhile). */
static void stop_thread(Engine *self) {
    if (!self->running) return;
    pthread_mutex_lock(&self->mu);
    self->stopping = 1;
    pthread_mutex_unlock(&self->mu);
    uint64_t one = 1;
    ssize_t r = write(self->wake_fd, &one, sizeof one);
    (void)r;
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->running = 0;
}

static void close_everything(Engine *self) {
    for (size_t fd = 0; fd < self->capacity; fd++)
        if (self->conns[fd].state != FREE) release(self, (int)fd);
    if (self->ep >= 0) close(self->ep);
    self->ep = -1;
}

static void Engine_dealloc(Engine *self) {
    stop_thread(self);
    close_everything(self);
    if (self->wake_fd >= 0) close(self->wake_fd);
    if (self->notify_fd >= 0) close(self->notify_fd);
    free(self->conns);
    free(self->buf);
    free(self->queue);
    free(self->told.queue);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(Engine *self) {
    if (self->ep < 0) {
        PyErr_SetString(PyExc_ValueError, "the engine is shut down");
        return -1;
    }
    return 0;
}

/* The statements, under the engine's mutex (never a return or a Python call inside). */
#define LOCKED(...)                      \
    do {                                 \
        pthread_mutex_lock(&self->mu);   \
        __VA_ARGS__;                     \
        pthread_mutex_unlock(&self->mu); \
    } while (0)

static PyObject *Engine_fileno(Engine *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->notify_fd);
}

static PyObject *Engine_start(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    if (self->running) Py_RETURN_NONE;
    int err = pthread_create(&self->thread, NULL, engine_thread, self);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_add_listener(Engine *self, PyObject *args) {
    int fd, tag, failed = 0;
    if (!PyArg_ParseTuple(args, "ii", &fd, &tag) || check_open(self) < 0) return NULL;
    if (tag < 0 || tag >= MAX_LISTENERS || self->nlisteners >= MAX_LISTENERS) {
        PyErr_SetString(PyExc_ValueError, "too many listeners");
        return NULL;
    }
    LOCKED({
        struct epoll_event e;
        e.events = (self->paused || !self->accepting) ? 0 : EPOLLIN;
        e.data.u64 = LISTENER_MARK | (uint64_t)self->nlisteners;
        self->listeners[self->nlisteners] = fd;
        self->tags[self->nlisteners] = tag;
        if (epoll_ctl(self->ep, EPOLL_CTL_ADD, fd, &e) < 0) failed = errno;
        else self->nlisteners++;
    });
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_stop_accepting(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    LOCKED({
        for (int i = 0; i < self->nlisteners; i++)
            epoll_ctl(self->ep, EPOLL_CTL_DEL, self->listeners[i], NULL);
        self->nlisteners = 0;
        self->accepting = 0;
    });
    Py_RETURN_NONE;
}

static PyObject *Engine_resume_accepting(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    LOCKED({
        if (self->paused && self->accepting) set_listeners(self, EPOLLIN);
        self->paused = 0;
    });
    Py_RETURN_NONE;
}

static PyObject *Engine_close(Engine *self, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    int done = 0;
    if (PyErr_Occurred()) return NULL;
    int fd = (int)(handle & 0xffffffffu);
    LOCKED({
        conn_t *c = lookup(self, handle);
        if (c && c->state == OPEN) {
            c->state = CLOSING;
            if (!c->pending && !c->piped && shutdown(fd, SHUT_WR) == 0)
                c->state = FIN_SENT; /* on failure the next read reports it */
            done = 1;
        }
    });
    return PyBool_FromLong(done);
}

static PyObject *Engine_abort(Engine *self, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    int found = 0;
    unsigned long long bytes_in = 0;
    size_t unsent = 0;
    if (PyErr_Occurred()) return NULL;
    int fd = (int)(handle & 0xffffffffu);
    LOCKED({
        conn_t *c = lookup(self, handle);
        if (c) {
            struct linger lg = {1, 0}; /* close() sends RST at once */
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            bytes_in = c->bytes_in;
            unsent = release(self, fd);
            found = 1;
        }
    });
    if (!found) Py_RETURN_NONE;
    return Py_BuildValue("(Kn)", bytes_in, (Py_ssize_t)unsent);
}

/* (bytes_in, drains, held, unacked) of a connection, zeros when it is gone. unacked (the
 * kernel's SIOCOUTQ: sent, not yet taken by the peer) only while an echo is held: then the
 * kernel's buffer is full, and a slow reader's progress shows only there. */
static int read_counters(Engine *self, PyObject *arg, uint64_t out[4]) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return -1;
    out[0] = out[1] = out[2] = out[3] = 0;
    LOCKED({
        conn_t *c = lookup(self, handle);
        if (c) {
            out[0] = c->bytes_in;
            out[1] = c->drains;
            out[2] = (c->pending ? c->len - c->off : 0) + c->piped;
            int unacked = 0;
            if (out[2] && ioctl((int)(handle & 0xffffffffu), SIOCOUTQ, &unacked) == 0)
                out[3] = (uint64_t)unacked;
        }
    });
    return 0;
}

static PyObject *Engine_counters(Engine *self, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(self, arg, v) < 0) return NULL;
    return Py_BuildValue("(KKK)", (unsigned long long)v[0], (unsigned long long)v[1],
                         (unsigned long long)v[2]);
}

static PyObject *Engine_activity(Engine *self, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(self, arg, v) < 0) return NULL;
    /* bytes in + bytes the peer took (in - held - unacked) + drains: a slow reader is
     * progress too (lifecycle.activity is the one rule; this is its twin) */
    return PyLong_FromUnsignedLongLong(2 * v[0] - v[2] - v[3] + v[1]);
}

static PyObject *Engine_held(Engine *self, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(self, arg, v) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(v[2]);
}

static PyObject *Engine_bytes_in(Engine *self, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(self, arg, v) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(v[0]);
}

static PyObject *Engine_set_table(Engine *self, PyObject *args) {
    PyObject *bounds;
    Py_ssize_t fd_budget, max_connections;
    if (!PyArg_ParseTuple(args, "nnO!", &fd_budget, &max_connections, &PyTuple_Type, &bounds))
        return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds);
    if (nb > MAX_BOUNDS) {
        PyErr_SetString(PyExc_ValueError, "too many duration buckets");
        return NULL;
    }
    double values[MAX_BOUNDS];
    for (Py_ssize_t i = 0; i < nb; i++) {
        values[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (values[i] == -1.0 && PyErr_Occurred()) return NULL;
    }
    LOCKED({
        memcpy(self->bounds, values, sizeof values);
        self->nbounds = (int)nb;
        self->fd_budget = fd_budget;
        self->max_connections = max_connections;
    });
    Py_RETURN_NONE;
}

static PyObject *Engine_set_others(Engine *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    LOCKED(self->others = n < 0 ? 0 : n);
    Py_RETURN_NONE;
}

static PyObject *Engine_open_count(Engine *self, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t n;
    LOCKED(n = self->open_here);
    return PyLong_FromSsize_t(n);
}

/* Move what the thread queued into ``told`` (called with the mutex held; no Python). */
static int move_told(Engine *self) {
    uint64_t count;
    ssize_t r = read(self->notify_fd, &count, sizeof count); /* EAGAIN: nothing was told */
    (void)r;
    self->notified = 0;
    told_t *t = &self->told;
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
        gone_t *g = &self->gone[i], *to = &t->gone[i];
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

/* ``told`` as a list of Python event tuples, emptied; NULL on a Python error (kept then).
 * Called without the mutex. */
static PyObject *build_told(Engine *self) {
    told_t *t = &self->told;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (size_t i = 0; i < t->queued; i++) {
        event_t *e = &t->queue[i];
        PyObject *item;
        if (e->kind == EV_OPENED) {
            PyObject *peer = peer_of(&e->peer);
            item = peer ? Py_BuildValue("(iKiNd)", EV_OPENED, handle_of(e->fd, e->gen),
                                        (int)e->tag, peer, e->opened_at)
                        : NULL;
        } else if (e->kind == EV_CLOSED) {
            item = Py_BuildValue("(iKiiKn)", EV_CLOSED, handle_of(e->fd, e->gen), (int)e->reason,
                                 e->err, (unsigned long long)e->bytes_in, (Py_ssize_t)e->unsent);
        } else {
            item = Py_BuildValue("(i)", (int)e->kind);
        }
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    for (int i = 0; i < MAX_LISTENERS; i++) {
        gone_t *g = &t->gone[i];
        if (!g->count) continue;
        PyObject *buckets = PyTuple_New(self->nbounds + 1);
        if (!buckets) goto fail;
        for (int b = 0; b <= self->nbounds; b++) {
            PyObject *v = PyLong_FromSsize_t(g->buckets[b]);
            if (!v) {
                Py_DECREF(buckets);
                goto fail;
            }
            PyTuple_SET_ITEM(buckets, b, v);
        }
        PyObject *item = Py_BuildValue("(iin(nnn)KKNd)", EV_GONE, i, g->count,
                                       g->closed[R_PEER_CLOSED], g->closed[R_RESET],
                                       g->closed[R_ERROR], g->bytes_in, g->bytes_out, buckets,
                                       g->duration_sum);
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    if (t->refused_cap || t->refused_budget) {
        PyObject *item = Py_BuildValue("(inn)", EV_REFUSED, t->refused_cap, t->refused_budget);
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    /* all of it is Python's now */
    t->queued = 0;
    memset(t->gone, 0, sizeof t->gone);
    t->refused_cap = t->refused_budget = 0;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *failed_error(int failed) {
    errno = failed;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *Engine_take(Engine *self, PyObject *Py_UNUSED(ignored)) {
    int failed;
    LOCKED(failed = move_told(self));
    if (failed) return failed_error(failed);
    return build_told(self);
}

/* (events, [(handle, tag, opened_at)]): what was queued, and the connections Python has no
 * object for, listed from now on (their close is an EV_CLOSED). One snapshot: the events
 * come first, so a close queued for a reused descriptor is heard before its new tenant. The
 * connections are copied out under the mutex; their Python objects are made after it. */
static PyObject *Engine_take_all(Engine *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *events = NULL, *listed = NULL, *out = NULL;
    listed_t *copied = NULL;
    size_t n = 0;
    int failed;
    LOCKED({
        failed = move_told(self);
        if (!failed && self->unlisted > 0) {
            copied = malloc((size_t)self->unlisted * sizeof *copied);
            if (!copied) failed = ENOMEM;
        }
        for (size_t fd = 0; copied && fd < self->capacity && self->unlisted > 0; fd++) {
            conn_t *c = &self->conns[fd];
            if (c->state == FREE || !c->unlisted) continue;
            copied[n].handle = handle_of((int)fd, c->gen);
            copied[n].tag = (int)c->tag;
            copied[n].opened_at = c->opened_at;
            n++;
            c->unlisted = 0;
            self->unlisted--;
        }
    });
    if (failed) {
        free(copied);
        return failed_error(failed);
    }
    if (!(events = build_told(self)) || !(listed = PyList_New((Py_ssize_t)n))) goto done;
    for (size_t i = 0; i < n; i++) {
        PyObject *item = Py_BuildValue("(Kid)", copied[i].handle, copied[i].tag,
                                       copied[i].opened_at);
        if (!item) goto done;
        PyList_SET_ITEM(listed, (Py_ssize_t)i, item);
    }
    out = PyTuple_Pack(2, events, listed);
done:
    if (!out && n) { /* not listed after all: unlisted again, as they were */
        LOCKED({
            for (size_t i = 0; i < n; i++) {
                conn_t *c = lookup(self, copied[i].handle);
                if (c && !c->unlisted) {
                    c->unlisted = 1;
                    self->unlisted++;
                }
            }
        });
    }
    free(copied);
    Py_XDECREF(events);
    Py_XDECREF(listed);
    return out;
}

/* [(tag, connections, bytes_in, bytes_out)] of the open connections Python has no object for,
 * per listener, leaving them unlisted: what a scrape counts (the owner tells its counts; a
 * scrape that listed them all would end the unlisted mode for every one). */
static PyObject *Engine_unlisted_sums(Engine *self, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t count[MAX_LISTENERS] = {0};
    unsigned long long in[MAX_LISTENERS] = {0}, held[MAX_LISTENERS] = {0};
    LOCKED({
        Py_ssize_t left = self->unlisted;
        for (size_t fd = 0; fd < self->capacity && left > 0; fd++) {
            conn_t *c = &self->conns[fd];
            if (c->state == FREE || !c->unlisted || c->tag >= MAX_LISTENERS) continue;
            left--;
            count[c->tag]++;
            in[c->tag] += c->bytes_in;
            held[c->tag] += (c->pending ? c->len - c->off : 0) + c->piped;
        }
    });
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int t = 0; t < MAX_LISTENERS; t++) {
        if (!count[t]) continue;
        PyObject *item = Py_BuildValue("(inKK)", t, count[t], in[t], in[t] - held[t]);
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *Engine_shutdown(Engine *self, PyObject *Py_UNUSED(ignored)) {
    stop_thread(self);
    close_everything(self);
    self->nlisteners = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *self, PyObject *Py_UNUSED(ignored)) {
    stop_thread(self);
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS,
     "The descriptor to watch: readable when take() has something."},
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the engine's thread."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS,
     "Stop the thread (connections stay open; take() still answers)."},
    {"take", (PyCFunction)Engine_take, METH_NOARGS,
     "The state changes since the last take: a list of (kind, ...)."},
    {"unlisted_sums", (PyCFunction)Engine_unlisted_sums, METH_NOARGS,
     "[(tag, connections, bytes_in, bytes_out)] of the open unlisted connections."},
    {"take_all", (PyCFunction)Engine_take_all, METH_NOARGS,
     "(take(), [(handle, tag, opened_at)] of the unlisted connections, listed from now on)."},
    {"add_listener", (PyCFunction)Engine_add_listener, METH_VARARGS,
     "add_listener(fd, tag): accept from this listening socket."},
    {"stop_accepting", (PyCFunction)Engine_stop_accepting, METH_NOARGS, "Accept no more."},
    {"resume_accepting", (PyCFunction)Engine_resume_accepting, METH_NOARGS,
     "Accept again after a pause (EMFILE)."},
    {"close", (PyCFunction)Engine_close, METH_O,
     "close(handle): echo no more, deliver what is held, FIN, wait for the peer."},
    {"abort", (PyCFunction)Engine_abort, METH_O,
     "abort(handle) -> (bytes_in, unsent) or None: reset now."},
    {"counters", (PyCFunction)Engine_counters, METH_O,
     "counters(handle) -> (bytes_in, drains, held), zeros once it is gone."},
    {"activity", (PyCFunction)Engine_activity, METH_O,
     "activity(handle) -> 2 * bytes_in - held - unacked + drains (lifecycle.activity)."},
    {"held", (PyCFunction)Engine_held, METH_O, "held(handle) -> echo bytes not yet sent."},
    {"bytes_in", (PyCFunction)Engine_bytes_in, METH_O, "bytes_in(handle) -> bytes received."},
    {"set_table", (PyCFunction)Engine_set_table, METH_VARARGS,
     "set_table(fd_budget, max_connections, duration_bounds): the table's limits and buckets."},
    {"set_others", (PyCFunction)Engine_set_others, METH_O,
     "set_others(n): the table's open connections that are not this engine's."},
    {"open_count", (PyCFunction)Engine_open_count, METH_NOARGS,
     "This engine's open connections, whether Python has heard of them or not."},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS,
     "Stop the thread, close every connection and the epoll descriptor."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "socket_echo.tcp._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The TCP echo's ready loop in a thread of its own: epoll, recv, send, held echoes.",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "socket-echo's native TCP data path.", -1, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "OPENED", EV_OPENED) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", EV_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "PAUSED", EV_PAUSED) < 0 ||
        PyModule_AddIntConstant(m, "GONE", EV_GONE) < 0 ||
        PyModule_AddIntConstant(m, "REFUSED", EV_REFUSED) < 0 ||
        PyModule_AddIntConstant(m, "PEER_CLOSED", R_PEER_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "RESET", R_RESET) < 0 ||
        PyModule_AddIntConstant(m, "ERROR", R_ERROR) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
