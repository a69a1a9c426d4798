/* The CPython binding of the native TCP engine (engine.c, engine.h: pure C, no Python.h).
 *
 * An Engine object owns one engine_t and touches it only through engine.h's se_ functions
 * (each takes the engine's mutex around C alone); it parses arguments and makes Python
 * objects after: what the thread queued is moved out under the lock (se_take, as libuv's
 * uv__work_done moves its queue) and built into tuples here, holding the GIL and no lock,
 * so the thread never waits for Python. Count is the process's one open-connection count.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    engine_t e;
    PyObject *count; /* the Count it admits against (se_set_table), kept alive while it runs */
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

/* The process's one open-connection count (engine.h's se_count_t), shared by every engine
 * and every Python path: limits.ConnectionTable admits against it (limits.OpenCount is the
 * twin where the extension is not built). */
typedef struct {
    PyObject_HEAD
    se_count_t c;
} Count;

static PyObject *Count_take(Count *self, PyObject *args) {
    long max_connections, fd_budget;
    if (!PyArg_ParseTuple(args, "ll", &max_connections, &fd_budget)) return NULL;
    return PyLong_FromLong(se_count_take(&self->c, max_connections, fd_budget));
}

static PyObject *Count_give(Count *self, PyObject *Py_UNUSED(ignored)) {
    se_count_give(&self->c);
    Py_RETURN_NONE;
}

static PyObject *Count_value(Count *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(se_count_open(&self->c));
}

static PyMethodDef Count_methods[] = {
    {"take", (PyCFunction)Count_take, METH_VARARGS,
     "take(max_connections, fd_budget) -> 0 (admitted), 1 (over the cap), 2 (over the budget)."},
    {"give", (PyCFunction)Count_give, METH_NOARGS, "A connection admitted by take() is gone."},
    {"value", (PyCFunction)Count_value, METH_NOARGS, "Open connections, every path's."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CountType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "socket_echo.tcp._native.Count",
    .tp_basicsize = sizeof(Count),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The process's open-connection count, one atomic number every path admits against.",
    .tp_new = PyType_GenericNew,
    .tp_methods = Count_methods,
};

static PyObject *from_errno(int err) {
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int Engine_init(Engine *py, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"read_size", "want_peers", NULL};
    Py_ssize_t read_size = 65536;
    int want_peers = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|np", kwlist, &read_size, &want_peers))
        return -1;
    if (read_size < 1) {
        PyErr_SetString(PyExc_ValueError, "read_size must be at least 1");
        return -1;
    }
    int err = se_init(&py->e, (size_t)read_size, want_peers);
    if (err == EALREADY) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    if (err) {
        from_errno(err);
        return -1;
    }
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Engine *py = (Engine *)type->tp_alloc(type, 0);
    if (!py) return NULL;
    se_preinit(&py->e);
    py->count = NULL;
    return (PyObject *)py;
}

/* Stop the thread and wait for it (it never takes the GIL: other Python threads may run
 * meanwhile). */
static void stop_thread(Engine *py) {
    Py_BEGIN_ALLOW_THREADS
    se_stop(&py->e);
    Py_END_ALLOW_THREADS
}

static void Engine_dealloc(Engine *py) {
    stop_thread(py);
    se_destroy(&py->e);
    Py_CLEAR(py->count); /* after the engine: its thread and its closes use the count */
    Py_TYPE(py)->tp_free((PyObject *)py);
}

static int check_open(Engine *py) {
    if (!se_is_open(&py->e)) {
        PyErr_SetString(PyExc_ValueError, "the engine is shut down");
        return -1;
    }
    return 0;
}

static int handle_arg(PyObject *arg, unsigned long long *handle) {
    *handle = PyLong_AsUnsignedLongLong(arg);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *Engine_fileno(Engine *py, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(py->e.notify_fd);
}

static PyObject *Engine_start(Engine *py, PyObject *Py_UNUSED(ignored)) {
    if (check_open(py) < 0) return NULL;
    int err = se_start(&py->e);
    if (err) return from_errno(err);
    Py_RETURN_NONE;
}

static PyObject *Engine_add_listener(Engine *py, PyObject *args) {
    int fd, tag;
    if (!PyArg_ParseTuple(args, "ii", &fd, &tag) || check_open(py) < 0) return NULL;
    int err = se_add_listener(&py->e, fd, tag);
    if (err == EINVAL) {
        PyErr_SetString(PyExc_ValueError, "too many listeners");
        return NULL;
    }
    if (err) return from_errno(err);
    Py_RETURN_NONE;
}

static PyObject *Engine_stop_accepting(Engine *py, PyObject *Py_UNUSED(ignored)) {
    if (check_open(py) < 0) return NULL;
    se_stop_accepting(&py->e);
    Py_RETURN_NONE;
}

static PyObject *Engine_close(Engine *py, PyObject *arg) {
    unsigned long long handle;
    if (handle_arg(arg, &handle) < 0) return NULL;
    return PyBool_FromLong(se_close(&py->e, handle));
}

static PyObject *Engine_abort(Engine *py, PyObject *arg) {
    unsigned long long handle;
    uint64_t bytes_in = 0;
    size_t unsent = 0;
    if (handle_arg(arg, &handle) < 0) return NULL;
    if (!se_abort(&py->e, handle, &bytes_in, &unsent)) Py_RETURN_NONE;
    return Py_BuildValue("(Kn)", (unsigned long long)bytes_in, (Py_ssize_t)unsent);
}

static PyObject *Engine_activity(Engine *py, PyObject *arg) {
    unsigned long long handle;
    se_counters_t v;
    if (handle_arg(arg, &handle) < 0) return NULL;
    se_counters(&py->e, handle, &v);
    return PyLong_FromUnsignedLongLong(v.activity);
}

static PyObject *Engine_held(Engine *py, PyObject *arg) {
    unsigned long long handle;
    se_counters_t v;
    if (handle_arg(arg, &handle) < 0) return NULL;
    se_counters(&py->e, handle, &v);
    return PyLong_FromUnsignedLongLong(v.held);
}

static PyObject *Engine_bytes_in(Engine *py, PyObject *arg) {
    unsigned long long handle;
    se_counters_t v;
    if (handle_arg(arg, &handle) < 0) return NULL;
    se_counters(&py->e, handle, &v);
    return PyLong_FromUnsignedLongLong(v.bytes_in);
}

static PyObject *Engine_set_table(Engine *py, PyObject *args) {
    PyObject *count, *bounds;
    long fd_budget, max_connections;
    double idle_timeout, sweep_every, retry_after;
    if (!PyArg_ParseTuple(args, "O!llO!ddd", &CountType, &count, &fd_budget, &max_connections,
                          &PyTuple_Type, &bounds, &idle_timeout, &sweep_every, &retry_after))
        return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds);
    if (nb > MAX_BOUNDS) {
        PyErr_SetString(PyExc_ValueError, "too many duration buckets");
        return NULL;
    }
    if (py->count && py->count != count) {
        PyErr_SetString(PyExc_RuntimeError, "the engine admits against one count for its life");
        return NULL;
    }
    double values[MAX_BOUNDS];
    for (Py_ssize_t i = 0; i < nb; i++) {
        values[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (values[i] == -1.0 && PyErr_Occurred()) return NULL;
    }
    if (!py->count) {
        Py_INCREF(count);
        py->count = count;
    }
    se_set_table(&py->e, &((Count *)count)->c, fd_budget, max_connections, values, (int)nb,
                 idle_timeout, sweep_every, retry_after);
    Py_RETURN_NONE;
}

static PyObject *Engine_sweep(Engine *py, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    se_sweep(&py->e, now);
    Py_RETURN_NONE;
}

/* ``told`` as a list of Python event tuples, emptied; NULL on a Python error (kept then).
 * Called without the mutex. */
static PyObject *build_told(Engine *py) {
    reported_t *t = &py->e.told;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (size_t i = 0; i < t->queued; i++) {
        event_t *e = &t->queue[i];
        PyObject *item;
        if (e->kind == EV_OPENED) {
            PyObject *peer = peer_of(&e->peer);
            item = peer ? Py_BuildValue("(iKiNd)", EV_OPENED, se_handle_of(e->fd, e->gen),
                                        (int)e->tag, peer, e->opened_at)
                        : NULL;
        } else if (e->kind == EV_CLOSED) {
            item = Py_BuildValue("(iKiiKn)", EV_CLOSED, se_handle_of(e->fd, e->gen), (int)e->reason,
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
        PyObject *buckets = PyTuple_New(py->e.nbounds + 1);
        if (!buckets) goto fail;
        for (int b = 0; b <= py->e.nbounds; b++) {
            PyObject *v = PyLong_FromSsize_t(g->buckets[b]);
            if (!v) {
                Py_DECREF(buckets);
                goto fail;
            }
            PyTuple_SET_ITEM(buckets, b, v);
        }
        PyObject *item = Py_BuildValue("(iin(nnnnn)KKNd)", EV_GONE, i, g->count,
                                       g->closed[R_PEER_CLOSED], g->closed[R_RESET],
                                       g->closed[R_ERROR], g->closed[R_IDLE],
                                       g->closed[R_STALLED], g->bytes_in, g->bytes_out,
                                       buckets, g->duration_sum);
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

static PyObject *Engine_take(Engine *py, PyObject *Py_UNUSED(ignored)) {
    int failed = se_take(&py->e);
    if (failed) return from_errno(failed);
    return build_told(py);
}

/* (events, [(handle, tag, opened_at)]): what was queued, and the connections Python has no
 * object for, listed from now on (their close is an EV_CLOSED). One snapshot: the events
 * come first, so a close queued for a reused descriptor is heard before its new tenant. */
static PyObject *Engine_take_all(Engine *py, PyObject *Py_UNUSED(ignored)) {
    PyObject *events = NULL, *listed = NULL, *out = NULL;
    listed_t *copied = NULL;
    size_t n = 0;
    int failed = se_take_all(&py->e, &copied, &n);
    if (failed) return from_errno(failed);
    if (!(events = build_told(py)) || !(listed = PyList_New((Py_ssize_t)n))) goto done;
    for (size_t i = 0; i < n; i++) {
        PyObject *item = Py_BuildValue("(Kid)", copied[i].handle, copied[i].tag,
                                       copied[i].opened_at);
        if (!item) goto done;
        PyList_SET_ITEM(listed, (Py_ssize_t)i, item);
    }
    out = PyTuple_Pack(2, events, listed);
done:
    if (!out && n) se_relist(&py->e, copied, n); /* not listed after all: as they were */
    free(copied);
    Py_XDECREF(events);
    Py_XDECREF(listed);
    return out;
}

/* (events, [(tag, connections, bytes_in, bytes_out)]): what was queued, and the sums of the
 * open connections Python has no object for, per listener, leaving them unlisted; one
 * snapshot, so a connection that closes meanwhile is in the sums or in the events, never in
 * neither (a scrape's counters never step back). */
static PyObject *Engine_unlisted_sums(Engine *py, PyObject *Py_UNUSED(ignored)) {
    open_sums_t sums[MAX_LISTENERS];
    int failed = se_unlisted_sums(&py->e, sums);
    if (failed) return from_errno(failed);
    PyObject *events = build_told(py), *list = events ? PyList_New(0) : NULL;
    for (int t = 0; list && t < MAX_LISTENERS; t++) {
        if (!sums[t].count) continue;
        PyObject *item = Py_BuildValue("(inKK)", t, sums[t].count, sums[t].bytes_in,
                                       sums[t].bytes_out);
        if (!item || PyList_Append(list, item) < 0) Py_CLEAR(list);
        Py_XDECREF(item);
    }
    PyObject *out = list ? PyTuple_Pack(2, events, list) : NULL;
    Py_XDECREF(events);
    Py_XDECREF(list);
    return out;
}

static PyObject *Engine_shutdown(Engine *py, PyObject *Py_UNUSED(ignored)) {
    stop_thread(py);
    se_close_all(&py->e);
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
    {"close", (PyCFunction)Engine_close, METH_O,
     "close(handle): echo no more, deliver what is held, FIN, wait for the peer."},
    {"abort", (PyCFunction)Engine_abort, METH_O,
     "abort(handle) -> (bytes_in, unsent) or None: reset now."},
    {"activity", (PyCFunction)Engine_activity, METH_O,
     "activity(handle) -> 2 * bytes_in - held - unacked + drains (lifecycle.activity)."},
    {"held", (PyCFunction)Engine_held, METH_O, "held(handle) -> echo bytes not yet sent."},
    {"bytes_in", (PyCFunction)Engine_bytes_in, METH_O, "bytes_in(handle) -> bytes received."},
    {"set_table", (PyCFunction)Engine_set_table, METH_VARARGS,
     "set_table(count, fd_budget, max_connections, duration_bounds, idle_timeout, "
     "sweep_every, retry_after): the count it admits against, the table's limits, buckets, "
     "sweep, and how long accepting pauses on EMFILE."},
    {"sweep", (PyCFunction)Engine_sweep, METH_O,
     "sweep(now): one look of the idle/stall sweep at monotonic time now (the thread's own "
     "runs every sweep_every s)."},
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
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&CountType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    Py_INCREF(&CountType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "Count", (PyObject *)&CountType) < 0 ||
        PyModule_AddIntConstant(m, "OPENED", EV_OPENED) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", EV_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "PAUSED", EV_PAUSED) < 0 ||
        PyModule_AddIntConstant(m, "GONE", EV_GONE) < 0 ||
        PyModule_AddIntConstant(m, "REFUSED", EV_REFUSED) < 0 ||
        PyModule_AddIntConstant(m, "PEER_CLOSED", R_PEER_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "RESET", R_RESET) < 0 ||
        PyModule_AddIntConstant(m, "ERROR", R_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "IDLE", R_IDLE) < 0 ||
        PyModule_AddIntConstant(m, "STALLED", R_STALLED) < 0 ||
        PyModule_AddIntConstant(m, "ADMITTED", SE_ADMITTED) < 0 ||
        PyModule_AddIntConstant(m, "OVER_CAP", SE_OVER_CAP) < 0 ||
        PyModule_AddIntConstant(m, "OVER_BUDGET", SE_OVER_BUDGET) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
