/* Reference TLS echo server for benchmarks: echo_epoll.c with OpenSSL on the same loop.
 * Non-blocking, level-triggered: each connection's handshake (SSL_accept) and echo (SSL_read
 * then SSL_write back) go on as epoll says; what SSL_write cannot take now is kept and reading
 * stops until EPOLLOUT drains it (the same flow control as echo_epoll and socket-echo). TLS 1.2
 * and 1.3 with OpenSSL's defaults; session tickets on (resumption), as Python's ssl server.
 * Usage: echo_tls PORT CERT KEY   (binds 127.0.0.1; prints "listening on PORT")
 * Build: cc -O2 -o echo_tls echo_tls.c -lssl -lcrypto */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (64 * 1024)

struct conn { int fd, ready; SSL *ssl; size_t off, len; char *pending; };

static void watch(int ep, struct conn *c, unsigned events) {
    struct epoll_event e = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void drop(struct conn *c) {
    SSL_free(c->ssl); close(c->fd); free(c->pending); free(c);
    ERR_clear_error();
}

/* Write what is pending; 1 when all of it went, 0 when it waits for EPOLLOUT, -1 on error. */
static int flush(int ep, struct conn *c) {
    while (c->off < c->len) {
        int w = SSL_write(c->ssl, c->pending + c->off, (int)(c->len - c->off));
        if (w > 0) { c->off += (size_t)w; continue; }
        int e = SSL_get_error(c->ssl, w);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) { watch(ep, c, EPOLLOUT); return 0; }
        return -1;
    }
    free(c->pending); c->pending = NULL; c->off = c->len = 0;
    watch(ep, c, EPOLLIN);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: echo_tls PORT CERT KEY\n"); return 2; }
    int port = atoi(argv[1]);
    signal(SIGPIPE, SIG_IGN); /* SSL_write has no MSG_NOSIGNAL: a peer gone is an error, not death */
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1) {
        ERR_print_errors_fp(stderr); return 1;
    }
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
                    c->ssl = SSL_new(ctx); SSL_set_fd(c->ssl, fd); SSL_set_accept_state(c->ssl);
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                continue;
            }
            if (!c->ready) {  /* the handshake, as far as it goes now */
                int r = SSL_accept(c->ssl);
                if (r == 1) { c->ready = 1; watch(ep, c, EPOLLIN); }
                else {
                    int e = SSL_get_error(c->ssl, r);
                    if (e == SSL_ERROR_WANT_READ) watch(ep, c, EPOLLIN);
                    else if (e == SSL_ERROR_WANT_WRITE) watch(ep, c, EPOLLOUT);
                    else drop(c);
                    continue;
                }
            }
            if (c->pending) {
                if (flush(ep, c) < 0) drop(c);
                continue;
            }
            for (;;) {  /* read what is there (whole records), echo each piece */
                int r = SSL_read(c->ssl, buf, BUF);
                if (r <= 0) {
                    int e = SSL_get_error(c->ssl, r);
                    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) drop(c);
                    break;
                }
                c->pending = malloc((size_t)r); memcpy(c->pending, buf, (size_t)r);
                c->len = (size_t)r; c->off = 0;
                int f = flush(ep, c);
                if (f < 0) { drop(c); break; }
                if (f == 0) break;  /* the rest waits for EPOLLOUT; reading stops meanwhile */
            }
        }
    }
}
