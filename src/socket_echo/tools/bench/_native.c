/* The bench tool's ping-pong in C, closed and open loop, so that the load generator is never
 * the limit and its clock is not the figure.
 *
 * bench/pingpong.py opens the connections and keeps every decision that is not per message:
 * replacing a connection that failed (its callback), the progress display (another callback,
 * ten times a second), the report. Here, per message: epoll_wait, send, recv, compare the
 * echo with what was sent (Patterns' bytes: the buffer Python made), count its latency in
 * microseconds. pingpong.py's PingPong is the twin: the same rules, tested alike.
 *
 * Closed loop (rate 0): one message in flight per connection, the next sent when its echo is
 * back; latency counts from the send.
 *
 * Open loop (rate > 0), as wrk2 and HdrHistogram model it: every request has an intended send
 * time on a schedule (uniform, or Poisson arrivals) and its latency counts from then
 * ("corrected"), beside the latency from when it actually left ("uncorrected"). Up to
 * `depth` requests are in flight per connection; an echo keeps order on a stream, so echoes
 * are matched to requests by position and verified byte for byte. A request whose slot comes
 * while its connection has `depth` in flight waits (the server is behind: counted as held); one
 * that leaves more than LATE_SEND_US after its slot with room to go was late because this process
 * was (counted as late_sends: the generator, not the server, fell behind).
 *
 * The schedule's clock: epoll_wait's timeout is whole milliseconds and the kernel adds timer
 * slack (50 us by default), which made bench report its own sleeping as latency. Here a
 * timerfd armed at an absolute CLOCK_MONOTONIC time in nanoseconds (timer slack set to 1 ns)
 * wakes the loop SPIN_US before the next slot, and the last stretch is spent polling with a
 * zero timeout (echoes are read meanwhile), so a send leaves within a few microseconds of its
 * slot on an idle machine.
 *
 * Latencies are kept in 1-us buckets (up to 10 s; slower counts as 10 s), one histogram per
 * second of the measured window (touched buckets only), and returned as {us: count} per
 * second; the warm-up is run but not counted.
 *
 * Over tls:// (where OpenSSL's headers were found at build time: SE_TLS, the module's TLS is
 * 1) the same loop runs through OpenSSL on the same epoll: Python hands over plain TCP
 * connections, each gets its handshake here (a blocking one, before the schedule starts or
 * when it replaces a failed one: never inside a measured send), then SSL_write and SSL_read
 * take send's and recv's places, WANT_READ/WANT_WRITE being EAGAIN. A record is at most 16 KiB
 * and every read asks for 64 KiB, OpenSSL reads no further ahead, so level-triggered epoll
 * sees everything still to read. At the end each sends its close_notify before Python ends
 * the connection with FIN.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#ifdef SE_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <arpa/inet.h>
#include <openssl/x509v3.h>
#include <poll.h>
#endif

/* Shared with Python, each owned there and held equal by tests/test_shared_constants.py:
 * tools/defaults.py (LATE_SEND_US, SPIN_US, CHECK_EVERY, MAX_SIZE, MAX_IN_FLIGHT),
 * tools/connect/patterns.py (PATTERN_PERIOD, SEQUENCE_STRIDE), bench/errors.py (E_...). */
#define LATE_SEND_US 10       /* a send this much after its slot (with room to go) is late */
#define SPIN_US 200           /* the last stretch before a slot is polled, not slept */
#define CHECK_EVERY_US 100000 /* timeouts looked for, progress told, this often */
#define MAX_SIZE 65536
#define MAX_IN_FLIGHT 4096
#define PATTERN_PERIOD 251
#define SEQUENCE_STRIDE 7
#define E_NO_COMPLETE_ANSWER "no complete answer within the timeout"
#define E_CLOSED_BY_SERVER "closed by server"
#define E_SEND_FAILED "send failed"
#define E_REGISTER_FAILED "register: epoll_ctl failed"
#define E_SEND "send"
#define E_RECV "recv"

#define MAX_EVENTS 256
#define HIST_US 10000000 /* 1 us buckets up to 10 s; slower answers count as 10 s */
#define LATENESS_US 1000000 /* how late sends left, in 1-us buckets up to 1 s */
#define TIMER_MARK UINT64_MAX
#define RBUF 65536
#define CHECK_EVERY (CHECK_EVERY_US * 1e-6)

typedef struct {
    double intended, sent;
    uint64_t seq;
} req_t;

typedef struct {
    int fd;
    int writing;  /* EPOLLOUT armed: a message is partly sent */
    int in_heap;  /* waiting for its next slot */
    int held;     /* its slot came while `depth` were in flight */
    uint64_t seq; /* the last message number given out */
    req_t *ring;  /* requests in flight, [head, tail); ring[tx] is being sent */
    uint64_t head, tx, tail;
    size_t off, got; /* bytes of ring[tx] sent, of ring[head] received */
    double next_slot;
    uint64_t answers; /* in the window, over this slot's connections (replacements too) */
    double first;     /* when its first answer in the window came (0: none yet) */
    void *ssl;        /* tls://: its SSL (SE_TLS), else NULL */
} peer_t;

typedef struct {
    uint32_t *us, *count;
    size_t n;
} second_t;

typedef struct {
    int ep, tfd, index, open, poisson;
    size_t size;
    uint64_t depth, mask;
    double interval, mstart, timeout, rate;
    const unsigned char *base;
    peer_t *peers;
    Py_ssize_t n;
    unsigned char *rbuf;
    /* the current second's histogram (touched buckets listed) and the seconds before it */
    uint32_t *shist, *touched;
    size_t ntouched, touched_cap;
    second_t *seconds;
    size_t nseconds, seconds_cap;
    long bin;
    uint32_t *uhist; /* open loop: uncorrected, the whole window */
    uint32_t *lhist; /* open loop: how late each send left after its slot */
    unsigned long long requests, mismatches, late_sends, held_sends, sends;
    uint64_t rng;
    double armed; /* the timerfd's absolute expiry, 0: disarmed */
    double spun;  /* seconds spent polling for a slot: CPU used, not work done */
    int failed;   /* ENOMEM in the bookkeeping */
    int *heap;    /* peers by next_slot */
    Py_ssize_t nheap;
    PyObject *replace;
    void *ctx;               /* tls://: the SSL_CTX (SE_TLS), else NULL */
    const char *server_name; /* tls://: the name sent (SNI) and verified */
    int verify;
} run_t;

/* -- the transport: plain send/recv, or OpenSSL's ------------------------------------------ */

static double now(void);

#ifdef SE_TLS
/* An OpenSSL failure as errno for the caller's message: EAGAIN for "not now". */
static ssize_t tls_failed(void *ssl, int ret) {
    int e = SSL_get_error(ssl, ret);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) errno = EAGAIN;
    else if (e == SSL_ERROR_ZERO_RETURN) return 0;
    else if (!(e == SSL_ERROR_SYSCALL && errno)) errno = EPROTO;
    ERR_clear_error();
    return -1;
}
#endif

static ssize_t io_send(peer_t *p, const void *buf, size_t n) {
#ifdef SE_TLS
    if (p->ssl) {
        int w = SSL_write(p->ssl, buf, (int)n);
        return w > 0 ? w : tls_failed(p->ssl, w);
    }
#endif
    return send(p->fd, buf, n, MSG_NOSIGNAL);
}

static ssize_t io_recv(peer_t *p, void *buf, size_t n) {
#ifdef SE_TLS
    if (p->ssl) {
        int got = SSL_read(p->ssl, buf, (int)n);
        return got > 0 ? got : tls_failed(p->ssl, got);
    }
#endif
    return recv(p->fd, buf, n, 0);
}

/* Plaintext OpenSSL holds that epoll cannot see (none, the way reads are sized: a check). */
static int io_pending(peer_t *p) {
#ifdef SE_TLS
    if (p->ssl) return SSL_pending(p->ssl) > 0;
#endif
    return 0;
}

/* Forget the peer's TLS (its descriptor is Python's to close). `notify`: send close_notify
 * first (the run's end; not after an error). */
static void tls_drop(peer_t *p, int notify) {
#ifdef SE_TLS
    if (!p->ssl) return;
    if (notify) SSL_shutdown(p->ssl); /* non-blocking: one try */
    SSL_free(p->ssl);
    ERR_clear_error();
#endif
    p->ssl = NULL;
}

/* The handshake on a fresh connection (blocking, within `timeout`); 0, or -1 with `why` said.
 * Never inside the schedule: at the start, or in place of a failed connection. */
static int tls_start(run_t *r, peer_t *p, char *why, size_t why_len) {
#ifdef SE_TLS
    SSL *ssl = SSL_new(r->ctx);
    if (!ssl || !SSL_set_fd(ssl, p->fd)) {
        snprintf(why, why_len, "TLS handshake: out of memory");
        SSL_free(ssl);
        return -1;
    }
    if (r->server_name && *r->server_name) {
        unsigned char addr[16];
        int literal = inet_pton(AF_INET, r->server_name, addr) == 1 ||
                      inet_pton(AF_INET6, r->server_name, addr) == 1;
        if (literal) { /* as Python's ssl: no SNI for an address, its IP SAN checked */
            if (r->verify) X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), r->server_name);
        } else {
            SSL_set_tlsext_host_name(ssl, r->server_name);
            if (r->verify) SSL_set1_host(ssl, r->server_name);
        }
    }
    double deadline = now() + r->timeout;
    for (;;) {
        int ret = SSL_connect(ssl);
        if (ret == 1) break;
        int e = SSL_get_error(ssl, ret);
        double left = deadline - now();
        if ((e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) && left > 0) {
            struct pollfd pfd = {.fd = p->fd, .events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT};
            int n;
            Py_BEGIN_ALLOW_THREADS
            n = poll(&pfd, 1, (int)(left * 1000) + 1);
            Py_END_ALLOW_THREADS
            if (n >= 0 || errno == EINTR) continue;
        }
        unsigned long err = ERR_get_error();
        char text[160] = "timed out";
        if (err) ERR_error_string_n(err, text, sizeof text);
        else if (left > 0) snprintf(text, sizeof text, "%s", strerror(errno ? errno : EPROTO));
        snprintf(why, why_len, "TLS handshake: %s", text);
        ERR_clear_error();
        SSL_free(ssl);
        return -1;
    }
    p->ssl = ssl;
    return 0;
#else
    snprintf(why, why_len, "TLS handshake: built without OpenSSL");
    return -1;
#endif
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64*: Poisson gaps need uniform doubles, not cryptographic ones */
static double uniform(run_t *r) {
    r->rng ^= r->rng >> 12;
    r->rng ^= r->rng << 25;
    r->rng ^= r->rng >> 27;
    return (double)((r->rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static double gap(run_t *r) {
    return r->poisson ? -log(1.0 - uniform(r)) * r->interval : r->interval;
}

/* -- the slot heap ------------------------------------------------------------------------ */
static int before(run_t *r, int a, int b) {
    return r->peers[a].next_slot < r->peers[b].next_slot;
}

static void heap_push(run_t *r, int i) {
    if (r->peers[i].in_heap) return;
    r->peers[i].in_heap = 1;
    Py_ssize_t k = r->nheap++;
    r->heap[k] = i;
    while (k > 0 && before(r, r->heap[k], r->heap[(k - 1) / 2])) {
        int t = r->heap[k];
        r->heap[k] = r->heap[(k - 1) / 2];
        r->heap[(k - 1) / 2] = t;
        k = (k - 1) / 2;
    }
}

static int heap_pop(run_t *r) {
    int top = r->heap[0];
    r->peers[top].in_heap = 0;
    r->heap[0] = r->heap[--r->nheap];
    for (Py_ssize_t k = 0;;) {
        Py_ssize_t l = 2 * k + 1, m = k;
        if (l < r->nheap && before(r, r->heap[l], r->heap[m])) m = l;
        if (l + 1 < r->nheap && before(r, r->heap[l + 1], r->heap[m])) m = l + 1;
        if (m == k) break;
        int t = r->heap[k];
        r->heap[k] = r->heap[m];
        r->heap[m] = t;
        k = m;
    }
    return top;
}

/* -- histograms --------------------------------------------------------------------------- */
static void end_second(run_t *r) {
    if (r->nseconds == r->seconds_cap) {
        size_t cap = r->seconds_cap ? 2 * r->seconds_cap : 64;
        second_t *s = realloc(r->seconds, cap * sizeof *s);
        if (!s) {
            r->failed = ENOMEM;
            return;
        }
        r->seconds = s;
        r->seconds_cap = cap;
    }
    second_t *s = &r->seconds[r->nseconds++];
    s->n = r->ntouched;
    s->us = r->ntouched ? malloc(r->ntouched * sizeof(uint32_t)) : NULL;
    s->count = r->ntouched ? malloc(r->ntouched * sizeof(uint32_t)) : NULL;
    if (r->ntouched && (!s->us || !s->count)) {
        r->failed = ENOMEM;
        s->n = 0;
    }
    for (size_t i = 0; i < r->ntouched; i++) {
        uint32_t us = r->touched[i];
        if (s->n) {
            s->us[i] = us;
            s->count[i] = r->shist[us];
        }
        r->shist[us] = 0;
    }
    r->ntouched = 0;
    r->bin++;
}

static void record(run_t *r, peer_t *p, req_t *q, double t) {
    if (q->intended < r->mstart) return; /* the warm-up: run, not counted */
    if (!p->answers++) p->first = t;
    long bin = (long)(t - r->mstart);
    while (r->bin < bin) end_second(r);
    uint64_t us = (uint64_t)((t - q->intended) * 1e6);
    if (us > HIST_US) us = HIST_US;
    if (!r->shist[us]++) {
        if (r->ntouched == r->touched_cap) {
            size_t cap = r->touched_cap ? 2 * r->touched_cap : 1024;
            uint32_t *p = realloc(r->touched, cap * sizeof *p);
            if (!p) {
                r->failed = ENOMEM;
                r->shist[us]--;
                return;
            }
            r->touched = p;
            r->touched_cap = cap;
        }
        r->touched[r->ntouched++] = (uint32_t)us;
    }
    if (r->uhist) {
        uint64_t u = (uint64_t)((t - q->sent) * 1e6);
        r->uhist[u > HIST_US ? HIST_US : u]++;
    }
    r->requests++;
}

/* -- sending ------------------------------------------------------------------------------ */
static const unsigned char *message(run_t *r, uint64_t seq) {
    return r->base + (seq * SEQUENCE_STRIDE + (uint64_t)r->index) % PATTERN_PERIOD;
}

static void want_out(run_t *r, peer_t *p, int on) {
    if (p->writing == on) return;
    p->writing = on;
    struct epoll_event e = {.events = EPOLLIN | (on ? EPOLLOUT : 0),
                            .data.u64 = (uint64_t)(p - r->peers)};
    epoll_ctl(r->ep, EPOLL_CTL_MOD, p->fd, &e);
}

/* Send what is queued, message after message; -1 on an error (errno set). */
static int push(run_t *r, peer_t *p) {
    while (p->tx < p->tail) {
        req_t *q = &p->ring[p->tx & r->mask];
        if (p->off == 0) q->sent = now();
        ssize_t w = io_send(p, message(r, q->seq) + p->off, r->size - p->off);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                want_out(r, p, 1);
                return 0;
            }
            return -1;
        }
        p->off += (size_t)w;
        if (p->off == r->size) {
            p->off = 0;
            p->tx++;
        }
    }
    want_out(r, p, 0);
    return 0;
}

/* One more request on this connection, meant for `intended`; `held`: its slot came while the
 * window was full (the server's delay, not this process's). */
static int issue(run_t *r, peer_t *p, double intended, double t, int held) {
    req_t *q = &p->ring[p->tail & r->mask];
    q->intended = intended;
    q->sent = t;
    q->seq = ++p->seq;
    p->tail++;
    if (r->open && intended >= r->mstart) {
        r->sends++;
        uint64_t late_us = (uint64_t)((t - intended) * 1e6);
        r->lhist[late_us > LATENESS_US ? LATENESS_US : late_us]++;
        if (t - intended > LATE_SEND_US * 1e-6) {
            if (held) r->held_sends++;
            else r->late_sends++;
        }
    }
    return p->tx + 1 == p->tail ? push(r, p) : 0;
}

/* Send every request whose slot has come and for which there is room; -1 on an error. */
static int fill(run_t *r, peer_t *p, double t) {
    if (!r->open) return p->head == p->tail ? issue(r, p, t, t, 0) : 0;
    int held = p->held; /* the slots due now came while the window was full */
    while (p->next_slot <= t) {
        if (p->tail - p->head >= r->depth) {
            p->held = 1; /* the server has not answered enough: wait for an echo */
            return 0;
        }
        double slot = p->next_slot;
        p->next_slot += gap(r);
        if (issue(r, p, slot, t, held) < 0) return -1;
    }
    p->held = 0;
    if (p->tail - p->head < r->depth) heap_push(r, (int)(p - r->peers));
    return 0;
}

static int watch(run_t *r, peer_t *p) {
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = (uint64_t)(p - r->peers)};
    p->writing = 0;
    return epoll_ctl(r->ep, EPOLL_CTL_ADD, p->fd, &e);
}

/* Ask Python for a new connection in place of this one (reason None: already counted). The
 * requests in flight are gone with it; the schedule goes on. */
static int replace(run_t *r, peer_t *p, const char *reason) {
    int old = p->fd;
    epoll_ctl(r->ep, EPOLL_CTL_DEL, old, NULL);
    tls_drop(p, 0);
    PyObject *res = PyObject_CallFunction(r->replace, "is", old, reason);
    if (!res) return -1;
    long fd = PyLong_AsLong(res);
    Py_DECREF(res);
    if (fd == -1 && PyErr_Occurred()) return -1;
    p->fd = (int)fd;
    p->head = p->tx = p->tail = 0;
    p->off = p->got = 0;
    if (fd < 0) return 0; /* none to be had: this slot rests */
    char why[200];
    if (r->ctx && tls_start(r, p, why, sizeof why) < 0) return replace(r, p, why);
    if (watch(r, p) < 0) return replace(r, p, E_REGISTER_FAILED);
    if (fill(r, p, now()) < 0) return replace(r, p, E_SEND_FAILED);
    return 0;
}

static int replace_errno(run_t *r, peer_t *p, const char *what) {
    char why[96];
    snprintf(why, sizeof why, "%s: %s", what, strerror(errno));
    return replace(r, p, why);
}

/* Read what came back, match it to the requests in flight by position, verify it. */
static int readable(run_t *r, peer_t *p) {
    ssize_t got = io_recv(p, r->rbuf, RBUF);
    if (got < 0) return errno == EAGAIN || errno == EINTR ? 0 : replace_errno(r, p, E_RECV);
    if (got == 0) return replace(r, p, E_CLOSED_BY_SERVER);
    double t = now();
    for (size_t off = 0; off < (size_t)got;) {
        if (p->head == p->tx && p->got + ((size_t)got - off) > p->off) {
            r->mismatches++; /* more bytes back than were sent */
            return replace(r, p, NULL);
        }
        req_t *q = &p->ring[p->head & r->mask];
        size_t take = r->size - p->got;
        if (take > (size_t)got - off) take = (size_t)got - off;
        if (memcmp(r->rbuf + off, message(r, q->seq) + p->got, take) != 0) {
            r->mismatches++;
            return replace(r, p, NULL); /* out of step: a new connection */
        }
        p->got += take;
        off += take;
        if (p->got == r->size) {
            record(r, p, q, t);
            p->head++;
            p->got = 0;
        }
    }
    if (fill(r, p, t) < 0) return replace_errno(r, p, E_SEND);
    return p->fd >= 0 && io_pending(p) ? readable(r, p) : 0;
}

/* Wake at `when` (absolute CLOCK_MONOTONIC seconds) through the timerfd. */
static void arm(run_t *r, double when) {
    if (r->armed == when) return;
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)when;
    its.it_value.tv_nsec = (long)((when - (double)(time_t)when) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    timerfd_settime(r->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    r->armed = when;
}

/* Send for every slot that has come; -1 on a Python error. */
static int due(run_t *r, double t) {
    while (r->nheap && r->peers[r->heap[0]].next_slot <= t) {
        peer_t *p = &r->peers[heap_pop(r)];
        if (p->fd >= 0 && fill(r, p, t) < 0 && replace_errno(r, p, E_SEND) < 0) return -1;
    }
    return 0;
}

/* {us: count}: of n (us, count) pairs, or of a flat array of n 1-us buckets. */
static PyObject *histogram_dict(const uint32_t *us, const uint32_t *count, size_t n,
                                const uint32_t *flat) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (size_t i = 0; i < n; i++) {
        uint32_t key = flat ? (uint32_t)i : us[i], value = flat ? flat[i] : count[i];
        if (!value) continue;
        PyObject *k = PyLong_FromUnsignedLong(key), *v = PyLong_FromUnsignedLong(value);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

/* -- the run: set up, start together, the loop, the result, tear down ------------------- */

/* Allocate what the run needs for `fds` (a Python sequence of connected descriptors); 0, or
 * -1 with a Python error set. The ring of each peer holds `depth` requests (a power of 2). */
static int run_init(run_t *r, PyObject *seq, Py_ssize_t depth) {
    r->depth = r->open ? (uint64_t)depth : 1;
    uint64_t cap = 1;
    while (cap < r->depth) cap <<= 1;
    r->mask = cap - 1;
    r->n = PySequence_Fast_GET_SIZE(seq);
    r->peers = calloc((size_t)(r->n ? r->n : 1), sizeof(peer_t));
    r->heap = calloc((size_t)(r->n ? r->n : 1), sizeof(int));
    r->shist = calloc(HIST_US + 1, sizeof(uint32_t)); /* pages are touched only where used */
    r->uhist = r->open ? calloc(HIST_US + 1, sizeof(uint32_t)) : NULL;
    r->lhist = r->open ? calloc(LATENESS_US + 1, sizeof(uint32_t)) : NULL;
    r->rbuf = malloc(RBUF);
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    r->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (!r->peers || !r->heap || !r->shist || (r->open && (!r->uhist || !r->lhist)) ||
        !r->rbuf || r->ep < 0 || r->tfd < 0) {
        PyErr_NoMemory();
        return -1;
    }
    struct epoll_event te = {.events = EPOLLIN, .data.u64 = TIMER_MARK};
    epoll_ctl(r->ep, EPOLL_CTL_ADD, r->tfd, &te);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* this thread's timers: 1 ns slack, not 50 us */
    for (Py_ssize_t i = 0; i < r->n; i++) {
        peer_t *p = &r->peers[i];
        p->fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (p->fd == -1 && PyErr_Occurred()) return -1;
        p->ring = calloc((size_t)cap, sizeof(req_t));
        if (!p->ring) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

/* Sleep until SPIN_US before `start` (absolute CLOCK_MONOTONIC seconds), then poll the clock
 * to it: every process and every segment begins together. -1 on a Python signal. */
static int wait_start(double start) {
    double until = start - SPIN_US * 1e-6;
    struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
    while (now() < until) {
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        Py_END_ALLOW_THREADS
        if (err == EINTR && PyErr_CheckSignals() < 0) return -1;
    }
    while (now() < start) {
    }
    return 0;
}

/* Every peer's first slot (spread over one interval, or Poisson), and its first sends. */
static int schedule_first(run_t *r, double start) {
    r->interval = r->open ? (double)r->n / r->rate : 0.0;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        peer_t *p = &r->peers[i];
        p->next_slot = start + (r->poisson ? gap(r) : r->interval * (double)i / (double)r->n);
        if ((watch(r, p) < 0 || fill(r, p, start) < 0) && replace(r, p, E_SEND_FAILED) < 0)
            return -1;
    }
    return 0;
}

/* Every connection's handshake, before the schedule (and before the start together). */
static int handshakes(run_t *r) {
    char why[200];
    for (Py_ssize_t i = 0; r->ctx && i < r->n; i++) {
        peer_t *p = &r->peers[i];
        if (p->fd >= 0 && tls_start(r, p, why, sizeof why) < 0 && replace(r, p, why) < 0)
            return -1;
    }
    return 0;
}

/* Unanswered longer than the timeout: the server lost bytes; a new connection. Then the
 * progress callback. -1 on a Python error. */
static int check_timeouts(run_t *r, double t, PyObject *tick) {
    for (Py_ssize_t i = 0; i < r->n; i++) {
        peer_t *p = &r->peers[i];
        if (p->fd >= 0 && p->head < p->tail && p->ring[p->head & r->mask].sent < t - r->timeout &&
            replace(r, p, E_NO_COMPLETE_ANSWER) < 0)
            return -1;
    }
    PyObject *ok = PyObject_CallFunction(tick, "K", r->requests);
    if (!ok) return -1;
    Py_DECREF(ok);
    return 0;
}

/* How long epoll_wait may sleep (ms; -1: until the timerfd armed here or an echo wakes it; 0:
 * the last stretch before a slot, polled). */
static int next_wait(run_t *r, double t, double wake) {
    if (r->nheap) {
        double slot = r->peers[r->heap[0]].next_slot;
        if (slot - SPIN_US * 1e-6 < wake) wake = slot - SPIN_US * 1e-6;
    }
    if (wake <= t) return 0;
    if (r->open) {
        arm(r, wake);
        return -1;
    }
    return (int)((wake - t) * 1000) + 1;
}

/* One batch of ready events: the timer, the slots that came meanwhile, then the sends and the
 * echoes of each peer. -1 on a Python error. */
static int serve_events(run_t *r, struct epoll_event *evs, int n) {
    for (int k = 0; k < n; k++) {
        if (evs[k].data.u64 == TIMER_MARK) {
            uint64_t expirations;
            ssize_t rd = read(r->tfd, &expirations, sizeof expirations);
            (void)rd;
            r->armed = 0;
            continue;
        }
        if (r->nheap && due(r, now()) < 0) return -1; /* a slot first, then the echoes */
        peer_t *p = &r->peers[evs[k].data.u64];
        if (p->fd < 0) continue;
        if (p->writing && (evs[k].events & EPOLLOUT) && push(r, p) < 0) {
            if (replace_errno(r, p, E_SEND) < 0) return -1;
            continue;
        }
        if (!(evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
        if (readable(r, p) < 0) return -1;
    }
    return 0;
}

/* The loop, from `start` to the window's end; -1 on a Python error (or ENOMEM, set). */
static int run_loop(run_t *r, double start, double seconds, PyObject *tick) {
    double deadline = r->mstart + seconds, next_check = start + CHECK_EVERY;
    if (schedule_first(r, start) < 0) return -1;
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        double t = now();
        if (t >= deadline || r->failed) break;
        if (due(r, t) < 0) return -1;
        if (t >= next_check) {
            next_check = t + CHECK_EVERY;
            if (check_timeouts(r, t, tick) < 0) return -1;
        }
        int wait_ms = next_wait(r, t, next_check < deadline ? next_check : deadline), n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(r->ep, evs, MAX_EVENTS, wait_ms);
        Py_END_ALLOW_THREADS
        if (wait_ms == 0 && n == 0) r->spun += now() - t;
        if (n < 0) {
            if (errno != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            if (PyErr_CheckSignals() < 0) return -1;
            continue;
        }
        if (serve_events(r, evs, n) < 0) return -1;
    }
    if (r->failed) {
        errno = r->failed;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    end_second(r); /* the last (partial) second */
    return 0;
}

/* The connections' descriptors still open at the end, as a list. */
static PyObject *open_fds(run_t *r) {
    PyObject *fds = PyList_New(0);
    for (Py_ssize_t i = 0; fds && i < r->n; i++) {
        if (r->peers[i].fd < 0) continue;
        PyObject *v = PyLong_FromLong(r->peers[i].fd);
        if (!v || PyList_Append(fds, v) < 0) Py_CLEAR(fds);
        Py_XDECREF(v);
    }
    return fds;
}

/* What the run measured, as the dict the docstring names; NULL with a Python error. */
static PyObject *run_result(run_t *r, double start) {
    /* Still waiting at the end, longer than the timeout: the server lost an answer. */
    unsigned long long late = 0;
    double end = now();
    for (Py_ssize_t i = 0; i < r->n; i++) {
        peer_t *p = &r->peers[i];
        if (p->fd >= 0 && p->head < p->tail && end - p->ring[p->head & r->mask].sent > r->timeout)
            late++;
    }
    PyObject *per_second = PyList_New((Py_ssize_t)r->nseconds);
    for (size_t i = 0; per_second && i < r->nseconds; i++) {
        PyObject *d = histogram_dict(r->seconds[i].us, r->seconds[i].count, r->seconds[i].n, NULL);
        if (!d) Py_CLEAR(per_second);
        else PyList_SET_ITEM(per_second, (Py_ssize_t)i, d);
    }
    PyObject *uncorrected = r->uhist ? histogram_dict(NULL, NULL, HIST_US + 1, r->uhist)
                                     : Py_NewRef(Py_None);
    PyObject *lateness = r->lhist ? histogram_dict(NULL, NULL, LATENESS_US + 1, r->lhist)
                                  : Py_NewRef(Py_None);
    PyObject *fds = open_fds(r);
    PyObject *answers = PyList_New(r->n), *first = PyList_New(r->n);
    for (Py_ssize_t i = 0; answers && first && i < r->n; i++) {
        peer_t *p = &r->peers[i];
        PyObject *a = PyLong_FromUnsignedLongLong(p->answers);
        PyObject *f = PyFloat_FromDouble(p->answers ? p->first - r->mstart : -1.0);
        if (!a || !f) {
            Py_XDECREF(a);
            Py_XDECREF(f);
            Py_CLEAR(answers);
            break;
        }
        PyList_SET_ITEM(answers, i, a);
        PyList_SET_ITEM(first, i, f);
    }
    if (!per_second || !uncorrected || !lateness || !fds || !answers || !first) {
        Py_XDECREF(per_second);
        Py_XDECREF(uncorrected);
        Py_XDECREF(lateness);
        Py_XDECREF(fds);
        Py_XDECREF(answers);
        Py_XDECREF(first);
        return NULL;
    }
    return Py_BuildValue(
        "{sKsNsNsNsKsKsNsKsKsKsdsdsdsNsN}", "requests", r->requests, "per_second", per_second,
        "uncorrected", uncorrected, "lateness", lateness, "mismatches", r->mismatches, "late",
        late, "open_fds", fds, "late_sends", r->late_sends, "held_sends", r->held_sends, "sends",
        r->sends, "start", start, "measured_from", r->mstart, "spun", r->spun, "answers", answers,
        "first", first);
}

static void run_free(run_t *r) {
    if (r->ep >= 0) close(r->ep);
    if (r->tfd >= 0) close(r->tfd);
    if (r->peers)
        for (Py_ssize_t i = 0; i < r->n; i++) {
            tls_drop(&r->peers[i], 1); /* close_notify; Python ends the TCP with FIN */
            free(r->peers[i].ring);
        }
#ifdef SE_TLS
    SSL_CTX_free(r->ctx);
#endif
    for (size_t i = 0; i < r->nseconds; i++) {
        free(r->seconds[i].us);
        free(r->seconds[i].count);
    }
    free(r->seconds);
    free(r->touched);
    free(r->peers);
    free(r->heap);
    free(r->shist);
    free(r->uhist);
    free(r->lhist);
    free(r->rbuf);
}

/* tls=(ca_file or None, insecure, server_name, cert_file or None, key_file or None): the
 * client context, as tools/connect/target.TlsOptions.context makes Python's (TLS 1.2 at
 * least, the system's CAs or --ca, the name checked unless insecure); -1 with a Python error. */
static int tls_context(run_t *r, PyObject *tls) {
#ifdef SE_TLS
    const char *ca = NULL, *name = NULL, *cert = NULL, *key = NULL;
    int insecure = 0;
    if (!PyArg_ParseTuple(tls, "zpzzz", &ca, &insecure, &name, &cert, &key)) return -1;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        PyErr_NoMemory();
        return -1;
    }
    r->ctx = ctx;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_clear_mode(ctx, SSL_MODE_AUTO_RETRY);
    r->verify = !insecure;
    r->server_name = name;
    SSL_CTX_set_verify(ctx, insecure ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    int ok = insecure || (ca ? SSL_CTX_load_verify_locations(ctx, ca, NULL)
                             : SSL_CTX_set_default_verify_paths(ctx));
    if (ok && cert) ok = SSL_CTX_use_certificate_chain_file(ctx, cert) &&
                         SSL_CTX_use_PrivateKey_file(ctx, key ? key : cert, SSL_FILETYPE_PEM);
    if (!ok) {
        char text[160] = "unknown";
        ERR_error_string_n(ERR_get_error(), text, sizeof text);
        ERR_clear_error();
        PyErr_Format(PyExc_ValueError, "TLS context: %s", text);
        return -1;
    }
    return 0;
#else
    PyErr_SetString(PyExc_RuntimeError, "built without OpenSSL: no TLS in the C loop");
    return -1;
#endif
}

static PyObject *pingpong(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"fds",   "size",    "seconds", "timeout", "index", "base",
                             "replace", "tick",  "rate",    "poisson", "seed",  "warmup",
                             "start", "depth",   "tls",     NULL};
    PyObject *fds, *replace_cb, *tick_cb, *tls = Py_None;
    Py_buffer base;
    Py_ssize_t size, depth = 16;
    double seconds, timeout, rate = 0.0, warmup = 0.0, start = 0.0;
    int index, poisson = 0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onddiy*OO|dpKddnO", kwlist, &fds, &size,
                                     &seconds, &timeout, &index, &base, &replace_cb, &tick_cb,
                                     &rate, &poisson, &seed, &warmup, &start, &depth, &tls))
        return NULL;
    run_t r = {.index = index, .size = (size_t)size, .base = base.buf, .replace = replace_cb,
               .open = rate > 0, .rate = rate, .poisson = poisson, .timeout = timeout,
               .tfd = -1, .ep = -1, .rng = seed * 0x9E3779B97F4A7C15ULL + (uint64_t)index + 1};
    PyObject *result = NULL, *seq = NULL;
    if (size < 1 || size > MAX_SIZE || base.len < size + PATTERN_PERIOD) {
        PyErr_SetString(PyExc_ValueError, "size must be 1..MAX_SIZE and base size + 251 bytes");
        goto done;
    }
    if (depth < 1 || depth > MAX_IN_FLIGHT || !(rate >= 0) || !(warmup >= 0)) {
        PyErr_SetString(PyExc_ValueError, "depth 1..MAX_IN_FLIGHT, rate and warmup >= 0");
        goto done;
    }
    seq = PySequence_Fast(fds, "fds must be a sequence");
    if (!seq || run_init(&r, seq, depth) < 0) goto done;
    if (tls != Py_None && (tls_context(&r, tls) < 0 || handshakes(&r) < 0)) goto done;
    if (start > 0) { /* every process (and every segment) begins together */
        if (wait_start(start) < 0) goto done;
    } else {
        start = now();
    }
    r.mstart = start + warmup;
    if (run_loop(&r, start, seconds, tick_cb) == 0) result = run_result(&r, start);
done:
    run_free(&r);
    Py_XDECREF(seq);
    PyBuffer_Release(&base);
    return result;
}

static PyMethodDef methods[] = {
    {"pingpong", (PyCFunction)(void (*)(void))pingpong, METH_VARARGS | METH_KEYWORDS,
     "pingpong(fds, size, seconds, timeout, index, base, replace, tick, rate=0, poisson=False, "
     "seed=0, warmup=0, start=0, depth=16, tls=None) -> {requests, per_second: [{us: count}], "
     "uncorrected: {us: count} | None, lateness: {us: count} | None, mismatches, late, open_fds, late_sends, held_sends, "
     "sends, start, measured_from, spun, answers: [per connection], first: [s or -1]}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "socket-echo bench's ping-pong loop in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef SE_TLS
    int tls = 1;
#else
    int tls = 0;
#endif
    if (m && PyModule_AddIntConstant(m, "TLS", tls) < 0) Py_CLEAR(m);
    return m;
}
