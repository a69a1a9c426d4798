/* Reference echo server for benchmarks: plain epoll, read() then write() back.
 * Level-triggered; a connection whose echo cannot be written completely keeps the rest
 * and stops reading until EPOLLOUT drains it (the same flow control as socket-echo).
 * Usage: echo_epoll PORT        (binds 127.0.0.1; prints "listening on PORT") */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (64 * 1024)

struct conn { int fd; size_t off, len; char *pending; };

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 4096)) { perror("bind/listen"); return 1; }
    socklen_t al = sizeof a; getsockname(ls, (void *)&a, &al);
    printf("listening on %d\n", ntohs(a.sin_port)); fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[BUF];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c); c->fd = fd;
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                continue;
            }
            if (c->pending) {  /* drain what could not be written before */
                ssize_t w = write(c->fd, c->pending + c->off, c->len - c->off);
                if (w > 0) c->off += w;
                if (w < 0 && errno != EAGAIN) goto close_it;
                if (c->off < c->len) continue;
                free(c->pending); c->pending = NULL;
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                continue;
            }
            ssize_t r = read(c->fd, buf, BUF);
            if (r == 0 || (r < 0 && errno != EAGAIN)) goto close_it;
            if (r < 0) continue;
            ssize_t w = write(c->fd, buf, r);
            if (w < 0) { if (errno != EAGAIN) goto close_it; w = 0; }
            if (w < r) {
                c->len = r - w; c->off = 0; c->pending = malloc(c->len);
                memcpy(c->pending, buf + w, c->len);
                struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
            }
            continue;
        close_it:
            close(c->fd); free(c->pending); free(c);
        }
    }
}
