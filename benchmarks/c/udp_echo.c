/* Reference UDP echo for benchmarks: recvfrom() then sendto() back, on a blocking socket.
 * Usage: udp_echo PORT   (binds 127.0.0.1; prints "listening on PORT") */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(argc > 1 ? atoi(argv[1]) : 0)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (void *)&a, sizeof a)) { perror("bind"); return 1; }
    socklen_t al = sizeof a; getsockname(s, (void *)&a, &al);
    printf("listening on %d\n", ntohs(a.sin_port)); fflush(stdout);
    static char buf[65536];
    for (;;) {
        struct sockaddr_storage peer; socklen_t pl = sizeof peer;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (void *)&peer, &pl);
        if (n >= 0) sendto(s, buf, n, 0, (void *)&peer, pl);
    }
}
