/* Verifying load generator for echo servers (benchmarks only): epoll, one thread.
 *   loadgen pingpong HOST PORT CONNS SIZE SECONDS   closed loop, one message in flight per conn
 *   loadgen stream   HOST PORT CONNS SIZE SECONDS   continuous both ways, SIZE-byte writes
 *   loadgen churn    HOST PORT CONNS SIZE SECONDS   connect, echo SIZE bytes, close; CONNS slots
 *   loadgen udp      HOST PORT CONNS SIZE SECONDS   UDP ping-pong: CONNS sockets, one datagram
 *                                                   in flight each (resent after 200 ms)
 *   loadgen idle     HOST PORT CONNS 1    SECONDS   open CONNS, echo 1 byte each, print READY,
 *                                                   hold until stdin closes or SECONDS pass
 * Every byte that comes back is compared with what was sent. Prints one JSON object. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAT (1 << 20)          /* stream pattern period */
#define WINDOW (4 << 20)       /* stream bytes in flight at most */
#define HIST_US 1000000        /* latency histogram: 1 us buckets up to 1 s */
#define WARMUP 0.5

static uint64_t hist[HIST_US + 1];
static uint64_t total_requests, requests, bytes_back, errors, mismatches, max_us;
static unsigned char pat[2 * PAT];
static struct sockaddr_storage addr;
static socklen_t addrlen;

struct conn {
    int fd, state;             /* state: 0 connecting, 1 active, 2 done */
    uint64_t sent, got, seq;
    double t0;
    unsigned char msg[65536];
};

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void record(double seconds, int measuring) {
    total_requests++;
    if (!measuring) return;
    uint64_t us = (uint64_t)(seconds * 1e6);
    if (us > max_us) max_us = us;
    hist[us > HIST_US ? HIST_US : us]++;
    requests++;
}

static uint64_t pct(double p) {
    uint64_t total = 0, seen = 0;
    for (int i = 0; i <= HIST_US; i++) total += hist[i];
    if (!total) return 0;
    uint64_t want = (uint64_t)(p * total); if (want >= total) want = total - 1;
    for (int i = 0; i <= HIST_US; i++) { seen += hist[i]; if (seen > want) return i; }
    return HIST_US;
}

static int udp_mode;
static uint64_t lost;

static int open_conn(int ep, struct conn *c) {
    if (udp_mode) {
        c->fd = socket(addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        connect(c->fd, (void *)&addr, addrlen);
        c->state = 0; c->sent = c->got = 0;
        struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
        return 0;
    }
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (void *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        close(c->fd); c->fd = -1; errors++; return -1;
    }
    c->state = 0; c->sent = c->got = 0;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    return 0;
}

static void set_events(int ep, struct conn *c, uint32_t events) {
    struct epoll_event e = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void fill(struct conn *c, int size) {
    unsigned char seed = (unsigned char)(((uintptr_t)c >> 4) * 131 + c->seq * 7);
    for (int i = 0; i < size; i++) c->msg[i] = (unsigned char)(seed + i);
    c->seq++;
}

static int send_msg(struct conn *c, int size) {  /* small messages: finish partial writes */
    int off = 0;
    while (off < size) {
        ssize_t w = write(c->fd, c->msg + off, size - off);
        if (w > 0) { off += w; continue; }
        if (w < 0 && errno == EAGAIN) { struct pollfd p = {c->fd, POLLOUT, 0}; poll(&p, 1, 1000); continue; }
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) { fprintf(stderr, "usage: loadgen MODE HOST PORT CONNS SIZE SECONDS\n"); return 2; }
    const char *mode = argv[1];
    int nconn = atoi(argv[4]), size = atoi(argv[5]);
    double seconds = atof(argv[6]);
    if (size < 1 || size > 65536) { fprintf(stderr, "SIZE must be 1..65536\n"); return 2; }
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(argv[2], argv[3], &hints, &ai)) { fprintf(stderr, "bad address\n"); return 2; }
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen); addrlen = ai->ai_addrlen;
    for (int i = 0; i < 2 * PAT; i++) pat[i] = (unsigned char)((i % PAT) * 2654435761u >> 13);

    int stream = !strcmp(mode, "stream"), churn = !strcmp(mode, "churn"), idle = !strcmp(mode, "idle");
    udp_mode = !strcmp(mode, "udp");
    int ep = epoll_create1(0);
    struct conn *cs = calloc(nconn, sizeof *cs);
    static unsigned char buf[1 << 18];
    double start = now(), measure_from = start + (idle ? 0 : WARMUP), end = measure_from + seconds;
    double connected_at = 0;
    int measuring = idle, inflight_connects = 0, next_idle = 0, ready = 0, done_idle = 0;
    uint64_t churned = 0;
    int max_connecting = idle ? 256 : nconn;
    for (int i = 0; i < nconn && i < max_connecting; i++) { open_conn(ep, &cs[i]); inflight_connects++; next_idle++; }

    struct epoll_event evs[512];
    for (;;) {
        double t = now();
        if (!measuring && t >= measure_from) { measuring = 1; memset(hist, 0, sizeof hist); requests = bytes_back = 0; max_us = 0; churned = 0; }
        if (!idle && t >= end) break;
        if (idle && ready && t >= start + seconds + 30) break;
        if (idle && done_idle == nconn && !ready) {
            connected_at = t - start; ready = 1;
            printf("READY %d %.3f\n", done_idle, connected_at); fflush(stdout);
            struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
            epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e);
        }
        if (idle && !ready && t > start + 60) { errors += nconn - done_idle; break; }
        if (udp_mode) {
            static double last_check;
            if (t - last_check > 0.05) {
                last_check = t;
                for (int k = 0; k < nconn; k++)
                    if (cs[k].state == 1 && t - cs[k].t0 > 0.2) {   /* lost: send anew */
                        lost++; cs[k].got = 0; cs[k].t0 = t;
                        if (write(cs[k].fd, cs[k].msg, size) != size) errors++;
                    }
            }
        }
        int n = epoll_wait(ep, evs, 512, udp_mode ? 20 : 100);
        int stop = 0;
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) { stop = 1; break; }   /* stdin closed or readable: end the hold */
            if (c->state == 0) {
                int err = 0; socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) { errors++; close(c->fd); c->state = 2; if (idle) { done_idle++; } continue; }
                c->state = 1; c->t0 = now();
                if (idle) {
                    inflight_connects--;
                    c->msg[0] = 'x'; if (write(c->fd, c->msg, 1) != 1) errors++;
                    set_events(ep, c, EPOLLIN);
                    if (next_idle < nconn) { open_conn(ep, &cs[next_idle++]); inflight_connects++; }
                } else if (stream) {
                    set_events(ep, c, EPOLLIN | EPOLLOUT);
                } else {
                    fill(c, size); if (send_msg(c, size)) errors++;
                    set_events(ep, c, EPOLLIN);
                }
                continue;
            }
            if (stream && (evs[i].events & EPOLLOUT)) {
                for (int k = 0; k < 16 && c->sent - c->got < WINDOW; k++) {
                    ssize_t w = write(c->fd, pat + c->sent % PAT, size);
                    if (w <= 0) break;
                    c->sent += w;
                }
                set_events(ep, c, c->sent - c->got < WINDOW ? EPOLLIN | EPOLLOUT : EPOLLIN);
            }
            if (!(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            ssize_t r = read(c->fd, buf, sizeof buf);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                errors++; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); c->state = 2;
                continue;
            }
            if (stream) {
                if (memcmp(buf, pat + c->got % PAT, r)) mismatches++;
                c->got += r; if (measuring) bytes_back += r;
                if (c->sent - c->got < WINDOW) set_events(ep, c, EPOLLIN | EPOLLOUT);
                continue;
            }
            if (idle) {
                if (r != 1 || buf[0] != 'x') mismatches++;
                done_idle++;
                continue;
            }
            if (udp_mode && (r != size || memcmp(buf, c->msg, r))) continue;  /* a late reply */
            if (c->got + r > (uint64_t)size || memcmp(buf, c->msg + c->got, r)) mismatches++;
            c->got += r;
            if (c->got < (uint64_t)size) continue;
            double t1 = now();
            record(t1 - c->t0, measuring);
            if (measuring) bytes_back += size;
            c->got = 0;
            if (churn) {
                close(c->fd); if (measuring) churned++;
                open_conn(ep, c);
            } else {
                c->t0 = t1; fill(c, size);
                if (send_msg(c, size)) errors++;
            }
        }
        if (stop) break;
    }
    double elapsed = idle ? connected_at : now() - measure_from;
    if (elapsed <= 0) elapsed = 1e-9;
    printf("{\"mode\":\"%s\",\"connections\":%d,\"size\":%d,\"seconds\":%.3f,\"requests\":%llu,"
           "\"requests_per_second\":%.1f,\"megabytes_per_second\":%.2f,\"connections_per_second\":%.1f,"
           "\"p50_us\":%llu,\"p90_us\":%llu,\"p99_us\":%llu,\"p999_us\":%llu,\"max_us\":%llu,"
           "\"errors\":%llu,\"mismatches\":%llu,\"established\":%d,\"total_requests\":%llu,\"lost\":%llu}\n",
           mode, nconn, size, elapsed, (unsigned long long)requests, requests / elapsed,
           bytes_back / elapsed / 1e6, churned / elapsed,
           (unsigned long long)pct(.5), (unsigned long long)pct(.9), (unsigned long long)pct(.99),
           (unsigned long long)pct(.999), (unsigned long long)max_us,
           (unsigned long long)errors, (unsigned long long)mismatches, done_idle,
           (unsigned long long)total_requests, (unsigned long long)lost);
    return mismatches || errors ? 1 : 0;
}
