/* The CPython binding of the native TCP engine (engine.c, engine.h: pure C, no Python.h).
 *
 * An Engine object owns one engine_t. Every method takes the engine's mutex only around C
 * (LOCKED) and makes Python objects after it: what the thread queued is moved out under the
 * lock (move_told, as libuv's uv__work_done moves its queue) and built into tuples here,
 * holding the GIL and no lock, so the thread never waits for Python.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    engine_t e;
} Engine;

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

static int Engine_init(Engine *py, PyObject *args, PyObject *kwds) {
    engine_t *self = &py->e;
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
    Engine *py = (Engine *)type->tp_alloc(type, 0);
    if (!py) return NULL;
    engine_t *self = &py->e;
    self->ep = self->wake_fd = self->notify_fd = -1;
    pthread_mutex_init(&self->mu, NULL);
    return (PyObject *)py;
}

/* Stop the thread and wait for it (it never takes the GIL: joining with it held is safe,
 * but other Python threads may run meanwhile). */
static void stop_thread(Engine *py) {
    engine_t *self = &py->e;
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

static void close_everything(Engine *py) {
    engine_t *self = &py->e;
    for (size_t fd = 0; fd < self->capacity; fd++)
        if (self->conns[fd].state != FREE) release(self, (int)fd);
    if (self->ep >= 0) close(self->ep);
    self->ep = -1;
}

static void Engine_dealloc(Engine *py) {
    engine_t *self = &py->e;
    stop_thread(py);
    close_everything(py);
    if (self->wake_fd >= 0) close(self->wake_fd);
    if (self->notify_fd >= 0) close(self->notify_fd);
    free(self->conns);
    free(self->buf);
    free(self->queue);
    free(self->told.queue);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(py)->tp_free((PyObject *)py);
}

static int check_open(Engine *py) {
    engine_t *self = &py->e;
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

static PyObject *Engine_fileno(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    return PyLong_FromLong(self->notify_fd);
}

static PyObject *Engine_start(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    if (check_open(py) < 0) return NULL;
    if (self->running) Py_RETURN_NONE;
    int err = pthread_create(&self->thread, NULL, engine_thread, self);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_add_listener(Engine *py, PyObject *args) {
    engine_t *self = &py->e;
    int fd, tag, failed = 0;
    if (!PyArg_ParseTuple(args, "ii", &fd, &tag) || check_open(py) < 0) return NULL;
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

static PyObject *Engine_stop_accepting(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    if (check_open(py) < 0) return NULL;
    LOCKED({
        for (int i = 0; i < self->nlisteners; i++)
            epoll_ctl(self->ep, EPOLL_CTL_DEL, self->listeners[i], NULL);
        self->nlisteners = 0;
        self->accepting = 0;
    });
    Py_RETURN_NONE;
}

static PyObject *Engine_resume_accepting(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    if (check_open(py) < 0) return NULL;
    LOCKED({
        if (self->paused && self->accepting) set_listeners(self, EPOLLIN);
        self->paused = 0;
    });
    Py_RETURN_NONE;
}

static PyObject *Engine_close(Engine *py, PyObject *arg) {
    engine_t *self = &py->e;
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

static PyObject *Engine_abort(Engine *py, PyObject *arg) {
    engine_t *self = &py->e;
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
static int read_counters(Engine *py, PyObject *arg, uint64_t out[4]) {
    engine_t *self = &py->e;
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

static PyObject *Engine_counters(Engine *py, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(py, arg, v) < 0) return NULL;
    return Py_BuildValue("(KKK)", (unsigned long long)v[0], (unsigned long long)v[1],
                         (unsigned long long)v[2]);
}

static PyObject *Engine_activity(Engine *py, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(py, arg, v) < 0) return NULL;
    /* bytes in + bytes the peer took (in - held - unacked) + drains: a slow reader is
     * progress too (lifecycle.activity is the one rule; this is its twin) */
    return PyLong_FromUnsignedLongLong(2 * v[0] - v[2] - v[3] + v[1]);
}

static PyObject *Engine_held(Engine *py, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(py, arg, v) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(v[2]);
}

static PyObject *Engine_bytes_in(Engine *py, PyObject *arg) {
    uint64_t v[4];
    if (read_counters(py, arg, v) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(v[0]);
}

static PyObject *Engine_set_table(Engine *py, PyObject *args) {
    engine_t *self = &py->e;
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

static PyObject *Engine_set_others(Engine *py, PyObject *arg) {
    engine_t *self = &py->e;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    LOCKED(self->others = n < 0 ? 0 : n);
    Py_RETURN_NONE;
}

static PyObject *Engine_open_count(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    Py_ssize_t n;
    LOCKED(n = self->open_here);
    return PyLong_FromSsize_t(n);
}

/* ``told`` as a list of Python event tuples, emptied; NULL on a Python error (kept then).
 * Called without the mutex. */
static PyObject *build_told(Engine *py) {
    engine_t *self = &py->e;
    reported_t *t = &self->told;
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
        closed_sums_t *g = &t->gone[i];
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

static PyObject *Engine_take(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    int failed;
    LOCKED(failed = move_told(self));
    if (failed) return failed_error(failed);
    return build_told(py);
}

/* (events, [(handle, tag, opened_at)]): what was queued, and the connections Python has no
 * object for, listed from now on (their close is an EV_CLOSED). One snapshot: the events
 * come first, so a close queued for a reused descriptor is heard before its new tenant. The
 * connections are copied out under the mutex; their Python objects are made after it. */
static PyObject *Engine_take_all(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
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
    if (!(events = build_told(py)) || !(listed = PyList_New((Py_ssize_t)n))) goto done;
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

/* (events, [(tag, connections, bytes_in, bytes_out)]): what was queued, and the sums of the
 * open connections Python has no object for, per listener, leaving them unlisted; one
 * snapshot, so a connection that closes meanwhile is in the sums or in the events, never in
 * neither (a scrape's counters never step back). What a scrape counts: listing them all would
 * end the unlisted mode for every one. */
static PyObject *Engine_unlisted_sums(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    Py_ssize_t count[MAX_LISTENERS] = {0};
    unsigned long long in[MAX_LISTENERS] = {0}, held[MAX_LISTENERS] = {0};
    int failed;
    LOCKED({
        failed = move_told(self);
        Py_ssize_t left = self->unlisted;
        for (size_t fd = 0; !failed && fd < self->capacity && left > 0; fd++) {
            conn_t *c = &self->conns[fd];
            if (c->state == FREE || !c->unlisted || c->tag >= MAX_LISTENERS) continue;
            left--;
            count[c->tag]++;
            in[c->tag] += c->bytes_in;
            held[c->tag] += (c->pending ? c->len - c->off : 0) + c->piped;
        }
    });
    if (failed) return failed_error(failed);
    PyObject *events = build_told(py), *sums = events ? PyList_New(0) : NULL;
    for (int t = 0; sums && t < MAX_LISTENERS; t++) {
        if (!count[t]) continue;
        PyObject *item = Py_BuildValue("(inKK)", t, count[t], in[t], in[t] - held[t]);
        if (!item || PyList_Append(sums, item) < 0) Py_CLEAR(sums);
        Py_XDECREF(item);
    }
    PyObject *out = sums ? PyTuple_Pack(2, events, sums) : NULL;
    Py_XDECREF(events);
    Py_XDECREF(sums);
    return out;
}

static PyObject *Engine_shutdown(Engine *py, PyObject *Py_UNUSED(ignored)) {
    engine_t *self = &py->e;
    stop_thread(py);
    close_everything(py);
    self->nlisteners = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *py, PyObject *Py_UNUSED(ignored)) {
    stop_thread(py);
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
     "(take(), [(tag, connections, bytes_in, bytes_out)] of the open unlisted connections)."},
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
