/* The bench tool's closed-loop ping-pong in C, so that the load generator is never the limit.
 *
 * tools/bench.py opens the connections and keeps every decision that is not per message:
 * replacing a connection that failed (its callback), the progress display (another callback,
 * ten times a second), the report. Here, per message: epoll_wait, recv until the whole echo is
 * back, compare it with what was sent (Patterns' bytes: the buffer Python made), count its
 * latency in microseconds, send the next one. The same rules as the Python loop: one message
 * in flight per connection, a connection that answers wrongly or not within the timeout is
 * replaced, latency counts from the send.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define HIST_US 10000000 /* 1 us buckets up to 10 s; slower answers count as 10 s */
#define CHECK_EVERY 0.1

typedef struct {
    int fd;
    uint64_t seq;
    size_t sent, got;
    double t0;
    const unsigned char *expected;
    unsigned char *buf;
} peer_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct {
    int ep, index;
    size_t size;
    const unsigned char *base;
    peer_t *peers;
    Py_ssize_t n;
    uint32_t *hist;
    unsigned long long requests, mismatches;
    PyObject *replace;
} run_t;

/* Send the rest of the current message; -1 on an error (errno set). */
static int push(run_t *r, peer_t *p) {
    while (p->sent < r->size) {
        ssize_t w = send(p->fd, p->expected + p->sent, r->size - p->sent, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                struct epoll_event e = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)(p - r->peers)};
                epoll_ctl(r->ep, EPOLL_CTL_MOD, p->fd, &e);
                return 0;
            }
            return -1;
        }
        p->sent += (size_t)w;
    }
    return 0;
}

static int next_message(run_t *r, peer_t *p, double t) {
    p->seq++;
    p->expected = r->base + (p->seq * 7 + (uint64_t)r->index) % 251;
    p->sent = p->got = 0;
    p->t0 = t;
    return push(r, p);
}

static int watch(run_t *r, peer_t *p) {
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = (uint64_t)(p - r->peers)};
    return epoll_ctl(r->ep, EPOLL_CTL_ADD, p->fd, &e);
}

static void read_only(run_t *r, peer_t *p) { /* the message is out: wait for its echo */
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = (uint64_t)(p - r->peers)};
    epoll_ctl(r->ep, EPOLL_CTL_MOD, p->fd, &e);
}

/* Ask Python for a new connection in place of this one (reason None: already counted). */
static int replace(run_t *r, peer_t *p, const char *reason) {
    int old = p->fd;
    epoll_ctl(r->ep, EPOLL_CTL_DEL, old, NULL);
    PyObject *res = PyObject_CallFunction(r->replace, "is", old, reason);
    if (!res) return -1;
    long fd = PyLong_AsLong(res);
    Py_DECREF(res);
    if (fd == -1 && PyErr_Occurred()) return -1;
    p->fd = (int)fd;
    if (fd < 0) return 0; /* none to be had: this slot rests */
    if (watch(r, p) < 0) return replace(r, p, "register: epoll_ctl failed");
    if (next_message(r, p, now()) < 0) return replace(r, p, "send failed");
    return 0;
}

static PyObject *pingpong(PyObject *self, PyObject *args) {
    PyObject *fds, *replace_cb, *tick_cb;
    Py_buffer base;
    Py_ssize_t size;
    double seconds, timeout;
    int index;
    if (!PyArg_ParseTuple(args, "Onddiy*OO", &fds, &size, &seconds, &timeout, &index, &base,
                          &replace_cb, &tick_cb))
        return NULL;
    run_t r = {.index = index, .size = (size_t)size, .base = base.buf, .replace = replace_cb};
    PyObject *result = NULL, *seq = NULL;
    if (size < 1 || size > 65536 || base.len < size + 251) {
        PyErr_SetString(PyExc_ValueError, "size must be 1..65536 and base size + 251 bytes");
        goto done;
    }
    seq = PySequence_Fast(fds, "fds must be a sequence");
    if (!seq) goto done;
    r.n = PySequence_Fast_GET_SIZE(seq);
    r.peers = calloc((size_t)(r.n ? r.n : 1), sizeof(peer_t));
    r.hist = calloc(HIST_US + 1, sizeof(uint32_t));
    r.ep = epoll_create1(EPOLL_CLOEXEC);
    if (!r.peers || !r.hist || r.ep < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < r.n; i++) {
        peer_t *p = &r.peers[i];
        p->fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (p->fd == -1 && PyErr_Occurred()) goto done;
        p->buf = malloc((size_t)size);
        if (!p->buf) {
            PyErr_NoMemory();
            goto done;
        }
    }
    double start = now(), deadline = start + seconds, next_check = start + CHECK_EVERY;
    for (Py_ssize_t i = 0; i < r.n; i++) {
        peer_t *p = &r.peers[i];
        if (watch(&r, p) < 0 || next_message(&r, p, start) < 0) {
            if (replace(&r, p, "send failed") < 0) goto done;
        }
    }
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        double t = now();
        if (t >= deadline) break;
        if (t >= next_check) { /* unanswered this long: the server lost bytes */
            next_check = t + CHECK_EVERY;
            for (Py_ssize_t i = 0; i < r.n; i++) {
                peer_t *p = &r.peers[i];
                if (p->fd >= 0 && p->t0 < t - timeout &&
                    replace(&r, p, "no complete answer within the timeout") < 0)
                    goto done;
            }
            PyObject *ok = PyObject_CallFunction(tick_cb, "K", r.requests);
            if (!ok) goto done;
            Py_DECREF(ok);
        }
        double wait = deadline - t < CHECK_EVERY ? deadline - t : CHECK_EVERY;
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(r.ep, evs, MAX_EVENTS, (int)(wait * 1000) + 1);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) goto done;
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        for (int k = 0; k < n; k++) {
            peer_t *p = &r.peers[evs[k].data.u64];
            if (p->fd < 0) continue;
            if (p->sent < r.size && (evs[k].events & EPOLLOUT)) {
                if (push(&r, p) < 0) {
                    char why[96];
                    snprintf(why, sizeof why, "send: %s", strerror(errno));
                    if (replace(&r, p, why) < 0) goto done;
                    continue;
                }
                if (p->sent == r.size) read_only(&r, p);
            }
            if (!(evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            ssize_t got = recv(p->fd, p->buf + p->got, r.size - p->got, 0);
            if (got < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                char why[96];
                snprintf(why, sizeof why, "recv: %s", strerror(errno));
                if (replace(&r, p, why) < 0) goto done;
                continue;
            }
            if (got == 0) {
                if (replace(&r, p, "closed by server") < 0) goto done;
                continue;
            }
            p->got += (size_t)got;
            if (p->got < r.size) continue;
            double done_at = now();
            if (memcmp(p->buf, p->expected, r.size) != 0) {
                r.mismatches++;
                if (replace(&r, p, NULL) < 0) goto done; /* out of step: a new connection */
                continue;
            }
            uint64_t us = (uint64_t)((done_at - p->t0) * 1e6);
            r.hist[us > HIST_US ? HIST_US : us]++;
            r.requests++;
            if (next_message(&r, p, done_at) < 0) {
                char why[96];
                snprintf(why, sizeof why, "send: %s", strerror(errno));
                if (replace(&r, p, why) < 0) goto done;
            }
        }
    }
    /* Still waiting at the end, longer than the timeout: the server lost an answer. */
    unsigned long long late = 0;
    double end = now();
    for (Py_ssize_t i = 0; i < r.n; i++)
        if (r.peers[i].fd >= 0 && end - r.peers[i].t0 > timeout) late++;
    PyObject *latency = PyDict_New();
    if (!latency) goto done;
    for (uint64_t us = 0; us <= HIST_US; us++) {
        if (!r.hist[us]) continue;
        PyObject *k = PyLong_FromUnsignedLongLong(us), *v = PyLong_FromUnsignedLong(r.hist[us]);
        if (!k || !v || PyDict_SetItem(latency, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(latency);
            goto done;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    PyObject *open_fds = PyList_New(0);
    if (!open_fds) {
        Py_DECREF(latency);
        goto done;
    }
    for (Py_ssize_t i = 0; i < r.n; i++) {
        if (r.peers[i].fd < 0) continue;
        PyObject *v = PyLong_FromLong(r.peers[i].fd);
        if (!v || PyList_Append(open_fds, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(latency);
            Py_DECREF(open_fds);
            goto done;
        }
        Py_DECREF(v);
    }
    result = Py_BuildValue("(KNKKN)", r.requests, latency, r.mismatches, late, open_fds);
done:
    if (r.ep > 0) close(r.ep);
    if (r.peers)
        for (Py_ssize_t i = 0; i < r.n; i++) free(r.peers[i].buf);
    free(r.peers);
    free(r.hist);
    Py_XDECREF(seq);
    PyBuffer_Release(&base);
    return result;
}

static PyMethodDef methods[] = {
    {"pingpong", pingpong, METH_VARARGS,
     "pingpong(fds, size, seconds, timeout, index, base, replace, tick) -> "
     "(requests, {latency_us: count}, mismatches, late, open_fds)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "socket-echo bench's ping-pong loop in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
