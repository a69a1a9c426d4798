/* The native TCP data path: the epoll path's ready loop in C (tcp/native.py drives it).
 *
 * Why C through the CPython API rather than Cython: the loop below makes no Python call per
 * message at all (epoll_wait, recv into one buffer, send, integer adds in a struct indexed
 * by descriptor), so what a binding generator would add is only build machinery; the
 * Python-facing part is a dozen small methods. Python hears about state changes only:
 * a connection opened, a connection closed (and why), accepting paused by EMFILE.
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
 * Descriptors index the connection table; each epoll registration carries the descriptor
 * and a generation, so an event can never reach a newer connection on a reused number.
 */
#define _GNU_SOURCE /* splice, pipe2 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Rounds of epoll per wake-up from the event loop: after a round with work, the next waits
 * up to LINGER_NS for more before going back to the loop. Under load that saves the loop's
 * own epoll_wait and its callback into Python per round (what a C server never pays); idle,
 * it costs at most LINGER_NS of sleep, never CPU; the loop's other work waits at most
 * RUN_ROUNDS rounds. */
#define RUN_ROUNDS 8
#define LINGER_NS 50000
#define MAX_EVENTS 256
#define SPLICE_FROM 16384 /* a read size below this never switches to splice (small buffers) */
#define ACCEPT_BATCH 128
#define MAX_LISTENERS 64
#define LISTENER_MARK (UINT64_C(1) << 63)

enum { FREE = 0, OPEN = 1, CLOSING = 2, FIN_SENT = 3 };
enum { EV_OPENED = 1, EV_CLOSED = 2, EV_PAUSED = 3, EV_GONE = 4, EV_REFUSED = 5 };
enum { R_PEER_CLOSED = 0, R_RESET = 1, R_ERROR = 2 };

typedef struct {
    uint8_t state;
    uint8_t unlisted; /* lazy mode: Python has no object for it yet */
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

#define MAX_BOUNDS 16
typedef struct {
    Py_ssize_t count, closed[3]; /* by R_* reason */
    unsigned long long bytes_in, bytes_out;
    Py_ssize_t buckets[MAX_BOUNDS + 1];
    double duration_sum;
} gone_t;

typedef struct {
    PyObject_HEAD
    int ep;
    char *buf;
    size_t bufsize;
    conn_t *conns;
    size_t capacity;
    int listeners[MAX_LISTENERS];
    int tags[MAX_LISTENERS];
    /* Lazy mode (no per-connection log lines): admission here, against the Python table's
     * open set plus the connections not listed yet; Python hears of a connection only when
     * it closes (EV_GONE) unless it asks for the list (the sweep, the drain, a scrape). */
    int lazy;
    PyObject *open_set;
    Py_ssize_t limit, max_connections, unlisted;
    Py_ssize_t refused_cap, refused_budget;
    /* Connections that closed unlisted, summed per listener tag until the end of the run:
     * Python counts them once per wake-up (limits.ConnectionTable.count_gone), not per
     * connection. Durations in the buckets Python gave (limits.DURATION_BUCKETS). */
    gone_t gone[MAX_LISTENERS];
    int gone_dirty;
    double bounds[MAX_BOUNDS];
    int nbounds;
    int nlisteners;
    int accepting;
    int paused;
    int want_peers;
    uint32_t next_gen;
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

static conn_t *lookup(Engine *self, long fd) {
    if (fd < 0 || (size_t)fd >= self->capacity) return NULL;
    conn_t *c = &self->conns[fd];
    return c->state == FREE ? NULL : c;
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
        c->spliced = 0;
        c->piped = 0;
    }
    if (c->unlisted) {
        c->unlisted = 0;
        self->unlisted--;
    }
    close(fd); /* leaves the epoll set with it: the descriptor is never duplicated */
    free(c->pending);
    c->pending = NULL;
    c->off = c->len = 0;
    c->state = FREE;
    return unsent;
}

static int append(PyObject **list, PyObject *item) {
    if (!item) return -1;
    if (!*list && !(*list = PyList_New(0))) {
        Py_DECREF(item);
        return -1;
    }
    int r = PyList_Append(*list, item);
    Py_DECREF(item);
    return r;
}

static double monotonic(void);

static int closed_event(Engine *self, PyObject **events, int fd, int reason, int err) {
    conn_t *c = &self->conns[fd];
    uint64_t bytes_in = c->bytes_in;
    int unlisted = c->unlisted, tag = c->tag;
    double opened_at = c->opened_at;
    size_t unsent = release(self, fd);
    if (unlisted && tag < MAX_LISTENERS) {
        gone_t *g = &self->gone[tag];
        self->gone_dirty = 1;
        double duration = monotonic() - opened_at;
        int b = 0;
        while (b < self->nbounds && duration > self->bounds[b]) b++; /* bisect_left */
        g->count++;
        g->closed[reason]++;
        g->bytes_in += bytes_in;
        g->bytes_out += bytes_in - unsent;
        g->buckets[b]++;
        g->duration_sum += duration;
        return 0;
    }
    return append(events, Py_BuildValue("(iiiiKn)", EV_CLOSED, fd, reason, err,
                                        (unsigned long long)bytes_in, (Py_ssize_t)unsent));
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Lazy mode: is there room for one more connection? (the table's rule: tcp/lifecycle.py) */
static int room(Engine *self) {
    Py_ssize_t open = PySet_GET_SIZE(self->open_set) + self->unlisted;
    if (open < self->limit) return 1;
    if (open >= self->max_connections) self->refused_cap++;
    else self->refused_budget++;
    return 0;
}

static int lost(Engine *self, PyObject **events, int fd, int err) {
    if (err == ECONNRESET || err == EPIPE) return closed_event(self, events, fd, R_RESET, 0);
    return closed_event(self, events, fd, R_ERROR, err);
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

/* Read what is there and send it back; a part the kernel does not take is held and reading
 * stops until it drains. 0 when done (also for EAGAIN), -1 on a Python error. */
/* The bulk path: what is readable goes into the connection's pipe and from there back out,
 * the kernel moving pages, never copying them through this process. What the socket does not
 * take stays in the pipe (held: reading stops until it drains, as for `pending`). */
static int splice_echo(Engine *self, int fd, PyObject **events) {
    conn_t *c = &self->conns[fd];
    ssize_t r = splice(fd, NULL, c->pipe_w, NULL, self->bufsize, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        return lost(self, events, fd, errno);
    }
    if (r == 0) return closed_event(self, events, fd, R_PEER_CLOSED, 0);
    c->bytes_in += (uint64_t)r;
    if (c->state != OPEN) { /* closing: what arrives now is not echoed; drop it */
        char sink[4096];
        for (ssize_t left = r; left > 0;) {
            ssize_t n = read(c->pipe_r, sink, left < (ssize_t)sizeof sink ? (size_t)left : sizeof sink);
            if (n <= 0) break;
            left -= n;
        }
        c->bytes_in -= (uint64_t)r;
        return 0;
    }
    ssize_t w = splice(c->pipe_r, NULL, fd, NULL, (size_t)r, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) return lost(self, events, fd, errno);
        w = 0;
    }
    if (w < r) {
        c->piped = (size_t)(r - w);
        watch(self, fd, EPOLLOUT, EPOLL_CTL_MOD); /* stop reading until it drains */
    }
    return 0;
}

/* A connection whose reads fill the whole buffer is streaming: it moves to splice(2) if a
 * pipe can be had (two more descriptors; none left: it stays on recv/send). */
static void maybe_splice(Engine *self, conn_t *c) {
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) return;
    fcntl(p[1], F_SETPIPE_SZ, (int)self->bufsize); /* at most one read held, as with recv */
    c->pipe_r = p[0];
    c->pipe_w = p[1];
    c->piped = 0;
    c->spliced = 1;
}

static int echo(Engine *self, int fd, PyObject **events) {
    conn_t *c = &self->conns[fd];
    if (c->spliced) return splice_echo(self, fd, events);
    ssize_t r = recv(fd, self->buf, self->bufsize, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        return lost(self, events, fd, errno);
    }
    if (r == 0) return closed_event(self, events, fd, R_PEER_CLOSED, 0);
    if (c->state != OPEN) return 0; /* closing: what arrives now is not echoed */
    c->bytes_in += (uint64_t)r;
    ssize_t w = send(fd, self->buf, (size_t)r, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) return lost(self, events, fd, errno);
        w = 0;
    }
    if (w < r) {
        c->len = (size_t)(r - w);
        c->off = 0;
        c->pending = malloc(c->len);
        if (!c->pending) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(c->pending, self->buf + w, c->len);
        watch(self, fd, EPOLLOUT, EPOLL_CTL_MOD); /* stop reading until it drains */
    } else if ((size_t)r == self->bufsize && self->bufsize >= SPLICE_FROM) {
        maybe_splice(self, c);
    }
    return 0;
}

static int accept_batch(Engine *self, int index, PyObject **events) {
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
                return append(events, Py_BuildValue("(i)", EV_PAUSED));
            }
            return 0; /* EAGAIN, or an error on this listener: look again next time */
        }
        if (self->lazy && !room(self)) { /* refused: reset at once, as Python's abort does */
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails on Unix: fine */
        if (grow(self, fd) < 0) {
            close(fd);
            PyErr_NoMemory();
            return -1;
        }
        conn_t *c = &self->conns[fd];
        memset(c, 0, sizeof *c);
        c->state = OPEN;
        c->gen = ++self->next_gen;
        c->tag = (uint16_t)self->tags[index];
        if (watch(self, fd, EPOLLIN, EPOLL_CTL_ADD) < 0) {
            c->state = FREE;
            close(fd);
            continue;
        }
        if (self->lazy) {
            c->unlisted = 1;
            c->opened_at = monotonic();
            self->unlisted++;
            continue;
        }
        PyObject *peer;
        if (self->want_peers) {
            peer = peer_of(&sa);
            if (!peer) return -1;
        } else {
            peer = Py_NewRef(Py_None);
        }
        if (append(events, Py_BuildValue("(iiiN)", EV_OPENED, fd, self->tags[index], peer)) < 0)
            return -1;
    }
    return 0;
}

/* The rest of a held echo; on a complete drain, back to reading (or FIN when closing). */
static int flush(Engine *self, int fd, PyObject **events) {
    conn_t *c = &self->conns[fd];
    if (c->piped) {
        ssize_t w = splice(c->pipe_r, NULL, fd, NULL, c->piped, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            return lost(self, events, fd, errno);
        }
        c->piped -= (size_t)w;
        if (c->piped) return 0;
    } else {
        ssize_t w = send(fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            return lost(self, events, fd, errno);
        }
        c->off += (size_t)w;
        if (c->off < c->len) return 0;
        free(c->pending);
        c->pending = NULL;
        c->off = c->len = 0;
    }
    c->drains++;
    if (c->state == CLOSING) {
        if (shutdown(fd, SHUT_WR) < 0) return lost(self, events, fd, errno);
        c->state = FIN_SENT;
    }
    watch(self, fd, EPOLLIN, EPOLL_CTL_MOD);
    return 0;
}

static PyObject *Engine_run(Engine *self, PyObject *Py_UNUSED(ignored)) {
    struct epoll_event evs[MAX_EVENTS];
    PyObject *events = NULL;
    for (int round = 0; round < RUN_ROUNDS; round++) {
    int n;
    if (round == 0) {
        n = epoll_wait(self->ep, evs, MAX_EVENTS, 0);
    } else { /* the last round had work: wait a little for more, as a C server would */
        struct timespec linger = {0, LINGER_NS};
        Py_BEGIN_ALLOW_THREADS
        n = epoll_pwait2(self->ep, evs, MAX_EVENTS, &linger, NULL);
        Py_END_ALLOW_THREADS
    }
    if (n < 0) {
        if (errno == EINTR) break;
        Py_XDECREF(events);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (n == 0) break;
    for (int i = 0; i < n; i++) {
        uint64_t data = evs[i].data.u64;
        if (data & LISTENER_MARK) {
            if (self->accepting && !self->paused &&
                accept_batch(self, (int)(data & 0xffff), &events) < 0)
                goto fail;
            continue;
        }
        int fd = (int)(uint32_t)data;
        conn_t *c = lookup(self, fd);
        if (!c || c->gen != (uint32_t)(data >> 32)) continue; /* stale */
        if (c->pending || c->piped) {
            if (flush(self, fd, &events) < 0) goto fail;
            continue;
        }
        if (echo(self, fd, &events) < 0) goto fail;
    }
    }
    for (int t = 0; self->gone_dirty && t < MAX_LISTENERS; t++) {
        gone_t *g = &self->gone[t];
        if (!g->count) continue;
        PyObject *buckets = PyTuple_New(self->nbounds + 1);
        if (!buckets) goto fail;
        for (int b = 0; b <= self->nbounds; b++)
            PyTuple_SET_ITEM(buckets, b, PyLong_FromSsize_t(g->buckets[b]));
        if (append(&events, Py_BuildValue("(iin(nnn)KKNd)", EV_GONE, t, g->count,
                                          g->closed[R_PEER_CLOSED], g->closed[R_RESET],
                                          g->closed[R_ERROR], g->bytes_in, g->bytes_out,
                                          buckets, g->duration_sum)) < 0)
            goto fail;
        memset(g, 0, sizeof *g);
    }
    self->gone_dirty = 0;
    if (self->refused_cap || self->refused_budget) {
        if (append(&events, Py_BuildValue("(inn)", EV_REFUSED, self->refused_cap,
                                          self->refused_budget)) < 0)
            goto fail;
        self->refused_cap = self->refused_budget = 0;
    }
    if (!events) Py_RETURN_NONE;
    return events;
fail:
    Py_XDECREF(events);
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
    if (self->ep < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->want_peers = want_peers;
    self->accepting = 1;
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (self) self->ep = -1;
    return (PyObject *)self;
}

static void close_everything(Engine *self) {
    for (size_t fd = 0; fd < self->capacity; fd++)
        if (self->conns[fd].state != FREE) release(self, (int)fd);
    if (self->ep >= 0) close(self->ep);
    self->ep = -1;
}

static void Engine_dealloc(Engine *self) {
    close_everything(self);
    free(self->conns);
    free(self->buf);
    Py_CLEAR(self->open_set);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(Engine *self) {
    if (self->ep < 0) {
        PyErr_SetString(PyExc_ValueError, "the engine is shut down");
        return -1;
    }
    return 0;
}

static PyObject *Engine_fileno(Engine *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->ep);
}

static PyObject *Engine_add_listener(Engine *self, PyObject *args) {
    int fd, tag;
    if (!PyArg_ParseTuple(args, "ii", &fd, &tag) || check_open(self) < 0) return NULL;
    if (self->nlisteners >= MAX_LISTENERS) {
        PyErr_SetString(PyExc_ValueError, "too many listeners");
        return NULL;
    }
    struct epoll_event e;
    e.events = (self->paused || !self->accepting) ? 0 : EPOLLIN;
    e.data.u64 = LISTENER_MARK | (uint64_t)self->nlisteners;
    if (epoll_ctl(self->ep, EPOLL_CTL_ADD, fd, &e) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    self->listeners[self->nlisteners] = fd;
    self->tags[self->nlisteners] = tag;
    self->nlisteners++;
    Py_RETURN_NONE;
}

static PyObject *Engine_stop_accepting(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    for (int i = 0; i < self->nlisteners; i++) epoll_ctl(self->ep, EPOLL_CTL_DEL, self->listeners[i], NULL);
    self->nlisteners = 0;
    self->accepting = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_resume_accepting(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    if (self->paused && self->accepting) set_listeners(self, EPOLLIN);
    self->paused = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_close(Engine *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    conn_t *c = lookup(self, fd);
    if (!c || c->state != OPEN) Py_RETURN_FALSE;
    c->state = CLOSING;
    if (!c->pending && !c->piped) {
        if (shutdown((int)fd, SHUT_WR) == 0) c->state = FIN_SENT;
        /* on failure the next read reports it */
    }
    Py_RETURN_TRUE;
}

static PyObject *Engine_abort(Engine *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    conn_t *c = lookup(self, fd);
    if (!c) Py_RETURN_NONE;
    struct linger lg = {1, 0}; /* close() sends RST at once */
    setsockopt((int)fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    unsigned long long bytes_in = c->bytes_in;
    size_t unsent = release(self, (int)fd);
    return Py_BuildValue("(Kn)", bytes_in, (Py_ssize_t)unsent);
}

static PyObject *Engine_counters(Engine *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    conn_t *c = lookup(self, fd);
    if (!c) Py_RETURN_NONE;
    return Py_BuildValue("(KKn)", (unsigned long long)c->bytes_in,
                         (unsigned long long)c->drains,
                         (Py_ssize_t)((c->pending ? c->len - c->off : 0) + c->piped));
}

static PyObject *Engine_activity(Engine *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    conn_t *c = lookup(self, fd);
    return PyLong_FromUnsignedLongLong(c ? c->bytes_in + c->drains : 0);
}

static PyObject *Engine_held(Engine *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    conn_t *c = lookup(self, fd);
    if (!c) return PyLong_FromSsize_t(0);
    return PyLong_FromSsize_t((Py_ssize_t)((c->pending ? c->len - c->off : 0) + c->piped));
}

static PyObject *Engine_bytes_in(Engine *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    conn_t *c = lookup(self, fd);
    return PyLong_FromUnsignedLongLong(c ? c->bytes_in : 0);
}

static PyObject *Engine_set_lazy(Engine *self, PyObject *args) {
    PyObject *open_set, *bounds;
    Py_ssize_t limit, max_connections;
    if (!PyArg_ParseTuple(args, "O!nnO!", &PySet_Type, &open_set, &limit, &max_connections,
                          &PyTuple_Type, &bounds))
        return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds);
    if (nb > MAX_BOUNDS) {
        PyErr_SetString(PyExc_ValueError, "too many duration buckets");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nb; i++) {
        self->bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (self->bounds[i] == -1.0 && PyErr_Occurred()) return NULL;
    }
    self->nbounds = (int)nb;
    Py_XSETREF(self->open_set, Py_NewRef(open_set));
    self->limit = limit;
    self->max_connections = max_connections;
    self->lazy = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_unlisted(Engine *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(self->unlisted);
}

/* The connections Python has no object for yet, as [(fd, tag, opened_at)]; from now on they
 * are listed (their close is an EV_CLOSED, as for eager connections). */
static PyObject *Engine_take_unlisted(Engine *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (size_t fd = 0; fd < self->capacity && self->unlisted > 0; fd++) {
        conn_t *c = &self->conns[fd];
        if (c->state == FREE || !c->unlisted) continue;
        PyObject *item = Py_BuildValue("(nid)", (Py_ssize_t)fd, (int)c->tag, c->opened_at);
        if (append(&out, item) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        c->unlisted = 0;
        self->unlisted--;
    }
    return out;
}

static PyObject *Engine_shutdown(Engine *self, PyObject *Py_UNUSED(ignored)) {
    close_everything(self);
    self->nlisteners = 0;
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor to watch."},
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Serve what is ready; a list of (kind, ...) state changes, or None."},
    {"add_listener", (PyCFunction)Engine_add_listener, METH_VARARGS,
     "add_listener(fd, tag): accept from this listening socket."},
    {"stop_accepting", (PyCFunction)Engine_stop_accepting, METH_NOARGS, "Accept no more."},
    {"resume_accepting", (PyCFunction)Engine_resume_accepting, METH_NOARGS,
     "Accept again after a pause (EMFILE)."},
    {"close", (PyCFunction)Engine_close, METH_O,
     "close(fd): echo no more, deliver what is held, FIN, wait for the peer."},
    {"abort", (PyCFunction)Engine_abort, METH_O,
     "abort(fd) -> (bytes_in, unsent) or None: reset now."},
    {"counters", (PyCFunction)Engine_counters, METH_O,
     "counters(fd) -> (bytes_in, drains, held) or None."},
    {"activity", (PyCFunction)Engine_activity, METH_O, "activity(fd) -> bytes_in + drains."},
    {"held", (PyCFunction)Engine_held, METH_O, "held(fd) -> echo bytes not yet sent."},
    {"bytes_in", (PyCFunction)Engine_bytes_in, METH_O, "bytes_in(fd) -> bytes received."},
    {"set_lazy", (PyCFunction)Engine_set_lazy, METH_VARARGS,
     "set_lazy(open_set, limit, max_connections): admit here; no event per opening."},
    {"unlisted", (PyCFunction)Engine_unlisted, METH_NOARGS,
     "Open connections Python has no object for."},
    {"take_unlisted", (PyCFunction)Engine_take_unlisted, METH_NOARGS,
     "[(fd, tag, opened_at)] of the unlisted connections, listed from now on."},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS,
     "Close every connection and the epoll descriptor."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "socket_echo.tcp._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The TCP echo's ready loop: epoll, recv, send, held echoes, in C.",
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
