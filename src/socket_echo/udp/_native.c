/* The native UDP data path: recvmmsg/sendmmsg batches with the reflection guard in C.
 *
 * Two types. ``Guard`` is udp/guard.py's UdpGuard, rule for rule (that file's docstring says
 * why each rule exists): forbidden and privileged source ports; multicast, broadcast,
 * unspecified and other martian sources (IPv4-mapped IPv6 judged as IPv4); a token bucket
 * per source prefix (/24, /56) in a bounded table whose least recently used tenth goes when
 * it is full (ties: oldest first, as Python's stable sort); a global bucket. Its ``check``
 * is exposed so the tests can hold the two twins to the same verdicts. ``UdpEcho`` serves
 * one socket: one recvmmsg takes up to 64 datagrams, the guard judges each, one sendmmsg
 * answers them; a full send buffer drops (counted), never queues. Counters live here and
 * Python reads them when it reports (metrics, the periodic drop line): nothing per datagram
 * reaches Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define SLOTS 64
#define SLOT_SIZE 65535
#define MAX_PORTS 64

/* Drop reasons, in the order of REASONS below (the Python names). */
enum {
    D_FORBIDDEN, D_PRIVILEGED, D_MARTIAN, D_MULTICAST, D_BROADCAST,
    D_SOURCE_RATE, D_GLOBAL_RATE, D_SEND_FULL, D_SEND_ERROR, D_RECV_ERROR, D_COUNT
};
static const char *REASONS[D_COUNT] = {
    "forbidden source port", "privileged source port", "martian source", "multicast source",
    "broadcast source", "source rate limit", "global rate limit", "send buffer full",
    "send error", "receive error",
};
#define ANSWER (-1)

typedef struct {
    uint64_t key;  /* 0 = empty slot */
    uint64_t seq;  /* insertion order: the tie-break of eviction */
    double tokens, last;
} bucket_t;

typedef struct {
    PyObject_HEAD
    double rate, burst, max_rate;
    int min_port;
    int forbidden[MAX_PORTS];
    int nforbidden;
    size_t max_sources, count, capacity; /* capacity: a power of two, >= 2 * max_sources */
    bucket_t *table;
    uint64_t seq;
    double g_tokens, g_last;
} Guard;

static uint64_t mix(uint64_t k) { /* splitmix64's finaliser: spreads prefixes over slots */
    k ^= k >> 30; k *= UINT64_C(0xbf58476d1ce4e5b9);
    k ^= k >> 27; k *= UINT64_C(0x94d049bb133111eb);
    return k ^ (k >> 31);
}

static bucket_t *find(Guard *g, uint64_t key, int insert) {
    size_t mask = g->capacity - 1, i = (size_t)mix(key) & mask;
    for (;;) {
        bucket_t *b = &g->table[i];
        if (b->key == key) return b;
        if (b->key == 0) return insert ? b : NULL;
        i = (i + 1) & mask;
    }
}

static int by_age(const void *a, const void *b) {
    const bucket_t *x = a, *y = b;
    if (x->last != y->last) return x->last < y->last ? -1 : 1;
    return x->seq < y->seq ? -1 : (x->seq > y->seq);
}

/* Drop the least recently used tenth: sort the live buckets by (last, seq), keep the rest. */
static int evict(Guard *g) {
    bucket_t *live = malloc(g->count * sizeof(bucket_t));
    if (!live) return -1;
    size_t n = 0;
    for (size_t i = 0; i < g->capacity; i++)
        if (g->table[i].key) live[n++] = g->table[i];
    qsort(live, n, sizeof(bucket_t), by_age);
    size_t gone = n / 10 ? n / 10 : 1;
    memset(g->table, 0, g->capacity * sizeof(bucket_t));
    g->count = 0;
    for (size_t i = gone; i < n; i++) {
        *find(g, live[i].key, 1) = live[i];
        g->count++;
    }
    free(live);
    return 0;
}

/* The reason a source is never answered, or -1 and its rate-limit key. */
static int classify(const unsigned char *addr, int family, uint64_t *key) {
    if (family == AF_INET6) {
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(addr, mapped, 12) == 0) {
            addr += 12;
            family = AF_INET;
        }
    }
    if (family == AF_INET) {
        unsigned a = addr[0];
        if (a >= 224 && a <= 239) return D_MULTICAST;
        if (a == 255 && addr[1] == 255 && addr[2] == 255 && addr[3] == 255) return D_BROADCAST;
        if (a == 0 || a >= 240) return D_MARTIAN;
        *key = ((uint64_t)a << 24 | (uint64_t)addr[1] << 16 | (uint64_t)addr[2] << 8) | 1;
        return -1;
    }
    if (addr[0] == 0xff) return D_MULTICAST;
    int zeros = 1; /* ::/96 (and ::) except ::1 */
    for (int i = 0; i < 12; i++) zeros &= addr[i] == 0;
    if (zeros) {
        static const unsigned char loopback[4] = {0, 0, 0, 1};
        if (memcmp(addr + 12, loopback, 4) != 0) return D_MARTIAN;
    }
    uint64_t k = 0;
    for (int i = 0; i < 7; i++) k = k << 8 | addr[i];
    *key = k << 8 | 2; /* the /56; low byte: 2 = IPv6, 1 = IPv4 */
    return -1;
}

/* One datagram from (addr, port) at now: ANSWER or a drop reason. */
static int judge(Guard *g, const unsigned char *addr, int family, int port, double now) {
    for (int i = 0; i < g->nforbidden; i++)
        if (port == g->forbidden[i]) return D_FORBIDDEN;
    if (port < g->min_port) return D_PRIVILEGED;
    uint64_t key = 0;
    int reason = classify(addr, family, &key);
    if (reason >= 0) return reason;
    bucket_t *b = find(g, key, 0);
    if (!b) {
        if (g->count >= g->max_sources && evict(g) < 0) return D_SOURCE_RATE;
        b = find(g, key, 1);
        b->key = key;
        b->seq = ++g->seq;
        b->tokens = g->burst;
        b->last = now;
        g->count++;
    }
    if (b->last != now) {
        double t = b->tokens + (now - b->last) * g->rate;
        b->tokens = t > g->burst ? g->burst : t;
        b->last = now;
    }
    if (b->tokens < 1.0) return D_SOURCE_RATE;
    if (g->g_last != now) {
        double gb = g->max_rate > 1.0 ? g->max_rate : 1.0;
        double t = g->g_tokens + (now - g->g_last) * g->max_rate;
        g->g_tokens = t > gb ? gb : t;
        g->g_last = now;
    }
    if (g->g_tokens < 1.0) return D_GLOBAL_RATE;
    b->tokens -= 1.0;
    g->g_tokens -= 1.0;
    return ANSWER;
}

static int Guard_init(Guard *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"rate", "burst", "max_rate", "min_port", "forbidden_ports",
                             "max_sources", NULL};
    PyObject *ports;
    Py_ssize_t max_sources;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dddiOn", kwlist, &self->rate, &self->burst,
                                     &self->max_rate, &self->min_port, &ports, &max_sources))
        return -1;
    if (max_sources < 1) {
        PyErr_SetString(PyExc_ValueError, "max_sources must be at least 1");
        return -1;
    }
    PyObject *seq = PySequence_Fast(ports, "forbidden_ports must be a sequence");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_PORTS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many forbidden ports");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long p = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (p == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        self->forbidden[i] = (int)p;
    }
    self->nforbidden = (int)n;
    Py_DECREF(seq);
    size_t cap = 16;
    while (cap < 2 * (size_t)max_sources) cap *= 2;
    free(self->table);
    self->table = calloc(cap, sizeof(bucket_t));
    if (!self->table) {
        PyErr_NoMemory();
        return -1;
    }
    self->capacity = cap;
    self->max_sources = (size_t)max_sources;
    self->count = 0;
    self->g_tokens = self->max_rate > 1.0 ? self->max_rate : 1.0; /* 1 s of burst */
    self->g_last = 0.0;
    return 0;
}

static void Guard_dealloc(Guard *self) {
    free(self->table);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Guard_check(Guard *self, PyObject *args) {
    Py_buffer addr;
    int family, port;
    double now;
    if (!PyArg_ParseTuple(args, "y*iid", &addr, &family, &port, &now)) return NULL;
    if ((family == AF_INET && addr.len != 4) || (family == AF_INET6 && addr.len != 16) ||
        (family != AF_INET && family != AF_INET6)) {
        PyBuffer_Release(&addr);
        PyErr_SetString(PyExc_ValueError, "address bytes do not match the family");
        return NULL;
    }
    int r = judge(self, addr.buf, family, port, now);
    PyBuffer_Release(&addr);
    if (r == ANSWER) Py_RETURN_NONE;
    return PyUnicode_FromString(REASONS[r]);
}

static PyObject *Guard_sources(Guard *self, void *closure) { return PyLong_FromSize_t(self->count); }

static PyMethodDef Guard_methods[] = {
    {"check", (PyCFunction)Guard_check, METH_VARARGS,
     "check(address_bytes, family, port, now) -> None (answer) or the reason to drop."},
    {NULL, NULL, 0, NULL},
};
static PyGetSetDef Guard_getset[] = {
    {"sources", (getter)Guard_sources, NULL, "Source prefixes whose rate is tracked.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "socket_echo.udp._native.Guard",
    .tp_basicsize = sizeof(Guard),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "udp/guard.py's UdpGuard in C: who is answered, and how often.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Guard_init,
    .tp_dealloc = (destructor)Guard_dealloc,
    .tp_methods = Guard_methods,
    .tp_getset = Guard_getset,
};

typedef struct {
    PyObject_HEAD
    Guard *guard;
    int fd, family;
    char *data; /* SLOTS x SLOT_SIZE: only the pages a datagram touches become resident */
    struct sockaddr_in6 names[SLOTS];
    struct iovec recv_iov[SLOTS], send_iov[SLOTS];
    struct mmsghdr recv[SLOTS], send[SLOTS];
    unsigned long long datagrams_in, datagrams_out, bytes_in, bytes_out;
    unsigned long long dropped[D_COUNT];
} UdpEcho;

static int UdpEcho_init(UdpEcho *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "family", "guard", NULL};
    PyObject *guard;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiO!", kwlist, &self->fd, &self->family,
                                     &GuardType, &guard))
        return -1;
    if (self->family != AF_INET && self->family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "an AF_INET or AF_INET6 socket");
        return -1;
    }
    if (!self->data && !(self->data = malloc((size_t)SLOTS * SLOT_SIZE))) {
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(guard);
    Py_XSETREF(self->guard, (Guard *)guard);
    for (int i = 0; i < SLOTS; i++) {
        self->recv_iov[i].iov_base = self->data + (size_t)i * SLOT_SIZE;
        self->recv_iov[i].iov_len = SLOT_SIZE;
        memset(&self->recv[i], 0, sizeof self->recv[i]);
        self->recv[i].msg_hdr.msg_iov = &self->recv_iov[i];
        self->recv[i].msg_hdr.msg_iovlen = 1;
        memset(&self->send[i], 0, sizeof self->send[i]);
        self->send[i].msg_hdr.msg_iov = &self->send_iov[i];
        self->send[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

static void UdpEcho_dealloc(UdpEcho *self) {
    Py_XDECREF(self->guard);
    free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *UdpEcho_run(UdpEcho *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    if (!self->guard) {
        PyErr_SetString(PyExc_ValueError, "not initialised");
        return NULL;
    }
    for (int i = 0; i < SLOTS; i++) {
        self->recv[i].msg_hdr.msg_name = &self->names[i];
        self->recv[i].msg_hdr.msg_namelen = sizeof self->names[i];
    }
    int got = recvmmsg(self->fd, self->recv, SLOTS, MSG_DONTWAIT, NULL);
    if (got < 0) {
        if (errno != EAGAIN && errno != EINTR) self->dropped[D_RECV_ERROR]++; /* e.g. ICMP */
        Py_RETURN_NONE;
    }
    int answers = 0;
    unsigned long long b_out = 0;
    for (int i = 0; i < got; i++) {
        unsigned size = self->recv[i].msg_len;
        self->bytes_in += size;
        const unsigned char *addr;
        int port;
        if (self->family == AF_INET) {
            struct sockaddr_in *sa = (struct sockaddr_in *)&self->names[i];
            addr = (const unsigned char *)&sa->sin_addr;
            port = ntohs(sa->sin_port);
        } else {
            struct sockaddr_in6 *sa = &self->names[i];
            addr = (const unsigned char *)&sa->sin6_addr;
            port = ntohs(sa->sin6_port);
        }
        int verdict = judge(self->guard, addr, self->family, port, now);
        if (verdict != ANSWER) {
            self->dropped[verdict]++;
            continue;
        }
        struct mmsghdr *out = &self->send[answers];
        out->msg_hdr.msg_name = &self->names[i];
        out->msg_hdr.msg_namelen = self->recv[i].msg_hdr.msg_namelen;
        self->send_iov[answers].iov_base = self->recv_iov[i].iov_base;
        self->send_iov[answers].iov_len = size;
        b_out += size;
        answers++;
    }
    self->datagrams_in += (unsigned)got;
    int next = 0, delivered = 0;
    while (next < answers) {
        int n = sendmmsg(self->fd, self->send + next, (unsigned)(answers - next), MSG_DONTWAIT);
        if (n > 0) {
            next += n;
            delivered += n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == ENOBUFS)) { /* full: drop, never queue */
            for (int i = next; i < answers; i++) b_out -= self->send_iov[i].iov_len;
            self->dropped[D_SEND_FULL] += (unsigned)(answers - next);
            break;
        }
        b_out -= self->send_iov[next].iov_len; /* this one failed; go on with the next */
        self->dropped[D_SEND_ERROR]++;
        next++;
    }
    self->datagrams_out += (unsigned)delivered;
    self->bytes_out += b_out;
    Py_RETURN_NONE;
}

static PyObject *UdpEcho_counters(UdpEcho *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *drops = PyDict_New();
    if (!drops) return NULL;
    for (int i = 0; i < D_COUNT; i++) {
        if (!self->dropped[i]) continue;
        PyObject *v = PyLong_FromUnsignedLongLong(self->dropped[i]);
        if (!v || PyDict_SetItemString(drops, REASONS[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(drops);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("(KKKKN)", self->datagrams_in, self->datagrams_out, self->bytes_in,
                         self->bytes_out, drops);
}

static PyMethodDef UdpEcho_methods[] = {
    {"run", (PyCFunction)UdpEcho_run, METH_O,
     "run(now): one recvmmsg, the guard over the batch, one sendmmsg."},
    {"counters", (PyCFunction)UdpEcho_counters, METH_NOARGS,
     "(datagrams_in, datagrams_out, bytes_in, bytes_out, {drop reason: count})."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject UdpEchoType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "socket_echo.udp._native.UdpEcho",
    .tp_basicsize = sizeof(UdpEcho),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "UDP echo of one socket: recvmmsg, the guard, sendmmsg.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)UdpEcho_init,
    .tp_dealloc = (destructor)UdpEcho_dealloc,
    .tp_methods = UdpEcho_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "socket-echo's native UDP data path.", -1, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&GuardType) < 0 || PyType_Ready(&UdpEchoType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&GuardType);
    Py_INCREF(&UdpEchoType);
    if (PyModule_AddObject(m, "Guard", (PyObject *)&GuardType) < 0 ||
        PyModule_AddObject(m, "UdpEcho", (PyObject *)&UdpEchoType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
