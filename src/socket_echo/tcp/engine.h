/* The native TCP engine (engine.c): pure C, no Python.h, so that "no Python call in the
 * engine's thread" is a fact of the build. tcp/_native.c is the CPython binding: it owns an
 * engine_t, calls these under the engine's mutex, and makes the Python objects after it. */
#ifndef SOCKET_ECHO_TCP_ENGINE_H
#define SOCKET_ECHO_TCP_ENGINE_H

#include <netinet/in.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

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
    ssize_t count, closed[3]; /* by R_* reason */
    unsigned long long bytes_in, bytes_out;
    ssize_t buckets[MAX_BOUNDS + 1];
    double duration_sum;
} closed_sums_t;

/* What was told, moved out of the engine under its mutex and made into Python objects after
 * unlocking it (libuv's uv__work_done moves its queue the same way): the thread never waits
 * while Python builds lists, raises or collects garbage. Only the GIL holder touches it; what
 * could not be built (a MemoryError) stays here for the next take. */
typedef struct {
    event_t *queue;
    size_t queued, cap;
    closed_sums_t gone[MAX_LISTENERS];
    ssize_t refused_cap, refused_budget;
} reported_t;

/* A connection listed by take_all, copied out under the mutex. */
typedef struct {
    unsigned long long handle;
    int tag;
    double opened_at;
} listed_t;

typedef struct engine {
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
    ssize_t others, open_here, unlisted;
    ssize_t fd_budget, max_connections; /* the table's two limits */
    ssize_t pipes;                      /* spliced connections: two descriptors more each */
    ssize_t refused_cap, refused_budget;
    int lazy; /* no per-connection log lines: no EV_OPENED, connections start unlisted */
    /* Connections that closed unlisted, summed per listener tag until Python takes them
     * (limits.ConnectionTable.count_gone). Durations in the buckets Python gave
     * (limits.DURATION_BUCKETS). */
    closed_sums_t gone[MAX_LISTENERS];
    double untold_since; /* when the oldest untold sum or refusal began; 0: none */
    double bounds[MAX_BOUNDS];
    int nbounds;
    int nlisteners;
    int accepting;
    int paused;
    int want_peers;
    uint32_t next_gen;
    reported_t told; /* Python's side (the binding, holding the GIL): no lock */
} engine_t;

unsigned long long handle_of(int fd, uint32_t gen);
conn_t *lookup(engine_t *self, unsigned long long handle);
size_t release(engine_t *self, int fd);
void set_listeners(engine_t *self, uint32_t events);
void *engine_thread(void *arg);
int move_told(engine_t *self);

#endif
