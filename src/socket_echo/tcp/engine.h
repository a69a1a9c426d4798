/* The native TCP engine (engine.c): pure C, no Python.h, so that "no Python call in the
 * engine's thread" is a fact of the build. tcp/_native.c is the CPython binding: it parses
 * arguments, calls the se_ functions below and builds Python objects from what they return;
 * every piece of engine work (set-up, listeners, admission, the idle/stall sweep, close and
 * abort, the scans, teardown) is here. As libuv's uv_ (public) and uv__ (internal) names:
 * se_ is this header, everything else in engine.c is static.
 *
 * Locking: every se_ function that a Python-side caller uses takes the engine's mutex
 * itself. The binding reads only what the thread never writes: notify_fd, nbounds, and
 * ``told`` (the GIL holder's side). */
#ifndef SOCKET_ECHO_TCP_ENGINE_H
#define SOCKET_ECHO_TCP_ENGINE_H

#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
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
#define MAX_BOUNDS 16
#define LISTENER_MARK (UINT64_C(1) << 63)
#define WAKE_MARK (UINT64_C(1) << 62)

enum { FREE = 0, OPEN = 1, CLOSING = 2, FIN_SENT = 3 };
enum { EV_OPENED = 1, EV_CLOSED = 2, EV_PAUSED = 3, EV_GONE = 4, EV_REFUSED = 5 };
/* Why a connection closed: lifecycle.py's PEER_CLOSED, RESET, ERROR, IDLE, STALLED. */
enum { R_PEER_CLOSED = 0, R_RESET = 1, R_ERROR = 2, R_IDLE = 3, R_STALLED = 4, R_COUNT = 5 };

/* The open-connection count every path of a process admits against (limits.OpenCount is its
 * Python twin, used where the extension is not): the engine's thread takes a slot in
 * accept, the Python paths (TLS, PROXY, impairments) through the binding's Count, so the cap
 * is one atomic number and no path tells another of its changes. ``extra`` is descriptors
 * held beyond one per connection (a spliced connection's pipe: two). */
typedef struct {
    atomic_long open;
    atomic_long extra;
} se_count_t;

enum { SE_ADMITTED = 0, SE_OVER_CAP = 1, SE_OVER_BUDGET = 2 };

int se_count_take(se_count_t *count, long max_connections, long fd_budget);
void se_count_give(se_count_t *count);
long se_count_open(se_count_t *count);

typedef struct {
    uint8_t state;
    uint8_t unlisted;    /* Python has no object for it (and hears of its close only as a sum) */
    uint8_t idle_closed; /* the sweep closed it: its close is R_IDLE whatever ends it */
    uint8_t spliced;     /* bulk: bytes go socket -> pipe -> socket, never through user space */
    uint16_t tag;
    uint32_t gen;
    double opened_at;    /* CLOCK_MONOTONIC seconds, as the event loop's time() */
    double active_since; /* the sweep: when ``seen`` last moved */
    uint64_t seen;       /* the sweep: activity when it last looked */
    int pipe_r, pipe_w;
    size_t piped; /* echo bytes in the pipe, not yet sent: held, as `pending` is */
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

typedef struct {
    ssize_t count, closed[R_COUNT]; /* by R_* reason */
    unsigned long long bytes_in, bytes_out;
    ssize_t buckets[MAX_BOUNDS + 1];
    double duration_sum;
} closed_sums_t;

/* What was told, moved out of the engine under its mutex (se_take) and made into Python
 * objects after unlocking it (libuv's uv__work_done moves its queue the same way): the
 * thread never waits while Python builds lists, raises or collects garbage. Only the GIL
 * holder touches it; what could not be built (a MemoryError) stays for the next take. */
typedef struct {
    event_t *queue;
    size_t queued, cap;
    closed_sums_t gone[MAX_LISTENERS];
    ssize_t refused_cap, refused_budget;
} reported_t;

/* A connection listed by se_take_all, copied out under the mutex. */
typedef struct {
    unsigned long long handle;
    int tag;
    double opened_at;
} listed_t;

/* The open unlisted connections of one listener, summed by se_unlisted_sums. */
typedef struct {
    ssize_t count;
    unsigned long long bytes_in, bytes_out;
} open_sums_t;

/* One connection as se_counters reads it; zeros once it is gone. */
typedef struct {
    uint64_t bytes_in, held, activity;
} se_counters_t;

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
    /* Admission: the process's one count (se_set_table), against the table's two limits. */
    se_count_t *count;
    se_count_t own_count; /* until se_set_table gives the shared one */
    long fd_budget, max_connections;
    ssize_t unlisted;
    ssize_t refused_cap, refused_budget;
    int lazy; /* no per-connection log lines: no EV_OPENED, connections start unlisted */
    /* Connections that closed unlisted, summed per listener tag until Python takes them
     * (limits.ConnectionTable.count_gone). Durations in the buckets Python gave
     * (limits.DURATION_BUCKETS). */
    closed_sums_t gone[MAX_LISTENERS];
    double untold_since; /* when the oldest untold sum or refusal began; 0: none */
    double bounds[MAX_BOUNDS];
    int nbounds;
    /* The idle/stall sweep (limits.ConnectionTable.sweep's rule for these connections):
     * every ``sweep_every`` s in the thread (0: only when se_sweep is called). */
    double idle_timeout, sweep_every, next_sweep;
    int nlisteners;
    int accepting;
    int paused;          /* accept met EMFILE (or kin): listeners off until ``paused_until`` */
    double paused_until; /* or until one of its connections closes, whichever comes first */
    double retry_after;  /* config.ACCEPT_RETRY_DELAY */
    int want_peers;
    uint32_t next_gen;
    reported_t told; /* Python's side (the binding, holding the GIL): no lock */
} engine_t;

double se_monotonic(void);
unsigned long long se_handle_of(int fd, uint32_t gen);

/* Life: 0 or an errno. se_stop joins the thread (release the GIL around it); se_destroy
 * stops, closes every connection and frees everything. */
void se_preinit(engine_t *self);
int se_init(engine_t *self, size_t read_size, int want_peers);
int se_start(engine_t *self);
void se_stop(engine_t *self);
void se_close_all(engine_t *self);
void se_destroy(engine_t *self);
int se_is_open(engine_t *self);

/* The table's limits, the duration buckets and the sweep; ``count`` outlives the engine. */
void se_set_table(engine_t *self, se_count_t *count, long fd_budget, long max_connections,
                  const double *bounds, int nbounds, double idle_timeout, double sweep_every,
                  double retry_after);

/* Listeners: 0 or an errno (EINVAL: too many). */
int se_add_listener(engine_t *self, int fd, int tag);
void se_stop_accepting(engine_t *self);

/* One connection, by handle: se_close 1 if it was open (now closing), se_abort 1 and what it
 * had if it was there (reset now), se_counters 1 if it is there. */
int se_close(engine_t *self, unsigned long long handle);
int se_abort(engine_t *self, unsigned long long handle, uint64_t *bytes_in, size_t *unsent);
int se_counters(engine_t *self, unsigned long long handle, se_counters_t *out);

/* One look of the sweep at ``now`` (CLOCK_MONOTONIC seconds): the thread's own, or a test's
 * with a clock of its choosing. */
void se_sweep(engine_t *self, double now);

/* What was told, into self->told: 0 or the engine's failure (an errno). se_take_all also
 * lists every unlisted connection (malloc'd into *out, Python makes their objects; on failure
 * se_relist makes them unlisted again); se_unlisted_sums sums them per listener tag,
 * leaving them unlisted. */
int se_take(engine_t *self);
int se_take_all(engine_t *self, listed_t **out, size_t *n);
void se_relist(engine_t *self, const listed_t *listed, size_t n);
int se_unlisted_sums(engine_t *self, open_sums_t sums[MAX_LISTENERS]);

#endif
