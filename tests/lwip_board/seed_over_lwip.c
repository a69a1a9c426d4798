/* A virtual board for the tests: the Zephyr sample's echo loop (the seed: blocking, one client
 * at a time, 128-byte reads, recv() == -1 taken for data) over lwIP 2.1.3, a real embedded
 * TCP/IP stack (Debian's liblwip-dev), on a TAP device. The host side of the TAP is the peer
 * the tools run from (tests/test_board.py makes a network namespace for both and removes it).
 *
 * The TAP driver is our own: Debian's unix-port tapif corrupts the heap on any frame over ~590
 * bytes in this build (glibc's `#define TCP_MSS 512` from netinet/tcp.h replaces lwipopts'
 * 1460 in memp.c), so each frame is copied into a PBUF_RAM pbuf of its own size here.
 *
 *     seed_over_lwip TAP IP   (IP: the board's address, /24, e.g. 192.0.2.1)
 *
 * Prints "ready" once the stack is up, then the seed's lines; after a reset it prints
 * "error: recv: -1" once and spins, as the seed does: the board is wedged.
 */
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "lwip/etharp.h"
#include "lwip/init.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/sockets.h"
#include "lwip/tcpip.h"
#include "netif/ethernet.h"

#define FRAME 1536 /* an Ethernet frame (1514) and room */

static int tap = -1;
static struct netif board;

static err_t tap_output(struct netif *netif, struct pbuf *p) {
    unsigned char frame[FRAME];
    (void)netif;
    if (p->tot_len > sizeof frame) return ERR_BUF;
    u16_t n = pbuf_copy_partial(p, frame, p->tot_len, 0);
    return write(tap, frame, n) == (ssize_t)n ? ERR_OK : ERR_IF;
}

static err_t tap_init(struct netif *netif) {
    static const unsigned char mac[6] = {0x02, 0x00, 0x5e, 0x00, 0x02, 0x01};
    netif->name[0] = 't';
    netif->name[1] = 'p';
    netif->output = etharp_output;
    netif->linkoutput = tap_output;
    netif->mtu = 1500;
    netif->hwaddr_len = 6;
    memcpy(netif->hwaddr, mac, 6);
    netif->flags = NETIF_FLAG_BROADCAST | NETIF_FLAG_ETHARP | NETIF_FLAG_LINK_UP;
    return ERR_OK;
}

/* Each frame from the TAP, copied into a PBUF_RAM pbuf, handed to the stack's thread. */
static void *tap_reader(void *arg) {
    unsigned char frame[FRAME];
    (void)arg;
    for (;;) {
        ssize_t n = read(tap, frame, sizeof frame);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return NULL;
        }
        struct pbuf *p = pbuf_alloc(PBUF_RAW, (u16_t)n, PBUF_RAM);
        if (!p) continue;
        pbuf_take(p, frame, (u16_t)n);
        if (board.input(p, &board) != ERR_OK) pbuf_free(p);
    }
}

static int open_tap(const char *name) {
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR);
    if (fd < 0) return -1;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void serve(void) { /* the seed's loop, over lwIP's sockets */
    int server = lwip_socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = lwip_htons(4242);
    addr.sin_addr.s_addr = INADDR_ANY;
    if (server < 0 || lwip_bind(server, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        lwip_listen(server, 5) < 0) {
        printf("error: bind or listen: %d\n", errno);
        exit(1);
    }
    printf("Single-threaded TCP echo server waits for a connection on port 4242...\n");
    fflush(stdout);
    for (int counter = 1;; counter++) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int client = lwip_accept(server, (struct sockaddr *)&peer, &len);
        if (client < 0) {
            printf("error: accept: %d\n", errno);
            continue;
        }
        const unsigned char *a = (const unsigned char *)&peer.sin_addr;
        char who[32];
        snprintf(who, sizeof who, "%u.%u.%u.%u", a[0], a[1], a[2], a[3]);
        printf("Connection #%d from %s\n", counter, who);
        fflush(stdout);
        int told = 0;
        for (;;) {
            char buf[128];
            int n = lwip_recv(client, buf, sizeof buf, 0);
            if (n == 0) break;
            if (n < 0) { /* the seed takes -1 for data: it never gets back to accept() */
                if (!told++) {
                    printf("error: recv: -1 (wedged)\n");
                    fflush(stdout);
                }
                usleep(1000);
                continue;
            }
            for (int off = 0; off < n;) {
                int out = lwip_send(client, buf + off, (size_t)(n - off), 0);
                if (out < 0) break;
                off += out;
            }
        }
        lwip_close(client);
        printf("Connection from %s closed\n", who);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TAP IP\n", argv[0]);
        return 2;
    }
    tap = open_tap(argv[1]);
    if (tap < 0) {
        perror("tap");
        return 1;
    }
    ip4_addr_t ip, mask, gw;
    if (!ip4addr_aton(argv[2], &ip)) return 2;
    IP4_ADDR(&mask, 255, 255, 255, 0);
    ip4_addr_set_zero(&gw);
    tcpip_init(NULL, NULL);
    LOCK_TCPIP_CORE();
    netif_add(&board, &ip, &mask, &gw, NULL, tap_init, tcpip_input);
    netif_set_default(&board);
    netif_set_up(&board);
    netif_set_link_up(&board);
    UNLOCK_TCPIP_CORE();
    pthread_t reader;
    pthread_create(&reader, NULL, tap_reader, NULL);
    printf("ready\n");
    fflush(stdout);
    serve();
    return 0;
}
